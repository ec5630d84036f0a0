"""What every command line shares: flags from option dataclasses, a readable `--help`, a quiet console and one
`error:` line (exit 2) for a fault the user can fix. Needs no TensorFlow, so a wrong flag is reported at once.

    cli.main("nvae_tf.sample", __doc__, [SampleOptions], run_from_flags)

`--help` lists the command's own flags grouped as data / model / training / run; `--helpfull` adds absl's.
TensorFlow's log lines (banners, MLIR and Grappler notes) are hidden unless `--verbose` is given or the user
sets TF_CPP_MIN_LOG_LEVEL; our own lines go to stderr as `[nvae_tf] message` (warnings as `warning: message`).
"""

import importlib.abc
import json
import logging as py_logging
import os
import sys
import textwrap

from nvae_tf import errors, options

HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "-?")
WIDTH = 110


def define_verbose(flag_values=None):
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    if "verbose" not in fv:
        flags.DEFINE_bool("verbose", False, "Show TensorFlow's own log lines too (banners, graph compiler notes).",
                          flag_values=fv)


def help_text(command, doc, option_classes, usage=None):
    """The text of `--help`: usage, the command's summary, then its flags by group."""
    lines = [f"usage: python -m {command} {usage or '[flags]'}", ""]
    summary = (doc or "").strip().split("\n\n")[0]
    lines += [*summary.splitlines(), ""]
    seen, by_group = set(), {g: [] for g in options.GROUPS}
    for cls in option_classes:
        for f in options.fields(cls):
            if f.name not in seen:
                seen.add(f.name)
                by_group[f.metadata["group"]].append(f)
    for group in options.GROUPS:
        if not by_group[group]:
            continue
        lines.append(f"{group}:")
        for f in sorted(by_group[group], key=lambda f: not f.metadata["required"]):
            lines += _flag_lines(f)
        lines.append("")
    lines.append("  --verbose                      Show TensorFlow's own log lines too.")
    lines.append("  --flagfile=FILE                Read flags from FILE, one --flag=value per line "
                 "(e.g. configs/cifar10.flags).")
    lines += ["", "--helpfull lists every flag, absl's and TensorFlow's included."]
    return "\n".join(lines)


def _flag_lines(f):
    meta = f.metadata
    if f.type in (bool, "bool"):
        head = f"--[no]{f.name}" + (" (on)" if f.default else "")
    else:
        shown = "" if f.default in (None, "") else f.default
        head = f"--{f.name}=" + ("|".join(meta["choices"]) if meta["choices"] and len(meta["choices"]) <= 3
                                  else str(shown) if shown != "" else "...")
    body = meta["help"] + (" Required." if meta["required"] else "")
    indent = " " * 33
    if len(head) > 30:
        return [f"  {head}", *textwrap.wrap(body, WIDTH, initial_indent=indent, subsequent_indent=indent)]
    return textwrap.wrap(body, WIDTH, initial_indent=f"  {head:<30} ", subsequent_indent=indent)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _ours(record):
    """Our own log lines, and anyone's errors; other libraries' notes (TensorFlow's among them) are dropped."""
    return record.levelno >= py_logging.ERROR or os.path.abspath(record.pathname).startswith(_PACKAGE)


