"""`python -m nvae_tf.evaluate --model_dir=runs/X`: importance-weighted negative log-likelihood of a split.

The estimate is `nvae_tf.likelihood`'s: K posterior samples per image, folded into a running log-sum-exp in
float64. The bound tightens as K grows (K = 1 is the ELBO of one sample). The result, -log p(x) averaged over
the split, is printed in nats and bits/dim, written to `model_dir/eval_<split>.json` and to TensorBoard.
"""

import os
import time

from absl import logging

from nvae_tf import cli, options, runs
from nvae_tf.errors import RunError
from nvae_tf.options import EvaluateOptions


def run(opts, strategy=None, progress=True):
    """Evaluate a run; returns the result dict that is also written to `model_dir/eval_<split>.json`."""
    options.check(opts)
    config = runs.load_config(opts.model_dir)
    import nvae_tf
    caveat = nvae_tf.choose_cpu_kernels(config)  # before TensorFlow is imported (checking the checkpoint imports it)
    if caveat:
        logging.warning("%s", caveat)
    path = runs.find_checkpoint(opts.model_dir, opts.checkpoint)
    import keras
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf import distribute
    from nvae_tf.likelihood import Evaluator, Progress
    from nvae_tf.objective import bits_per_dim
    source = data_lib.open_source(config, runs.data_dir_of(opts.model_dir, opts.data_dir), strict=opts.strict_data, download=opts.download)
    split = opts.split
    if split not in source.sizes:
        raise RunError(f"--split: {config.dataset} has no split {split!r}; it has {', '.join(sorted(source.sizes))}")
    strategy = strategy or distribute.make_strategy(opts.cpu_replicas)
    keras.mixed_precision.set_global_policy(opts.precision)
    batch_size = opts.batch_size or config.batch_size
    with strategy.scope():
        _, model, path = runs.load_model(opts.model_dir, opts.checkpoint)
    evaluator = Evaluator(model, strategy, opts.num_iw_samples, batch_size, opts.forward_batch, opts.seed)
    max_images = opts.max_images
    num_images = source.sizes[split] if not max_images else min(max_images, source.sizes[split])

    def make(context):
        # Each input pipeline (one per worker) reads its own shard, so every image is counted once.
        ds = source.dataset(split, batch_size, training=False, input_context=context, deterministic=True,
                            seed=opts.seed)
        if max_images:
            ds = ds.unbatch().take(-(-max_images // context.num_input_pipelines)).batch(batch_size)
        return ds
    logging.info("evaluating %s (%s) on %d %s images: K = %d importance samples, %d per forward pass, "
                 "%d replicas", opts.model_dir, os.path.basename(path), num_images, split, opts.num_iw_samples,
                 evaluator.chunk, strategy.num_replicas_in_sync)
    start = time.time()
    nats, count = evaluator.evaluate(strategy.distribute_datasets_from_function(make), num_images,
                                     Progress(config.data_dims) if progress else None)
    result = {"model_dir": opts.model_dir, "checkpoint": path, "step": runs.checkpoint_step(path), "split": split,
              "dataset": config.dataset, "num_images": count, "num_iw_samples": opts.num_iw_samples,
              "nll_nats": nats, "bpd": bits_per_dim(nats, config.data_dims), "data_dims": config.data_dims,
              "precision": opts.precision, "seed": opts.seed, "seconds": round(time.time() - start, 1)}
    if distribute.is_chief(strategy):
        runs.write_json(os.path.join(opts.model_dir, f"eval_{split}.json"), result)
        with tf.summary.create_file_writer(os.path.join(opts.model_dir, "eval")).as_default(step=result["step"]):
            tf.summary.scalar(f"eval_{split}/nll_nats", nats)
            tf.summary.scalar(f"eval_{split}/bpd", result["bpd"])
            tf.summary.scalar(f"eval_{split}/num_iw_samples", opts.num_iw_samples)
    return result


def run_from_flags(fv):
    opts = options.from_flags(EvaluateOptions, fv)
    if opts.cpu_replicas > 1:
        from nvae_tf import distribute
        distribute.split_cpu(opts.cpu_replicas)
    result = run(opts)
    nats = f"{result['nll_nats']:.2f} nats"
    if result["dataset"] == "mnist":
        nats += " (MNIST is reported in nats, on the 28x28 crop)"
    print(f"{result['split']}: -log p(x) = {nats}, {result['bpd']:.4f} bits/dim over {result['num_images']} "
          f"images, K = {result['num_iw_samples']} ({os.path.basename(result['checkpoint'])})")
    print(f"written to {os.path.join(result['model_dir'], 'eval_' + result['split'] + '.json')}")
    return 0


def main():
    cli.main("nvae_tf.evaluate", __doc__, [EvaluateOptions], run_from_flags, usage="--model_dir=DIR [flags]")


if __name__ == "__main__":
    main()
