"""A run directory as training leaves it: `config.json`, `checkpoints/ckpt-<step>`, TensorBoard logs.

`evaluate`, `sample` and `export` start from a run directory alone: `load_model(model_dir)` reads the saved
config, builds the model and restores its weights (every model variable: BN statistics included) from the
newest intact checkpoint or a chosen one.

A damaged checkpoint (index missing, data file missing or truncated, or one that fails to restore) is named
in a warning and the next older intact one is used; a checkpoint that holds a non-finite value is refused.
`training_lock` keeps a second training run out of a directory that a live run holds.
"""

import datetime
import glob
import json
import os
import re
import shutil
import socket

from absl import logging

from nvae_tf import config as config_lib
from nvae_tf.errors import ConfigError, RunError

_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d+)(?:\.index|\.data-\d+-of-(\d+))$")
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int8": 1, "uint8": 1, "int16": 2,
                "uint16": 2, "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "bool": 1}
LOCK_FILE = ".train.lock"
DAMAGED_DIR = "damaged"


# ------------------------------------------------------------------------------------------------ writing
def check_model_dir(model_dir):
    """`ConfigError` unless `model_dir` is a directory or can be created as one (no file in the way)."""
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ConfigError("model_dir", f"{model_dir} is a file, not a directory")
    parent = model_dir
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip(os.sep))
    if parent and not os.path.isdir(parent):
        raise ConfigError("model_dir", f"{model_dir} cannot be created: {parent} is a file")


def open_for_training(model_dir):
    """Create `model_dir` and take its training lock (`TrainingLock`); `ConfigError` if it cannot be written,
    `RunLockedError` if a live run holds it."""
    check_model_dir(model_dir)
    try:
        os.makedirs(model_dir, exist_ok=True)
        lock = TrainingLock(model_dir).acquire()
    except OSError as e:
        raise ConfigError("model_dir", f"cannot write to {model_dir}: {e.strerror or e}") from None
    if lock.previous:
        logging.warning("took over the lock of %s left by a run that has ended (PID %s on host %s, started %s)",
                        model_dir, lock.previous.get("pid"), lock.previous.get("host"),
                        lock.previous.get("started"))
    return lock


class FolderSnapshot:
    """What `folder` holds now (its top-level entries, or that it is absent). `undo()` removes whatever was added
    since, and the folder itself if it was absent; as a context manager it undoes on an exception. So a download
    or a run that fails leaves the user's folder as it found it."""

    def __init__(self, folder):
        self.folder = folder
        self.existed = os.path.isdir(folder)
        self.before = set(os.listdir(folder)) if self.existed else set()

    def undo(self):
        if not self.existed:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        for name in set(os.listdir(self.folder)) - self.before if os.path.isdir(self.folder) else ():
            path = os.path.join(self.folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)

    def __enter__(self):
        return self

    def __exit__(self, kind, _value, _tb):
        if kind is not None:
            self.undo()
        return False


def write_config(model_dir, config, write=True):
    """Save `config` as `model_dir/config.json` (`write`: the chief only), or, when the directory already holds a
    run, check that the structural fields agree (`ConfigError` otherwise) and warn about the changed others."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "config.json")
    if os.path.exists(path):
        try:
            saved = read_config(path)
        except RunError as e:
            raise ConfigError("model_dir", f"{e}; use another --model_dir, or move the file away to start a new "
                              f"run there") from None
        for name in config_lib.structural_fields():
            if getattr(saved, name) != getattr(config, name):
                raise ConfigError(
                    name, f"{model_dir} holds a run with {name}={getattr(saved, name)!r}, but this run asks for "
                    f"{getattr(config, name)!r}; that changes the model, so it cannot resume. Use another "
                    f"--model_dir, or the saved value.")
        old, new = saved.to_dict(), config.to_dict()
        changed = [f for f, v in new.items() if old[f] != v]
        if changed:
            logging.warning("resuming with changed settings: %s",
                            ", ".join(f"{f} {old[f]!r} -> {new[f]!r}" for f in changed))
    if write:
        config.save(path + ".tmp")
        os.replace(path + ".tmp", path)


def save_model(model_dir, model, step=0):
    """Write a run directory holding `model` at `step` as `evaluate`, `sample` and `export` read it: the config
    and a checkpoint of every model variable (no optimiser state). Returns the checkpoint prefix."""
    import tensorflow as tf
    write_config(model_dir, model.config)
    checkpoint = tf.train.Checkpoint(model_variables=model_variables(model))
    manager = tf.train.CheckpointManager(checkpoint, checkpoint_dir(model_dir), max_to_keep=None)
    return manager.save(checkpoint_number=step)


DATA_FILE = "data.json"


def record_data_dir(model_dir, data_dir):
    """Remember in the run directory where its data is (`data.json`), so that `evaluate` and `sample` find it
    without `--data_dir`. An empty `data_dir` (the dataset's default place) is recorded as such."""
    write_json(os.path.join(model_dir, DATA_FILE), {"data_dir": os.path.abspath(os.path.expanduser(data_dir))
                                                    if data_dir else ""})


def data_dir_of(model_dir, data_dir=""):
    """`data_dir` if given, else the one the run recorded (`record_data_dir`), else "" (the dataset's default)."""
    if data_dir:
        return data_dir
    path = os.path.join(model_dir, DATA_FILE)
    try:
        with open(path) as f:
            recorded = json.load(f).get("data_dir", "")
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, AttributeError) as e:
        raise RunError(f"{path} is damaged ({first_line(e)}); give --data_dir, or delete the file") from None
    if not isinstance(recorded, str):
        raise RunError(f"{path} is damaged (data_dir is not a path); give --data_dir, or delete the file")
    if recorded:
        logging.info("reading the data from %s, where the run trained (--data_dir to read another)", recorded)
    return recorded


