"""Tests of nvae_tf.model.distributions against independent NumPy float64 references (spec §2, §11).

Every reference below is written from the spec's formulas; no expected value comes from running the code under
test a second time. Parameters are assembled channel by channel from the layout the spec gives (logits in
[0, M); then, for colour c, means / log-scales / coefficients at M + 3Mc + {0, M, 2M} + j).
"""

import itertools
import math

import keras
import numpy as np
import pytest

from nvae_tf.model.distributions import Bernoulli, DiscretizedMixtureOfLogistics, KerasNoise, Normal, ZeroNoise


# ----------------------------------------------------------------------------------------------------------
# NumPy float64 helpers
# ----------------------------------------------------------------------------------------------------------

def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sigmoid(x):
    return np.exp(np_log_sigmoid(x))


def np_log_softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def np_logsumexp(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def np_log_bin_mass(plus, minus):
    """log(sigmoid(plus) - sigmoid(minus)) for plus > minus, in float64, from whichever tail is accurate."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # Lower side (minus <= 0): log sig(p) + log(1 - sig(m) / sig(p)).
        lp, lm = np_log_sigmoid(plus), np_log_sigmoid(minus)
        lower = lp + np.log1p(-np.exp(lm - lp))
        # Upper side (minus > 0): 1 - CDF tails, sig(-m) - sig(-p).
        a, b = np_log_sigmoid(-minus), np_log_sigmoid(-plus)
        upper = a + np.log1p(-np.exp(b - a))
    return np.where(minus > 0.0, upper, lower)


def assemble_dmol_params(logits, means, log_scales, coeffs_raw):
    """[..., 10M] parameters from logits [..., M] and per-colour arrays [..., 3, M], following spec §2."""
    m = logits.shape[-1]
    out = np.zeros(logits.shape[:-1] + (10 * m,), dtype=np.float64)
    out[..., :m] = logits
    for c in range(3):
        base = m + 3 * m * c
        out[..., base:base + m] = means[..., c, :]
        out[..., base + m:base + 2 * m] = log_scales[..., c, :]
        out[..., base + 2 * m:base + 3 * m] = coeffs_raw[..., c, :]
    return out


def ref_dmol_log_prob_map(logits, means, log_scales, coeffs_raw, x01, num_bits, clamp=True):
    """Spec §2 log p(x) per pixel in float64, for x01 [..., 3] on the 2**num_bits grid."""
    b = 2.0 ** num_bits - 1.0
    ls = np.maximum(log_scales, -7.0) if clamp else log_scales
    s = np.exp(ls)
    c = np.tanh(coeffs_raw)
    x = 2.0 * x01 - 1.0
    k = np.rint(x01 * b).astype(np.int64)
    xr, xg = x[..., 0:1], x[..., 1:2]
    mu = [means[..., 0, :],
          means[..., 1, :] + c[..., 0, :] * xr,
          means[..., 2, :] + c[..., 1, :] * xr + c[..., 2, :] * xg]
    total = np_log_softmax(logits)
    for ch in range(3):
        xc, kc = x[..., ch:ch + 1], k[..., ch:ch + 1]
        plus = (xc - mu[ch] + 1.0 / b) / s[..., ch, :]
        minus = (xc - mu[ch] - 1.0 / b) / s[..., ch, :]
        lowest = np_log_sigmoid(plus)  # log CDF(plus)
        highest = np_log_sigmoid(-minus)  # log(1 - CDF(minus))
        middle = np_log_bin_mass(plus, minus)
        total = total + np.where(kc == 0, lowest, np.where(kc == int(b), highest, middle))
    return np_logsumexp(total, axis=-1)


def random_dmol(rng, lead_shape, m, log_scale_range=(-9.0, 2.0), mean_range=(-1.3, 1.3), coeff_scale=1.5):
    logits = rng.normal(0.0, 1.5, lead_shape + (m,))
    means = rng.uniform(*mean_range, lead_shape + (3, m))
    log_scales = rng.uniform(*log_scale_range, lead_shape + (3, m))
    coeffs_raw = rng.normal(0.0, coeff_scale, lead_shape + (3, m))
    return logits, means, log_scales, coeffs_raw


def all_values(num_bits, channels):
    """All 2**(num_bits*channels) value tuples of `channels` channels, as [N, channels] integers."""
    levels = range(2 ** num_bits)
    return np.array(list(itertools.product(levels, repeat=channels)), dtype=np.int64)


class ConstNoise:
    """Noise source returning constants: uniform 0.5 gives zero logistic noise and a constant Gumbel."""

    def normal(self, shape, dtype="float32"):
        return np.zeros(tuple(shape), dtype=dtype)

    def uniform(self, shape, dtype="float32"):
        return np.full(tuple(shape), 0.5, dtype=dtype)


class RecordingNoise:
    """NumPy noise source that records every draw, so a reference can replay it."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)
        self.normals = []
        self.uniforms = []

    def normal(self, shape, dtype="float32"):
        z = self.rng.standard_normal(tuple(shape)).astype(dtype)
        self.normals.append(z)
        return z

    def uniform(self, shape, dtype="float32"):
        u = self.rng.uniform(1e-5, 1.0 - 1e-5, tuple(shape)).astype(dtype)
        self.uniforms.append(u)
        return u


# ----------------------------------------------------------------------------------------------------------
# Discretized mixture of logistics: normalisation
# ----------------------------------------------------------------------------------------------------------

DMOL_CASES = {
    # name: (M, log-scale range, mean range)
    "m1_generic": (1, (-4.0, 0.0), (-1.2, 1.2)),
    "m3_near_clamp": (3, (-7.6, -6.5), (-1.1, 1.1)),
    "m4_large_scales": (4, (0.5, 3.0), (-1.5, 1.5)),
    "m5_mixed": (5, (-9.0, 2.0), (-1.3, 1.3)),
}


@pytest.mark.parametrize("case", sorted(DMOL_CASES))
def test_dmol_3bit_probabilities_of_all_512_pixel_values_sum_to_one(case):
    m, ls_range, mean_range = DMOL_CASES[case]
    rng = np.random.default_rng(sorted(DMOL_CASES).index(case) + 50)
    logits, means, log_scales, coeffs_raw = random_dmol(rng, (), m, ls_range, mean_range)
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw)
    values = all_values(3, 3)  # [512, 3]
    x01 = (values / 7.0).reshape(512, 1, 1, 3).astype(np.float32)
    batch_params = np.broadcast_to(params, (512, 1, 1, 10 * m)).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(batch_params, num_bits=3)
    log_p = keras.ops.convert_to_numpy(dist.log_prob(x01)).astype(np.float64)
    assert log_p.shape == (512,)
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(np.sum(np.exp(log_p)), 1.0, atol=1e-4)
    # The same pixel values under the float64 reference (sanity of the reference and pointwise agreement).
    ref = ref_dmol_log_prob_map(logits, means, log_scales, coeffs_raw, values / 7.0, 3)
    np.testing.assert_allclose(np.sum(np.exp(ref)), 1.0, atol=1e-10)
    np.testing.assert_allclose(np.exp(log_p), np.exp(ref), atol=2e-6, rtol=1e-4)


