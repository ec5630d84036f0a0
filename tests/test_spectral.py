"""Spectral and BN regularisation (spec section 4): L_SR = sum over every convolution of the largest singular
value of its effective kernel, by batched power iteration (40 iterations on the first call, 4 afterwards) with
persistent non-trainable state and gradients through W only; L_BN = sum over BN layers of max |gamma|.

The gradient checks use `tf.GradientTape` and run under the TensorFlow backend only; the rest runs under any
Keras backend."""

import numpy as np
import pytest
from conftest import load_flagfile, tensorflow_backend

from nvae_tf.model.nvae import NVAE
from nvae_tf.model.ops import Conv2D

EPS = 1e-3  # the normalisation eps of the power iteration (spec section 4)


@pytest.fixture
def model():
    model = NVAE(load_flagfile("tiny"))
    model.build()
    return model


def kernel_matrix(layer):
    """The effective kernel as a float64 matrix: one row per output channel (depthwise: per channel)."""
    kernel = np.asarray(layer.effective_kernel(), dtype=np.float64)
    k, _, cin, cout = kernel.shape
    if layer.depthwise:
        assert cout == 1
        return np.stack([kernel[:, :, c, 0].ravel() for c in range(cin)])  # [C, k*k]
    return np.stack([kernel[:, :, :, o].ravel() for o in range(cout)])  # [out, k*k*in]


def true_sigma(layer):
    return np.linalg.svd(kernel_matrix(layer), compute_uv=False)[0]


def _normalize(x):
    return x / max(np.linalg.norm(x), EPS)


def numpy_power_iteration(w, u, v, iterations):
    for _ in range(iterations):
        v = _normalize(u @ w)
        u = _normalize(w @ v)
    return u, v, float(u @ w @ v)


def spectral_state(model):
    """(layer, u variable, v variable, row) for every layer in the regulariser's power-iteration state."""
    rows = []
    for layers, u_var, v_var in zip(model._sr_groups, model._sr_u, model._sr_v):
        for i, layer in enumerate(layers):
            rows.append((layer, u_var, v_var, i))
    return rows


def state_estimates(model):
    """Per-layer sigma estimate u^T W v from the persistent state (W recomputed independently)."""
    out = {}
    for layer, u_var, v_var, i in spectral_state(model):
        u, v = np.asarray(u_var, np.float64)[i], np.asarray(v_var, np.float64)[i]
        out[id(layer)] = float(u @ kernel_matrix(layer) @ v)
    return out


def set_spiked_kernels(model, seed=0):
    """Raw kernels with a dominant rank-one part, so each effective kernel has a clear spectral gap."""
    rng = np.random.default_rng(seed)
    for layer in model.conv_layers:
        k, _, cin, cout = layer.kernel.shape
        if layer.depthwise:
            spike = rng.normal(size=(k, k, 1, 1)) * np.ones((1, 1, cin, 1))
        else:
            spike = rng.normal(size=(k, k, cin, 1)) * (1.0 + 0.2 * rng.uniform(size=(1, 1, 1, cout)))
        kernel = spike + 0.05 * rng.normal(size=layer.kernel.shape)
        layer.kernel.assign(kernel.astype("float32"))


# ---------------------------------------------------------------------------------------------- coverage
def test_regulariser_state_covers_every_conv_once(model):
    convs = model.conv_layers
    assert len({id(layer) for layer in convs}) == len(convs)
    # Every convolution kernel among the trainable weights (4-D) belongs to one of conv_layers...
    conv_kernels = {id(layer.kernel) for layer in convs}
    four_d = [w for w in model.trainable_weights if len(w.shape) == 4]
    assert four_d and all(id(w) in conv_kernels for w in four_d)
    # ...including the depthwise, autoregressive (masked) and plain (no weight norm) ones.
    assert any(layer.depthwise for layer in convs)
    assert any(layer.mask is not None for layer in convs)
    assert any(not layer.weight_norm for layer in convs)
    # The power-iteration state holds each conv exactly once, with matching shapes.
    in_state = [id(layer) for layer, *_ in spectral_state(model)]
    assert sorted(in_state) == sorted(id(layer) for layer in convs)
    for layer, u_var, v_var, i in spectral_state(model):
        rows, cols = kernel_matrix(layer).shape
        assert u_var.shape[1] == rows and v_var.shape[1] == cols


