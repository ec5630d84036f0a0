"""Where the time of a whole training run goes: the steps, and everything between them (validation, pictures,
checkpoints, making and freeing each epoch's data pipeline, logging). Prints a table.

    python benchmarks/training_run.py                                  # the quick start's config, 5 epochs
    python benchmarks/training_run.py --epochs=20 --repeats=2
    python benchmarks/training_run.py --set=num_cell_per_cond_enc=2,num_cell_per_cond_dec=2

`benchmarks/train_step.py` times steps back to back on synthetic images; this runs the trainer as
`python -m nvae_tf.train` does, on the config's real data (which must be on this machine: the built-in digits
need nothing), with validation and pictures at every epoch's end, and times every step and every gap between
two steps. "between steps" is the run's wall time outside the steps; the columns after it split it into
validation, pictures and checkpoints after the first step, and "other" is the rest (data pipelines, log lines
and their summaries).
Each run is a process of its own.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Timed:
    """Wraps a callable; adds the seconds of every call to `seconds[key]` (and keeps each call's interval)."""

    def __init__(self, fn, seconds, key, intervals=None):
        self.fn, self.seconds, self.key, self.intervals = fn, seconds, key, intervals

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            end = time.perf_counter()
            self.seconds[self.key] = self.seconds.get(self.key, 0.0) + end - start
            if self.intervals is not None:
                self.intervals.append((start, end))

    def __getattr__(self, name):  # get_concrete_function and the like
        return getattr(self.fn, name)


def load_config(flagfile, epochs, settings):
    """The NVAEConfig of `flagfile` with `--epochs` and the `settings` flags; absl's error for a wrong flag."""
    sys.path.insert(0, ROOT)
    from absl import flags

    from nvae_tf import config as config_lib
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["bench", f"--flagfile={flagfile}", f"--epochs={epochs}", *[f"--{s}" for s in settings]])
    return config_lib.from_flags(fv)


def measure(flagfile, epochs, settings, data_dir):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    from absl import logging

    import nvae_tf
    config = load_config(flagfile, epochs, settings)
    nvae_tf.choose_cpu_kernels(config)  # as the training command does
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf.options import TrainOptions
    from nvae_tf.trainer import Trainer
    logging.set_verbosity(logging.ERROR)

    started = time.perf_counter()
    seconds, steps = {}, []
    bpd = []
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(config, tf.distribute.get_strategy(), data_lib.open_source(config, data_dir),
                          TrainOptions(model_dir=model_dir))
        trainer.train_step = Timed(trainer.train_step, seconds, "steps", steps)
        validate = trainer._validate

        def validated(*args, **kwargs):
            bpd.append(validate(*args, **kwargs))
            return bpd[-1]

        trainer._validate = Timed(validated, seconds, "validation")
        trainer._write_images = Timed(trainer._write_images, seconds, "pictures")
        trainer.save = Timed(trainer.save, seconds, "checkpoints")
        built = time.perf_counter()
        last = trainer.train()
        ended = time.perf_counter()
    first, wall = steps[0][1] - built, ended - steps[0][1]
    durations = np.array([end - start for start, end in steps[1:]])
    gaps = np.array([b[0] - a[1] for a, b in zip(steps, steps[1:])])
    outside = wall - float(durations.sum())
    return {"flagfile": os.path.relpath(flagfile, ROOT), "settings": settings, "epochs": epochs, "steps": last,
            "build_s": built - started, "wall_s": wall, "first_step_s": first,
            "steps_s": float(durations.sum()), "median_step_ms": 1000 * float(np.median(durations)),
            "outside_s": outside, "validation_s": seconds.get("validation", 0.0),
            "pictures_s": seconds.get("pictures", 0.0), "checkpoints_s": seconds.get("checkpoints", 0.0),
            "other_s": outside - sum(seconds.get(k, 0.0) for k in ("validation", "pictures", "checkpoints")),
            "largest_gap_s": float(gaps.max()) if len(gaps) else 0.0,
            "bpd": float(bpd[-1]) if bpd else float("nan")}


def describe(run):
    return " ".join([os.path.relpath(run["flagfile"], ROOT), *[f"--{s}" for s in run["settings"]]]) + \
        f", {run['epochs']} epochs"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flagfile", default="configs/digits_grey8.flags", help="the config to train")
    parser.add_argument("--epochs", type=int, default=5, help="epochs to train (each ends with validation and "
                                                               "pictures, as in `nvae_tf.train`)")
    parser.add_argument("--set", default="", help="comma-separated config flags without their dashes, e.g. "
                                                  "num_cell_per_cond_enc=2,num_cell_per_cond_dec=2")
    parser.add_argument("--data_dir", default="", help="where the config's data is (not needed for digits)")
    parser.add_argument("--repeats", type=int, default=1, help="runs, one after the other")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    flagfile = os.path.abspath(os.path.join(ROOT, args.flagfile) if not os.path.isfile(args.flagfile)
                               else args.flagfile)
    if not os.path.isfile(flagfile):
        parser.error(f"--flagfile: no such file: {args.flagfile}")
    if args.epochs < 1 or args.repeats < 1:
        parser.error(f"--epochs and --repeats must be >= 1, got {args.epochs} and {args.repeats}")
    job = {"flagfile": flagfile, "epochs": args.epochs, "settings": [s for s in args.set.split(",") if s],
           "data_dir": args.data_dir}
    try:  # wrong flags are refused here, before any run
        load_config(job["flagfile"], job["epochs"], job["settings"])
    except Exception as e:  # absl's flag errors and the config's own checks
        parser.error(f"--flagfile / --set: {e}")
    rows = []
    for i in range(args.repeats):
        print(f"run {i + 1}/{args.repeats}: {describe(job)} ...",
              file=sys.stderr, flush=True)
        result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                                text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        if result.returncode:
            sys.exit(f"error: the run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    columns = [("steps", "steps", "{:d}"), ("build s", "build_s", "{:.1f}"), ("first step s", "first_step_s", "{:.1f}"),
               ("wall s", "wall_s", "{:.1f}"), ("in steps s", "steps_s", "{:.1f}"),
               ("median step ms", "median_step_ms", "{:.1f}"), ("between steps s", "outside_s", "{:.1f}"),
               ("validation s", "validation_s", "{:.1f}"), ("pictures s", "pictures_s", "{:.1f}"),
               ("checkpoints s", "checkpoints_s", "{:.1f}"), ("other s", "other_s", "{:.1f}"),
               ("largest gap s", "largest_gap_s", "{:.2f}"), ("val bpd", "bpd", "{:.4f}")]
    print(f"{describe(rows[0])} "
          "(first step: its trace and run; wall: from its end to the end of training)")
    print(" | ".join(name for name, _, _ in columns))
    for r in rows:
        print(" | ".join(fmt.format(r[key]).rjust(len(name)) for name, key, fmt in columns))


if __name__ == "__main__":
    main()
