"""NVAE: the deep hierarchical VAE of Vahdat & Kautz (2020) as a Keras 3 model.

Layout (paper Fig. 2; L latent scales, N latent groups):

    images -> stem -> pre-process blocks -> bottom-up encoder tower --------------------.
                                                  | features of groups 1..N-1          | enc0
                                                  v                                    v
    prior_ftr0 -> [group 0: z0 ~ q(z0|x)] -> [group k: decoder cells, prior p(zk|z<k),
                   posterior q(zk|x, z<k), combine] ... -> up cells between scales
               -> post-process blocks -> output head -> p(x|z)

`call(images)` returns the terms of the ELBO per image; `sample()` draws images from the prior.
"""

import contextlib
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from nvae_tf.model.cells import BatchNorm, EncoderCell, GenerativeCell
from nvae_tf.model.distributions import Bernoulli, DiscretizedMixtureOfLogistics, KerasNoise, Normal
from nvae_tf.model.flows import ARFlowCell
from nvae_tf.model.ops import (SHARED_KERNELS, Conv2D, after, channels_shape, remat, sum_per_image,
                              weight_normalized)

DECODER_EXPANSION = 6
POSTPROCESS_EXPANSION = 3
POWER_ITERATIONS = 4
FIRST_POWER_ITERATIONS = 40
POWER_ITERATION_EPS = 1e-3


class ForwardTerms(NamedTuple):
    """The ELBO terms of a batch, as `NVAE.call` returns them (N latent groups, top first)."""
    recon_log_prob: object  # [batch]: log p(x|z) of one posterior sample, over the likelihood crop
    kl: object  # [batch, N]: KL of every group (analytic without flows, log q - log p with flows)
    log_q: object  # [batch, N]: log q(z_k|x, z<k) of the sample (flows included), for importance weighting
    log_p: object  # [batch, N]: log p(z_k|z<k) of the sample
    posterior_means: list  # per group, the posterior mean [batch, h_k, w_k, nz] (for active units)
    decoder_params: object  # [batch, H, W, K]: the parameters of p(x|z)

    def negative_elbo(self):
        """-ELBO per image in nats, `[batch]`: -log p(x|z) + sum_k KL_k."""
        return -self.recon_log_prob + ops.sum(self.kl, axis=1)

    def log_weights(self, dtype="float32"):
        """log p(x|z) + sum_k log p(z_k) - sum_k log q(z_k|x) per image, `[batch]`, summed in `dtype`: the log
        importance weight of the sample."""
        recon, log_p, log_q = (ops.cast(t, dtype) for t in (self.recon_log_prob, self.log_p, self.log_q))
        return recon + ops.sum(log_p, axis=1) - ops.sum(log_q, axis=1)


