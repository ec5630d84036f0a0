"""nvae_tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow 2 / Keras 3.

TensorFlow's own C++ log lines (start-up banners, graph compiler notes) are hidden unless the user sets
TF_CPP_MIN_LOG_LEVEL or a command runs with --verbose.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if "--verbose" in _sys.argv[1:] else "2")

try:
    _level = int(_os.environ["TF_CPP_MIN_LOG_LEVEL"])
except ValueError:
    _level = 0
from nvae_tf import _quiet  # noqa: E402

_quiet.install(_level)