def test_initial_state_is_normalised_random(model):
    for layer, u_var, v_var, i in spectral_state(model):
        for var in (u_var, v_var):
            np.testing.assert_allclose(np.linalg.norm(np.asarray(var)[i]), 1.0, rtol=1e-5)
    assert float(model.power_iteration_started) == 0.0


# ------------------------------------------------------------------------------------------- convergence
def test_spectral_loss_converges_to_sum_of_largest_singular_values(model):
    sigmas = np.array([true_sigma(layer) for layer in model.conv_layers])
    losses = [float(model.spectral_norm_loss()) for _ in range(4)]  # the first call, then 3 more
    total = sigmas.sum()
    # Power iteration approaches sigma from below: u^T W v <= sigma_max for unit u, v.
    assert all(loss <= total * (1 + 1e-5) for loss in losses)
    assert losses[-1] == pytest.approx(total, rel=1e-3)
    estimates = state_estimates(model)
    for layer in model.conv_layers:
        assert estimates[id(layer)] <= true_sigma(layer) * (1 + 1e-5)
        assert estimates[id(layer)] == pytest.approx(true_sigma(layer), rel=2e-2)
    assert losses[-1] == pytest.approx(sum(estimates.values()), rel=1e-5)


def test_spectral_loss_matches_each_kernels_sigma_with_spectral_gap(model):
    set_spiked_kernels(model)
    for _ in range(4):
        loss = float(model.spectral_norm_loss())
    sigmas = {id(layer): true_sigma(layer) for layer in model.conv_layers}
    estimates = state_estimates(model)
    for layer in model.conv_layers:
        assert estimates[id(layer)] == pytest.approx(sigmas[id(layer)], rel=1e-5), layer.path
    assert loss == pytest.approx(sum(sigmas.values()), rel=1e-5)


# -------------------------------------------------------------------------------- gradients and state
def test_gradients_reach_every_kernel_through_w_only(model):
    tf = tensorflow_backend()
    convs = model.conv_layers
    with tf.GradientTape() as tape:
        loss = model.spectral_norm_loss()
    kernels = [layer.kernel for layer in convs]
    norms = [layer.log_weight_norm for layer in convs if layer.weight_norm]
    grads = tape.gradient(loss, kernels + norms)
    assert all(g is not None for g in grads)
    for layer, g in zip(convs, grads[:len(convs)]):
        g = np.asarray(g)
        assert np.abs(g).max() > 0, layer.path
        if layer.mask is not None:
            assert np.count_nonzero(g[layer.mask == 0]) == 0, layer.path
    for g in grads[len(convs):]:
        assert np.abs(np.asarray(g)).max() > 0
    # For a plain kernel (no weight norm) W is the raw kernel, and with u, v held fixed d(u^T W v)/dW = u v^T.
    # The state after 40 iterations is not converged for these random kernels, so a gradient through the
    # power iteration itself would differ.
    grads_by_layer = {id(layer): np.asarray(g) for layer, g in zip(convs, grads)}
    checked = 0
    for layer, u_var, v_var, i in spectral_state(model):
        if layer.weight_norm:
            continue
        u, v = np.asarray(u_var)[i], np.asarray(v_var)[i]
        k, _, cin, cout = layer.kernel.shape
        outer = np.outer(u, v)
        if layer.depthwise:
            expected = np.stack([outer[c].reshape(k, k) for c in range(cin)], axis=-1)[..., None]
        else:
            expected = np.stack([outer[o].reshape(k, k, cin) for o in range(cout)], axis=-1)
        np.testing.assert_allclose(grads_by_layer[id(layer)], expected, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked > 0


def test_power_iteration_state_is_non_trainable_and_updated(model):
    state_vars = [var for _, u_var, v_var, _ in spectral_state(model) for var in (u_var, v_var)]
    state_vars = list({id(v): v for v in state_vars}.values()) + [model.power_iteration_started]
    trainable = {id(w) for w in model.trainable_weights}
    non_trainable = {id(w) for w in model.non_trainable_weights}
    for var in state_vars:
        assert not var.trainable
        assert id(var) not in trainable and id(var) in non_trainable
    before = [np.asarray(var).copy() for var in state_vars]
    model.spectral_norm_loss()
    after = [np.asarray(var) for var in state_vars]
    for b, a in zip(before[:-1], after[:-1]):
        assert not np.allclose(a, b)
        np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)
    assert float(before[-1]) == 0.0 and float(after[-1]) == 1.0
    # The state persists: a second call starts from it (and keeps moving), the flag stays set.
    model.spectral_norm_loss()
    assert float(model.power_iteration_started) == 1.0


