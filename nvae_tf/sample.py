"""`python -m nvae_tf.sample --model_dir=runs/X --temperature=0.7 --out=samples.png`: images from a run.

Modes:
  sample        `--num_samples` images from the prior at `--temperature` (a square grid);
  temperatures  one row of `--num_samples` images per temperature in `--temperatures`, the same noise in
                every row, so a column shows one sample as the temperature rises;
  reconstruct   the first `--num_samples` images of `--split` next to their reconstructions (pairs of
                columns: input, reconstruction).

The same `--seed` gives the same PNG. `--readjust_bn` re-estimates the BatchNorm statistics first: they are
reset to (mean 0, variance 1), then `--bn_passes` training-mode sampling passes of `--bn_batch` images at the
sampling temperature update them (NVAE's procedure, spec section 5). Pixels are the decoder's draw
(`--pixels=sample`) or its mean (`--pixels=mean`); the default is the mean for binary images and a draw
otherwise.
"""

import math
import os
import sys
import time

from absl import app, flags, logging

from nvae_tf import data as data_lib
from nvae_tf import imaging, runs

FLAGS = flags.FLAGS
DEFAULT_TEMPERATURES = "0.5,0.6,0.7,0.8,0.9,1.0"


def define_flags():
    flags.DEFINE_string("model_dir", None, "Run directory written by nvae_tf.train.")
    flags.DEFINE_string("checkpoint", None, "Checkpoint prefix or step number (default: the latest).")
    flags.DEFINE_enum("mode", "sample", ["sample", "temperatures", "reconstruct"], "What to draw.")
    flags.DEFINE_float("temperature", 0.7, "Prior temperature t in (0, 2]: z ~ N(mu, (t sigma)^2).")
    flags.DEFINE_string("temperatures", DEFAULT_TEMPERATURES, "Comma-separated temperatures (mode temperatures).")
    flags.DEFINE_integer("num_samples", 64, "Images to draw (per row in mode temperatures).")
    flags.DEFINE_integer("seed", 0, "Seed of all noise; the same seed gives the same image.")
    flags.DEFINE_enum("pixels", "auto", ["auto", "sample", "mean"], "Pixel values: a draw from p(x|z), its mean, "
                      "or auto (mean for binary images, a draw otherwise).")
    flags.DEFINE_bool("readjust_bn", False, "Re-estimate BatchNorm statistics from samples at the temperature.")
    flags.DEFINE_integer("bn_passes", 500, "Sampling passes for --readjust_bn.")
    flags.DEFINE_integer("bn_batch", 16, "Images per pass for --readjust_bn.")
    flags.DEFINE_string("split", "validation", "Split for mode reconstruct.")
    flags.DEFINE_integer("columns", 0, "Images per grid row (default: square; 2 x pairs for reconstruct).")
    flags.DEFINE_string("out", "samples.png", "Output PNG.")
    data_lib.define_flags()


MAX_TEMPERATURE = 2.0


def check_temperature(t, flag="--temperature"):
    if not (isinstance(t, (int, float)) and 0.0 < t <= MAX_TEMPERATURE):
        raise runs.RunError(f"{flag} must be in (0, {MAX_TEMPERATURE:g}], got {t}")
    return float(t)


def pixel_mode(config, pixels="auto"):
    if pixels == "auto":
        return "mean" if config.decoder == "bernoulli" else "sample"
    return pixels


def reset_batchnorm(model):
    """The sampling path's running statistics back to (mean 0, variance 1), so a readjustment does not depend
    on training's. The encoder's BatchNorm layers are not on that path and keep their statistics."""
    from keras import ops
    for bn in model.sampling_batchnorm_layers:
        bn.moving_mean.assign(ops.zeros(bn.moving_mean.shape, bn.moving_mean.dtype))
        bn.moving_variance.assign(ops.ones(bn.moving_variance.shape, bn.moving_variance.dtype))


