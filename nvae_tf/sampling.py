"""Drawing images from a trained NVAE: temperature bounds, pixel mode, reconstructions and BatchNorm readjustment.

Shared by `sample` (PNG grids), `export` (the deployed samplers) and `train` (TensorBoard image summaries).
"""

import time

import keras
import tensorflow as tf
from absl import logging
from keras import ops

from nvae_tf.errors import RunError
from nvae_tf.model.distributions import KerasNoise

MAX_TEMPERATURE = 2.0


def check_temperature(t, flag="--temperature"):
    """`t` as a float if 0 < t <= 2, else `RunError` naming `flag`."""
    if not (isinstance(t, (int, float)) and 0.0 < t <= MAX_TEMPERATURE):
        raise RunError(f"{flag} must be in (0, {MAX_TEMPERATURE:g}], got {t}")
    return float(t)


def parse_temperatures(text, flag="--temperatures"):
    """The temperatures of a comma-separated list, each checked."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise RunError(f"{flag}: expected comma-separated numbers, got {text!r}") from e
    if not values:
        raise RunError(f"{flag} is empty")
    return [check_temperature(t, flag) for t in values]


def pixel_mode(config, pixels="auto"):
    """'mean' or 'sample': `auto` takes the decoder mean for binary images and a draw otherwise."""
    if pixels == "auto":
        return "mean" if config.decoder == "bernoulli" else "sample"
    return pixels


def seeded_noise(seed, name):
    """A noise source of its own, seeded: the same seed gives the same draws."""
    return KerasNoise(keras.random.SeedGenerator(seed, name=name))


def restart_noise(noise, seed):
    """Puts a `seeded_noise` source back at the first draw of `seed`, as if it had just been made with it (in
    eager code, or inside a traced function, which then restarts it at every call)."""
    state = noise.seed_generator.state
    state.assign(tf.constant([seed, 0], state.dtype))  # Keras's SeedGenerator starts at [seed, 0]


def draw(model, num_samples, temperature, seed=0, pixels="sample"):
    """`[num_samples, H, W, C]` float images in [0, 1] from the prior; the same seed gives the same images."""
    return model.sample(num_samples, temperature, noise=seeded_noise(seed, "sample_noise"), mode=pixels).numpy()


def reconstruct(model, images, noise=None, pixels="sample"):
    """(inputs, reconstructions), float tensors in [0, 1], for uint8 `images`: one posterior sample, decoded
    (noise from `noise`, default the model's own generator)."""
    terms = model(images, training=False, noise=noise)
    return model.preprocess_images(images), model.decode_pixels(terms.decoder_params, mode=pixels, noise=noise)


def reset_batchnorm(model):
    """The sampling path's running statistics back to (mean 0, variance 1), so a readjustment does not depend
    on training's. The encoder's BatchNorm layers are not on that path and keep their statistics."""
    for bn in model.sampling_batchnorm_layers:
        bn.moving_mean.assign(ops.zeros(bn.moving_mean.shape, bn.moving_mean.dtype))
        bn.moving_variance.assign(ops.ones(bn.moving_variance.shape, bn.moving_variance.dtype))


def readjustment_pass(model, batch, seed):
    """The traced training-mode sampling pass of `batch` images at a temperature given as a float32 scalar
    tensor, its noise restarted at `seed`. Traced once per model and batch size: readjusting at several
    temperatures (a row each in `sample --mode=temperatures`) reuses the same graph."""
    cache = model.__dict__.setdefault("_readjustment_passes", {})  # not a tracked Keras attribute
    if batch not in cache:
        noise = seeded_noise(seed, "readjust_noise")
        cache[batch] = noise, tf.function(
            lambda t: model.sample(batch, t, noise=noise, mode="mean", training=True), reduce_retracing=True)
    noise, sample_pass = cache[batch]
    restart_noise(noise, seed)
    return sample_pass


def readjust_batchnorm(model, temperature, passes=500, batch=16, seed=0, progress=True):
    """Reset the sampling path's BN running statistics, then update them with `passes` training-mode sampling
    passes of `batch` images at `temperature` (running <- 0.95 running + 0.05 batch). Weights are unchanged."""
    if passes < 1 or batch < 2:
        raise RunError(f"--bn_passes must be >= 1 and --bn_batch >= 2, got {passes} and {batch}")
    if progress:
        logging.info("re-estimating BatchNorm statistics: %d passes of %d samples at t = %g", passes, batch,
                     temperature)
    sample_pass = readjustment_pass(model, batch, seed)
    temperature = tf.constant(temperature, tf.float32)
    reset_batchnorm(model)
    start = last = time.time()
    for i in range(passes):
        sample_pass(temperature)
        now = time.time()
        if progress and (now - last >= 10 or i + 1 == passes):  # a line every 10 s, and the last pass
            logging.info("BN readjustment: pass %d/%d (%.1f s)", i + 1, passes, now - start)
            last = now
