"""The distributions of NVAE: residual Normal latents, discretized mixture of logistics and Bernoulli pixels.

All densities are evaluated in float32 whatever the compute dtype of the network. Random draws come from a
noise source (an object with `normal(shape, dtype)` and `uniform(shape, dtype)`), so the caller decides how noise
is made: Keras seeded generators for training (`KerasNoise`), a builtin-op generator for the exported samplers,
no noise at all (`ZeroNoise`, latents at their means) for debugging and comparing backends.
"""

import math

import keras
from keras import ops

from nvae_tf.model.ops import sum_per_image

LOG_2PI = math.log(2.0 * math.pi)
UNIFORM_EPS = 1e-5


def soft_clamp(x, bound=5.0):
    """`bound * tanh(x / bound)`: smooth clamp of a raw network output to (-bound, bound)."""
    return bound * ops.tanh(x / bound)


class KerasNoise:
    """Noise source drawing from a `keras.random.SeedGenerator`."""

    def __init__(self, seed_generator):
        self.seed_generator = seed_generator

    def normal(self, shape, dtype="float32"):
        return keras.random.normal(shape, dtype=dtype, seed=self.seed_generator)

    def uniform(self, shape, dtype="float32"):
        return keras.random.uniform(shape, minval=UNIFORM_EPS, maxval=1.0 - UNIFORM_EPS, dtype=dtype,
                                    seed=self.seed_generator)


class ZeroNoise:
    """Noise source without randomness: every normal draw is 0 and every uniform draw is 0.5.

    With it a latent sample is the mean of its distribution (`z = mu`: the posterior mean in `NVAE.call`, the
    prior mean in `NVAE.sample`), the logistic noise `log u - log(1 - u)` of the mixture-of-logistics sampler
    is 0 and its Gumbel perturbation is the same constant for every component (so a draw is the conditioned
    mean of the most probable component), and a Bernoulli pixel is 1 where its logit is positive. Nothing
    depends on a seed, a random generator or the backend's random ops, so it is the noise for debugging and for
    comparing backends or exports number for number: e.g. `model(images, training=False, noise=ZeroNoise())`.
    """

    def normal(self, shape, dtype="float32"):
        return ops.zeros(shape, dtype=dtype)

    def uniform(self, shape, dtype="float32"):
        return ops.full(shape, 0.5, dtype=dtype)


class Normal:
    """Diagonal Normal with NVAE's parameterisation.

    From raw network outputs: `mu = 5 tanh(mu_raw / 5)`, `sigma = (exp(5 tanh(log_sigma_raw / 5)) + 0.01) * t`.
    With both raw values zero this is the top prior, sigma = 1.01 (times the temperature t).
    """

    def __init__(self, mu, sigma):
        self.mu = mu
        self.sigma = sigma

    @classmethod
    def from_raw(cls, mu_raw, log_sigma_raw, temperature=1.0):
        mu_raw = ops.cast(mu_raw, "float32")
        log_sigma_raw = ops.cast(log_sigma_raw, "float32")
        sigma = (ops.exp(soft_clamp(log_sigma_raw)) + 0.01) * temperature
        return cls(soft_clamp(mu_raw), sigma)

    def sample(self, noise):
        """Reparameterised draw `mu + sigma * eps`."""
        return self.mu + self.sigma * noise.normal(ops.shape(self.mu))

    def log_prob(self, z):
        """Elementwise log-density."""
        z = ops.cast(z, "float32")
        normalized = (z - self.mu) / self.sigma
        return -0.5 * ops.square(normalized) - 0.5 * LOG_2PI - ops.log(self.sigma)

    def kl(self, other):
        """Elementwise analytic KL(self || other)."""
        ratio = self.sigma / other.sigma
        diff = (self.mu - other.mu) / other.sigma
        return 0.5 * (ops.square(diff) + ops.square(ratio)) - 0.5 - ops.log(ratio)


class Bernoulli:
    """Independent Bernoulli pixels from logits `[batch, h, w, channels]`; data in {0, 1}."""

    def __init__(self, logits):
        self.logits = ops.cast(logits, "float32")

    def log_prob(self, x):
        """log p(x) summed per image: `[batch]`."""
        x = ops.cast(x, "float32")
        lp = x * ops.log_sigmoid(self.logits) + (1.0 - x) * ops.log_sigmoid(-self.logits)
        return sum_per_image(lp)

    def sample(self, noise):
        return ops.cast(noise.uniform(ops.shape(self.logits)) < ops.sigmoid(self.logits), "float32")

    def mean(self):
        return ops.sigmoid(self.logits)


