"""Tests of nvae_tf.model.ops against independent NumPy float64 references (spec §1.2, §1.3)."""

import math

import keras
import numpy as np
import pytest

from nvae_tf.model.ops import (Conv2D, FactorizedReduce, SqueezeExcitation, upsample_bilinear_aligned,
                               upsample_nearest)


# ----------------------------------------------------------------------------------------------------------
# NumPy float64 references
# ----------------------------------------------------------------------------------------------------------

def np_conv2d(x, w, bias=None, stride=1, pads=None, depthwise=False):
    """Direct loop convolution. x [B, H, W, C]; w [k, k, C, O] (or [k, k, C, 1] depthwise).

    `pads` = (top, bottom, left, right); default symmetric (k - 1) // 2 (PyTorch `padding=(k-1)//2`).
    """
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    k = w.shape[0]
    if pads is None:
        p = (k - 1) // 2
        pads = (p, p, p, p)
    xp = np.pad(x, ((0, 0), pads[:2], pads[2:], (0, 0)))
    ho = (xp.shape[1] - k) // stride + 1
    wo = (xp.shape[2] - k) // stride + 1
    out_c = x.shape[-1] if depthwise else w.shape[-1]
    y = np.zeros((x.shape[0], ho, wo, out_c))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            if depthwise:
                y[:, i, j, :] = np.einsum("bhwc,hwc->bc", patch, w[..., 0])
            else:
                y[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, w)
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y


def np_weight_norm(v, g, depthwise=False, mask=None):
    """Spec §1.3: W = exp(g) * v / (||v|| + 1e-5), norm per output channel over (kh, kw, cin/groups)."""
    v = np.asarray(v, np.float64)
    if mask is not None:
        v = v * mask
    g = np.asarray(g, np.float64)
    w = np.empty_like(v)
    if depthwise:
        for c in range(v.shape[2]):
            w[:, :, c, 0] = math.exp(g[c]) * v[:, :, c, 0] / (np.sqrt(np.sum(v[:, :, c, 0] ** 2)) + 1e-5)
    else:
        for o in range(v.shape[3]):
            w[..., o] = math.exp(g[o]) * v[..., o] / (np.sqrt(np.sum(v[..., o] ** 2)) + 1e-5)
    return w


def per_output_norms(kernel, depthwise=False):
    kernel = np.asarray(kernel, np.float64)
    if depthwise:
        return np.sqrt(np.sum(kernel[..., 0] ** 2, axis=(0, 1)))
    return np.sqrt(np.sum(kernel ** 2, axis=(0, 1, 2)))


def np_swish(x):
    return x / (1.0 + np.exp(-x))