def _pinned_dmol(rng, m, pin):
    """A mixture whose pinned channels put all their mass into one edge bin whatever the other channels are.

    `pin` maps a channel index to -1 (everything in the lowest bin) or +1 (everything in the highest bin).
    Means of a pinned channel sit at 5 * pin (|coefficient terms| <= 2), with a scale of e^-3, so the edge
    bin has mass 1 - O(e^-40).
    """
    logits, means, log_scales, coeffs_raw = random_dmol(rng, (), m, (-7.5, 1.0), (-1.2, 1.2))
    for ch, side in pin.items():
        means[ch, :] = 5.0 * side
        log_scales[ch, :] = -3.0
    return logits, means, log_scales, coeffs_raw


def _dmol_probs(params, values01, num_bits):
    n = values01.shape[0]
    batch_params = np.broadcast_to(params, (n, 1, 1, params.shape[-1])).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(batch_params, num_bits=num_bits)
    log_p = keras.ops.convert_to_numpy(dist.log_prob(values01.reshape(n, 1, 1, 3).astype(np.float32)))
    return np.exp(log_p.astype(np.float64))


def test_dmol_8bit_red_marginal_sums_to_one():
    """G and B are pinned to bin 0, so p(R, 0, 0) is the red marginal; it must sum to 1 over 256 values."""
    rng = np.random.default_rng(7)
    logits, means, log_scales, coeffs_raw = _pinned_dmol(rng, 3, {1: -1, 2: -1})
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw)
    values = np.zeros((256, 3), dtype=np.int64)
    values[:, 0] = np.arange(256)
    probs = _dmol_probs(params, values / 255.0, 8)
    np.testing.assert_allclose(np.sum(probs), 1.0, atol=1e-4)

    # Independent check of each value: the red marginal of the mixture in float64.
    b = 255.0
    x = 2.0 * np.arange(256)[:, None] / b - 1.0
    s = np.exp(np.maximum(log_scales[0], -7.0))
    cdf_hi = np_sigmoid((x - means[0] + 1.0 / b) / s)
    cdf_lo = np_sigmoid((x - means[0] - 1.0 / b) / s)
    cdf_hi[-1] = 1.0
    cdf_lo[0] = 0.0
    w = np.exp(np_log_softmax(logits))
    np.testing.assert_allclose(probs, np.sum(w * (cdf_hi - cdf_lo), axis=-1), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("free, pin", [((0, 1), {2: -1}), ((1, 2), {0: +1})],
                         ids=["red_green_blue_pinned_low", "green_blue_red_pinned_high"])
def test_dmol_8bit_joint_of_two_channels_sums_to_one(free, pin):
    """Enumerates 256 x 256 values of two channels (the third pinned to an edge bin) at 8 bits."""
    rng = np.random.default_rng(11)
    logits, means, log_scales, coeffs_raw = _pinned_dmol(rng, 3, pin)
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw)
    values = np.zeros((65536, 3), dtype=np.int64)
    values[:, list(free)] = all_values(8, 2)
    for ch, side in pin.items():
        values[:, ch] = 0 if side < 0 else 255
    probs = _dmol_probs(params, values / 255.0, 8)
    np.testing.assert_allclose(np.sum(probs), 1.0, atol=1e-4)


