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


# A 3x5 pixel font for row labels such as "t=0.7": each glyph is five rows of three bits.
GLYPHS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "001", "001", "001"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"), "t": ("010", "111", "010", "010", "011"),
    "=": ("000", "111", "000", "111", "000"), "-": ("000", "000", "111", "000", "000"),
    " ": ("000", "000", "000", "000", "000"),
}


def render_text(text, scale=2):
    """`text` (characters of `GLYPHS`) as a `[5 scale, 4 scale len - scale]` boolean mask of its dark pixels."""
    unknown = sorted(set(text) - set(GLYPHS))
    if unknown:
        raise ValueError(f"cannot draw {''.join(unknown)!r}; the label font has {''.join(sorted(GLYPHS))!r}")
    columns = []
    for i, char in enumerate(text):
        if i:
            columns.append(np.zeros((5, 1), bool))
        columns.append(np.array([[bit == "1" for bit in row] for row in GLYPHS[char]]))
    mask = np.concatenate(columns, axis=1) if columns else np.zeros((5, 0), bool)
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def make_grid(images, columns=None, padding=2, pad_value=255, min_size=64, row_labels=None):
    """Tile `[n, h, w, c]` images into one `[H, W, c]` uint8 image, `columns` per row (default: square).

    Images smaller than `min_size` pixels are enlarged by an integer factor (nearest neighbour) to be seen.
    `row_labels` (one short text per row, e.g. "t=0.7") are written in a margin left of the rows.
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
    if row_labels is None:
        return grid
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    masks = [render_text(label) for label in row_labels]
    width = max(m.shape[1] for m in masks) + 2 * padding
    margin = np.full((grid.shape[0], width, c), pad_value, np.uint8)
    for r, mask in enumerate(masks):
        top = padding + r * (h + padding) + max(0, (h - mask.shape[0]) // 2)
        rows_fit = min(mask.shape[0], grid.shape[0] - top)
        region = margin[top:top + rows_fit, padding:padding + mask.shape[1]]
        region[mask[:rows_fit]] = 255 - pad_value if pad_value > 127 else 255
    return np.concatenate([margin, grid], axis=1)


def write_png(path, image):
    """Write a `[h, w, c]` uint8 image (c = 1 or 3) as PNG, creating the folder; renamed into place."""
    import tensorflow as tf
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    staging = f"{path}.tmp-{os.getpid()}"
    tf.io.write_file(staging, tf.io.encode_png(to_uint8(image)))
    tf.io.gfile.rename(staging, path, overwrite=True)  # a stopped or failed write leaves `path` as it was
