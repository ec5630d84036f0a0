"""The residual cells of NVAE (paper Fig. 3).

Every cell computes `skip(x) + 0.1 * SE(branch(x))`. The 0.1 scale on the residual branch is part of the
reference model (the paper does not mention it); SE is applied only with `use_se`.

- `EncoderCell` (pre-process and bottom-up encoder): branch BN-Swish-Conv3x3-BN-Swish-Conv3x3 (weight
  normalised); a `down` cell halves height and width and doubles channels, with `FactorizedReduce` as skip.
- `GenerativeCell` (top-down decoder and post-process): branch MBConv, i.e. BN-Conv1x1-BN-Swish-DWConv5x5-BN-
  Swish-Conv1x1-BN with expansion 6 (decoder) or 3 (post-process), plain convs; an `up` cell doubles height
  and width and halves channels, with bilinear up-sampling and a 1x1 conv (weight normalised, no bias) as skip.
"""

import keras
from keras import ops

from nvae_tf.model.ops import (Conv2D, FactorizedReduce, SqueezeExcitation, channels_shape, swish,
                               upsample_bilinear_aligned, upsample_nearest)

RESIDUAL_SCALE = 0.1


class BatchNorm(keras.layers.BatchNormalization):
    """Keras BatchNormalization whose running-statistics update can be switched off.

    With `update_statistics = False` a training call still normalises with the batch statistics but leaves the
    running statistics alone. A rematerialised cell runs its forward pass a second time to compute gradients;
    that second pass must not update the running statistics again.
    """

    update_statistics = True
    # Optional `(x, axes) -> (mean, variance)` for the batch statistics in training, e.g. over every replica's
    # batch (set by the runtime that replicates the model); the layer's own moments otherwise.
    moments_fn = None

    def _moments(self, inputs, mask):
        if self.moments_fn is not None and mask is None:
            return self.moments_fn(inputs, self._reduction_axes)
        return super()._moments(inputs, mask)

    # Optional `(layer, x, update_statistics, with_swish, conv) -> y`: the whole training-mode computation (batch
    # statistics, the running-statistics update if `update_statistics`, then swish if `with_swish`, then the
    # `Conv2D` layer `conv` if not None), e.g. fused ops (set by the runtime).
    training_fn = None

    def call(self, inputs, training=None, mask=None, with_swish=False, conv=None):
        """BN(inputs), swish(BN(inputs)) with `with_swish`, and `conv` (a `Conv2D` layer) of that if given: one
        call, so that a runtime may keep only the input for the gradient of them all, instead of the normalised
        tensor and the convolution's input as well."""
        if training and self.trainable and self.training_fn is not None and mask is None:
            return self.training_fn(self, inputs, self.update_statistics, with_swish, conv)
        y = self._normalize(inputs, training, mask)
        y = swish(y) if with_swish else y
        return y if conv is None else conv(y)

    def _normalize(self, inputs, training, mask):
        if not (training and self.trainable) or self.update_statistics:
            return super().call(inputs, training=training, mask=mask)
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(x, mask)
        gamma = ops.cast(self.gamma, x.dtype) if self.scale else None
        beta = ops.cast(self.beta, x.dtype) if self.center else None
        y = ops.batch_normalization(x, mean, variance, axis=self.axis, offset=beta, scale=gamma,
                                    epsilon=self.epsilon)
        return ops.cast(y, self.compute_dtype)


def batch_norm(name=None):
    """BatchNormalization as NVAE uses it: running <- 0.95 running + 0.05 batch. The model works under any Keras
    backend; a runtime that replicates it computes the statistics over the global batch
    (`nvae_tf.distribute.prepare_model`)."""
    return BatchNorm(momentum=0.95, epsilon=1e-5, name=name)


class BNSwishConv(keras.layers.Layer):
    """BN -> Swish -> Conv3x3 (weight normalised, bias), stride 1 or 2."""

    def __init__(self, filters, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.filters, self.strides = int(filters), int(strides)
        self.bn = batch_norm("bn")
        self.conv = Conv2D(filters, 3, strides=strides, name="conv")

    def build(self, input_shape):
        self.bn.build(input_shape)
        self.conv.build(input_shape)

    def call(self, x, training=False):
        return self.bn(x, training=training, with_swish=True, conv=self.conv)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "strides": self.strides}