def readjust_batchnorm(model, temperature, passes=500, batch=16, seed=0, progress=True):
    """Reset every BN layer's running statistics, then update them with `passes` training-mode sampling
    passes of `batch` images at `temperature` (running <- 0.95 running + 0.05 batch). Weights are unchanged."""
    import keras
    import tensorflow as tf

    from nvae_tf.model.distributions import KerasNoise
    if passes < 1 or batch < 2:
        raise runs.RunError(f"--bn_passes must be >= 1 and --bn_batch >= 2, got {passes} and {batch}")
    noise = KerasNoise(keras.random.SeedGenerator(seed, name="readjust_noise"))
    sample_pass = tf.function(lambda: model.sample(batch, temperature, noise=noise, mode="mean", training=True))
    reset_batchnorm(model)
    start = time.time()
    for i in range(passes):
        sample_pass()
        if progress and ((i + 1) % max(1, passes // 10) == 0 or i + 1 == passes):
            logging.info("BN readjustment: pass %d/%d (%.1f s)", i + 1, passes, time.time() - start)


def draw(model, num_samples, temperature, seed=0, pixels="sample"):
    """`[num_samples, H, W, C]` float images in [0, 1] from the prior; the same seed gives the same images."""
    import keras

    from nvae_tf.model.distributions import KerasNoise
    noise = KerasNoise(keras.random.SeedGenerator(seed, name="sample_noise"))
    return model.sample(num_samples, temperature, noise=noise, mode=pixels).numpy()


def reconstruct(model, images, seed=0, pixels="sample"):
    """(inputs, reconstructions) in [0, 1] for uint8 images: one posterior sample, decoded."""
    import keras

    from nvae_tf.model.distributions import KerasNoise
    noise = KerasNoise(keras.random.SeedGenerator(seed, name="reconstruct_noise"))
    out = model(images, training=False, noise=noise)
    recon = model.decode_pixels(out["decoder_params"], mode=pixels, noise=noise).numpy()
    return model.preprocess_images(images).numpy(), recon


def interleave(inputs, reconstructions):
    """[input_0, recon_0, input_1, recon_1, ...] as one `[2n, H, W, C]` array."""
    import numpy as np
    pairs = np.stack([inputs, reconstructions], axis=1)
    return pairs.reshape(-1, *inputs.shape[1:])


def parse_temperatures(text):
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise runs.RunError(f"--temperatures: expected comma-separated numbers, got {text!r}") from e
    if not values:
        raise runs.RunError("--temperatures is empty")
    return [check_temperature(t, "--temperatures") for t in values]


def run(model_dir, mode="sample", temperature=0.7, temperatures=DEFAULT_TEMPERATURES, num_samples=64, seed=0,
        pixels="auto", readjust_bn=False, bn_passes=500, bn_batch=16, split="validation", columns=0,
        out="samples.png", checkpoint=None, data_dir="", strict=False, download=True):
    """Write the PNG grid of `mode`; returns (grid `[H, W, C]` uint8, checkpoint path)."""
    import numpy as np
    if num_samples < 1:
        raise runs.RunError(f"--num_samples must be >= 1, got {num_samples}")
    temperature = check_temperature(temperature)
    temps = parse_temperatures(temperatures) if mode == "temperatures" else [temperature]
    config = runs.load_config(model_dir)
    path = runs.find_checkpoint(model_dir, checkpoint)
    source = None
    if mode == "reconstruct":
        source = data_lib.open_source(config, data_dir, strict=strict, download=download)
        if split not in source.sizes:
            raise runs.RunError(f"--split: {config.dataset} has no split {split!r}; it has "
                                f"{', '.join(sorted(source.sizes))}")
    _, model, path = runs.load_model(model_dir, checkpoint)
    pixels = pixel_mode(config, pixels)
    if readjust_bn:
        logging.info("re-estimating BatchNorm statistics: %d passes of %d samples at t = %g", bn_passes, bn_batch,
                     temps[0])
        readjust_batchnorm(model, temps[0], bn_passes, bn_batch, seed)

    if mode == "sample":
        images = draw(model, num_samples, temperature, seed, pixels)
        grid = imaging.make_grid(images, columns or None)
    elif mode == "temperatures":
        rows = [draw(model, num_samples, t, seed, pixels) for t in temps]
        grid = imaging.make_grid(np.concatenate(rows), columns=num_samples)
    else:
        ds = source.dataset(split, num_samples, training=False, deterministic=True, seed=seed, cache=False)
        batch = next(iter(ds))
        inputs, recon = reconstruct(model, batch, seed, pixels)
        pairs = interleave(inputs, recon)
        cols = columns or 2 * max(1, math.ceil(math.sqrt(len(inputs))))
        grid = imaging.make_grid(pairs, columns=cols + cols % 2)
    imaging.write_png(out, grid)
    return grid, path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        grid, path = run(FLAGS.model_dir, FLAGS.mode, FLAGS.temperature, FLAGS.temperatures, FLAGS.num_samples,
                         FLAGS.seed, FLAGS.pixels, FLAGS.readjust_bn, FLAGS.bn_passes, FLAGS.bn_batch, FLAGS.split,
                         FLAGS.columns, FLAGS.out, FLAGS.checkpoint, FLAGS.data_dir, FLAGS.strict_data,
                         FLAGS.download)
    except (runs.RunError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {os.path.abspath(FLAGS.out)} ({grid.shape[1]}x{grid.shape[0]}, mode {FLAGS.mode}, "
          f"{os.path.basename(path)})")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
