"""Training-step speed and peak memory of nvae_tf, per config, precision and XLA setting; prints a table.

    python benchmarks/train_step.py                 # tiny, digits, cifar10 x float32/mixed_bfloat16 x XLA off/on
    python benchmarks/train_step.py --quick         # tiny and digits only, no XLA
    python benchmarks/train_step.py --configs=digits --precisions=float32 --jit=off --batch=16 --steps=20
    python benchmarks/train_step.py --configs=digits --precisions=float32 --jit=off --remat=off,on --batch=256

Each measurement runs in its own process (so peak memory is its own): it builds the run's `Trainer` (model,
NVAE's Adamax, the full objective with spectral and BN regularisation) on synthetic uint8 images of the
config's shape, traces the step, then times `--steps` steps. Peak memory is the process's maximum resident
set size on CPU, or TensorFlow's peak allocation on GPU.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BATCH = {"tiny": 8, "digits": 32, "cifar10": 2}


def measure(config_name, precision, jit, batch, steps, remat=False):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np
    from absl import flags, logging

    import nvae_tf
    from nvae_tf import config as config_lib
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["bench", f"--flagfile={os.path.join(ROOT, 'configs', config_name + '.flags')}", f"--batch_size={batch}"])
    config = config_lib.from_flags(fv)
    nvae_tf.choose_cpu_kernels(config)  # as the training command does
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf.options import TrainOptions
    from nvae_tf.trainer import Trainer
    logging.set_verbosity(logging.ERROR)

    images = np.random.default_rng(0).integers(0, 256, (max(4 * batch, 16), *config.image_shape), dtype=np.uint8)
    if config.decoder == "bernoulli":
        images = (images > 127).astype(np.uint8) * 255
    source = data_lib.Source(config_name, config.image_shape, {"train": len(images), "validation": len(images)},
                             lambda split, shard=None, shuffle_files=False, seed=None: tf.data.Dataset.from_tensor_slices(images))
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(config, tf.distribute.get_strategy(), source,
                          TrainOptions(model_dir=model_dir, precision=precision, jit_compile=jit, remat=remat))
        batches = [b for b in source.dataset("train", batch, training=True)]
        start = time.perf_counter()
        trainer.train_step(batches[0])
        trace = time.perf_counter() - start
        trainer.train_step(batches[1 % len(batches)])  # a second warm-up step
        start = time.perf_counter()
        for i in range(steps):
            metrics = trainer.train_step(batches[i % len(batches)])
        float(metrics["loss"])
        elapsed = time.perf_counter() - start
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        peak = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2 ** 20
        where = "GPU"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        where = "CPU RSS"
    params = int(sum(np.prod(w.shape) for w in trainer.model.trainable_weights))
    return {"config": config_name, "precision": precision, "jit": jit, "remat": remat, "batch": batch,
            "params": params,
            "trace_s": trace, "step_ms": 1000 * elapsed / steps, "images_per_s": batch * steps / elapsed,
            "peak_mib": peak, "memory": where, "finite": bool(np.isfinite(float(metrics["loss"])))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,digits,cifar10")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--jit", default="off,on", help="off, on, or off,on")
    parser.add_argument("--remat", default="off", help="off, on, or off,on (gradient checkpointing per cell)")
    parser.add_argument("--batch", type=int, default=0, help="images per step (default: per config)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny and digits, float32 and bf16, no XLA, 5 steps")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    if args.quick:
        args.configs, args.jit, args.steps = "tiny,digits", "off", 5
    rows = []
    for name in args.configs.split(","):
        for precision in args.precisions.split(","):
            for jit, remat in [(j, r) for j in args.jit.split(",") for r in args.remat.split(",")]:
                job = {"config_name": name, "precision": precision, "jit": jit == "on", "remat": remat == "on",
                       "batch": args.batch or DEFAULT_BATCH.get(name, 4), "steps": args.steps}
                print(f"measuring {name} {precision} jit={jit} remat={remat} ...", file=sys.stderr, flush=True)
                result = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True,
                                        text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
                if result.returncode:
                    print(result.stderr[-2000:], file=sys.stderr)
                    rows.append({**job, "config": name, "error": f"exit {result.returncode}"})
                    continue
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    header = f"{'config':<8} {'params':>12} {'precision':<15} {'XLA':<4} {'remat':<5} {'batch':>5} {'trace s':>8} " \
             f"{'step ms':>9} {'images/s':>9} {'peak MiB':>9} {'memory':<8} finite"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['config']:<8} {'':>12} {r['precision']:<15} {'on' if r['jit'] else 'off':<4} "
                  f"{'on' if r['remat'] else 'off':<5} {r['batch']:>5} "
                  f"{r['error']}")
            continue
        print(f"{r['config']:<8} {r['params']:>12,} {r['precision']:<15} {'on' if r['jit'] else 'off':<4} "
              f"{'on' if r['remat'] else 'off':<5} "
              f"{r['batch']:>5} {r['trace_s']:>8.1f} {r['step_ms']:>9.1f} {r['images_per_s']:>9.1f} "
              f"{r['peak_mib']:>9.0f} {r['memory']:<8} {r['finite']}")


if __name__ == "__main__":
    main()