def np_bilinear_aligned_x2(x):
    """Bilinear x2 up-sampling with align_corners=True, one output pixel at a time."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    out = np.zeros((b, 2 * h, 2 * w, c))
    for i in range(2 * h):
        sy = i * (h - 1) / (2 * h - 1)
        y0 = int(math.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(2 * w):
            sx = j * (w - 1) / (2 * w - 1)
            x0 = int(math.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                            + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
    return out


def build_conv(x, **kwargs):
    layer = Conv2D(**kwargs)
    y = keras.ops.convert_to_numpy(layer(x))
    return layer, y


def weights(layer):
    v = keras.ops.convert_to_numpy(layer.kernel)
    g = keras.ops.convert_to_numpy(layer.log_weight_norm) if layer.weight_norm else None
    b = keras.ops.convert_to_numpy(layer.bias) if layer.use_bias else None
    return v, g, b


# ----------------------------------------------------------------------------------------------------------
# Conv2D with weight normalisation
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_conv_initial_log_weight_norm_and_effective_kernel_norms(depthwise):
    rng = np.random.default_rng(0)
    cin = 6
    filters = cin if depthwise else 5
    x = rng.normal(size=(1, 6, 6, cin)).astype(np.float32)
    layer, _ = build_conv(x, filters=filters, kernel_size=3, depthwise=depthwise)
    v, g, _ = weights(layer)
    assert v.shape == ((3, 3, cin, 1) if depthwise else (3, 3, cin, filters))
    assert g.shape == (filters,)
    v_norm = per_output_norms(v, depthwise)
    np.testing.assert_allclose(g, np.log(v_norm + 0.01), rtol=1e-5, atol=1e-6)

    # Effective kernel: norm exp(g) * ||v|| / (||v|| + 1e-5) per output channel, for arbitrary g and v.
    layer.log_weight_norm.assign(rng.normal(0, 1, filters).astype(np.float32))
    layer.kernel.assign(rng.normal(0, 2, v.shape).astype(np.float32))
    v, g, _ = weights(layer)
    v_norm = per_output_norms(v, depthwise)
    eff = keras.ops.convert_to_numpy(layer.effective_kernel())
    assert eff.shape == v.shape
    np.testing.assert_allclose(per_output_norms(eff, depthwise), np.exp(g) * v_norm / (v_norm + 1e-5),
                               rtol=1e-5)
    np.testing.assert_allclose(per_output_norms(eff, depthwise), np.exp(g), rtol=1e-4)
    np.testing.assert_allclose(eff, np_weight_norm(v, g, depthwise), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_conv_initialisation_bounds(depthwise):
    """v ~ U(+-sqrt(1/fan_in)), bias ~ U(+-1/sqrt(fan_in)), fan_in = k*k*cin/groups (spec §1.3)."""
    cin, k = 16, 5
    filters = cin if depthwise else 32
    layer, _ = build_conv(np.zeros((1, 5, 5, cin), np.float32), filters=filters, kernel_size=k,
                          depthwise=depthwise)
    v, _, b = weights(layer)
    fan_in = k * k * (1 if depthwise else cin)
    bound = 1.0 / math.sqrt(fan_in)
    assert np.all(np.abs(b) <= bound) and np.max(np.abs(b)) > 0.5 * bound
    assert np.max(np.abs(v)) <= bound
    assert np.std(v) == pytest.approx(bound / math.sqrt(3.0), rel=0.1), (
        f"kernel std {np.std(v):.4f}, expected U(+-{bound:.4f}) with fan_in {fan_in}")


def test_conv_with_mask_uses_the_masked_kernel_norm():
    rng = np.random.default_rng(1)
    cin, cout, k = 4, 6, 3
    mask = (rng.uniform(size=(k, k, cin, cout)) < 0.5).astype(np.float32)
    mask[1, 1] = 1.0  # every output channel keeps some weights
    x = rng.normal(size=(2, 5, 5, cin)).astype(np.float32)
    layer, y = build_conv(x, filters=cout, kernel_size=k, mask=mask)
    v, g, b = weights(layer)
    masked_norm = per_output_norms(v * mask)
    assert np.all(np.abs(masked_norm - per_output_norms(v)) > 1e-3)  # the mask changes every norm
    np.testing.assert_allclose(g, np.log(masked_norm + 0.01), rtol=1e-5, atol=1e-6)

    layer.log_weight_norm.assign(rng.normal(0, 1, cout).astype(np.float32))
    v, g, b = weights(layer)
    eff = keras.ops.convert_to_numpy(layer.effective_kernel())
    np.testing.assert_array_equal(eff[mask == 0], 0.0)
    np.testing.assert_allclose(per_output_norms(eff), np.exp(g), rtol=1e-4)
    y = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(y, np_conv2d(x, np_weight_norm(v, g, mask=mask), b), rtol=1e-4, atol=1e-5)


CONV_CASES = [
    # kernel_size, strides, depthwise, weight_norm, use_bias
    (1, 1, False, True, True),
    (3, 1, False, True, True),
    (5, 1, False, True, False),
    (3, 2, False, True, True),
    (1, 2, False, True, True),
    (5, 2, False, True, True),
    (3, 1, False, False, False),
    (5, 1, True, False, False),
    (5, 1, True, True, True),
    (3, 2, True, True, True),
]


@pytest.mark.parametrize("k, stride, depthwise, wn, use_bias", CONV_CASES,
                         ids=[f"k{c[0]}s{c[1]}{'dw' if c[2] else ''}{'wn' if c[3] else ''}" for c in CONV_CASES])
def test_conv_output_matches_numpy_direct_convolution(k, stride, depthwise, wn, use_bias):
    rng = np.random.default_rng(10 * k + stride)
    cin = 4
    filters = cin if depthwise else 3
    x = rng.normal(size=(2, 8, 6, cin)).astype(np.float32)
    layer, y = build_conv(x, filters=filters, kernel_size=k, strides=stride, depthwise=depthwise,
                          weight_norm=wn, use_bias=use_bias)
    if wn:  # a g that is not its initial value
        layer.log_weight_norm.assign(rng.normal(0, 0.5, filters).astype(np.float32))
        y = keras.ops.convert_to_numpy(layer(x))
    v, g, b = weights(layer)
    w = np_weight_norm(v, g, depthwise) if wn else v
    ref = np_conv2d(x, w, b, stride=stride, depthwise=depthwise)
    # PyTorch output size: floor((n + 2p - k) / s) + 1.
    p = (k - 1) // 2
    assert y.shape == (2, (8 + 2 * p - k) // stride + 1, (6 + 2 * p - k) // stride + 1, filters)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k, depthwise", [(3, False), (5, False), (3, True)])
def test_conv_stride2_pads_symmetrically_not_like_tf_same(k, depthwise):
    """On an even input, TF 'same' at stride 2 pads (p-1 or less) before and more after; PyTorch pads p on
    each side. The outputs differ, and the layer must give the PyTorch one."""
    rng = np.random.default_rng(k)
    cin = 3
    filters = cin if depthwise else 2
    x = rng.normal(size=(1, 8, 8, cin)).astype(np.float32)
    layer, y = build_conv(x, filters=filters, kernel_size=k, strides=2, depthwise=depthwise)
    v, g, b = weights(layer)
    w = np_weight_norm(v, g, depthwise)
    p = (k - 1) // 2
    torch_like = np_conv2d(x, w, b, stride=2, pads=(p, p, p, p), depthwise=depthwise)
    total = (4 - 1) * 2 + k - 8  # TF 'same': total padding, the extra pixel at the end
    tf_same = np_conv2d(x, w, b, stride=2, pads=(total // 2, total - total // 2) * 2, depthwise=depthwise)
    assert torch_like.shape == tf_same.shape == y.shape
    assert np.max(np.abs(torch_like - tf_same)) > 1e-2  # the input discriminates the two paddings
    np.testing.assert_allclose(y, torch_like, rtol=1e-4, atol=1e-5)


def test_conv_rejects_bad_configurations():
    with pytest.raises(ValueError):
        Conv2D(4, 2)
    with pytest.raises(ValueError):
        Conv2D(5, 3, depthwise=True)(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError):
        Conv2D(4, 3, mask=np.ones((3, 3, 2, 2)))(np.zeros((1, 4, 4, 3), np.float32))


# ----------------------------------------------------------------------------------------------------------
# Up-sampling
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 5, 2), (1, 4, 4, 3), (1, 1, 3, 1), (1, 2, 2, 1)])
def test_upsample_bilinear_aligned_matches_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    y = keras.ops.convert_to_numpy(upsample_bilinear_aligned(x))
    b, h, w, c = shape
    assert y.shape == (b, 2 * h, 2 * w, c)
    np.testing.assert_allclose(y, np_bilinear_aligned_x2(x), rtol=1e-5, atol=1e-6)
    for i, j in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        np.testing.assert_allclose(y[:, i, j], x[:, i, j], rtol=1e-6, atol=1e-6)


def test_upsample_bilinear_aligned_on_a_ramp_is_exact():
    """A linear ramp is reproduced exactly: output i along an axis of n takes value i (n-1)/(2n-1)."""
    h, w = 4, 3
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = (10.0 * yy + xx).astype(np.float32)[None, :, :, None]
    y = keras.ops.convert_to_numpy(upsample_bilinear_aligned(x))[0, :, :, 0]
    oy, ox = np.meshgrid(np.arange(2 * h) * (h - 1) / (2 * h - 1), np.arange(2 * w) * (w - 1) / (2 * w - 1),
                         indexing="ij")
    np.testing.assert_allclose(y, 10.0 * oy + ox, rtol=1e-6, atol=1e-5)


def test_upsample_nearest_matches_np_repeat():
    x = np.random.default_rng(3).normal(size=(2, 3, 5, 4)).astype(np.float32)
    y = keras.ops.convert_to_numpy(upsample_nearest(x))
    np.testing.assert_array_equal(y, np.repeat(np.repeat(x, 2, axis=1), 2, axis=2))


# ----------------------------------------------------------------------------------------------------------
# FactorizedReduce and squeeze-excitation
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("filters", [10, 16, 6])
def test_factorized_reduce_matches_numpy(filters):
    rng = np.random.default_rng(filters)
    x = rng.normal(0, 1.5, size=(2, 6, 8, 5)).astype(np.float32)
    layer = FactorizedReduce(filters)
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (2, 3, 4, filters)

    q = filters // 4
    assert len(layer.convs) == 4
    assert [c.filters for c in layer.convs] == [q, q, q, filters - 3 * q]
    s = np_swish(x.astype(np.float64))
    # NCHW x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :] of the spec, in NHWC.
    shifted = [s, s[:, 1:, 1:, :], s[:, :, 1:, :], s[:, 1:, :, :]]
    parts = []
    for conv, xs in zip(layer.convs, shifted):
        assert conv.kernel_size == 1 and conv.strides == 2 and conv.weight_norm and conv.use_bias
        v, g, b = weights(conv)
        w = np_weight_norm(v, g)[0, 0]  # [cin, n]
        parts.append(xs[:, ::2, ::2, :] @ w + b)
    ref = np.concatenate(parts, axis=-1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels, hidden", [(8, 4), (64, 4), (96, 6), (128, 8)])
def test_squeeze_excitation_matches_numpy(channels, hidden):
    rng = np.random.default_rng(channels)
    x = rng.normal(size=(2, 3, 4, channels)).astype(np.float32)
    layer = SqueezeExcitation()
    y = keras.ops.convert_to_numpy(layer(x))
    k1, b1 = (keras.ops.convert_to_numpy(t) for t in layer.squeeze.weights)
    k2, b2 = (keras.ops.convert_to_numpy(t) for t in layer.excite.weights)
    assert k1.shape == (channels, hidden) and b1.shape == (hidden,)
    assert k2.shape == (hidden, channels) and b2.shape == (channels,)
    pooled = x.astype(np.float64).mean(axis=(1, 2))
    h = np.maximum(pooled @ k1 + b1, 0.0)
    gate = 1.0 / (1.0 + np.exp(-(h @ k2 + b2)))
    np.testing.assert_allclose(y, x * gate[:, None, None, :], rtol=1e-5, atol=1e-6)
    # PyTorch Linear defaults: biases within 1/sqrt(fan_in).
    assert np.all(np.abs(b1) <= 1 / math.sqrt(channels)) and np.all(np.abs(b2) <= 1 / math.sqrt(hidden))