def test_dmol_8bit_pixel_254_is_an_interior_bin():
    """nvae_tf uses the edge x > 1 - 1/b (spec §11): p(254) is a CDF difference, not an upper tail."""
    rng = np.random.default_rng(3)
    logits, means, log_scales, coeffs_raw = _pinned_dmol(rng, 1, {1: -1, 2: -1})
    means[0, 0], log_scales[0, 0] = 0.97, -3.5  # bins 254 and 255 both carry visible mass
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw)
    values = np.array([[254, 0, 0], [255, 0, 0]])
    probs = _dmol_probs(params, values / 255.0, 8)
    s = math.exp(-3.5)
    x254 = 2.0 * 254 / 255 - 1.0
    mass_254 = np_sigmoid((x254 - 0.97 + 1 / 255) / s) - np_sigmoid((x254 - 0.97 - 1 / 255) / s)
    tail_254 = 1.0 - np_sigmoid((x254 - 0.97 - 1 / 255) / s)  # what the reference code's x > 0.99 would use
    tail_255 = 1.0 - np_sigmoid((1.0 - 0.97 - 1 / 255) / s)
    assert abs(tail_254 - mass_254) > 0.1  # the case discriminates the two edges
    np.testing.assert_allclose(probs, [mass_254, tail_255], rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Discretized mixture of logistics: log_prob against the float64 reference
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_bits", [8, 5])
@pytest.mark.parametrize("m", [1, 3])
def test_dmol_log_prob_matches_numpy_reference(num_bits, m):
    rng = np.random.default_rng(100 * num_bits + m)
    lead = (2, 3, 4)
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, m)
    b = 2 ** num_bits - 1
    k = rng.integers(0, b + 1, lead + (3,))
    # Force the edge bins and their neighbours into every channel.
    k[0, 0, 0], k[0, 0, 1], k[0, 0, 2], k[0, 0, 3] = 0, 1, b - 1, b
    k[1, 2, 0] = [b, 0, b - 1]
    k[1, 2, 1] = [1, b, 0]
    x01 = k / b
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw)
    dist = DiscretizedMixtureOfLogistics(params.astype(np.float32), num_bits=num_bits)
    assert dist.num_mixtures == m

    ref_map = ref_dmol_log_prob_map(logits, means, log_scales, coeffs_raw, x01, num_bits)
    got_map = keras.ops.convert_to_numpy(dist.log_prob_map(x01.astype(np.float32)))
    assert got_map.shape == lead
    np.testing.assert_allclose(got_map, ref_map, rtol=1e-4, atol=1e-4)
    got = keras.ops.convert_to_numpy(dist.log_prob(x01.astype(np.float32)))
    np.testing.assert_allclose(got, ref_map.reshape(2, -1).sum(axis=1), rtol=1e-4)

    # The parameter draw exercises the -7 clamp: without it the reference is clearly different.
    unclamped = ref_dmol_log_prob_map(logits, means, log_scales, coeffs_raw, x01, num_bits, clamp=False)
    assert np.max(np.abs(unclamped - ref_map)) > 1.0


def test_dmol_log_prob_conditions_on_true_data_not_on_means():
    """Changing only the red value moves the green/blue densities through c0, c1 (autoregressive means)."""
    rng = np.random.default_rng(5)
    logits, means, log_scales, coeffs_raw = random_dmol(rng, (1, 1, 1), 2, (-3.0, -1.0), (-0.5, 0.5))
    coeffs_raw[...] = 2.0  # strong coupling
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(params, num_bits=8)
    for red in (10, 128, 240):
        x01 = (np.array([red, 90, 200]) / 255.0).reshape(1, 1, 1, 3)
        got = keras.ops.convert_to_numpy(dist.log_prob_map(x01.astype(np.float32)))
        ref = ref_dmol_log_prob_map(logits, means, log_scales, coeffs_raw, x01, 8)
        np.testing.assert_allclose(got, ref, rtol=1e-4)


def ref_dmol_reference_edges_log_prob_map(logits, means, log_scales, coeffs_raw, x01, num_bits):
    """The reference code's log p(x) per pixel (spec §2 as the reference computes it), float64: tails below -0.999
    and above 0.99, a middle bin's mass as CDF(plus) - CDF(minus), pdf x bin width where that is <= 1e-5."""
    b = 2.0 ** num_bits - 1.0
    ls = np.maximum(log_scales, -7.0)
    s, c = np.exp(ls), np.tanh(coeffs_raw)
    x = 2.0 * x01 - 1.0
    xr, xg = x[..., 0:1], x[..., 1:2]
    mu = [means[..., 0, :], means[..., 1, :] + c[..., 0, :] * xr,
          means[..., 2, :] + c[..., 1, :] * xr + c[..., 2, :] * xg]
    total = np_log_softmax(logits)
    for ch in range(3):
        xc = x[..., ch:ch + 1]
        plus = (xc - mu[ch] + 1.0 / b) / s[..., ch, :]
        minus = (xc - mu[ch] - 1.0 / b) / s[..., ch, :]
        mid = (xc - mu[ch]) / s[..., ch, :]
        delta = np_sigmoid(plus) - np_sigmoid(minus)
        log_pdf = mid - ls[..., ch, :] - 2.0 * np.logaddexp(0.0, mid)
        with np.errstate(divide="ignore"):
            middle = np.where(delta > 1e-5, np.log(np.maximum(delta, 1e-10)), log_pdf - np.log(b / 2.0))
        total = total + np.where(xc < -0.999, np_log_sigmoid(plus), np.where(xc > 0.99, np_log_sigmoid(-minus),
                                                                               middle))
    return np_logsumexp(total, axis=-1)