class LatentGroup(keras.layers.Layer):
    """One latent group of the top-down decoder with its samplers, combiners and flows.

    For group k > 0 on the decoder state `s` `[batch, h, w, Cd_j]`:
      s <- decoder cells(s);  prior raw = Conv1x1(ELU(s)) -> 2 nz;
      posterior raw = Conv3x3(encoder feature + Conv1x1(s)) -> 2 nz, added to the prior's (residual Normal);
      z ~ q, then the flows;  s <- Conv1x1(concat[s, z]).
    Group 0 has no cells and a fixed N(0, 1.01^2) prior; its posterior reads enc0's output.
    """

    def __init__(self, index, decoder_channels, encoder_channels, latent_channels, num_cells, num_flows,
                 use_se=True, flow_elu_twice=False, **kwargs):
        super().__init__(**kwargs)
        self.index, self.latent_channels = int(index), int(latent_channels)
        self.decoder_channels, self.encoder_channels = int(decoder_channels), int(encoder_channels)
        self.is_top = self.index == 0
        self.cells = [] if self.is_top else [
            GenerativeCell(decoder_channels, "normal", DECODER_EXPANSION, use_se, name=f"cell_{i}")
            for i in range(num_cells)]
        if not self.is_top:
            self.prior_sampler = Conv2D(2 * latent_channels, 1, name="prior_sampler")
            self.encoder_combiner = Conv2D(encoder_channels, 1, name="encoder_combiner")
        self.posterior_sampler = Conv2D(2 * latent_channels, 3, name="posterior_sampler")
        self.flows = [ARFlowCell(latent_channels, mirror=i % 2 == 1, elu_twice=flow_elu_twice, name=f"flow_{i}")
                      for i in range(2 * num_flows)]
        self.decoder_combiner = Conv2D(decoder_channels, 1, name="decoder_combiner")

    def build(self, input_shape=None):
        dec, enc = channels_shape(self.decoder_channels), channels_shape(self.encoder_channels)
        for cell in self.cells:
            cell.build()
        if not self.is_top:
            self.prior_sampler.build(dec)
            self.encoder_combiner.build(dec)
        self.posterior_sampler.build(enc)
        for flow in self.flows:
            flow.build()
        self.decoder_combiner.build(channels_shape(self.decoder_channels + self.latent_channels))

    def run_cells(self, s, training=False, run=None):
        for cell in self.cells:
            s = run(cell, s, training) if run else cell(s, training=training)
        return s

    def prior(self, s, temperature=1.0):
        """p(z_k | z_<k) from the decoder state `s`: N(0, 1.01^2) for the top group (the raw parameters are
        zero), else from `prior_raw`; sigma scaled by `temperature`."""
        if self.is_top:
            zeros = ops.zeros((*ops.shape(s)[:3], self.latent_channels), "float32")
            return Normal.from_raw(zeros, zeros, temperature)
        return self.normal(self.prior_raw(s), temperature)

    def posterior_and_prior(self, s, encoder_feature, residual=True):
        """(q(z_k | x, z_<k), p(z_k | z_<k)); with `residual` the posterior's raw parameters are offsets to the
        prior's (NVAE's residual Normal, for every group but the top one)."""
        raw = self.posterior_raw(s, encoder_feature)
        if self.is_top:
            return self.normal(raw), self.prior(s)
        prior_raw = self.prior_raw(s)
        return self.normal(prior_raw + raw if residual else raw), self.normal(prior_raw)

    def prior_raw(self, s):
        """Raw prior parameters `[batch, h, w, 2 nz]` from the decoder state (k > 0)."""
        return ops.cast(self.prior_sampler(ops.elu(s)), "float32")

    def posterior_raw(self, s, encoder_feature):
        """Raw posterior parameters (offsets to the prior's for k > 0)."""
        if self.is_top:
            return ops.cast(self.posterior_sampler(encoder_feature), "float32")
        return ops.cast(self.posterior_sampler(encoder_feature + self.encoder_combiner(s)), "float32")

    def combine(self, s, z):
        dtype = self.decoder_combiner.compute_dtype
        return self.decoder_combiner(ops.concatenate([ops.cast(s, dtype), ops.cast(z, dtype)], axis=-1))

    def normal(self, raw, temperature=1.0):
        nz = self.latent_channels
        return Normal.from_raw(raw[..., :nz], raw[..., nz:], temperature)