def test_no_gradient_reaches_the_power_iteration_state(model):
    tf = tensorflow_backend()
    state_vars = list({id(v): v for _, u_var, v_var, _ in spectral_state(model) for v in (u_var, v_var)}.values())
    with tf.GradientTape() as tape:
        loss = model.spectral_norm_loss()
    assert all(g is None for g in tape.gradient(loss, state_vars))


def test_first_call_runs_40_iterations_later_calls_4(model):
    rng = np.random.default_rng(42)
    rows = spectral_state(model)
    start = {}
    for layer, u_var, v_var, i in rows:
        start[id(layer)] = (_normalize(rng.normal(size=u_var.shape[1])), _normalize(rng.normal(size=v_var.shape[1])))

    def reset():
        for layers, u_var, v_var in zip(model._sr_groups, model._sr_u, model._sr_v):
            u_var.assign(np.stack([start[id(layer)][0] for layer in layers]).astype("float32"))
            v_var.assign(np.stack([start[id(layer)][1] for layer in layers]).astype("float32"))

    def expected(iterations):
        out = {}
        for layer, *_ in rows:
            out[id(layer)] = numpy_power_iteration(kernel_matrix(layer), *start[id(layer)], iterations)
        return out

    sigmas = {id(layer): true_sigma(layer) for layer, *_ in rows}
    after_40, after_4 = expected(40), expected(4)

    reset()
    assert float(model.power_iteration_started) == 0.0
    first = float(model.spectral_norm_loss())
    assert float(model.power_iteration_started) == 1.0
    first_state = state_estimates(model)
    reset()  # same starting vectors, but now a later call
    assert float(model.power_iteration_started) == 1.0
    later = float(model.spectral_norm_loss())
    later_state = state_estimates(model)

    for layer, *_ in rows:
        key = id(layer)
        assert first_state[key] == pytest.approx(after_40[key][2], rel=1e-4, abs=1e-6), layer.path
        assert later_state[key] == pytest.approx(after_4[key][2], rel=1e-4, abs=1e-6), layer.path
    assert first == pytest.approx(sum(s[2] for s in after_40.values()), rel=1e-5)
    assert later == pytest.approx(sum(s[2] for s in after_4.values()), rel=1e-5)
    # The check discriminates: 4 iterations leave a far larger error than 40.
    err_40 = sum(sigmas[k] - after_40[k][2] for k in sigmas)
    err_4 = sum(sigmas[k] - after_4[k][2] for k in sigmas)
    assert err_4 > 10 * err_40 > 0
    assert sum(sigmas.values()) - first < 0.2 * (sum(sigmas.values()) - later)
    assert max(abs(after_40[k][2] - after_4[k][2]) / sigmas[k] for k in sigmas) > 1e-2


# ---------------------------------------------------------------------------------------------- BN loss
def test_batchnorm_loss_is_sum_of_max_abs_gamma(model):
    bns = model.batchnorm_layers
    assert bns
    rng = np.random.default_rng(7)
    gammas = []
    for n, bn in enumerate(bns):
        gamma = rng.uniform(-1.0, 1.0, size=bn.gamma.shape)
        gamma[n % gamma.shape[0]] = -(2.0 + n) if n % 2 else 2.0 + n  # the largest magnitude, either sign
        bn.gamma.assign(gamma.astype("float32"))
        gammas.append(gamma)
    expected = sum(np.abs(g).max() for g in gammas)
    assert float(model.batchnorm_loss()) == pytest.approx(expected, rel=1e-6)
    # d max|gamma| / d gamma = sign at the arg-max, 0 elsewhere.
    tf = tensorflow_backend()
    with tf.GradientTape() as tape:
        loss = model.batchnorm_loss()
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    grads = tape.gradient(loss, [bn.gamma for bn in bns])
    for gamma, g in zip(gammas, grads):
        want = np.zeros_like(gamma)
        arg = np.argmax(np.abs(gamma))
        want[arg] = np.sign(gamma[arg])
        np.testing.assert_allclose(np.asarray(g), want)


def test_batchnorm_loss_at_init_counts_every_bn_layer(model):
    # gamma starts at 1 (spec section 1.2), so L_BN is the number of BN layers.
    for bn in model.batchnorm_layers:
        np.testing.assert_array_equal(np.asarray(bn.gamma), 1.0)
    assert float(model.batchnorm_loss()) == pytest.approx(len(model.batchnorm_layers))
    assert not any(isinstance(layer, Conv2D) for layer in model.batchnorm_layers)
