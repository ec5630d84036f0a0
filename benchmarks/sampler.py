"""Latency and throughput of the exported samplers (SavedModel and TFLite) at batch 1 and 16; prints a table.

    python benchmarks/sampler.py                          # the digits config, weights as initialised
    python benchmarks/sampler.py --config=cifar10 --batches=1,4
    python benchmarks/sampler.py --model_dir=runs/digits  # a trained run

The run is exported once per batch size (the TFLite sampler has a fixed batch; float32 and float16 variants),
then every sampler is called `--repeats` times after one warm-up call. The SavedModel is loaded with
`tf.saved_model.load` (no nvae_tf code), the TFLite files with LiteRT's interpreter. Sampling cost does not
depend on the weights' values, so an untrained model measures the same as a trained one.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def untrained_run(config_name, model_dir):
    """A run directory holding the config and a checkpoint of freshly initialised weights."""
    from nvae_tf import runs
    from nvae_tf.config import from_flagfile
    from nvae_tf.model import NVAE
    config = from_flagfile(os.path.join(ROOT, "configs", config_name + ".flags"))
    model = NVAE(config)
    model.build()
    runs.save_model(model_dir, model, step=0)


def time_calls(call, repeats):
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits", help="config to build untrained (without --model_dir)")
    parser.add_argument("--model_dir", help="a trained run to export instead")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf
    from absl import logging
    from ai_edge_litert.interpreter import Interpreter

    from nvae_tf import export
    logging.set_verbosity(logging.ERROR)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if not model_dir:
            model_dir = os.path.join(scratch, "run")
            print(f"building an untrained {args.config} run ...", file=sys.stderr, flush=True)
            untrained_run(args.config, model_dir)
        name = args.config if not args.model_dir else os.path.basename(os.path.normpath(model_dir))
        for batch in batches:
            print(f"exporting with TFLite batch {batch} ...", file=sys.stderr, flush=True)
            out = os.path.join(scratch, f"export_{batch}")
            info = export.run(export.ExportOptions(model_dir=model_dir, export_dir=out, tflite_batch=batch,
                                                   tflite_quantize="float16", max_samples=max(batches)))
            version_dir = os.path.join(out, str(info["version"]))
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(version_dir) for f in files)
            loaded = tf.saved_model.load(version_dir)
            serve = loaded.signatures["serving_default"]
            seconds = time_calls(lambda: serve(num_samples=tf.constant(batch), temperature=tf.constant(
                args.temperature), seed=tf.constant(1, tf.int64))["images"].numpy(), args.repeats)
            rows.append((name, "SavedModel", batch, seconds, size))
            for file in info["tflite"]["files"]:
                interpreter = Interpreter(model_path=os.path.join(out, file), num_threads=os.cpu_count())
                runner = interpreter.get_signature_runner()
                seconds = time_calls(lambda: runner(temperature=np.array(args.temperature, np.float32),
                                                    seed=np.array(1, np.int64)), args.repeats)
                rows.append((name, f"TFLite {file}", batch, seconds, os.path.getsize(os.path.join(out, file))))
            weights = info["tflite"]["sampler_weights"]
    print(f"\nsampler weights: {weights:,} (float32: {weights * 4 / 2 ** 20:.2f} MiB); {os.cpu_count()} CPU threads")
    header = f"{'run':<10} {'sampler':<36} {'batch':>5} {'latency ms':>11} {'images/s':>9} {'size MiB':>9}"
    print(header)
    print("-" * len(header))
    for name, kind, batch, seconds, size in rows:
        print(f"{name:<10} {kind:<36} {batch:>5} {1000 * seconds:>11.1f} {batch / seconds:>9.1f} "
              f"{size / 2 ** 20:>9.2f}")


if __name__ == "__main__":
    main()