def write_json(path, value):
    """Write `value` as JSON to `path` through a temporary file, so a reader never sees half of it."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------------------------ reading
def checkpoint_dir(model_dir):
    return os.path.join(model_dir, "checkpoints")


def model_variables(model):
    """Every model variable by its path: the form in which training checkpoints store the model."""
    return {v.path: v for v in model.variables}


def load_config(model_dir):
    if not model_dir:
        raise RunError("--model_dir is required")
    if not os.path.isdir(model_dir):
        raise RunError(f"--model_dir: {model_dir} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise RunError(f"--model_dir: {model_dir} has no config.json; is it a directory written by "
                       f"`python -m nvae_tf.train`?")
    return read_config(path)


def read_config(path):
    """The `NVAEConfig` saved at `path`; `RunError` naming the file if it is not one."""
    try:
        return config_lib.NVAEConfig.load(path)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise RunError(f"{path} is not a valid nvae_tf config: {reason}") from e


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_step(path):
    tail = os.path.basename(path).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def list_checkpoints(directory):
    """Every checkpoint prefix in `directory` that has an index or a data file, newest (highest step) first.

    Found from the files themselves, so a checkpoint missing from TensorFlow's `checkpoint` state file (or a
    state file that is missing or unreadable) does not hide the others."""
    steps = set()
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        match = _CHECKPOINT_NAME.match(name)
        if match:
            steps.add(int(match.group(1)))
    return [os.path.join(directory, f"ckpt-{s}") for s in sorted(steps, reverse=True)]


def checkpoint_problem(prefix):
    """None if the checkpoint at `prefix` looks intact, else what is wrong with it (one phrase naming the file).

    Reads the index only: the data files must exist and hold at least the bytes of every numeric tensor the
    index lists, which catches a missing index, a missing data file and a truncated data file."""
    import tensorflow as tf
    index = prefix + ".index"
    if not os.path.exists(index):
        return f"its index file {os.path.basename(index)} is missing"
    data = sorted(glob.glob(glob.escape(prefix) + ".data-*-of-*"))
    if not data:
        return f"its data file {os.path.basename(prefix)}.data-00000-of-00001 is missing"
    shards = int(data[0].rsplit("-of-", 1)[1])
    if len(data) != shards:
        return f"it has {len(data)} of its {shards} data files"
    try:
        reader = tf.train.load_checkpoint(prefix)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    except Exception as e:  # noqa: BLE001 - any failure to parse the index means it is damaged
        return f"its index file {os.path.basename(index)} cannot be read ({first_line(e)})"
    expected = 0
    for name, shape in shapes.items():
        size = _DTYPE_BYTES.get(dtypes[name].name, 0)
        count = 1
        for d in shape:
            count *= d
        expected += size * count
    present = sum(os.path.getsize(p) for p in data)
    if present < expected:
        return (f"its data file {os.path.basename(data[0])} is truncated ({present:,} bytes, the index lists "
                f"{expected:,})")
    return None


def first_line(error):
    """The first line of an error's message (at most 300 characters), or its type's name."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def find_checkpoint(model_dir, checkpoint=None):
    """The checkpoint prefix to restore: `checkpoint` (a prefix, or a step number of this run), or the newest
    intact one. A damaged newer checkpoint is named in a warning; `RunError` if none can be used."""
    return _candidates(model_dir, checkpoint)[0]


