"""`python -m nvae_tf.evaluate --model_dir=runs/X`: importance-weighted negative log-likelihood of a split.

For every image x, with K posterior samples z_k ~ q(z|x):

    log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) = logsumexp_k w_k - log K,
    w_k = log p(x|z_k) + sum_groups log p(z_k) - sum_groups log q(z_k|x)      (log q includes the flows)

The bound tightens as K grows (K = 1 is the ELBO of one sample). Samples are drawn in chunks of several per
forward pass (each image tiled `chunk` times) and folded into a running log-sum-exp in float64, so K can be
1000 without holding K weights or losing precision under mixed precision. The result, -log p(x) averaged over
the split, is printed in nats and bits/dim, written to `model_dir/eval_<split>.json` and to TensorBoard.
"""

import math
import os
import sys
import time
from dataclasses import dataclass

from absl import logging

from nvae_tf import cli, options, runs
from nvae_tf.errors import RunError
from nvae_tf.options import option


@dataclass(frozen=True)
class EvaluateOptions(options.RunOptions, options.DataOptions, options.ReplicaOptions):
    split: str = option("validation", "Split to evaluate: validation or test (if the dataset has one).",
                        group="data")
    num_iw_samples: int = option(1000, "Importance samples K per image.", minimum=1)
    batch_size: int = option(0, "Images per batch and replica (default: the run's batch_size).", minimum=0)
    forward_batch: int = option(0, "Images per forward pass and replica, i.e. batch_size x samples per pass "
                                "(default: 4 x batch_size; lower it if memory runs out).", minimum=0)
    max_images: int = option(0, "Evaluate only the first N images of the split (0: all).", minimum=0, group="data")
    seed: int = option(0, "Seed of the importance samples.")
    precision: str = option("float32", "Compute precision of the model (the log-sum-exp is float64 regardless).",
                            choices=options.PRECISIONS)


# ------------------------------------------------------------------------------------- importance weighting
def log_weights(out):
    """Per-sample log importance weights `[batch]` (float64) from the model's forward terms."""
    return out.log_weights("float64")