class NVAE(keras.Model):
    """The NVAE model for one `NVAEConfig`.

    Inputs are images `[batch, H, W, C]` of integers 0..255 (uint8); the model reduces them to
    `config.num_x_bits` bits and maps them to [-1, 1] itself.
    """

    def __init__(self, config, remat=False, **kwargs):
        kwargs.setdefault("name", "nvae")
        super().__init__(**kwargs)
        self.config = config
        self.remat = bool(remat)
        c = config
        P, L = c.num_preprocess_blocks, c.num_latent_scales
        groups = c.groups_per_scale

        self.stem = Conv2D(c.num_channels_enc, 3, name="stem")
        channels = c.num_channels_enc
        self.preprocess = []
        for b in range(P):
            for i in range(c.num_preprocess_cells - 1):
                self.preprocess.append(EncoderCell(channels, "normal", c.use_se, name=f"pre_{b}_{i}"))
            self.preprocess.append(EncoderCell(channels, "down", c.use_se, name=f"pre_{b}_down"))
            channels *= 2

        # Bottom-up tower: for each scale, the cells of each latent group, then a down cell between scales.
        self.encoder_tower = []
        for s in range(L):
            for g in range(groups[s]):
                self.encoder_tower += [EncoderCell(channels, "normal", c.use_se, name=f"enc_{s}_{g}_{i}")
                                       for i in range(c.num_cell_per_cond_enc)]
            if s < L - 1:
                self.encoder_tower.append(EncoderCell(channels, "down", c.use_se, name=f"enc_{s}_down"))
                channels *= 2
        self.enc0 = Conv2D(channels, 1, name="enc0")

        top = c.image_size // c.total_downsampling
        dec_channels = c.num_channels_dec * 2 ** (P + L - 1)
        enc_channels = channels
        self.prior_ftr0 = self.add_weight(name="prior_ftr0", shape=(top, top, dec_channels),
                                          initializer=keras.initializers.RandomUniform(0.0, 1.0))
        # Top-down: the latent groups of each scale, lowest resolution first, then an up cell between scales.
        self.latent_groups, self.decoder_up_cells = [], []
        for j in range(L):
            for _ in range(groups[L - 1 - j]):
                k = len(self.latent_groups)
                self.latent_groups.append(LatentGroup(k, dec_channels, enc_channels, c.num_latent_per_group,
                                                      c.num_cell_per_cond_dec, c.num_nf, c.use_se,
                                                      c.flow_elu_twice, name=f"group_{k}"))
            if j < L - 1:
                self.decoder_up_cells.append(GenerativeCell(dec_channels, "up", DECODER_EXPANSION, c.use_se,
                                                            name=f"dec_up_{j}"))
                dec_channels //= 2
                enc_channels //= 2

        self.postprocess = []
        for b in range(P):
            self.postprocess.append(GenerativeCell(dec_channels, "up", POSTPROCESS_EXPANSION, c.use_se,
                                                   name=f"post_{b}_up"))
            dec_channels //= 2
            for i in range(c.num_postprocess_cells - 1):
                self.postprocess.append(GenerativeCell(dec_channels, "normal", POSTPROCESS_EXPANSION, c.use_se,
                                                       name=f"post_{b}_{i}"))
        head_channels = (c.image_channels if c.decoder == "bernoulli" else
                         DiscretizedMixtureOfLogistics.params_per_mixture(c.image_channels) * c.num_mixture_dec)
        self.head = Conv2D(head_channels, 3, name="head")
        self.seed_generator = keras.random.SeedGenerator(c.seed, name="nvae_noise")

    # ----------------------------------------------------------------------------------------------- build
    def build(self, input_shape=None):
        """Create every weight without data, then the power-iteration state of the spectral regulariser."""
        self.stem.build(channels_shape(self.config.image_channels))
        for layer in (*self.preprocess, *self.encoder_tower, *self.latent_groups, *self.decoder_up_cells,
                      *self.postprocess):
            layer.build()
        self.enc0.build(channels_shape(self.enc0.filters))
        self.head.build(channels_shape(self.config.num_channels_dec))
        self._build_spectral_state()

    def _build_spectral_state(self):
        by_shape = {}
        for layer in self.conv_layers:
            by_shape.setdefault(tuple(_matrix_shape(layer)), []).append(layer)
        self._sr_groups, self._sr_u, self._sr_v = [], [], []
        rng = np.random.default_rng(self.config.seed)
        for i, ((rows, cols), layers) in enumerate(sorted(by_shape.items())):
            self._sr_groups.append(layers)
            for name, size, store in (("u", rows, self._sr_u), ("v", cols, self._sr_v)):
                init = rng.standard_normal((len(layers), size)).astype("float32")
                init /= np.maximum(np.linalg.norm(init, axis=1, keepdims=True), POWER_ITERATION_EPS)
                store.append(self.add_weight(name=f"power_iteration_{name}_{i}", shape=init.shape,
                                             initializer=keras.initializers.Constant(init), trainable=False,
                                             aggregation="only_first_replica"))
        self.power_iteration_started = self.add_weight(name="power_iteration_started", shape=(),
                                                       initializer="zeros", trainable=False,
                                                       aggregation="only_first_replica")

    # ------------------------------------------------------------------------------------------- structure
    @property
    def conv_layers(self):
        """Every convolution (weight-normalised, plain, depthwise and autoregressive)."""
        return [layer for layer in self._flatten_layers(include_self=False) if isinstance(layer, Conv2D)]

    @property
    def batchnorm_layers(self):
        return [layer for layer in self._flatten_layers(include_self=False)
                if isinstance(layer, keras.layers.BatchNormalization)]

    @property
    def sampling_batchnorm_layers(self):
        """The BatchNorm layers that `sample()` runs through (the generative side: no encoder)."""
        blocks = [*self.latent_groups, *self.decoder_up_cells, *self.postprocess]
        return [layer for block in blocks for layer in block._flatten_layers(include_self=True)
                if isinstance(layer, keras.layers.BatchNormalization)]

    # ------------------------------------------------------------------------------------------ forward
    def preprocess_images(self, images):
        """uint8 images -> float32 in [0, 1] on the grid of `2**num_x_bits` levels."""
        bits = self.config.num_x_bits
        x = ops.cast(images, "float32")
        return ops.floor(x / 2.0 ** (8 - bits)) / (2.0 ** bits - 1.0)

    def call(self, images, training=False, noise=None):
        """The ELBO terms of every image of a batch of uint8 images `[batch, H, W, C]`, as `ForwardTerms`.

        `noise` is an optional noise source for the posterior samples (default: the model's seed generator).
        """
        noise = noise or KerasNoise(self.seed_generator)
        x = self.preprocess_images(images)
        features = self._encode(x, training)
        groups = []  # per group: (posterior mean, log q, log p, KL), each `[batch]` but the mean

        def posterior_sample(group, s):
            q, prior = group.posterior_and_prior(s, features[group.index], self.config.res_dist)
            z = q.sample(noise)
            log_q = sum_per_image(q.log_prob(z))
            for flow in group.flows:  # recomputed like a cell under remat: its hidden tensors have 6 nz channels
                z = self._run_cell(flow, z, training)
            log_p = sum_per_image(prior.log_prob(z))
            groups.append((q.mu, log_q, log_p, log_q - log_p if group.flows else sum_per_image(q.kl(prior))))
            return z

        params = self._top_down(ops.shape(images)[0], posterior_sample, training)
        crop = self.config.likelihood_crop
        cropped = params[:, crop:-crop, crop:-crop, :] if crop else params
        x = x[:, crop:-crop, crop:-crop, :] if crop else x
        means, log_q, log_p, kl = zip(*groups)
        return ForwardTerms(recon_log_prob=self.output_distribution(cropped).log_prob(x),
                            kl=ops.stack(kl, axis=1), log_q=ops.stack(log_q, axis=1),
                            log_p=ops.stack(log_p, axis=1), posterior_means=list(means), decoder_params=params)

    def get_config(self):
        return {"name": self.name, "config": self.config.to_dict(), "remat": self.remat}

    @classmethod
    def from_config(cls, config):
        from nvae_tf.config import NVAEConfig
        return cls(NVAEConfig.from_dict(config.pop("config")), **config)

    def _encode(self, x, training=False):
        """The encoder feature each latent group's posterior reads, top group first: enc0's output for group 0,
        then the tower's feature after the cells of the matching bottom-up group."""
        h = self.stem(2.0 * x - 1.0)
        for cell in self.preprocess:
            h = self._run_cell(cell, h, training)
        cells = iter(self.encoder_tower)
        features = []
        for scale, num_groups in enumerate(self.config.groups_per_scale):
            for _ in range(num_groups):
                for _ in range(self.config.num_cell_per_cond_enc):
                    h = self._run_cell(next(cells), h, training)
                features.append(h)
            if scale < self.config.num_latent_scales - 1:
                h = self._run_cell(next(cells), h, training)
        features[-1] = ops.elu(self.enc0(ops.elu(h)))  # the last bottom-up group feeds the top group via enc0
        return features[::-1]

    def _top_down(self, batch, latent, training=False):
        """The generative pass shared by `call` and `sample`: from the learned initial state through every latent
        group (its cells, then `s <- combine(s, latent(group, s))`), an up cell after the last group of each
        scale, and the post-process blocks; returns the decoder parameters `[batch, H, W, K]`."""
        scales = self.config.group_scales
        s = self._initial_state(batch)
        for k, group in enumerate(self.latent_groups):
            s = group.run_cells(s, training, self._run_cell)
            s = group.combine(s, latent(group, s))
            if k + 1 < len(scales) and scales[k + 1] != scales[k]:
                s = self._run_cell(self.decoder_up_cells[scales[k]], s, training)
        return self._decode(s, training=training)

    def _run_cell(self, cell, x, training):
        """`cell(x)`; with `remat` in training, the cell's activations are not kept for the gradient but
        recomputed from `x` during back-propagation (gradient checkpointing per cell)."""
        if not (self.remat and training):
            return cell(x, training=training)
        layers = list(cell._flatten_layers())
        norms = [layer for layer in layers if isinstance(layer, BatchNorm)]
        # Kernels computed by `shared_kernels` enter as inputs of the rematerialised function, so that its
        # gradient reaches them (and, through them, the stacked weight normalisation) like any input's.
        shared = getattr(SHARED_KERNELS, "by_layer", None) or {}
        convs = [layer for layer in layers if isinstance(layer, Conv2D) and id(layer) in shared]
        passes = []

        def forward(h, *kernels):
            # The first pass updates the BN running statistics; the recomputation must not do it again.
            recomputing = bool(passes)
            passes.append(None)
            for bn in norms:
                bn.update_statistics = not recomputing
            outer = getattr(SHARED_KERNELS, "by_layer", None)
            if convs:  # the recomputation runs outside `shared_kernels`: the kernels are the inputs given here
                SHARED_KERNELS.by_layer = {id(layer): k for layer, k in zip(convs, kernels)}
            try:
                return cell(h, training=True)
            finally:
                SHARED_KERNELS.by_layer = outer
                for bn in norms:
                    bn.update_statistics = True

        return remat(forward)(x, *[shared[id(layer)] for layer in convs])

    def _initial_state(self, batch):
        return ops.broadcast_to(self.prior_ftr0[None], (batch, *self.prior_ftr0.shape))

    def _decode(self, s, training=False):
        for cell in self.postprocess:
            s = self._run_cell(cell, s, training)
        return ops.cast(self.head(ops.elu(s)), "float32")

    def output_distribution(self, params):
        """p(x|z) from decoder parameters: Bernoulli or discretized mixture of logistics."""
        if self.config.decoder == "bernoulli":
            return Bernoulli(params)
        return DiscretizedMixtureOfLogistics(params, self.config.num_x_bits,
                                             reference_edges=self.config.reference_logistic,
                                             channels=self.config.image_channels)

    def decode_pixels(self, params, mode="sample", noise=None, temperature=1.0):
        """Images in [0, 1] from decoder parameters: a draw (`sample`, on the bit grid) or the `mean`.
        `temperature` applies to a mixture-of-logistics draw only with `config.pixel_temperature`."""
        dist = self.output_distribution(params)
        if mode == "mean":
            return dist.mean()
        if mode != "sample":
            raise ValueError(f"mode must be 'sample' or 'mean', got {mode!r}")
        noise = noise or KerasNoise(self.seed_generator)
        if self.config.pixel_temperature and self.config.decoder != "bernoulli":
            x = dist.sample(noise, temperature)
        else:
            x = dist.sample(noise)
        levels = 2.0 ** self.config.num_x_bits - 1.0
        return ops.round(x * levels) / levels

    @contextlib.contextmanager
    def shared_kernels(self):
        """Within this context every convolution's effective kernel is computed once, on entry, and shared by the
        forward pass and `spectral_norm_loss` (a training step computes it once instead of twice); under `remat`
        a rematerialised cell takes its kernels as inputs (`_run_cell`). Without effect under a mixed precision
        policy (a convolution computes its kernel from variables cast to its compute dtype, the regulariser in
        float32).

        The kernels of one spectral group (convolutions whose kernels have one shape) are computed stacked, a
        handful of ops for the group instead of a dozen per convolution in the step and as many in its gradient.
        The regulariser's power iteration runs here too, on those stacks, so that each group's largest singular
        values come out of `kernels_and_sigmas` beside the kernels the forward pass uses: the regulariser's
        gradient (a kernel-sized outer product per group) is then formed only when the forward pass's gradient
        of the group has arrived, instead of being held through the whole back-propagation (a copy of every
        weight, 0.5 GB for CIFAR-10)."""
        if self.stem.compute_dtype != "float32":
            yield
            return
        kernels, stacks, matrices = {}, [], []
        for layers in self._sr_groups:
            if len({(tuple(l.kernel.shape), l.depthwise, l.weight_norm) for l in layers}) == 1:
                stacked = stacked_effective_kernels(layers)
                stacks.append(stacked)
                matrices.append(_as_matrices(ops.stop_gradient(stacked), layers[0].depthwise))
            else:  # one shape of matrix from kernels of different shapes: each kernel on its own
                own = [layer.effective_kernel() for layer in layers]
                kernels.update((id(layer), k) for layer, k in zip(layers, own))
                stacks.append(None)
                matrices.append(ops.stack([_as_matrices(k, layer.depthwise) for layer, k in zip(layers, own)]))
        us, vs = self._power_iteration(matrices)
        sigmas = []
        for layers, stacked, w, u, v in zip(self._sr_groups, stacks, matrices, us, vs):
            if stacked is None:
                sigmas.append(_sigmas(u, w, v))
            else:
                stacked, sigma = kernels_and_sigmas(stacked, u, v, layers[0].depthwise)
                kernels.update((id(layer), k) for layer, k in zip(layers, ops.unstack(stacked)))
                sigmas.append(sigma)
        SHARED_KERNELS.by_layer, SHARED_KERNELS.spectral = kernels, (us, vs, sigmas)
        try:
            yield
        finally:
            SHARED_KERNELS.by_layer = SHARED_KERNELS.spectral = None

    # ------------------------------------------------------------------------------------------ sampling
    def sample(self, num_samples, temperature=1.0, noise=None, mode="sample", training=False):
        """Draw `[num_samples, H, W, C]` images in [0, 1] from the prior at `temperature`.

        z0 ~ N(0, (1.01 t)^2); every later group from its prior with sigma scaled by t; no flows. Pixels are
        drawn at temperature 1 (`mode="sample"`; at t with `config.pixel_temperature`) or taken as the decoder
        mean (`mode="mean"`). With
        `training=True` BatchNorm uses and updates batch statistics (BN readjustment).
        """
        noise = noise or KerasNoise(self.seed_generator)
        params = self.prior_decoder_params(num_samples, temperature, noise, training)
        return self.decode_pixels(params, mode=mode, noise=noise, temperature=temperature)

    def prior_decoder_params(self, num_samples, temperature=1.0, noise=None, training=False):
        """The decoder parameters `[num_samples, H, W, K]` of p(x|z) for z drawn from the prior at `temperature`
        (what `sample` decodes into pixels)."""
        noise = noise or KerasNoise(self.seed_generator)
        return self._top_down(num_samples, lambda group, s: group.prior(s, temperature).sample(noise), training)

    # ----------------------------------------------------------------------------------- regularisation
    def spectral_norm_loss(self):
        """Sum over every convolution of the largest singular value of its effective kernel.

        Kernels are reshaped to `[out, in * kh * kw]` and grouped by shape; batched power iteration
        (v <- normalise(u^T W), u <- normalise(W v)) runs 40 iterations on the first call and 4 afterwards,
        keeping u and v in non-trainable weights. sigma = u^T W v with gradients through W only.
        """
        shared = getattr(SHARED_KERNELS, "spectral", None)
        if shared:  # `shared_kernels` has run the power iteration and computed sigma
            us, vs, sigmas = shared
        else:
            matrices = [ops.stack([_as_matrices(c.effective_kernel(), c.depthwise) for c in layers])
                        for layers in self._sr_groups]
            us, vs = self._power_iteration(matrices)
            sigmas = [_sigmas(u, w, v) for w, u, v in zip(matrices, us, vs)]
        total = 0.0
        for sigma, u, v, u_var, v_var in zip(sigmas, us, vs, self._sr_u, self._sr_v):
            u_var.assign(u)
            v_var.assign(v)
            total = total + ops.sum(sigma)
        self.power_iteration_started.assign(1.0)
        return total

    def _power_iteration(self, matrices):
        """The new `(us, vs)` of every spectral group from its matrices (no gradient through them)."""
        iterations = ops.where(self.power_iteration_started > 0, POWER_ITERATIONS, FIRST_POWER_ITERATIONS)
        # One loop iterates every shape group (a loop per group costs as much to trace again as its body).
        us, vs, _ = ops.fori_loop(0, iterations, _power_steps,
                                  (tuple(ops.convert_to_tensor(u) for u in self._sr_u),
                                   tuple(ops.convert_to_tensor(v) for v in self._sr_v),
                                   tuple(ops.stop_gradient(w) for w in matrices)))
        return us, vs

    def batchnorm_loss(self):
        """Sum over BatchNorm layers of max_c |gamma_c| (an L-infinity norm per layer); the layers with as many
        channels are taken together (one max over a stack instead of one per layer, and as much in the gradient)."""
        by_shape = {}
        for bn in self.batchnorm_layers:
            by_shape.setdefault(tuple(bn.gamma.shape), []).append(bn.gamma.value)
        return sum(ops.sum(ops.max(ops.abs(ops.stack(gammas)), axis=1)) for gammas in by_shape.values())