def _candidates(model_dir, checkpoint=None):
    """The checkpoints to try in order: `[checkpoint]` if one is chosen, else every intact one, newest first."""
    directory = checkpoint_dir(model_dir)
    found = list_checkpoints(directory)
    if checkpoint:
        path = str(checkpoint)
        if path.isdigit():
            path = os.path.join(directory, f"ckpt-{int(path)}")
        if not os.path.exists(path + ".index") and not glob.glob(glob.escape(path) + ".data-*"):
            names = [os.path.basename(p) for p in reversed(found)]
            raise RunError(f"--checkpoint: {path} does not exist (available in {directory}: "
                           f"{', '.join(names) or 'none'})")
        problem = checkpoint_problem(path)
        if problem:
            raise RunError(f"--checkpoint: {path} is damaged: {problem}")
        return [path]
    if not found:
        raise RunError(f"--model_dir: {model_dir} has no checkpoint in {directory}; train first "
                       f"(python -m nvae_tf.train --model_dir={model_dir} ...)")
    intact, damaged = [], []
    for path in found:
        problem = checkpoint_problem(path)
        if problem:
            damaged.append(f"{os.path.basename(path)} ({problem})")
            _warn_once(path, problem)
        else:
            intact.append(path)
    if not intact:
        raise RunError(f"no intact checkpoint in {directory}: " + "; ".join(damaged))
    return intact


_warned = set()


def _warn_once(path, problem):
    if (path, problem) not in _warned:
        _warned.add((path, problem))
        logging.warning("checkpoint %s is damaged: %s; trying an older one", path, problem)


def restore(model, path):
    """Restore every variable of a built `model` from the training checkpoint at `path`."""
    import tensorflow as tf
    status = tf.train.Checkpoint(model_variables=model_variables(model)).read(path)
    status.expect_partial().assert_existing_objects_matched()


NON_FINITE = "it holds a non-finite value"


def restore_each(paths, restore_one, variables):
    """Try the checkpoints `paths` in order: yields (path, problem) after `restore_one(path)`; `problem` is None
    when the checkpoint looks intact, restores, and leaves every one of `variables` finite, else a phrase that
    says what is wrong ("it fails to restore (...)", "it holds a non-finite value (in <variable>)")."""
    for path in paths:
        problem = checkpoint_problem(path)
        if not problem:
            try:
                restore_one(path)
            except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways (OpError, IndexError, ...)
                problem = f"it fails to restore ({first_line(e)})"
        if not problem:
            bad = first_non_finite(variables)
            problem = f"{NON_FINITE} (in {bad})" if bad else None
        yield path, problem


def first_non_finite(variables):
    """The path (or name) of the first floating-point variable holding a NaN or an infinity, or None."""
    import tensorflow as tf
    for v in variables:
        dtype = tf.as_dtype(getattr(v, "dtype", "float32"))
        if dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(tf.convert_to_tensor(v)))):
            return getattr(v, "path", None) or v.name
    return None


def restore_model(model, model_dir, checkpoint=None):
    """Restore `model` from `checkpoint` or the newest checkpoint that restores; returns its path.

    A checkpoint that fails to restore is named and the next older one tried (unless `checkpoint` was chosen);
    a checkpoint holding a non-finite value is refused with `RunError` naming the variable."""
    candidates = _candidates(model_dir, checkpoint)
    failures = []
    for path, problem in restore_each(candidates, lambda p: restore(model, p), model.variables):
        if not problem:
            return path
        if problem.startswith(NON_FINITE):
            others = [os.path.basename(p) for p in candidates if p != path]
            raise RunError(f"checkpoint {path} {problem.replace('it ', '', 1)}; it cannot be used. "
                           + (f"Choose an earlier one with --checkpoint=STEP (present: {', '.join(others)})."
                              if others else "No other checkpoint is present."))
        if checkpoint:
            raise RunError(f"--checkpoint: {path} cannot be used: {problem}")
        failures.append(f"{os.path.basename(path)} ({problem})")
        _warn_once(path, problem)
    raise RunError(f"no checkpoint in {checkpoint_dir(model_dir)} restores: " + "; ".join(failures))


def load_model(model_dir, checkpoint=None, remat=False):
    """(config, model with restored weights, checkpoint path). Build it inside a strategy scope to replicate."""
    from nvae_tf import distribute
    from nvae_tf.model import NVAE
    distribute.tune_graph_optimizer()
    config = load_config(model_dir)
    model = NVAE(config, remat=remat)
    model.build()
    path = restore_model(model, model_dir, checkpoint)
    return config, model, path


