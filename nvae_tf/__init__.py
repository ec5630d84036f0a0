"""nvae_tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow 2 / Keras 3.

TensorFlow's own C++ log lines (start-up banners, graph compiler notes) are hidden unless the user sets
TF_CPP_MIN_LOG_LEVEL or a command runs with --verbose.

On x86-64, TensorFlow's oneDNN kernels are switched on (TF_ENABLE_ONEDNN_OPTS=1) unless the user set the variable:
TensorFlow uses them by default only on CPUs with AVX-512 or AMX, and on an AVX2 CPU they made the training
steps of the MNIST and CIFAR-10 configs a quarter to a third faster. It takes effect when nvae_tf is imported
before TensorFlow, as every command does. Those kernels are not reproducible from one run to the next on every
CPU (on an AVX2 CPU two `--deterministic` runs differed after 20 steps), so a deterministic run goes without them
(`reproducible_kernels`).
"""

import os as _os
import platform as _platform
import sys as _sys

__version__ = "0.1.0"

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if "--verbose" in _sys.argv[1:] else "2")
_ONEDNN = "TF_ENABLE_ONEDNN_OPTS"
_onednn_chosen_here = (_ONEDNN not in _os.environ and "tensorflow" not in _sys.modules
                       and _platform.machine().lower() in ("x86_64", "amd64"))
if _onednn_chosen_here:
    _os.environ[_ONEDNN] = "1"

try:
    _level = int(_os.environ["TF_CPP_MIN_LOG_LEVEL"])
except ValueError:
    _level = 0
from nvae_tf import _quiet  # noqa: E402

_quiet.install(_level)


def reproducible_kernels():
    """Before TensorFlow is imported: no oneDNN kernels unless the user asked for them by TF_ENABLE_ONEDNN_OPTS.

    Returns None when that is done (or TensorFlow decides by itself), else a sentence saying why results may
    still differ from run to run."""
    value = _os.environ.get(_ONEDNN, "")
    if value.strip().lower() in ("0", "false", "off", "no"):
        return None
    if _onednn_chosen_here and "tensorflow" not in _sys.modules:
        _os.environ[_ONEDNN] = "0"
        return None
    if _onednn_chosen_here:
        return ("TensorFlow was imported before this run started, with oneDNN's kernels on, which may differ from run to "
                "run on this CPU; set TF_ENABLE_ONEDNN_OPTS=0 for results that repeat bit for bit")
    return None if not value else (f"TF_ENABLE_ONEDNN_OPTS={value}: oneDNN's kernels may differ from run to run "
                                   "on this CPU; set it to 0 for results that repeat bit for bit")
