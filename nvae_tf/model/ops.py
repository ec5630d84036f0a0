"""Building blocks of NVAE: convolutions (weight-normalised or plain), SE, swish, resampling.

Every tensor is `[batch, height, width, channels]`. Only Keras 3 layers and `keras.ops` are used, so the
blocks are backend-portable and convert to TFLite builtin ops.
"""

import math
import threading

import keras
import numpy as np
from keras import ops


# A runtime may give swish an implementation of its own with the same values (`set_swish`), e.g. one whose
# gradient takes fewer graph ops.
_swish = None


def set_swish(fn):
    """Compute `swish` with `fn` from now on (None: `keras.ops.silu`)."""
    global _swish
    _swish = fn


def swish(x):
    """x * sigmoid(x)."""
    return ops.silu(x) if _swish is None else _swish(x)


# Likewise for gradient checkpointing: a runtime may give `remat` an implementation of its own (`set_remat`).
_remat = None


def set_remat(fn):
    """Rematerialise with `fn` from now on (None: `keras.remat`)."""
    global _remat
    _remat = fn


def remat(f):
    """`f` whose activations are recomputed during back-propagation instead of kept (`keras.remat`)."""
    return keras.remat(f) if _remat is None else _remat(f)


# And for ordering: `after(x, dependency)` is `x`, to be used only once `dependency` has been computed, so that
# what is computed from it is not scheduled (and held in memory) any earlier. A runtime that schedules by data
# dependencies alone gives it its implementation (`set_after`); by default it is `x`.
_after = None


def set_after(fn):
    """Order with `fn(x, dependency)` from now on (None: no ordering beyond the data)."""
    global _after
    _after = fn


def after(x, dependency):
    """`x`, not to be used before `dependency` has been computed (see `set_after`)."""
    return x if _after is None else _after(x, dependency)


def sum_per_image(x):
    """The sum over every axis but the first: `[batch, ...]` -> `[batch]`."""
    return ops.sum(ops.reshape(x, (ops.shape(x)[0], -1)), axis=1)


def channels_shape(channels):
    """An input shape that fixes only the channels, for building a layer whose weights depend on nothing else."""
    return (None, None, None, int(channels))