def test_dmol_reference_edges_match_the_reference_formula_and_differ_where_documented():
    """`reference_edges`: pixel 254 of 8-bit data takes the upper tail, and bins of tiny mass take pdf x bin
    width."""
    rng = np.random.default_rng(31)
    lead, m = (2, 6, 6), 3
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, m, (-6.0, -1.0), (-1.0, 1.0))
    k = rng.integers(0, 256, lead + (3,))
    k[0, 0] = [254, 254, 254]
    k[0, 1] = [255, 0, 254]
    k[0, 2] = [128, 128, 128]
    means[0, 2], log_scales[0, 2] = -0.9, -6.0  # far in the tail: the bins of 128 have a mass far below 1e-5
    x01 = k / 255.0
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    got = keras.ops.convert_to_numpy(DiscretizedMixtureOfLogistics(params, 8, reference_edges=True)
                                     .log_prob_map(x01.astype(np.float32)))
    ref = ref_dmol_reference_edges_log_prob_map(logits, means, log_scales, coeffs_raw, x01, 8)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-3)
    exact = ref_dmol_log_prob_map(logits, means, log_scales, coeffs_raw, x01, 8)
    assert np.min(np.abs(ref[0, 0] - exact[0, 0])) > 1e-3  # pixel 254: a tail instead of a bin
    assert np.min(np.abs(ref[0, 2] - exact[0, 2])) > 1e-3  # the density fallback


def test_dmol_sample_at_a_temperature_scales_the_noise_and_the_logits():
    """`sample(noise, t)`: Gumbel-max on logits / t and logistic noise / t (the reference's pixel temperature)."""
    rng = np.random.default_rng(32)
    lead, m, t = (2, 3, 3), 4, 0.5
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, m, (-3.0, -1.0), (-0.5, 0.5))
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    noise = RecordingNoise(2)
    got = keras.ops.convert_to_numpy(DiscretizedMixtureOfLogistics(params, 8).sample(noise, t))
    gu = [u for u in noise.uniforms if u.shape == lead + (m,)][0].astype(np.float64)
    lu = [u for u in noise.uniforms if u.shape == lead + (3,)][0].astype(np.float64)
    j = np.argmax(logits / t - np.log(-np.log(gu)), axis=-1)
    pick = lambda a: np.take_along_axis(a, j[..., None, None], axis=-1)[..., 0]  # noqa: E731
    x = pick(means) + np.exp(np.maximum(pick(log_scales), -7.0)) / t * (np.log(lu) - np.log1p(-lu))
    np.testing.assert_allclose(got, _conditioned(x, np.tanh(pick(coeffs_raw))), atol=2e-5)
    untempered = keras.ops.convert_to_numpy(DiscretizedMixtureOfLogistics(params, 8).sample(RecordingNoise(2)))
    assert np.max(np.abs(untempered - got)) > 1e-2


def test_dmol_rejects_parameter_count_not_multiple_of_ten():
    with pytest.raises(ValueError):
        DiscretizedMixtureOfLogistics(np.zeros((1, 2, 2, 25), np.float32))


# ----------------------------------------------------------------------------------------------------------
# Discretized mixture of logistics: sampling and mean
# ----------------------------------------------------------------------------------------------------------

def _conditioned(means_rgb, coeffs_rgb):
    """Spec §2 conditioning of one selected component: clip red, condition green on it, clip, then blue."""
    r = np.clip(means_rgb[..., 0], -1.0, 1.0)
    g = np.clip(means_rgb[..., 1] + coeffs_rgb[..., 0] * r, -1.0, 1.0)
    b = np.clip(means_rgb[..., 2] + coeffs_rgb[..., 1] * r + coeffs_rgb[..., 2] * g, -1.0, 1.0)
    return (np.stack([r, g, b], axis=-1) + 1.0) / 2.0


def test_dmol_sample_shape_and_range():
    rng = np.random.default_rng(21)
    lead = (2, 4, 5)
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, 3, (-7.5, 1.5), (-2.0, 2.0))
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(params, num_bits=8)
    x = keras.ops.convert_to_numpy(dist.sample(KerasNoise(keras.random.SeedGenerator(3))))
    assert x.shape == lead + (3,)
    assert np.all(np.isfinite(x))
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert np.unique(x).size > 20  # actually random, not a constant


def test_dmol_sample_matches_numpy_replay_of_the_noise():
    """Gumbel-max selection on the logits, logistic noise, clip, autoregressive conditioning on samples."""
    rng = np.random.default_rng(22)
    lead, m = (3, 4, 4), 4  # M != 3 so the Gumbel and logistic draws have different shapes
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, m, (-4.0, 0.5), (-1.5, 1.5))
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    noise = RecordingNoise(1)
    got = keras.ops.convert_to_numpy(DiscretizedMixtureOfLogistics(params, num_bits=8).sample(noise))

    gumbel_u = [u for u in noise.uniforms if u.shape == lead + (m,)]
    logistic_u = [u for u in noise.uniforms if u.shape == lead + (3,)]
    assert len(gumbel_u) == 1 and len(logistic_u) == 1 and not noise.normals
    gu, lu = gumbel_u[0].astype(np.float64), logistic_u[0].astype(np.float64)
    j = np.argmax(logits - np.log(-np.log(gu)), axis=-1)  # [lead]
    pick = lambda a: np.take_along_axis(a, j[..., None, None], axis=-1)[..., 0]  # [lead, 3]
    mu, ls, c = pick(means), np.maximum(pick(log_scales), -7.0), np.tanh(pick(coeffs_raw))
    x = mu + np.exp(ls) * (np.log(lu) - np.log1p(-lu))
    ref = _conditioned(x, c)
    np.testing.assert_allclose(got, ref, atol=2e-5)


