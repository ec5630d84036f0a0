"""`python -m nvae_tf.sample --model_dir=runs/X --temperature=0.7 --out=samples.png`: images from a run.

Modes:
  sample        `--num_samples` images from the prior at `--temperature` (a square grid);
  temperatures  one row of `--num_samples` images per temperature in `--temperatures` (written left of the
                row), the same noise in every row, so a column shows one sample as the temperature rises;
  reconstruct   the first `--num_samples` images of `--split` next to their reconstructions (pairs of
                columns: input, reconstruction).

The same `--seed` gives the same PNG. `--readjust_bn` re-estimates the BatchNorm statistics first: they are
reset to (mean 0, variance 1), then `--bn_passes` training-mode sampling passes of `--bn_batch` images at the
sampling temperature update them (NVAE's procedure, spec section 5); in `temperatures` mode every row is
readjusted at its own temperature. Pixels are the decoder's draw
(`--pixels=sample`) or its mean (`--pixels=mean`); the default is the mean for binary images and a draw
otherwise.
"""

import math
import os

from nvae_tf import cli, imaging, options, runs
from nvae_tf.errors import RunError
from nvae_tf.options import SampleOptions


def interleave(inputs, reconstructions):
    """[input_0, recon_0, input_1, recon_1, ...] as one `[2n, H, W, C]` array."""
    import numpy as np
    pairs = np.stack([inputs, reconstructions], axis=1)
    return pairs.reshape(-1, *inputs.shape[1:])


def run(opts):
    """Write the PNG grid of `opts.mode`; returns (grid `[H, W, C]` uint8, checkpoint path)."""
    options.check(opts)
    from nvae_tf import sampling
    temperature = sampling.check_temperature(opts.temperature)
    temps = sampling.parse_temperatures(opts.temperatures) if opts.mode == "temperatures" else [temperature]
    config = runs.load_config(opts.model_dir)
    runs.find_checkpoint(opts.model_dir, opts.checkpoint)
    source = None
    if opts.mode == "reconstruct":
        from nvae_tf import data as data_lib
        source = data_lib.open_source(config, runs.data_dir_of(opts.model_dir, opts.data_dir), strict=opts.strict_data, download=opts.download)
        if opts.split not in source.sizes:
            raise RunError(f"--split: {config.dataset} has no split {opts.split!r}; it has "
                           f"{', '.join(sorted(source.sizes))}")
    _, model, path = runs.load_model(opts.model_dir, opts.checkpoint)
    pixels = sampling.pixel_mode(config, opts.pixels)

    def readjust(t):
        if opts.readjust_bn:
            sampling.readjust_batchnorm(model, t, opts.bn_passes, opts.bn_batch, opts.seed)

    import numpy as np
    if opts.mode == "sample":
        readjust(temperature)
        images = sampling.draw(model, opts.num_samples, temperature, opts.seed, pixels)
        grid = imaging.make_grid(images, opts.columns or None)
    elif opts.mode == "temperatures":
        rows = []
        for t in temps:  # with --readjust_bn, every row gets the statistics of samples at its own temperature
            readjust(t)
            rows.append(sampling.draw(model, opts.num_samples, t, opts.seed, pixels))
        grid = imaging.make_grid(np.concatenate(rows), columns=opts.num_samples,
                                 row_labels=[f"t={t:g}" for t in temps])
    else:
        readjust(temperature)
        batch = next(iter(source.dataset(opts.split, opts.num_samples, training=False, deterministic=True,
                                         seed=opts.seed, cache=False)))
        noise = sampling.seeded_noise(opts.seed, "reconstruct_noise")
        inputs, recon = (t.numpy() for t in sampling.reconstruct(model, batch, noise, pixels))
        cols = opts.columns or 2 * max(1, math.ceil(math.sqrt(len(inputs))))
        grid = imaging.make_grid(interleave(inputs, recon), columns=cols + cols % 2)
    imaging.write_png(opts.out, grid)
    return grid, path


def run_from_flags(fv):
    opts = options.from_flags(SampleOptions, fv)
    grid, path = run(opts)
    print(f"wrote {os.path.abspath(opts.out)} ({grid.shape[1]}x{grid.shape[0]}, mode {opts.mode}, "
          f"{os.path.basename(path)})")
    return 0


def main():
    cli.main("nvae_tf.sample", __doc__, [SampleOptions], run_from_flags, usage="--model_dir=DIR [flags]")


if __name__ == "__main__":
    main()