def _normalize(x):
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True)), POWER_ITERATION_EPS)


def _power_steps(_, state):
    """One batched power iteration of every shape group: v <- normalise(u^T W), u <- normalise(W v). A
    module-level function with the matrices in the loop state (not a closure over them), so that eager JAX traces
    and compiles the loop once per model instead of once per call."""
    us, vs, ws = state
    new_us, new_vs = [], []
    for u, w in zip(us, ws):
        v = _normalize(ops.einsum("gi,gij->gj", u, w))
        new_vs.append(v)
        new_us.append(_normalize(ops.einsum("gij,gj->gi", w, v)))
    return tuple(new_us), tuple(new_vs), ws


def _sigmas(u, w, v):
    """u^T W v of every matrix of a group, with gradients through W only."""
    return ops.einsum("gi,gij,gj->g", ops.stop_gradient(u), w, ops.stop_gradient(v))


def kernels_and_sigmas(stacked, u, v, depthwise):
    """`(stacked, sigma)`: the kernels unchanged, and u^T W v of each kernel's matrix W (`_as_matrices`), u and
    v taken as constants. The gradient of sigma by the kernels is formed only in the backward step that also
    receives the kernels' own gradient, so it is never held alone."""
    n, k, _, cin, _ = stacked.shape
    # u and v in the kernel's layout: W[o, (a, b, i)] = K[a, b, i, o]; depthwise W[c, (a, b)] = K[a, b, c, 0].
    u, v = ops.stop_gradient(u), ops.stop_gradient(v)
    v_kernel = ops.reshape(v, (n, k, k) if depthwise else (n, k, k, cin))

    @ops.custom_gradient
    def forward(kernels):
        if depthwise:
            sigma = ops.einsum("gabc,gc,gab->g", kernels[..., 0], u, v_kernel)
        else:
            sigma = ops.einsum("gabio,go,gabi->g", kernels, u, v_kernel)

        def grad(*args, upstream=None):
            upstream = args if upstream is None else upstream
            d_kernels, d_sigma = upstream if len(upstream) == 2 else upstream[0]
            if d_kernels is not None:
                d_sigma = after(d_sigma, d_kernels)
            if depthwise:
                d_spectral = ops.einsum("g,gc,gab->gabc", d_sigma, u, v_kernel)[..., None]
            else:
                d_spectral = ops.einsum("g,go,gabi->gabio", d_sigma, u, v_kernel)
            return d_spectral if d_kernels is None else d_kernels + d_spectral

        return (kernels, sigma), grad

    return forward(stacked)


