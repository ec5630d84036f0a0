"""The faults a user can cause or meet, each with a message that says what is wrong and what to do.

Every command prints such an error as one `error: ...` line and exits with status 2 (3 for a training run
that cannot go on, `TrainingError`); nothing else reaches the user as a traceback.
"""


import re


class RunError(ValueError):
    """A flag, a run directory, a checkpoint or data that cannot be used; the message says why."""


class ConfigError(RunError):
    """An invalid flag or configuration value; the message starts with the flag at fault."""

    def __init__(self, flag, message):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


class TrainingError(RunError):
    """Training cannot go on; the message says why and what was kept."""


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (disk full, no permission); the previous checkpoints are intact."""


def os_reason(error):
    """The operating system's words in a failed write ("No space left on device"), without TensorFlow's
    function names and temporary file names."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
    return re.sub(r"\s*\[Op:\w+\]$", "", text.rsplit("; ", 1)[-1])[:200]
