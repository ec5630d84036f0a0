"""NVAE's training objective: the ELBO with KL warm-up and balancing, plus spectral and BatchNorm regularisation.

    loss = mean_b[ recon_b + beta * sum_k gamma_k KL_k,b ] + lambda * (L_SR + L_BN)

- beta (KL warm-up) rises linearly from `kl_const_coeff` to 1 over `kl_anneal_portion` of training, after a
  constant phase of `kl_const_portion`.
- gamma (KL balancing, only while beta < 1) is proportional to each group's mean KL over its weight alpha_k,
  where alpha_k ~ (height * width) / groups of the group's scale; normalised so that mean gamma = 1. It is
  computed from the replica's own batch and carries no gradient, as in the reference.
- lambda anneals log-linearly from `weight_decay_norm_init` to `weight_decay_norm` with beta when
  `weight_decay_norm_anneal`, and is `weight_decay_norm` otherwise.
"""

import math

import numpy as np
import tensorflow as tf


def bits_per_dim(nats, dims):
    """Nats per image as bits per dimension: nats / (ln 2 * dims); `dims` is `config.data_dims`."""
    return nats / (math.log(2.0) * dims)


def kl_coefficient(step, config, num_total_steps):
    """beta = max(min((step - c) / a, 1) beta_max, beta_min), a = anneal portion * T, c = const portion * T;
    beta_max = `kl_max_coeff` (1 in NVAE)."""
    step = tf.cast(step, tf.float32)
    anneal = max(config.kl_anneal_portion * num_total_steps, 1e-8)
    const = config.kl_const_portion * num_total_steps
    return tf.maximum(tf.minimum((step - const) / anneal, 1.0) * config.kl_max_coeff, config.kl_const_coeff)


def kl_balance_alpha(config):
    """alpha_k per group, top first: 4^j / n_j for a group at decoder scale j of n_j groups, normalised to min 1."""
    per_scale = list(reversed(config.groups_per_scale))
    raw = np.array([4.0 ** j / per_scale[j] for j in config.group_scales])
    return raw / raw.min()


def kl_balance_coefficients(kl, alpha):
    """gamma `[N]` from the KL of each group `[batch, N]`: N (kappa_k / alpha_k) / sum_j (kappa_j / alpha_j),
    kappa_k = mean_b |KL_k| + 0.01; no gradient."""
    kappa = tf.reduce_mean(tf.abs(tf.stop_gradient(kl)), axis=0) + 0.01
    weighted = kappa / tf.cast(alpha, kl.dtype)
    n = tf.cast(tf.shape(kl)[1], kl.dtype)
    return n * weighted / tf.reduce_sum(weighted)


def regularization_coefficient(beta, config):
    """lambda: log-linear from weight_decay_norm_init (beta = 0) to weight_decay_norm (beta = 1) if annealed."""
    if not config.weight_decay_norm_anneal:
        return tf.constant(config.weight_decay_norm, tf.float32)
    start, end = math.log(config.weight_decay_norm_init), math.log(config.weight_decay_norm)
    beta = tf.minimum(beta, 1.0)  # with kl_max_coeff > 1, lambda stays at weight_decay_norm once beta passes 1
    return tf.exp((1.0 - beta) * start + beta * end)


ACTIVE_UNIT_THRESHOLD = 0.01


def active_units(posterior_means):
    """Per group, the number of latent units whose posterior mean varies over the batch by more than 0.01
    (Burda et al., 2016, estimated on one batch): `[N]`."""
    counts = []
    for mu in posterior_means:
        variance = tf.math.reduce_variance(tf.cast(mu, tf.float32), axis=0)
        counts.append(tf.reduce_sum(tf.cast(variance > ACTIVE_UNIT_THRESHOLD, tf.float32)))
    return tf.stack(counts)


def nvae_loss(model, out, step, num_total_steps, alpha=None):
    """The loss of one replica's batch and the metrics of its terms.

    Args:
      model: the NVAE (for its spectral and BN regularisers, which update the power-iteration state).
      out: the model's forward terms for the batch.
      step: the global training step (scalar).
      num_total_steps: steps of the whole run (epochs x steps per epoch).
      alpha: `kl_balance_alpha(config)`; computed if not given.
    Returns:
      (loss, metrics): the scalar loss, and a dict of scalars and the per-group KL `[N]`.
    """
    config = model.config
    alpha = kl_balance_alpha(config) if alpha is None else alpha
    beta = kl_coefficient(step, config, num_total_steps)
    kl = out.kl
    gamma = tf.cond(beta < 1.0, lambda: kl_balance_coefficients(kl, alpha), lambda: tf.ones_like(kl[0]))
    recon = -out.recon_log_prob
    elbo_term = tf.reduce_mean(recon + beta * tf.reduce_sum(gamma * kl, axis=1))
    lam = regularization_coefficient(beta, config)
    spectral = model.spectral_norm_loss()
    bn = model.batchnorm_loss()
    loss = elbo_term + lam * (spectral + bn)
    nelbo = tf.reduce_mean(out.negative_elbo())
    metrics = {
        "loss": loss,
        "recon": tf.reduce_mean(recon),
        "kl": tf.reduce_mean(tf.reduce_sum(kl, axis=1)),
        "nelbo": nelbo,
        "bpd": bits_per_dim(nelbo, config.data_dims),
        "beta": beta,
        "lambda": lam,
        "spectral_norm": spectral,
        "bn_norm": bn,
        "kl_per_group": tf.reduce_mean(kl, axis=0),
        "active_units_per_group": active_units(out.posterior_means),
    }
    return loss, metrics