def test_dmol_peaked_single_mixture_samples_equal_conditioned_means():
    rng = np.random.default_rng(23)
    lead = (64, 2, 2)
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, 1, (-12.0, -7.0), (-0.9, 0.9))
    means[:8, :, :, 0, 0] = 1.4  # red beyond the range: green/blue condition on the *clipped* red
    means[8:16, :, :, 1, 0] = -1.6
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(params, num_bits=8)
    expected = _conditioned(means[..., 0], np.tanh(coeffs_raw[..., 0]))

    exact = keras.ops.convert_to_numpy(dist.sample(ConstNoise()))  # zero logistic noise
    np.testing.assert_allclose(exact, expected, atol=1e-6)

    # Real noise: the scale is clamped at e^-7 and the uniforms at 1e-5, so each logistic draw is within
    # e^-7 * log(1e5) ~ 0.0105 in [-1, 1]; through the coefficients (|c| < 1) blue moves at most 4x that.
    noisy = keras.ops.convert_to_numpy(dist.sample(KerasNoise(keras.random.SeedGenerator(4))))
    bound = 0.5 * math.exp(-7.0) * math.log((1 - 1e-5) / 1e-5) * np.array([1.0, 2.0, 4.0])
    assert np.all(np.abs(noisy - expected) <= 1.01 * bound + 1e-6)
    assert np.max(np.abs(noisy - expected)) > 1e-5  # the noise is really applied


def test_dmol_sampled_red_channel_follows_the_mixture():
    """Quantised red samples (t = 1) follow the discretised red marginal of the mixture (3 bits)."""
    rng = np.random.default_rng(24)
    logits = np.array([0.5, -0.3, 1.0])
    means = rng.uniform(-0.9, 0.9, (3, 3))
    means[0] = [-0.7, 0.1, 0.8]
    log_scales = np.full((3, 3), -2.0)
    log_scales[0] = [-2.5, -1.5, -1.0]
    coeffs_raw = rng.normal(0.0, 1.0, (3, 3))
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw)
    n = 20000
    dist = DiscretizedMixtureOfLogistics(np.broadcast_to(params, (n, 1, 1, 30)).astype(np.float32), num_bits=3)
    red = keras.ops.convert_to_numpy(dist.sample(KerasNoise(keras.random.SeedGenerator(5))))[:, 0, 0, 0]
    counts = np.bincount(np.rint(red * 7).astype(np.int64), minlength=8)

    x = 2.0 * np.arange(8)[:, None] / 7.0 - 1.0
    s = np.exp(log_scales[0])
    hi = np_sigmoid((x - means[0] + 1 / 7) / s)
    lo = np_sigmoid((x - means[0] - 1 / 7) / s)
    hi[-1], lo[0] = 1.0, 0.0
    p = np.sum(np.exp(np_log_softmax(logits)) * (hi - lo), axis=-1)
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sd + 2), (counts, n * p)


def _ref_mean(logits, means, coeffs_raw):
    """Spec §2: softmax-weighted means and coefficients, conditioned like sampling (clip, then condition)."""
    w = np.exp(np_log_softmax(logits))[..., None, :]  # [..., 1, M]
    return _conditioned(np.sum(w * means, axis=-1), np.sum(w * np.tanh(coeffs_raw), axis=-1))


def test_dmol_mean_matches_numpy_weighted_conditioned_means():
    rng = np.random.default_rng(25)
    lead = (2, 3, 3)
    # Means small enough that no intermediate (red, green) value leaves [-1, 1].
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, 4, (-3.0, 0.0), (-0.4, 0.4))
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    got = keras.ops.convert_to_numpy(DiscretizedMixtureOfLogistics(params).mean())
    assert got.shape == lead + (3,)
    np.testing.assert_allclose(got, _ref_mean(logits, means, coeffs_raw), atol=1e-5)


