"""Start-up cost of nvae_tf: time from process start to the end of the first training step, split into import,
model build, trace and graph optimisation + first run; the steady step after it; peak memory of both; the time
to the first image of `sample` and to a finished `export`. Prints a table.

    python benchmarks/startup.py                                    # digits, folder64, mnist, cifar10, celebahq
    python benchmarks/startup.py --configs=digits --remat=off,on
    python benchmarks/startup.py --configs=cifar10 --batch=4 --commands=
    python benchmarks/startup.py --configs= --commands=sample,export  # the commands on a digits run only

Each training measurement runs in a process of its own, as `python -m nvae_tf.train` would: it imports the
project, builds the run's `Trainer` (model, NVAE's Adamax, the full objective) on synthetic uint8 images of the
config's shape at the config's batch size (or `--batch`), traces the training step, runs it once, then
`--steps` more. Memory is the resident set: its peak up to the end of the first step, then its peak over the
steady steps alone (the kernel's high-water mark is reset in between). `sample` and `export` run as the real
commands on a digits run directory (untrained weights; the work is the same) and are timed from spawn to exit.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = "digits,folder64,mnist,cifar10,celebahq"


def _rss_mib(field):
    """VmHWM (peak) or VmRSS (current) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss():
    """Reset the kernel's resident-set high-water mark of this process (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_training(config_name, batch, steps, remat, start):
    """Runs in a child process started at `start` (time.time() of the parent just before the spawn)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np

    from absl import flags, logging

    import nvae_tf
    from nvae_tf import cli
    from nvae_tf import config as config_lib
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    args = ["bench", f"--flagfile={os.path.join(ROOT, 'configs', config_name + '.flags')}"]
    fv(args + ([f"--batch_size={batch}"] if batch else []))
    config = config_lib.from_flags(fv)
    nvae_tf.choose_cpu_kernels(config)  # as the commands do
    cli.hide_scikit_learn_from_keras()
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf import distribute
    from nvae_tf.options import TrainOptions
    from nvae_tf.trainer import Trainer
    imported = time.time()
    logging.set_verbosity(logging.ERROR)
    batch = config.batch_size
    images = np.random.default_rng(0).integers(0, 256, (2 * batch, *config.image_shape), dtype=np.uint8)
    if config.decoder == "bernoulli":
        images = (images > 127).astype(np.uint8) * 255
    source = data_lib.Source(config_name, config.image_shape, {"train": len(images), "validation": len(images)},
                             lambda split, shard=None, shuffle_files=False, seed=None:
                             tf.data.Dataset.from_tensor_slices(images))
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(config, distribute.make_strategy(), source,
                          TrainOptions(model_dir=model_dir, remat=remat))
        built, rss_built = time.time(), _rss_mib("VmRSS")
        batches = [tf.constant(images[:batch]), tf.constant(images[batch:])]
        graph = trainer.train_step.get_concrete_function(batches[0]).graph
        traced, rss_traced = time.time(), _rss_mib("VmRSS")
        float(trainer.train_step(batches[0])["loss"])
        first = time.time()
        peak_first = _rss_mib("VmHWM")
        reset = _reset_peak_rss()
        float(trainer.train_step(batches[1])["loss"])  # a second warm-up step
        started = time.time()
        for i in range(steps):
            metrics = trainer.train_step(batches[i % 2])
        loss = float(metrics["loss"])
        steady = (time.time() - started) / steps
    params = int(sum(np.prod(w.shape) for w in trainer.model.trainable_weights))
    return {"config": config_name, "remat": remat, "batch": batch, "params": params,
            "variables": len(trainer.model.trainable_weights), "graph_ops": len(graph.get_operations()),
            "import_s": imported - start, "build_s": built - imported, "trace_s": traced - built,
            "first_run_s": first - traced, "first_step_s": first - start, "steady_ms": 1000 * steady,
            "rss_built_mib": rss_built, "rss_traced_mib": rss_traced, "peak_first_mib": peak_first,
            "peak_steady_mib": _rss_mib("VmHWM") if reset else float("nan"),
            "finite": bool(np.isfinite(loss))}


