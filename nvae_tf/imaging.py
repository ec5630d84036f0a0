"""Image grids and PNG files for inspection, samples and reconstructions."""

import math
import os

import numpy as np


def to_uint8(images):
    """Floats in [0, 1] -> uint8 (rounded); uint8 passes through."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def make_grid(images, columns=None, padding=2, pad_value=255, min_size=64):
    """Tile `[n, h, w, c]` images into one `[H, W, c]` uint8 image, `columns` per row (default: square).

    Images smaller than `min_size` pixels are enlarged by an integer factor (nearest neighbour) to be seen.
    """
    images = to_uint8(images)
    if images.ndim != 4:
        raise ValueError(f"expected images [n, h, w, c], got shape {images.shape}")
    scale = max(1, min_size // max(images.shape[1], images.shape[2]))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, c = images.shape
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def write_png(path, image):
    """Write a `[h, w, c]` uint8 image (c = 1 or 3) as PNG, creating the folder."""
    import tensorflow as tf
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tf.io.write_file(path, tf.io.encode_png(to_uint8(image)))