@pytest.mark.filterwarnings("ignore:You are using a softmax over axis")
def test_dmol_mean_conditions_on_clipped_channels_like_sampling():
    """When the weighted red (or green) mean is outside [-1, 1], green (blue) is conditioned on the clipped
    value, exactly as sample() does (spec §2: "mean() uses ... the same channel conditioning"). For a single
    component this makes mean() equal the zero-noise sample."""
    rng = np.random.default_rng(26)
    lead = (4, 2, 2)
    logits, means, log_scales, coeffs_raw = random_dmol(rng, lead, 1, (-3.0, 0.0), (-0.5, 0.5))
    means[:2, ..., 0, :] = 1.5  # red mean out of range
    means[2:, ..., 1, :] = -1.7  # green mean out of range
    coeffs_raw[...] = 1.0
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(params)
    got = keras.ops.convert_to_numpy(dist.mean())
    zero_noise_sample = keras.ops.convert_to_numpy(dist.sample(ConstNoise()))
    np.testing.assert_allclose(zero_noise_sample, _ref_mean(logits, means, coeffs_raw), atol=1e-5)
    np.testing.assert_allclose(got, _ref_mean(logits, means, coeffs_raw), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Normal
# ----------------------------------------------------------------------------------------------------------

def ref_from_raw(mu_raw, ls_raw, t=1.0):
    mu_raw, ls_raw = np.asarray(mu_raw, np.float64), np.asarray(ls_raw, np.float64)
    return 5.0 * np.tanh(mu_raw / 5.0), (np.exp(5.0 * np.tanh(ls_raw / 5.0)) + 0.01) * t


def ref_normal_log_prob(z, mu, sigma):
    return -0.5 * ((z - mu) / sigma) ** 2 - 0.5 * np.log(2.0 * np.pi) - np.log(sigma)


def ref_normal_kl(mu_q, s_q, mu_p, s_p):
    return np.log(s_p / s_q) + (s_q ** 2 + (mu_q - mu_p) ** 2) / (2.0 * s_p ** 2) - 0.5


RAW_VALUES = np.array([-1e3, -50.0, -7.0, -5.0, -1.3, -0.2, 0.0, 0.4, 2.5, 5.0, 9.0, 60.0, 1e4])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_normal_from_raw_soft_clamps(temperature):
    mu_raw = RAW_VALUES.reshape(1, 13, 1)
    ls_raw = RAW_VALUES[::-1].reshape(1, 13, 1)
    d = Normal.from_raw(mu_raw.astype(np.float32), ls_raw.astype(np.float32), temperature)
    mu_ref, sigma_ref = ref_from_raw(mu_raw, ls_raw, temperature)
    mu, sigma = keras.ops.convert_to_numpy(d.mu), keras.ops.convert_to_numpy(d.sigma)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5)
    # Saturation: |mu| < 5 always, sigma within ((e^-5 + 0.01) t, (e^5 + 0.01) t).
    np.testing.assert_allclose(mu[0, [0, -1], 0], [-5.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(sigma[0, [0, -1], 0], [(math.exp(5) + 0.01) * temperature,
                                                      (math.exp(-5) + 0.01) * temperature], rtol=1e-5)


def test_normal_top_prior_sigma_is_1_01():
    zeros = np.zeros((2, 3, 3, 4), np.float32)
    d = Normal.from_raw(zeros, zeros)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(d.mu), 0.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(d.sigma), 1.01, rtol=1e-7)
    d_t = Normal.from_raw(zeros, zeros, 0.6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(d_t.sigma), 1.01 * 0.6, rtol=1e-6)


def test_normal_log_prob_matches_closed_form():
    rng = np.random.default_rng(31)
    mu_raw, ls_raw = rng.normal(0, 4, (2, 3, 3, 5)), rng.normal(0, 3, (2, 3, 3, 5))
    z = rng.normal(0, 6, (2, 3, 3, 5))
    d = Normal.from_raw(mu_raw.astype(np.float32), ls_raw.astype(np.float32), 0.8)
    mu, sigma = ref_from_raw(mu_raw.astype(np.float32), ls_raw.astype(np.float32), 0.8)
    got = keras.ops.convert_to_numpy(d.log_prob(z.astype(np.float32)))
    np.testing.assert_allclose(got, ref_normal_log_prob(z.astype(np.float32).astype(np.float64), mu, sigma),
                               rtol=1e-5, atol=1e-4)


def test_normal_log_prob_integrates_to_one():
    d = Normal(np.float32(0.3), np.float32(0.7))
    z = np.linspace(-8, 8, 20001).astype(np.float32)
    p = np.exp(keras.ops.convert_to_numpy(d.log_prob(z)).astype(np.float64))
    np.testing.assert_allclose(np.trapezoid(p, z.astype(np.float64)), 1.0, atol=1e-6)


def test_normal_kl_matches_closed_form():
    rng = np.random.default_rng(32)
    shape = (2, 4, 4, 3)
    raws = [rng.normal(0, 3, shape).astype(np.float32) for _ in range(4)]
    q, p = Normal.from_raw(raws[0], raws[1]), Normal.from_raw(raws[2], raws[3])
    mq, sq = ref_from_raw(raws[0], raws[1])
    mp, sp = ref_from_raw(raws[2], raws[3])
    got = keras.ops.convert_to_numpy(q.kl(p))
    np.testing.assert_allclose(got, ref_normal_kl(mq, sq, mp, sp), rtol=1e-4, atol=1e-5)
    # KL(q || q) = 0 and KL >= 0.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(q.kl(q)), 0.0, atol=1e-6)
    assert np.all(got >= -1e-6)


def test_normal_kl_matches_monte_carlo():
    rng = np.random.default_rng(33)
    mu_q_raw = np.array([0.0, 1.0, -2.0, 0.5, 3.0, -0.3], np.float32)
    ls_q_raw = np.array([0.0, -0.5, 0.3, -1.0, 0.2, 0.6], np.float32)
    mu_p_raw = np.array([0.0, 0.0, -1.0, 1.5, 2.0, 0.0], np.float32)
    ls_p_raw = np.array([0.0, 0.0, 0.5, -0.5, 0.8, 0.1], np.float32)
    q, p = Normal.from_raw(mu_q_raw, ls_q_raw), Normal.from_raw(mu_p_raw, ls_p_raw)
    got = keras.ops.convert_to_numpy(q.kl(p)).astype(np.float64)
    mq, sq = ref_from_raw(mu_q_raw, ls_q_raw)
    mp, sp = ref_from_raw(mu_p_raw, ls_p_raw)
    n = 200_000
    z = mq + sq * rng.standard_normal((n, 6))
    diff = ref_normal_log_prob(z, mq, sq) - ref_normal_log_prob(z, mp, sp)
    mc, se = diff.mean(axis=0), diff.std(axis=0) / math.sqrt(n)
    assert np.all(np.abs(got - mc) <= 5 * se + 1e-6), (got, mc, se)


def test_normal_residual_parameterisation_sums_raw_values():
    """--res_dist: q = from_raw(prior_raw + delta_raw), i.e. the soft clamps act on the summed raw outputs."""
    rng = np.random.default_rng(34)
    shape = (2, 3, 3, 4)
    mu_p, ls_p, dmu, dls = (rng.normal(0, 4, shape).astype(np.float32) for _ in range(4))
    prior = Normal.from_raw(mu_p, ls_p)
    q = Normal.from_raw(mu_p + dmu, ls_p + dls)
    mu_ref, sigma_ref = ref_from_raw(mu_p.astype(np.float64) + dmu, ls_p.astype(np.float64) + dls)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(q.mu), mu_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(q.sigma), sigma_ref, rtol=1e-5)
    # ... which is not the paper's N(mu_p + d_mu, sigma_p * d_sigma) (spec §2).
    paper_mu = keras.ops.convert_to_numpy(prior.mu) + ref_from_raw(dmu, dls)[0]
    assert np.max(np.abs(keras.ops.convert_to_numpy(q.mu) - paper_mu)) > 0.1