def remove_leftovers(directory):
    """Delete the `ckpt-N_temp` folders that a run killed while writing a checkpoint leaves; returns them."""
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "ckpt-*_temp"))):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def quarantine(prefix, reason):
    """Move every file of the checkpoint at `prefix` into `<checkpoints>/damaged/` (kept, not deleted) and drop it
    from TensorFlow's checkpoint state file, so that training neither resumes from it nor overwrites it."""
    directory = os.path.dirname(prefix)
    target = os.path.join(directory, DAMAGED_DIR)
    os.makedirs(target, exist_ok=True)
    moved = []
    for path in glob.glob(glob.escape(prefix) + ".*"):
        name = os.path.basename(path)
        destination = os.path.join(target, name)
        if os.path.exists(destination):
            destination += "." + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        os.replace(path, destination)
        moved.append(name)
    logging.warning("checkpoint %s is damaged (%s); its files (%s) are moved to %s", prefix, reason,
                    ", ".join(sorted(moved)), target)
    write_checkpoint_state(directory, [p for p in reversed(list_checkpoints(directory))
                                       if p != prefix and os.path.exists(p + ".index")])


def write_checkpoint_state(directory, prefixes):
    """Rewrite TensorFlow's `checkpoint` state file to list `prefixes` (oldest first; paths relative to
    `directory`), or remove it if there are none. Written to a temporary file and renamed into place."""
    path = os.path.join(directory, "checkpoint")
    if not prefixes:
        if os.path.exists(path):
            os.remove(path)
        return
    names = [os.path.basename(p) for p in prefixes]
    # The timestamps let tf.train.CheckpointManager manage (and rotate) these checkpoints like its own.
    times = [os.path.getmtime(p + ".index") for p in prefixes]
    text = (f'model_checkpoint_path: "{names[-1]}"\n'
            + "".join(f'all_model_checkpoint_paths: "{n}"\n' for n in names)
            + "".join(f"all_model_checkpoint_timestamps: {t!r}\n" for t in times)
            + f"last_preserved_timestamp: {min(times) - 1.0!r}\n")
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def repair_checkpoints(directory):
    """Prepare a training run's checkpoint folder: remove leftover temporary folders, move damaged checkpoints
    aside, and rewrite the state file from the intact ones (oldest first). Returns the intact prefixes."""
    import tensorflow as tf
    for path in remove_leftovers(directory):
        logging.warning("removed %s, left by a run stopped while writing a checkpoint", path)
    for path in list_checkpoints(directory):
        problem = checkpoint_problem(path)
        if problem:
            quarantine(path, problem)
    intact = list(reversed(list_checkpoints(directory)))
    if intact:
        state = None
        try:
            state = tf.train.get_checkpoint_state(directory)
        except Exception:  # noqa: BLE001 - an unreadable state file is rewritten below
            pass
        listed = [os.path.basename(p) for p in state.all_model_checkpoint_paths] if state else []
        if listed != [os.path.basename(p) for p in intact]:
            write_checkpoint_state(directory, intact)
    return intact


# ------------------------------------------------------------------------------------------------ lock
class RunLockedError(RunError):
    """Another live training run holds the model_dir."""


class TrainingLock:
    """An exclusive lock on a run directory for one training process (`fcntl.flock` on `model_dir/.train.lock`).

    The operating system releases the lock when its process ends, however it ends, so a lock left by a killed
    run is taken over at once; the file records the holder's PID, host and start time for the message a second
    run gets."""

    def __init__(self, model_dir):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._file = None
        self.previous = None  # the holder recorded by a run that ended without releasing the lock

    def acquire(self):
        import fcntl
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read()
            self._file.close()
            self._file = None
            who = (f"PID {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
                   if holder else "a process that has not recorded itself yet")
            raise RunLockedError(f"--model_dir: {os.path.dirname(self.path)} is in use by another training run "
                                 f"({who}); stop it first, or use another --model_dir") from None
        self.previous = self._read() or None
        self._file.seek(0)
        self._file.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds")}, self._file)
        self._file.flush()
        return self

    def _read(self):
        try:
            self._file.seek(0)
            return json.loads(self._file.read() or "{}")
        except ValueError:
            return {}

    def release(self):
        if self._file is None:
            return
        import fcntl
        try:
            self._file.seek(0)
            self._file.truncate()
        except OSError:
            pass
        fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