def importance_weighted_log_likelihood(sample_log_weights, num_samples, chunk, batch):
    """log p(x) ~= logsumexp_k w_k - log K for a batch of `batch` items, K = `num_samples`.

    `sample_log_weights()` returns the log weights of `chunk` fresh samples per item, `[chunk, batch]`; it is
    called ceil(K / chunk) times and the weights are folded into a running (max, scaled sum) pair in float64.
    Samples beyond K in the last chunk are masked out. Returns `[batch]` float64.
    """
    if num_samples < 1 or chunk < 1:
        raise ValueError(f"num_samples and chunk must be >= 1, got {num_samples} and {chunk}")
    passes = -(-num_samples // chunk)
    state = fold_log_weights(sample_log_weights, num_samples, chunk, 0, passes, initial_state(batch))
    return finish(state, num_samples)


def initial_state(batch):
    """The empty running log-sum-exp of `batch` items: (max, scaled sum) = (-inf, 0), float64 `[batch]` each."""
    import tensorflow as tf
    return tf.fill([batch], tf.constant(-math.inf, tf.float64)), tf.zeros([batch], tf.float64)


def fold_log_weights(sample_log_weights, num_samples, chunk, first_pass, passes, state):
    """Fold the log weights of passes `first_pass .. first_pass + passes - 1` (each `chunk` samples per item, from
    `sample_log_weights()`) into the running (max, scaled sum) `state`; samples numbered K or more are masked."""
    import tensorflow as tf
    offsets = tf.range(chunk)
    first_pass = tf.cast(first_pass, tf.int32)

    def body(i, running_max, running_sum):
        w = tf.cast(sample_log_weights(), tf.float64)
        index = (first_pass + i) * chunk + offsets
        w = tf.where((index < num_samples)[:, None], w, tf.constant(-math.inf, tf.float64))
        new_max = tf.maximum(running_max, tf.reduce_max(w, axis=0))
        # exp(-inf - finite) = 0 on the first pass, where running_sum is 0 too.
        running_sum = running_sum * tf.exp(running_max - new_max) + tf.reduce_sum(tf.exp(w - new_max), axis=0)
        return i + 1, new_max, running_sum

    _, running_max, running_sum = tf.while_loop(lambda i, *_: i < passes, body, (tf.constant(0), *state))
    return running_max, running_sum


def finish(state, num_samples):
    """log (1/K) sum_k exp(w_k) `[batch]` from the running (max, scaled sum)."""
    import tensorflow as tf
    running_max, running_sum = state
    return running_max + tf.math.log(running_sum) - math.log(num_samples)


class Evaluator:
    """Importance-weighted NLL of a restored model under a distribution strategy.

    The K samples of a batch are drawn in calls of a few seconds each (the running log-sum-exp carried between
    them), so progress can be shown however large K is."""

    CALL_SECONDS = 2.0  # aim for device calls of about this long

    def __init__(self, model, strategy, num_iw_samples, batch_size, forward_batch=0, seed=0):
        import keras
        import tensorflow as tf

        from nvae_tf import distribute
        if num_iw_samples < 1:
            raise ValueError(f"--num_iw_samples must be >= 1, got {num_iw_samples}")
        self.model, self.strategy, self.num_iw_samples = model, strategy, num_iw_samples
        forward_batch = forward_batch or 4 * batch_size
        self.chunk = max(1, min(num_iw_samples, forward_batch // batch_size))
        self.passes = -(-num_iw_samples // self.chunk)
        with strategy.scope():
            self.seed_generator = keras.random.SeedGenerator(seed, name="evaluate_noise")

        def replica_passes(images, first_pass, passes, running_max, running_sum):
            noise = distribute.replica_noise(self.seed_generator)
            batch = tf.shape(images)[0]
            tiled = tf.tile(images, [self.chunk, 1, 1, 1])

            def sample_log_weights():
                out = self.model(tiled, training=False, noise=noise)
                return tf.reshape(log_weights(out), [self.chunk, batch])

            return fold_log_weights(sample_log_weights, self.num_iw_samples, self.chunk, first_pass, passes,
                                    (running_max, running_sum))

        def replica_finish(images, running_max, running_sum):
            log_px = finish((running_max, running_sum), self.num_iw_samples)
            return -tf.reduce_sum(log_px), tf.cast(tf.shape(images)[0], tf.float64)

        def start(images):
            return strategy.run(lambda x: initial_state(tf.shape(x)[0]), args=(images,))

        def passes_step(images, first_pass, passes, state):
            return strategy.run(replica_passes, args=(images, first_pass, passes, *state))

        def finish_step(images, state):
            return distribute.total(strategy, *strategy.run(replica_finish, args=(images, *state)))

        self._start, self._passes, self._finish = (tf.function(start), tf.function(passes_step),
                                                   tf.function(finish_step))

    def evaluate(self, dataset, num_images=None, progress=None):
        """Mean -log p(x) in nats over a (distributed) dataset of uint8 batches; returns (nats, images).

        `progress(done, total, nats, elapsed)` is called after every call of the model: `done` counts images,
        with a fraction for the batch in progress."""
        import tensorflow as tf
        total, count = 0.0, 0
        start = time.time()
        per_call, traced = 1, False
        for images in dataset:
            state = self._start(images)
            batch = sum(int(tf.shape(x)[0]) for x in self.strategy.experimental_local_results(state[0]))
            done = 0
            while done < self.passes:
                passes = min(per_call, self.passes - done)
                call_start = time.time()
                state = self._passes(images, tf.constant(done), tf.constant(passes), state)
                seconds = time.time() - call_start
                if traced:  # the first call's time is mostly tracing
                    per_call = max(1, int(self.CALL_SECONDS * passes / max(seconds, 1e-6)))
                traced = True
                done += passes
                if progress and done < self.passes:
                    progress(count + batch * done / self.passes, num_images,
                             total / count if count else None, time.time() - start)
            t, c = self._finish(images, state)
            total, count = total + float(t), count + int(c)
            if progress:
                progress(count, num_images, total / max(count, 1), time.time() - start)
        if count == 0:
            raise RunError("the split gave no images to evaluate")
        return total / count, count


class Progress:
    """A one-line progress bar on stderr (a new line per update when stderr is not a terminal)."""

    def __init__(self, dims, stream=sys.stderr, every_seconds=5.0):
        self.dims, self.stream, self.every = dims, stream, every_seconds
        self.tty = stream.isatty()
        self.last = -math.inf

    def __call__(self, done, total, nats, elapsed):
        finished = total is not None and done >= total
        if not self.tty and not finished and elapsed - self.last < self.every:
            return
        self.last = elapsed
        rate = done / max(elapsed, 1e-9)
        images = f"{done}" if float(done).is_integer() else f"{done:.2f}"
        from nvae_tf.objective import bits_per_dim
        figures = (f"{nats:.2f} nats  {bits_per_dim(nats, self.dims):.4f} bpd" if nats is not None
                   else "first batch in progress")
        if total:
            width = 30
            filled = int(width * min(done / total, 1.0))
            eta = (total - done) / max(rate, 1e-9)
            line = (f"[{'#' * filled}{'.' * (width - filled)}] {images}/{total} images  {figures}  "
                    f"{rate:.2f} img/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        else:
            line = f"{images} images  {figures}  {rate:.2f} img/s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and finished:
            self.stream.write("\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------- entry point
def run(opts, strategy=None, progress=True):
    """Evaluate a run; returns the result dict that is also written to `model_dir/eval_<split>.json`."""
    options.check(opts)
    config = runs.load_config(opts.model_dir)
    path = runs.find_checkpoint(opts.model_dir, opts.checkpoint)
    import keras
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf import distribute
    from nvae_tf.objective import bits_per_dim
    source = data_lib.open_source(config, opts.data_dir, strict=opts.strict_data, download=opts.download)
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
    options.check(opts)
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