def test_normal_sample_is_mu_plus_sigma_eps():
    rng = np.random.default_rng(35)
    shape = (2, 3, 3, 4)
    mu_raw, ls_raw = rng.normal(0, 3, shape).astype(np.float32), rng.normal(0, 2, shape).astype(np.float32)
    d = Normal.from_raw(mu_raw, ls_raw, 0.9)
    noise = RecordingNoise(2)
    z = keras.ops.convert_to_numpy(d.sample(noise))
    assert len(noise.normals) == 1 and noise.normals[0].shape == shape
    mu, sigma = ref_from_raw(mu_raw, ls_raw, 0.9)
    np.testing.assert_allclose(z, mu + sigma * noise.normals[0], rtol=1e-5, atol=1e-5)


def test_zero_noise_draws_zeros_and_halves_so_samples_are_the_means():
    noise = ZeroNoise()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(noise.normal((2, 3))), np.zeros((2, 3)))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(noise.uniform((2, 3))), np.full((2, 3), 0.5))
    assert keras.backend.standardize_dtype(noise.normal((1,), "float16").dtype) == "float16"
    assert keras.backend.standardize_dtype(noise.uniform((1,), "bfloat16").dtype) == "bfloat16"
    rng = np.random.default_rng(36)
    shape = (2, 3, 3, 4)
    mu_raw, ls_raw = rng.normal(0, 3, shape).astype(np.float32), rng.normal(0, 2, shape).astype(np.float32)
    z = keras.ops.convert_to_numpy(Normal.from_raw(mu_raw, ls_raw, 0.9).sample(noise))
    np.testing.assert_allclose(z, ref_from_raw(mu_raw, ls_raw, 0.9)[0], rtol=1e-6, atol=1e-6)
    # Mixture of logistics: the same draw as the NumPy constant-noise source (uniform 0.5 everywhere).
    logits, means, log_scales, coeffs_raw = random_dmol(rng, (2, 4, 5), 3, (-7.5, 1.5), (-2.0, 2.0))
    params = assemble_dmol_params(logits, means, log_scales, coeffs_raw).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(params)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(dist.sample(noise)),
                                  keras.ops.convert_to_numpy(dist.sample(ConstNoise())))
    logits = rng.normal(size=(2, 4, 4, 1)).astype(np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(Bernoulli(logits).sample(noise)),
                                  (logits > 0).astype(np.float32))


def test_normal_sample_with_keras_noise_has_right_moments():
    mu = np.array([-1.0, 0.5, 2.0], np.float32)
    sigma = np.array([0.3, 1.0, 2.5], np.float32)
    n = 20000
    d = Normal(np.broadcast_to(mu, (n, 3)), np.broadcast_to(sigma, (n, 3)))
    z = keras.ops.convert_to_numpy(d.sample(KerasNoise(keras.random.SeedGenerator(6)))).astype(np.float64)
    assert np.all(np.abs(z.mean(0) - mu) <= 5 * sigma / math.sqrt(n))
    np.testing.assert_allclose(z.std(0), sigma, rtol=0.04)


# ----------------------------------------------------------------------------------------------------------
# Bernoulli
# ----------------------------------------------------------------------------------------------------------

def test_bernoulli_log_prob_matches_numpy():
    rng = np.random.default_rng(41)
    logits = rng.normal(0, 3, (3, 5, 5, 1))
    logits[0, 0, 0, 0], logits[0, 0, 1, 0] = 30.0, -30.0
    x = (rng.uniform(size=logits.shape) < 0.5).astype(np.float64)
    x[0, 0, 0, 0], x[0, 0, 1, 0] = 0.0, 1.0  # unlikely values under extreme logits: log p ~ -30
    d = Bernoulli(logits.astype(np.float32))
    ref = x * np_log_sigmoid(logits.astype(np.float32)) + (1 - x) * np_log_sigmoid(-logits.astype(np.float32))
    got = keras.ops.convert_to_numpy(d.log_prob(x.astype(np.float32)))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, ref.reshape(3, -1).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(d.mean()), 1.0 / (1.0 + np.exp(-logits)),
                               rtol=1e-5, atol=1e-7)