class _Format(py_logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        if record.levelno >= py_logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return f"[nvae_tf] {message}"


def configure_console(verbose=False):
    """Quiet TensorFlow (unless `verbose` or the user's own TF_CPP_MIN_LOG_LEVEL) and format our log lines.
    Must run before TensorFlow is imported to hide its C++ lines."""
    from absl import logging
    if verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        py_logging.getLogger("tensorflow").setLevel(py_logging.ERROR)
    logging.set_verbosity(logging.DEBUG if verbose else logging.INFO)
    handler = logging.get_absl_handler()
    handler.python_handler.setFormatter(_Format())
    if not verbose:
        handler.addFilter(_ours)
    handler.activate_python_handler()


class _NoScikitLearnForKeras(importlib.abc.MetaPathFinder):
    """Keras imports scikit-learn, when it is installed, for its scikit-learn wrappers, which nvae_tf does not use;
    that took a second or two of every command. Installed (`hide_scikit_learn_from_keras`), this finder makes
    those imports fail as if scikit-learn were absent, which Keras expects; any other import of it proceeds."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] != "sklearn":
            return None
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__", "").startswith("keras.src.wrappers"):
                raise ModuleNotFoundError(f"{name} is not imported for Keras's scikit-learn wrappers", name=name)
            frame = frame.f_back
        return None


def hide_scikit_learn_from_keras():
    """Install `_NoScikitLearnForKeras` (once); imports nothing."""
    if not any(isinstance(f, _NoScikitLearnForKeras) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoScikitLearnForKeras())


def caused_by_interrupt(error):
    """Whether `error` is a `KeyboardInterrupt` or was raised while handling one (its context or cause chain)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _redeliver_interrupts(previous):
    """An unraisable hook that sends Ctrl-C again when it landed in a `__del__` (Python would print it as
    "Exception ignored" and go on; TensorFlow frees graph functions that way), so the command stops after all."""
    import signal
    import threading

    def hook(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            # Sent from another thread a moment later, once the `__del__` has returned.
            threading.Timer(0.05, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
        else:
            previous(unraisable)
    return hook


def main(command, doc, option_classes, run, usage=None, extra_flags=None):
    """Run a command: define its flags, parse argv, then `run(flag_values)` -> exit code.

    An `errors.RunError` (a bad flag, run directory, checkpoint or data) becomes one `error:` line and exit 2.
    `extra_flags(flag_values)` defines flags that are not options of a dataclass."""
    from absl import app, flags
    fv = flags.FLAGS
    for cls in option_classes:
        options.define_flags(cls, fv)
    if extra_flags:
        extra_flags(fv)
    define_verbose(fv)

    def parse(argv):
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(help_text(command, doc, option_classes, usage))
            sys.exit(0)
        if "--helpfull" in argv[1:]:
            print(f"usage: python -m {command} {usage or '[flags]'}\n\n{fv.get_help()}")
            sys.exit(0)
        try:
            rest = fv(argv)
        except flags.Error as e:
            print(f"error: {e}\n(python -m {command} --help lists the flags)", file=sys.stderr)
            sys.exit(2)
        if len(rest) > 1:
            print(f"error: unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)", file=sys.stderr)
            sys.exit(2)
        configure_console(fv.verbose)
        return rest

    def app_main(_):
        hide_scikit_learn_from_keras()
        sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)
        try:
            return run(fv) or 0
        except errors.RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except BaseException as e:
            # Ctrl-C (train handles it itself once training has started). TensorFlow can turn the interrupt into
            # another exception on its way out (a graph context left mid-way), hence the search of the chain.
            # Outputs are written to a temporary name and renamed into place, so nothing half-written remains.
            if not caused_by_interrupt(e):
                raise
            print(f"interrupted: {command} stopped before it finished", file=sys.stderr)
            return 130

    app.run(app_main, flags_parser=parse)


def process_is_chief(environ=None):
    """Whether this process is the chief of its cluster, from TF_CONFIG or Slurm's variables alone.

    The chief is the task of type "chief", else worker 0; under Slurm (several tasks, no TF_CONFIG) task 0; a
    process outside a cluster is its own chief. `ValueError` if TF_CONFIG is not JSON."""
    environ = os.environ if environ is None else environ
    try:
        tf_config = json.loads(environ.get("TF_CONFIG") or "{}")
    except ValueError as e:
        raise errors.RunError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = tf_config.get("cluster", {})
    if sum(len(v) for k, v in cluster.items() if k in ("worker", "chief")) > 1:
        task = tf_config.get("task", {})
        return task.get("type") == "chief" or (task.get("type") == "worker" and int(task.get("index", 0)) == 0
                                               and "chief" not in cluster)
    if not tf_config and "SLURM_JOB_ID" in environ and int(environ.get("SLURM_STEP_NUM_TASKS") or 1) > 1:
        return environ.get("SLURM_PROCID", "0") == "0"
    return True
