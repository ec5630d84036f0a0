"""TensorFlow's C++ start-up lines that TF_CPP_MIN_LOG_LEVEL does not reach.

TensorFlow writes some log lines while it loads, before its logging reads TF_CPP_MIN_LOG_LEVEL: on CPUs with
AVX-512 or AMX, "oneDNN custom operations are on ..." twice, each after absl's "All log messages before
absl::InitializeLog() is called are written to STDERR". `install(level)` holds back the stderr file descriptor
while `tensorflow` is first imported and then writes out every line except those below `level` (the
TF_CPP_MIN_LOG_LEVEL scale: 1 drops INFO lines, 2 also WARNING, 3 also ERROR); anything else printed meanwhile,
a Python warning or traceback among them, is passed on unchanged. Imports nothing heavy.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys

ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# absl's line prefix: severity letter, MMDD, time (before its logging starts: seconds since 1970), thread id,
# file:line]
_HEADER = re.compile(r"^([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
_RANK = {"I": 0, "W": 1, "E": 2, "F": 3}


def dropped(line, level):
    """Whether a line of TensorFlow's start-up output is one `level` hides."""
    if level < 1:
        return False
    if line.rstrip("\r\n") == ABSL_NOTICE:
        return True
    match = _HEADER.match(line)
    return bool(match) and _RANK[match.group(1)] < level


@contextlib.contextmanager
def held_back_stderr(level):
    """Within: the stderr file descriptor goes to a temporary file; after: its lines that `level` keeps."""
    import tempfile
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", "replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not dropped(line, level))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _Loader(importlib.abc.Loader):
    def __init__(self, loader, level):
        self._loader, self._level = loader, level

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with held_back_stderr(self._level):
            self._loader.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, level):
        self.level = level

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; the real finders give the spec
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self.level)
        return spec


def install(level):
    """Quiet TensorFlow's first import at `level`; nothing if it is imported already or `level` < 1."""
    if level >= 1 and "tensorflow" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder(level))
