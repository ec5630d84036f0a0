"""Importance-weighted log-likelihood of images under a trained NVAE (`python -m nvae_tf.evaluate` runs it).

For every image x, with K posterior samples z_k ~ q(z|x):

    log p(x) ~= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x) = logsumexp_k w_k - log K,
    w_k = log p(x|z_k) + sum_groups log p(z_k) - sum_groups log q(z_k|x)      (log q includes the flows)

Samples are drawn in chunks of several per forward pass (each image tiled `chunk` times) and folded into a
running log-sum-exp in float64, so K can be 1000 without holding K weights or losing precision.
"""

import math
import sys
import time

import keras
import tensorflow as tf

from nvae_tf import distribute
from nvae_tf.errors import RunError
from nvae_tf.objective import bits_per_dim


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
    return tf.fill([batch], tf.constant(-math.inf, tf.float64)), tf.zeros([batch], tf.float64)


def fold_log_weights(sample_log_weights, num_samples, chunk, first_pass, passes, state):
    """Fold the log weights of passes `first_pass .. first_pass + passes - 1` (each `chunk` samples per item, from
    `sample_log_weights()`) into the running (max, scaled sum) `state`; samples numbered K or more are masked."""
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
    running_max, running_sum = state
    return running_max + tf.math.log(running_sum) - math.log(num_samples)


class Evaluator:
    """Importance-weighted NLL of a restored model under a distribution strategy.

    The K samples of a batch are drawn in calls of a few seconds each (the running log-sum-exp carried between
    them), so progress can be shown however large K is."""

    CALL_SECONDS = 2.0  # aim for device calls of about this long

    def __init__(self, model, strategy, num_iw_samples, batch_size, forward_batch=0, seed=0):
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
