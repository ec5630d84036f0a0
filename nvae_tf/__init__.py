"""nvae_tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow 2 / Keras 3.

TensorFlow's own C++ log lines (start-up banners, graph compiler notes) are hidden unless the user sets
TF_CPP_MIN_LOG_LEVEL or a command runs with --verbose. `choose_cpu_kernels`: oneDNN's kernels or not, per
command and model.
"""

import os as _os
import platform as _platform
import sys as _sys

__version__ = "0.1.0"

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if "--verbose" in _sys.argv[1:] else "2")

try:
    _level = int(_os.environ["TF_CPP_MIN_LOG_LEVEL"])
except ValueError:
    _level = 0
from nvae_tf import _quiet  # noqa: E402

_quiet.install(_level)

_ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
# Activation elements of one encoder convolution per step (batch x pixels x encoder channels) from which oneDNN's
# kernels are chosen: on an AVX2 CPU they made the step of CIFAR-10 at batch 4 (524,288) 1.3x and of MNIST at
# batch 32 (1,048,576) 1.5x faster, digits at batch 32 (131,072) neither, 8x8 digits at batch 32 (32,768) 1.5x
# slower.
ONEDNN_MIN_ELEMENTS = 2 ** 18


def choose_cpu_kernels(config, deterministic=False):
    """Before a command imports TensorFlow: whether its CPU ops run on oneDNN's kernels.

    TensorFlow uses oneDNN by default only on CPUs with AVX-512 or AMX. On x86-64, unless the user set
    TF_ENABLE_ONEDNN_OPTS (which always wins) or TensorFlow is imported already: a `deterministic` run goes
    without them (on an AVX2 CPU they differ from run to run), a model whose encoder convolutions have at least
    `ONEDNN_MIN_ELEMENTS` activation elements per step gets them, a smaller one TensorFlow's default. Returns a
    warning for the user, else None: when TF_ENABLE_ONEDNN_OPTS holds a value TensorFlow does not read (it then
    falls back to its default without a word at the default log level), or a deterministic run was asked for
    oneDNN's kernels."""
    value = _os.environ.get(_ONEDNN)
    if value is not None:
        word = value.strip().lower()
        if word not in ("0", "1", "true", "false"):  # what TensorFlow reads; anything else it ignores
            return (f"TF_ENABLE_ONEDNN_OPTS={value!r} is not one of 0, 1, true, false: TensorFlow ignores it "
                    "and uses its default kernels")
        if deterministic and word in ("1", "true"):
            return (f"--deterministic: TF_ENABLE_ONEDNN_OPTS={value}: oneDNN's kernels may differ from run to run "
                    "on this CPU; set it to 0 for results that repeat bit for bit")
        return None
    if "tensorflow" in _sys.modules or _platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    height, width = config.image_shape[:2]
    if deterministic:
        _os.environ[_ONEDNN] = "0"
    elif config.batch_size * height * width * config.num_channels_enc >= ONEDNN_MIN_ELEMENTS:
        _os.environ[_ONEDNN] = "1"
    return None