def test_bernoulli_sample_mean_close_to_sigmoid():
    logits = np.array([-3.0, -0.5, 0.0, 1.2, 4.0, 40.0, -40.0], np.float32)
    n = 20000
    d = Bernoulli(np.broadcast_to(logits.reshape(1, 1, 7, 1), (n, 1, 7, 1)))
    x = keras.ops.convert_to_numpy(d.sample(KerasNoise(keras.random.SeedGenerator(7))))
    assert set(np.unique(x)) <= {0.0, 1.0}
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    freq = x[:, 0, :, 0].mean(axis=0)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)


# ----------------------------------------------------------------------------------------------------------
# Discretized mixture of logistics on one grey channel
# ----------------------------------------------------------------------------------------------------------

def grey_params(logits, means, log_scales):
    """`[..., 3M]`: logits, then (one channel) means and log-scales."""
    return np.concatenate([logits, means, log_scales], axis=-1)


def ref_grey_probabilities(logits, means, log_scales, num_bits):
    """float64 probabilities of every grey level `[..., 2**bits]`: logistic CDF differences per bin, the end bins
    taking the tails, mixed by softmax(logits)."""
    levels = 2 ** num_bits - 1
    x = 2.0 * np.arange(levels + 1) / levels - 1.0  # [L]
    s = np.exp(np.maximum(log_scales, -7.0))[..., None, :]
    mu = means[..., None, :]
    hi = np_sigmoid((x[:, None] - mu + 1.0 / levels) / s)
    lo = np_sigmoid((x[:, None] - mu - 1.0 / levels) / s)
    hi[..., -1, :], lo[..., 0, :] = 1.0, 0.0
    return np.sum(np.exp(np_log_softmax(logits))[..., None, :] * (hi - lo), axis=-1)


@pytest.mark.parametrize("num_bits, m", [(3, 1), (5, 4), (8, 10)])
def test_grey_dmol_log_prob_matches_numpy_and_all_levels_sum_to_one(num_bits, m):
    rng = np.random.default_rng(40 + m)
    logits = rng.normal(0, 1.5, (4, m))
    means = rng.uniform(-1.1, 1.1, (4, m))
    log_scales = rng.uniform(-8.0, 0.5, (4, m))
    levels = 2 ** num_bits
    expected = ref_grey_probabilities(logits, means, log_scales, num_bits)  # [4, L]
    np.testing.assert_allclose(expected.sum(axis=-1), 1.0, rtol=1e-12)
    # Every level of every pixel: parameters repeated along the width, one level per column.
    params = np.broadcast_to(grey_params(logits, means, log_scales)[:, None, None, :], (4, 1, levels, 3 * m))
    x = np.broadcast_to((np.arange(levels) / (levels - 1.0))[None, None, :, None], (4, 1, levels, 1))
    dist = DiscretizedMixtureOfLogistics(params.astype(np.float32), num_bits=num_bits, channels=1)
    log_p = keras.ops.convert_to_numpy(dist.log_prob_map(x.astype(np.float32)))[:, 0, :]
    assert log_p.shape == (4, levels)
    np.testing.assert_allclose(np.exp(log_p), expected, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(np.exp(log_p).sum(axis=-1), 1.0, rtol=1e-4)


def test_grey_dmol_samples_follow_the_mixture_and_the_mean_is_the_weighted_mean():
    logits = np.array([0.3, -0.5, 1.0])
    means = np.array([-0.6, 0.2, 0.7])
    log_scales = np.array([-2.0, -1.5, -2.5])
    n = 20000
    params = np.broadcast_to(grey_params(logits, means, log_scales), (n, 1, 1, 9)).astype(np.float32)
    dist = DiscretizedMixtureOfLogistics(params, num_bits=3, channels=1)
    x = keras.ops.convert_to_numpy(dist.sample(KerasNoise(keras.random.SeedGenerator(7))))
    assert x.shape == (n, 1, 1, 1) and x.min() >= 0.0 and x.max() <= 1.0
    counts = np.bincount(np.rint(x[:, 0, 0, 0] * 7).astype(np.int64), minlength=8)
    p = ref_grey_probabilities(logits, means, log_scales, 3)
    assert np.all(np.abs(counts - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 2), (counts, n * p)
    mean = keras.ops.convert_to_numpy(dist.mean())[0, 0, 0, 0]
    w = np.exp(np_log_softmax(logits))
    assert mean == pytest.approx((np.clip(np.sum(w * means), -1, 1) + 1) / 2, rel=1e-6)


def test_grey_dmol_needs_three_parameters_per_component():
    with pytest.raises(ValueError, match="1-channel mixture of logistics needs 3"):
        DiscretizedMixtureOfLogistics(np.zeros((1, 2, 2, 10), np.float32), channels=1)
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3"):
        DiscretizedMixtureOfLogistics(np.zeros((1, 2, 2, 12), np.float32), channels=2)