def _fan_in_uniform(fan_in):
    """U(+-1/sqrt(fan_in)): the default initialisation of kernels and biases in the paper's code."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def weight_normalized(kernel, log_weight_norm, depthwise):
    """`exp(g) * v / (||v|| + 1e-5)` per output channel (per input channel for a depthwise kernel), the norm over
    (kernel height, kernel width, input channels), for kernels `[..., k, k, in, out]` and log weight norms
    `[..., channels]` with the same leading axes (one kernel, or a stack of them). The per-channel factor is
    formed first: the gradient then keeps only the kernel and that factor, not a kernel-sized intermediate."""
    lead = len(kernel.shape) - 4
    axes = tuple(lead + a for a in ((0, 1) if depthwise else (0, 1, 2)))
    norm = ops.sqrt(ops.sum(ops.square(kernel), axis=axes, keepdims=True))
    shape = tuple(kernel.shape[:lead]) + ((1, 1, -1, 1) if depthwise else (1, 1, 1, -1))
    return kernel * (ops.reshape(ops.exp(log_weight_norm), shape) / (norm + 1e-5))


# Effective kernels computed once and shared by a forward pass and the spectral regulariser, by `id(layer)`
# (`NVAE.shared_kernels()`). Per thread: a distribution strategy traces its replicas in threads of their own.
SHARED_KERNELS = threading.local()


class Conv2D(keras.layers.Layer):
    """A 2-D convolution with optional weight normalisation, depthwise grouping and a fixed weight mask.

    With weight normalisation (Salimans & Kingma, 2016) the effective kernel of output channel o is
    `exp(g_o) * v_o / (||v_o|| + 1e-5)`, the norm taken over (kernel height, kernel width, input channels);
    `g` (the log weight norm) starts at `log(||v_o|| + 0.01)`, plus `log_weight_norm_offset`.

    Args:
      filters: output channels. For a depthwise convolution it must equal the input channels.
      kernel_size: odd square kernel size.
      strides: 1 or 2. Padding is symmetric, `(kernel_size - 1) // 2` on every side.
      use_bias: add a bias, initialised U(+-1/sqrt(fan_in)).
      weight_norm: weight-normalise the kernel.
      depthwise: one filter per input channel (`groups = channels`).
      mask: optional fixed 0/1 array of the kernel's shape (`[k, k, in, out]`, or `[k, k, in, 1]` for a
        depthwise kernel) multiplied into the raw kernel; used by the autoregressive flows.
      log_weight_norm_offset: added to the initial log weight norm.
    """

    def __init__(self, filters, kernel_size, strides=1, use_bias=True, weight_norm=True, depthwise=False,
                 mask=None, log_weight_norm_offset=0.0, **kwargs):
        super().__init__(**kwargs)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.use_bias = bool(use_bias)
        self.weight_norm = bool(weight_norm)
        self.depthwise = bool(depthwise)
        self.mask = None if mask is None else np.asarray(mask, dtype="float32")
        self.log_weight_norm_offset = float(log_weight_norm_offset)

    def build(self, input_shape):
        in_channels = int(input_shape[-1])
        k = self.kernel_size
        if self.depthwise:
            if self.filters != in_channels:
                raise ValueError(f"a depthwise conv needs filters == input channels, got {self.filters} != {in_channels}")
            shape, fan_in, self._norm_axes = (k, k, in_channels, 1), k * k, (0, 1)
        else:
            shape, fan_in, self._norm_axes = (k, k, in_channels, self.filters), k * k * in_channels, (0, 1, 2)
        if self.mask is not None and tuple(self.mask.shape) != shape:
            raise ValueError(f"mask shape {self.mask.shape} does not match the kernel shape {shape}")
        # U(+-1/sqrt(fan_in)) with the fan-in of the convolution (k*k for a depthwise kernel, which Keras's
        # variance-scaling initialisers would take as k*k*channels).
        self.kernel = self.add_weight(name="kernel", shape=shape, initializer=_fan_in_uniform(fan_in))
        if self.weight_norm:
            def init_log_weight_norm(shape, dtype=None):
                norm = ops.sqrt(ops.sum(ops.square(self._masked_kernel()), axis=self._norm_axes))
                return ops.reshape(ops.log(norm + 0.01) + self.log_weight_norm_offset, shape)
            g_shape = (in_channels,) if self.depthwise else (self.filters,)
            self.log_weight_norm = self.add_weight(name="log_weight_norm", shape=g_shape,
                                                   initializer=init_log_weight_norm)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer=_fan_in_uniform(fan_in))

    def _masked_kernel(self):
        if self.mask is None:
            return self.kernel
        return self.kernel * ops.cast(self.mask, self.kernel.dtype)

    def effective_kernel(self):
        """The kernel the convolution applies: masked, then weight-normalised."""
        shared = getattr(SHARED_KERNELS, "by_layer", None)
        if shared and id(self) in shared:
            return shared[id(self)]
        kernel = self._masked_kernel()
        if not self.weight_norm:
            return kernel
        return weight_normalized(kernel, self.log_weight_norm, self.depthwise)

    def padding(self):
        """(zeros added on every side of the height and width before the convolution, the convolution's own
        padding): stride 1 pads "same" (symmetric for an odd kernel); a strided convolution pads explicitly,
        then "valid"."""
        if self.strides == 1:
            return 0, "same"
        return (self.kernel_size - 1) // 2, "valid"

    def call(self, x):
        kernel = self.effective_kernel()
        pad, padding = self.padding()
        if pad:
            x = ops.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        if self.depthwise:
            y = ops.depthwise_conv(x, kernel, strides=self.strides, padding=padding)
        else:
            y = ops.conv(x, kernel, strides=self.strides, padding=padding)
        return self.add_bias(y)

    def add_bias(self, y):
        """`y` plus the bias, if the layer has one."""
        return y + self.bias if self.use_bias else y

    def get_config(self):
        config = super().get_config()
        config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                      use_bias=self.use_bias, weight_norm=self.weight_norm, depthwise=self.depthwise,
                      mask=None if self.mask is None else self.mask.tolist(),
                      log_weight_norm_offset=self.log_weight_norm_offset)
        return config


class SqueezeExcitation(keras.layers.Layer):
    """Squeeze-and-excitation: channel gates from global average pooling.

    `x * sigmoid(W2 relu(W1 mean_hw(x)))`, with a hidden width of `max(channels // 16, 4)`.
    """

    def build(self, input_shape):
        channels = int(input_shape[-1])
        hidden = max(channels // 16, 4)
        self.squeeze = keras.layers.Dense(hidden, activation="relu", name="squeeze",
                                          kernel_initializer=_fan_in_uniform(channels),
                                          bias_initializer=_fan_in_uniform(channels))
        self.excite = keras.layers.Dense(channels, activation="sigmoid", name="excite",
                                         kernel_initializer=_fan_in_uniform(hidden),
                                         bias_initializer=_fan_in_uniform(hidden))
        self.squeeze.build((None, channels))
        self.excite.build((None, hidden))

    def call(self, x):
        gate = self.excite(self.squeeze(ops.mean(x, axis=(1, 2))))
        return x * gate[:, None, None, :]


class FactorizedReduce(keras.layers.Layer):
    """Halves height and width: swish, then four strided 1x1 convs on the input shifted by (0,0), (1,1),
    (0,1) and (1,0) pixels, concatenated along channels (`out // 4` channels each, the rest in the last)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = int(filters)
        quarter = self.filters // 4
        sizes = [quarter, quarter, quarter, self.filters - 3 * quarter]
        self.convs = [Conv2D(n, 1, strides=2, name=f"conv_{i}") for i, n in enumerate(sizes)]

    def build(self, input_shape):
        for conv in self.convs:
            conv.build(input_shape)

    def call(self, x):
        x = swish(x)
        shifted = [x, x[:, 1:, 1:, :], x[:, :, 1:, :], x[:, 1:, :, :]]
        return ops.concatenate([conv(xs) for conv, xs in zip(self.convs, shifted)], axis=-1)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def upsample_nearest(x):
    """Nearest-neighbour x2 up-sampling by broadcast and reshape (static height, width and channels)."""
    _, h, w, c = x.shape
    x = ops.reshape(x, (-1, h, 1, w, 1, c))
    x = ops.broadcast_to(x, (ops.shape(x)[0], h, 2, w, 2, c))
    return ops.reshape(x, (-1, 2 * h, 2 * w, c))


def bilinear_upsample_matrix(n):
    """The [2n, n] matrix of x2 bilinear interpolation with aligned corners along one axis."""
    out = 2 * n
    m = np.zeros((out, n), dtype="float64")
    for i in range(out):
        src = i * (n - 1) / (out - 1) if out > 1 else 0.0
        lo = min(int(math.floor(src)), n - 1)
        hi = min(lo + 1, n - 1)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, hi] += frac
    return m


def upsample_bilinear_aligned(x):
    """x2 bilinear up-sampling with aligned corners, as two matrix products (separable and exact)."""
    _, h, w, _ = x.shape
    rows = ops.cast(bilinear_upsample_matrix(h).T, x.dtype)  # [h, 2h]
    cols = ops.cast(bilinear_upsample_matrix(w).T, x.dtype)  # [w, 2w]
    x = ops.matmul(ops.transpose(x, (0, 2, 3, 1)), rows)  # [b, w, c, 2h]
    x = ops.matmul(ops.transpose(x, (0, 3, 2, 1)), cols)  # [b, 2h, c, 2w]
    return ops.transpose(x, (0, 1, 3, 2))