class DiscretizedMixtureOfLogistics:
    """Discretized mixture of M logistics over RGB with autoregressive channel means (PixelCNN++ style), or over
    one grey channel (`channels=1`: parameters `[batch, h, w, 3 M]`, M logits, M means, M log-scales).

    Parameters `[batch, h, w, 10 M]`: channels [0, M) are mixture logits; the other 9M, viewed as
    (3 colours, 3M), hold per colour M means, M log-scales (clamped at -7) and M coefficients (tanh). The
    green mean adds `c0 * red`, the blue mean `c1 * red + c2 * green`, where c_i are the coefficients of
    colour slot i. Data in [0, 1] on the grid of `2**num_bits` levels.

    The mass of a bin is the exact logistic CDF difference, computed in log space; the two extreme bins take
    the tails, so the probabilities of all `2**num_bits` values of a pixel sum to 1.

    With `reference_edges` it computes what the reference code does instead: the lower tail below -0.999 and the
    upper tail above 0.99 on the [-1, 1] scale (at 8 bits pixel 254 takes the upper tail too, so the
    probabilities sum to more than 1), and a middle bin's mass as the difference of the two sigmoids, replaced
    by pdf x bin width where it is at most 1e-5.
    """

    def __init__(self, params, num_bits=8, reference_edges=False, channels=3):
        params = ops.cast(params, "float32")
        num_params = params.shape[-1]
        if channels not in (1, 3):
            raise ValueError(f"a mixture of logistics models 1 (grey) or 3 (RGB) channels, not {channels}")
        per_mixture = self.params_per_mixture(channels)
        if num_params % per_mixture:
            raise ValueError(f"a {channels}-channel mixture of logistics needs {per_mixture}*M parameters, got "
                             f"{num_params}")
        m = num_params // per_mixture
        self.num_mixtures = m
        self.channels = channels
        self.num_bits = int(num_bits)
        self.reference_edges = bool(reference_edges)
        self.logits = params[..., :m]
        per_channel = (per_mixture - 1) // channels  # means, log-scales (and coefficients for RGB)
        rest = ops.reshape(params[..., m:], (*ops.shape(params)[:-1], channels, per_channel * m))
        self.means = rest[..., :m]  # [b, h, w, C, M]
        self.log_scales = ops.maximum(rest[..., m:2 * m], -7.0)
        self.coeffs = ops.tanh(rest[..., 2 * m:]) if channels == 3 else None

    @staticmethod
    def params_per_mixture(channels):
        """Parameters per mixture component: a logit, and per channel a mean and a log-scale, plus the three
        colour coefficients of RGB (10 for RGB, 3 for grey)."""
        return 10 if channels == 3 else 3

    def _channel_means(self, red, green):
        """Means of the three colours given red and green values broadcastable to `[b, h, w, M]` (grey: the
        means)."""
        if self.channels == 1:
            return self.means
        mean_r = self.means[..., 0, :]
        mean_g = self.means[..., 1, :] + self.coeffs[..., 0, :] * red
        mean_b = self.means[..., 2, :] + self.coeffs[..., 1, :] * red + self.coeffs[..., 2, :] * green
        return ops.stack([mean_r, mean_g, mean_b], axis=-2)

    def log_prob_map(self, x):
        """log p(x) per pixel, `[batch, h, w]`, for x in [0, 1] of shape `[batch, h, w, 3]`."""
        x = 2.0 * ops.cast(x, "float32") - 1.0
        half_bin = 1.0 / (2.0 ** self.num_bits - 1.0)
        means = self._channel_means(x[..., 0:1], x[..., 1:2])  # [b, h, w, 3, M]
        x = x[..., None]  # [b, h, w, 3, 1]
        inv_scale = ops.exp(-self.log_scales)
        centered = x - means
        plus_in = inv_scale * (centered + half_bin)
        minus_in = inv_scale * (centered - half_bin)
        if self.reference_edges:
            log_probs = self._reference_log_probs(x, centered, inv_scale, plus_in, minus_in)
            log_probs = ops.sum(log_probs, axis=-2) + ops.log_softmax(self.logits, axis=-1)
            return ops.logsumexp(log_probs, axis=-1)
        # log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a)), for a > b.
        log_mass = (ops.log_sigmoid(plus_in) + ops.log_sigmoid(-minus_in)
                    + ops.log(-ops.expm1(minus_in - plus_in)))
        log_probs = ops.where(x < -1.0 + half_bin, ops.log_sigmoid(plus_in),
                              ops.where(x > 1.0 - half_bin, ops.log_sigmoid(-minus_in), log_mass))
        log_probs = ops.sum(log_probs, axis=-2) + ops.log_softmax(self.logits, axis=-1)
        return ops.logsumexp(log_probs, axis=-1)

    def _reference_log_probs(self, x, centered, inv_scale, plus_in, minus_in):
        """Per colour and component, the reference code's log-probability (see the class docstring)."""
        cdf_delta = ops.sigmoid(plus_in) - ops.sigmoid(minus_in)
        mid_in = inv_scale * centered
        log_pdf_mid = mid_in - self.log_scales - 2.0 * ops.softplus(mid_in)
        log_mid = ops.where(cdf_delta > 1e-5, ops.log(ops.maximum(cdf_delta, 1e-10)),
                            log_pdf_mid - math.log((2.0 ** self.num_bits - 1.0) / 2.0))
        return ops.where(x < -0.999, plus_in - ops.softplus(plus_in),
                         ops.where(x > 0.99, -ops.softplus(minus_in), log_mid))

    def log_prob(self, x):
        """log p(x) summed per image: `[batch]`."""
        return sum_per_image(self.log_prob_map(x))

    def sample(self, noise, temperature=1.0):
        """Draw pixels in [0, 1]. At the default temperature 1 this is a draw from the distribution; another
        `temperature` t does what the reference's sampler does: the component is drawn from softmax(logits / t)
        and the logistic noise is divided by t."""
        shape = ops.shape(self.logits)
        gumbel = -ops.log(-ops.log(noise.uniform(shape)))
        # Gumbel-max: the component with the largest perturbed logit (ties have probability 0). A comparison
        # with the max instead of argmax keeps the sampler to builtin TFLite ops.
        unit = isinstance(temperature, (int, float)) and temperature == 1.0
        perturbed = (self.logits if unit else self.logits / temperature) + gumbel
        select = ops.cast(perturbed >= ops.max(perturbed, axis=-1, keepdims=True), "float32")[..., None, :]
        means = ops.sum(self.means * select, axis=-1)  # [b, h, w, C]
        log_scales = ops.sum(self.log_scales * select, axis=-1)
        u = noise.uniform(ops.shape(means))
        scales = ops.exp(log_scales) if unit else ops.exp(log_scales) / temperature
        x = means + scales * (ops.log(u) - ops.log(1.0 - u))
        if self.channels == 1:
            return (ops.clip(x, -1.0, 1.0) + 1.0) / 2.0
        coeffs = ops.sum(self.coeffs * select, axis=-1)
        red = ops.clip(x[..., 0], -1.0, 1.0)
        green = ops.clip(x[..., 1] + coeffs[..., 0] * red, -1.0, 1.0)
        blue = ops.clip(x[..., 2] + coeffs[..., 1] * red + coeffs[..., 2] * green, -1.0, 1.0)
        return (ops.stack([red, green, blue], axis=-1) + 1.0) / 2.0

    def mean(self):
        """Mixture-weighted means, each colour clipped to [-1, 1] before it conditions the next, in [0, 1]."""
        weights = ops.softmax(self.logits, axis=-1)

        def weighted(values):
            return ops.clip(ops.sum(weights * values, axis=-1, keepdims=True), -1.0, 1.0)

        red = weighted(self.means[..., 0, :])
        if self.channels == 1:
            return (red + 1.0) / 2.0
        green = weighted(self.means[..., 1, :] + self.coeffs[..., 0, :] * red)
        blue = weighted(self.means[..., 2, :] + self.coeffs[..., 1, :] * red + self.coeffs[..., 2, :] * green)
        return (ops.concatenate([red, green, blue], axis=-1) + 1.0) / 2.0
