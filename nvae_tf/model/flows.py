"""Autoregressive (IAF-style, shift-only) flows applied to posterior samples.

A flow cell maps z to `z - mu(z)`, where `mu` at a position and channel depends only on z at earlier
positions (raster order, or reversed with `mirror`) and on lower channels at the same position. The
Jacobian is triangular with unit diagonal, so the log-determinant is 0.
"""

import math

import keras
import numpy as np
from keras import ops

from nvae_tf.model.ops import Conv2D, channels_shape

FLOW_EXPANSION = 6


def channel_mask(in_channels, out_channels, zero_diag):
    """`[in, out]` 0/1 mask of which input channels each output channel sees at the centre pixel.

    With `out >= in` (ratio r = out / in) output block i (channels [i r, (i+1) r)) sees inputs <= i, or < i
    with `zero_diag`. With `out < in` (r = in / out) output i sees inputs < (i+1) r, or < i r with `zero_diag`.
    """
    mask = np.zeros((in_channels, out_channels), dtype="float32")
    if out_channels >= in_channels:
        if out_channels % in_channels:
            raise ValueError(f"out channels {out_channels} must be a multiple of in channels {in_channels}")
        ratio = out_channels // in_channels
        for o in range(out_channels):
            limit = o // ratio + (0 if zero_diag else 1)
            mask[:limit, o] = 1.0
    else:
        if in_channels % out_channels:
            raise ValueError(f"in channels {in_channels} must be a multiple of out channels {out_channels}")
        ratio = in_channels // out_channels
        for o in range(out_channels):
            limit = o * ratio if zero_diag else (o + 1) * ratio
            mask[:limit, o] = 1.0
    return mask


def autoregressive_mask(kernel_size, in_channels, out_channels, zero_diag, mirror=False, depthwise=False):
    """Kernel mask `[k, k, in, out]` (`[k, k, in, 1]` if depthwise) of an autoregressive convolution.

    Rows above the centre and pixels left of the centre in the centre row are fully visible; the centre pixel
    uses `channel_mask` (depthwise: all ones, or all zeros with `zero_diag`); later pixels are hidden.
    `mirror` reverses the spatial order.
    """
    k, m = kernel_size, (kernel_size - 1) // 2
    out = 1 if depthwise else out_channels
    mask = np.zeros((k, k, in_channels, out), dtype="float32")
    mask[:m] = 1.0
    mask[m, :m] = 1.0
    if depthwise:
        mask[m, m] = 0.0 if zero_diag else 1.0
    else:
        mask[m, m] = channel_mask(in_channels, out_channels, zero_diag)
    if mirror:
        mask = mask[::-1, ::-1].copy()
    return mask


class ARFlowCell(keras.layers.Layer):
    """Shift-only autoregressive flow on a latent sample `[batch, h, w, nz]`:

    `h = ELU(ARConv3x3(z; nz -> 6nz, strictly autoregressive))`, `h = ELU(depthwise ARConv5x5(h))`,
    `mu = ARConv1x1(h; 6nz -> nz)` (log weight norm initialised 0.1 smaller), `z' = z - mu`.
    The reference applies ELU twice before the last conv (NVAE issue #25, unintended); this cell applies it
    once, or twice with `elu_twice` (for the reference's checkpoints). Every conv is weight-normalised.
    """

    def __init__(self, latent_channels, mirror=False, elu_twice=False, **kwargs):
        super().__init__(**kwargs)
        self.latent_channels, self.mirror = int(latent_channels), bool(mirror)
        self.elu_twice = bool(elu_twice)
        nz, hidden = self.latent_channels, FLOW_EXPANSION * self.latent_channels
        self.conv_in = Conv2D(hidden, 3, use_bias=False, name="conv_in",
                              mask=autoregressive_mask(3, nz, hidden, zero_diag=True, mirror=mirror))
        self.conv_depthwise = Conv2D(hidden, 5, use_bias=False, depthwise=True, name="conv_depthwise",
                                     mask=autoregressive_mask(5, hidden, hidden, zero_diag=False, mirror=mirror,
                                                              depthwise=True))
        self.conv_out = Conv2D(nz, 1, use_bias=True, name="conv_out", log_weight_norm_offset=math.log(0.1),
                               mask=autoregressive_mask(1, hidden, nz, zero_diag=False, mirror=mirror))

    def build(self, input_shape=None):
        hidden = channels_shape(FLOW_EXPANSION * self.latent_channels)
        self.conv_in.build(channels_shape(self.latent_channels))
        self.conv_depthwise.build(hidden)
        self.conv_out.build(hidden)

    def shift(self, z):
        """The autoregressive shift mu(z)."""
        h = ops.elu(self.conv_in(z))
        h = ops.elu(self.conv_depthwise(h))
        if self.elu_twice:
            h = ops.elu(h)
        return self.conv_out(h)

    def call(self, z, training=False):
        return z - self.shift(z)

    def get_config(self):
        return {**super().get_config(), "latent_channels": self.latent_channels, "mirror": self.mirror,
                "elu_twice": self.elu_twice}