def make_run(model_dir, start=None):
    """A digits run directory with untrained weights, for timing `sample` and `export`."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    from absl import flags

    from nvae_tf import config as config_lib
    from nvae_tf import runs
    from nvae_tf.model import NVAE
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["bench", f"--flagfile={os.path.join(ROOT, 'configs', 'digits.flags')}"])
    model = NVAE(config_lib.from_flags(fv))
    model.build()
    runs.save_model(model_dir, model, step=0)
    return {}


def run_command(argv):
    """(seconds from spawn to exit, peak RSS MiB, exit code, last stderr line) of `python -m ...argv`."""
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)  # reaps the child and gives its own peak memory
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.time() - start
    peak = usage.ru_maxrss / 1024
    lines = stderr.strip().splitlines()
    return elapsed, peak, process.returncode, lines[-1] if lines else ""


def child(job):
    """Run one job in a fresh process; returns its JSON result (or an error row)."""
    job = dict(job, start=time.time())
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    if result.returncode:
        print(result.stderr[-2000:], file=sys.stderr)
        return {"error": f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def print_table(rows, columns):
    """One line per training row: config, remat, params and batch, then `columns` ((title, key, width, format))."""
    header = f"{'config':<9} {'remat':<5} {'params':>12} {'batch':>5} " + " ".join(
        f"{title:>{width}}" for title, _, width, _ in columns)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:<9} {'on' if r['remat'] else 'off':<5} {r['params']:>12,} {r['batch']:>5} "
              + " ".join(f"{r[key]:>{width}{spec}}" for _, key, width, spec in columns))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated config names (configs/*.flags)")
    parser.add_argument("--remat", default="off", help="off, on, or off,on")
    parser.add_argument("--batch", type=int, default=0, help="images per step (default: the config's)")
    parser.add_argument("--steps", type=int, default=3, help="steady steps timed after the first two")
    parser.add_argument("--commands", default="sample,export", help="commands timed on a digits run: "
                        "sample, export, or none (empty)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        kind = job.pop("kind")
        print(json.dumps(make_run(**job) if kind == "make_run" else measure_training(**job)))
        return

    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if not os.path.exists(os.path.join(ROOT, "configs", n + ".flags"))]
    if unknown:
        parser.error(f"--configs: no configs/{unknown[0]}.flags (known: "
                     f"{', '.join(sorted(f[:-6] for f in os.listdir(os.path.join(ROOT, 'configs'))))})")
    rows = []
    for name in names:
        for remat in args.remat.split(","):
            print(f"measuring the first training step of {name} (remat {remat}) ...", file=sys.stderr, flush=True)
            job = {"kind": "train", "config_name": name, "batch": args.batch, "steps": args.steps,
                   "remat": remat == "on"}
            rows.append({"config": name, "remat": remat == "on", **child(job)})
    commands = [c for c in args.commands.split(",") if c]
    command_rows = []
    if commands:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = os.path.join(tmp, "digits")
            child({"kind": "make_run", "model_dir": run_dir})
            argvs = {"sample": ["nvae_tf.sample", f"--model_dir={run_dir}", f"--out={tmp}/samples.png",
                                "--num_samples=16"],
                     "export": ["nvae_tf.export", f"--model_dir={run_dir}", f"--export_dir={tmp}/export"]}
            for command in commands:
                print(f"timing {command} on a digits run ...", file=sys.stderr, flush=True)
                command_rows.append((command, *run_command(argvs[command])))

    for r in rows:
        if "error" in r:
            print(f"{r['config']} (remat {'on' if r['remat'] else 'off'}): {r['error']}")
    rows = [r for r in rows if "error" not in r]
    if rows:
        print_table(rows, [("ops", "graph_ops", 7, ""), ("import s", "import_s", 8, ".1f"),
                           ("build s", "build_s", 8, ".1f"), ("trace s", "trace_s", 8, ".1f"),
                           ("opt+run s", "first_run_s", 9, ".1f"), ("1st step s", "first_step_s", 10, ".1f"),
                           ("steady ms", "steady_ms", 9, ".0f")])
        print()
        print_table(rows, [("RSS built MiB", "rss_built_mib", 13, ".0f"),
                           ("RSS traced MiB", "rss_traced_mib", 14, ".0f"),
                           ("peak 1st step MiB", "peak_first_mib", 17, ".0f"),
                           ("peak steady MiB", "peak_steady_mib", 15, ".0f")])
    if command_rows:
        print()
        print(f"{'command (digits)':<17} {'seconds':>8} {'peak MiB':>9} result")
        for command, seconds, peak, code, last in command_rows:
            print(f"{command:<17} {seconds:>8.1f} {peak:>9.0f} {'ok' if code == 0 else f'exit {code}: {last}'}")


if __name__ == "__main__":
    main()