def stacked_effective_kernels(layers):
    """The effective kernels of convolutions with kernels of one shape, depthwise flag and weight
    normalisation, stacked: `[n, k, k, in, out]`, each exactly as `Conv2D.effective_kernel` computes it."""
    first = layers[0]
    kernel = ops.stack([layer.kernel.value for layer in layers])
    if any(layer.mask is not None for layer in layers):
        ones = np.ones(first.kernel.shape, "float32")
        masks = np.stack([ones if layer.mask is None else layer.mask for layer in layers])
        kernel = kernel * ops.cast(masks, kernel.dtype)
    if not first.weight_norm:
        return kernel
    return weight_normalized(kernel, ops.stack([layer.log_weight_norm.value for layer in layers]), first.depthwise)


def _as_matrices(kernels, depthwise):
    """Kernels as matrices, over any leading axes: `[..., k, k, in, out]` -> `[..., out, k*k*in]`, depthwise
    `[..., k, k, C, 1]` -> `[..., C, k*k]`."""
    lead = tuple(kernels.shape[:-4])
    k, _, cin, cout = kernels.shape[-4:]
    first = tuple(range(len(lead)))
    rows = len(lead) + (2 if depthwise else 3)  # the axis that becomes the rows
    others = [a for a in range(len(lead), len(lead) + 4) if a != rows]
    return ops.reshape(ops.transpose(kernels, (*first, rows, *others)),
                       (*lead, cin if depthwise else cout, k * k * (1 if depthwise else cin)))


def _matrix_shape(layer):
    k, _, cin, cout = layer.kernel.shape
    return (cin, k * k) if layer.depthwise else (cout, k * k * cin)
