"""The objective's schedules and terms against the formulas of spec section 4."""

import math

import numpy as np
import pytest
import tensorflow as tf

from conftest import load_flagfile
from nvae_tf import objective
from nvae_tf.model import NVAE


@pytest.mark.parametrize("step", [0, 1, 5, 100, 2999, 3000, 3001, 5000, 9999])
def test_kl_warmup_matches_its_formula(step):
    config = load_flagfile("cifar10")
    total = 10000
    a, c = 0.3 * total, 1e-4 * total
    expected = max(min((step - c) / a, 1.0), 1e-4)
    assert float(objective.kl_coefficient(step, config, total)) == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("step", [0, 1, 1500, 2999, 3000, 3001, 9999])
def test_kl_warmup_rises_to_kl_max_coeff_and_lambda_stops_at_its_end(step):
    config = load_flagfile("celebahq", kl_max_coeff=2.0)  # lambda annealed from 1.0 to 1e-2 with beta
    total = 10000
    a, c = 0.3 * total, 1e-4 * total
    expected = max(min((step - c) / a, 1.0) * 2.0, 1e-4)
    beta = objective.kl_coefficient(step, config, total)
    assert float(beta) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    clipped = min(expected, 1.0)
    lam = math.exp((1 - clipped) * math.log(1.0) + clipped * math.log(1e-2))
    assert float(objective.regularization_coefficient(beta, config)) == pytest.approx(lam, rel=1e-5)


@pytest.mark.parametrize("name, expected", [
    ("celebahq", [1] * 4 + [4] * 4 + [16] * 4 + [32] * 8 + [64] * 16),
    ("mnist", [1] * 5 + [2] * 10),
    ("cifar10", [1] * 30),
])
def test_kl_balance_alpha_matches_the_spec_examples(name, expected):
    np.testing.assert_allclose(objective.kl_balance_alpha(load_flagfile(name)), expected)


def test_kl_balance_coefficients_have_mean_one_and_follow_kl_over_alpha():
    rng = np.random.default_rng(0)
    kl = rng.gamma(2.0, 3.0, size=(8, 5))
    kl[:, 1] *= -1  # |KL| is used
    alpha = np.array([1.0, 4.0, 16.0, 16.0, 32.0])
    gamma = objective.kl_balance_coefficients(tf.constant(kl, tf.float32), alpha).numpy()
    kappa = np.abs(kl).mean(0) + 0.01
    expected = 5 * (kappa / alpha) / np.sum(kappa / alpha)
    np.testing.assert_allclose(gamma, expected, rtol=1e-5)
    assert gamma.mean() == pytest.approx(1.0, rel=1e-6)


def test_kl_balance_coefficients_carry_no_gradient():
    kl = tf.Variable(np.ones((2, 3), np.float32))
    with tf.GradientTape() as tape:
        gamma = objective.kl_balance_coefficients(kl, np.ones(3))
        total = tf.reduce_sum(gamma * tf.constant([1.0, 2.0, 3.0]))
    assert tape.gradient(total, kl) is None


@pytest.mark.parametrize("beta", [0.0, 0.25, 0.5, 1.0])
def test_regularization_coefficient_anneals_log_linearly(beta):
    config = load_flagfile("celebahq")  # 1e-2, annealed from 1.0
    expected = math.exp((1 - beta) * math.log(1.0) + beta * math.log(1e-2))
    assert float(objective.regularization_coefficient(tf.constant(beta), config)) == pytest.approx(expected, rel=1e-5)
    fixed = load_flagfile("cifar10")
    assert float(objective.regularization_coefficient(tf.constant(beta), fixed)) == pytest.approx(1e-2)


def test_loss_assembles_its_terms_with_balancing_only_during_warmup():
    model = NVAE(load_flagfile("tiny"))
    model.build()
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    out = model(x, training=False)
    total = 1000
    kl, recon = out.kl.numpy().astype(np.float64), -out.recon_log_prob.numpy().astype(np.float64)
    alpha = objective.kl_balance_alpha(model.config)
    for step in (10, 900):  # beta < 1, then beta = 1
        loss, metrics = objective.nvae_loss(model, out, step, total)
        beta = max(min((step - 1e-4 * total) / (0.3 * total), 1.0), 1e-4)
        if beta < 1:
            kappa = np.abs(kl).mean(0) + 0.01
            gamma = kl.shape[1] * (kappa / alpha) / np.sum(kappa / alpha)
        else:
            gamma = np.ones(kl.shape[1])
        elbo_term = np.mean(recon + beta * (gamma * kl).sum(1))
        reg = float(metrics["spectral_norm"]) + float(metrics["bn_norm"])
        assert float(metrics["beta"]) == pytest.approx(beta, rel=1e-5)
        assert float(loss) == pytest.approx(elbo_term + 1e-2 * reg, rel=1e-4)
        nelbo = np.mean(recon + kl.sum(1))
        assert float(metrics["bpd"]) == pytest.approx(nelbo / (math.log(2) * 16 * 16 * 3), rel=1e-5)
        np.testing.assert_allclose(metrics["kl_per_group"].numpy(), kl.mean(0), rtol=1e-5)


def test_active_units_count_latents_whose_posterior_mean_varies_over_the_batch():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(1, 2, 2, 3))
    mu = np.repeat(base, 50, axis=0)
    mu[:, 0, 0, 0] += rng.normal(scale=1.0, size=50)  # variance ~1: active
    mu[:, 1, 1, 2] += rng.normal(scale=0.01, size=50)  # variance ~1e-4: inactive
    other = rng.normal(size=(50, 1, 1, 4))  # all four active
    counts = objective.active_units([tf.constant(mu, tf.float32), tf.constant(other, tf.float32)]).numpy()
    expected = [np.sum(mu.var(0) > 0.01), np.sum(other.var(0) > 0.01)]
    np.testing.assert_array_equal(counts, expected)
    assert list(counts) == [1, 4]