class InvertedResidual(keras.layers.Layer):
    """MBConv: BN -> Conv1x1 (C -> eC) -> BN -> Swish -> DWConv5x5 -> BN -> Swish -> Conv1x1 (eC -> out) -> BN.

    No bias and no weight normalisation. With `upsample`, nearest x2 up-sampling comes first.
    """

    def __init__(self, in_channels, filters, expansion, upsample=False, **kwargs):
        super().__init__(**kwargs)
        self.in_channels, self.filters = int(in_channels), int(filters)
        self.expansion, self.upsample = int(expansion), bool(upsample)
        hidden = self.expansion * self.in_channels
        self.bn_in = batch_norm("bn_in")
        self.expand = Conv2D(hidden, 1, use_bias=False, weight_norm=False, name="expand")
        self.bn_expand = batch_norm("bn_expand")
        self.depthwise = Conv2D(hidden, 5, use_bias=False, weight_norm=False, depthwise=True, name="depthwise")
        self.bn_depthwise = batch_norm("bn_depthwise")
        self.project = Conv2D(self.filters, 1, use_bias=False, weight_norm=False, name="project")
        self.bn_out = batch_norm("bn_out")

    def build(self, input_shape=None):
        hidden = channels_shape(self.expansion * self.in_channels)
        for layer, shape in ((self.bn_in, channels_shape(self.in_channels)),
                             (self.expand, channels_shape(self.in_channels)), (self.bn_expand, hidden),
                             (self.depthwise, hidden), (self.bn_depthwise, hidden), (self.project, hidden),
                             (self.bn_out, channels_shape(self.filters))):
            layer.build(shape)

    def call(self, x, training=False):
        if self.upsample:
            x = upsample_nearest(x)
        x = self.expand(self.bn_in(x, training=training))
        x = self.bn_expand(x, training=training, with_swish=True, conv=self.depthwise)
        x = self.bn_depthwise(x, training=training, with_swish=True, conv=self.project)
        return self.bn_out(x, training=training)

    def get_config(self):
        return {**super().get_config(), "in_channels": self.in_channels, "filters": self.filters,
                "expansion": self.expansion, "upsample": self.upsample}


class _ResidualCell(keras.layers.Layer):
    """`skip(x) + 0.1 * SE(branch(x))`; subclasses set `self.branch` (a list of layers) and `self.skip`."""

    def __init__(self, in_channels, out_channels, use_se, **kwargs):
        super().__init__(**kwargs)
        self.in_channels, self.out_channels, self.use_se = int(in_channels), int(out_channels), bool(use_se)
        self.se = SqueezeExcitation(name="se") if use_se else None
        self.skip = None

    def build(self, input_shape=None):
        channels = self.in_channels
        for layer in self.branch:
            layer.build(channels_shape(channels))
            channels = layer.filters
        if self.se is not None:
            self.se.build(channels_shape(self.out_channels))
        if self.skip is not None:
            self.skip.build(channels_shape(self.in_channels))

    def call(self, x, training=False):
        h = x
        for layer in self.branch:
            h = layer(h, training=training)
        if self.se is not None:
            h = self.se(h)
        return self._skip(x) + RESIDUAL_SCALE * h

    def _skip(self, x):
        return x if self.skip is None else self.skip(x)


class EncoderCell(_ResidualCell):
    """Residual cell of the pre-process blocks and the encoder tower.

    Args:
      in_channels: channels of the input `[batch, h, w, in_channels]`.
      cell_type: "normal" (same shape out) or "down" (`[batch, h/2, w/2, 2*in_channels]` out).
      use_se: apply squeeze-and-excitation to the residual branch.
    """

    def __init__(self, in_channels, cell_type="normal", use_se=True, **kwargs):
        if cell_type not in ("normal", "down"):
            raise ValueError(f"EncoderCell cell_type must be 'normal' or 'down', got {cell_type!r}")
        out_channels = 2 * in_channels if cell_type == "down" else in_channels
        super().__init__(in_channels, out_channels, use_se, **kwargs)
        self.cell_type = cell_type
        strides = 2 if cell_type == "down" else 1
        self.branch = [BNSwishConv(out_channels, strides=strides, name="res_0"),
                       BNSwishConv(out_channels, name="res_1")]
        if cell_type == "down":
            self.skip = FactorizedReduce(out_channels, name="skip")

    def get_config(self):
        return {**super().get_config(), "in_channels": self.in_channels, "cell_type": self.cell_type,
                "use_se": self.use_se}


class _UpSkip(keras.layers.Layer):
    """Bilinear x2 (aligned corners) then Conv1x1 (weight normalised, no bias)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.conv = Conv2D(filters, 1, use_bias=False, name="conv")

    def build(self, input_shape):
        self.conv.build(input_shape)

    def call(self, x):
        return self.conv(upsample_bilinear_aligned(x))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class GenerativeCell(_ResidualCell):
    """Residual MBConv cell of the top-down decoder (expansion 6) and the post-process blocks (expansion 3).

    Args:
      in_channels: channels of the input `[batch, h, w, in_channels]`.
      cell_type: "normal" (same shape out) or "up" (`[batch, 2h, 2w, in_channels/2]` out).
      expansion: MBConv expansion factor; the hidden width is `expansion * in_channels`.
      use_se: apply squeeze-and-excitation to the residual branch.
    """

    def __init__(self, in_channels, cell_type="normal", expansion=6, use_se=True, **kwargs):
        if cell_type not in ("normal", "up"):
            raise ValueError(f"GenerativeCell cell_type must be 'normal' or 'up', got {cell_type!r}")
        if cell_type == "up" and in_channels % 2:
            raise ValueError(f"an up cell halves the channels; {in_channels} is odd")
        out_channels = in_channels // 2 if cell_type == "up" else in_channels
        super().__init__(in_channels, out_channels, use_se, **kwargs)
        self.cell_type, self.expansion = cell_type, int(expansion)
        self.branch = [InvertedResidual(in_channels, out_channels, expansion, upsample=cell_type == "up",
                                        name="mbconv")]
        if cell_type == "up":
            self.skip = _UpSkip(out_channels, name="skip")

    def get_config(self):
        return {**super().get_config(), "in_channels": self.in_channels, "cell_type": self.cell_type,
                "expansion": self.expansion, "use_se": self.use_se}
