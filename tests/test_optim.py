"""NVAE's Adamax and learning-rate schedule against NumPy references written from spec section 4."""

import math

import keras
import numpy as np
import pytest

from nvae_tf.optim import NVAEAdamax, NVAELearningRate


def numpy_adamax(params, grads, lr, steps, b1=0.9, b2=0.999, eps=1e-3, l2=3e-4):
    p = np.array(params, np.float64)
    m = np.zeros_like(p)
    u = np.zeros_like(p)
    for t in range(1, steps + 1):
        g = grads(t, p) + l2 * p
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g) + eps)
        p = p - lr / (1 - b1 ** t) * m / u
    return p


def test_adamax_matches_the_numpy_reference_over_many_steps():
    rng = np.random.default_rng(0)
    start = rng.normal(size=(4, 3))
    grad_table = rng.normal(size=(30, 4, 3)) * np.array([1e-4, 1e-2, 1.0, 10.0])[:, None]  # some below eps
    var = keras.Variable(start.astype("float32"))
    opt = NVAEAdamax(learning_rate=1e-2, l2=3e-4)
    opt.build([var])
    for t in range(1, 31):
        g = grad_table[t - 1] + 0.0 * var.numpy()
        opt.apply_gradients([(g.astype("float32"), var)])
    expected = numpy_adamax(start, lambda t, p: grad_table[t - 1], 1e-2, 30)
    np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_eps_is_inside_the_max_not_in_the_denominator():
    """After a large gradient and then tiny ones, u decays towards |g| + eps in NVAE's form, while Keras's
    Adamax divides by max(b2 u, |g|) + eps: the trajectories differ, and ours is the NumPy reference."""
    grads = [1.0] + [1e-5] * 8
    ours = keras.Variable(np.zeros(1, "float32"))
    theirs = keras.Variable(np.zeros(1, "float32"))
    # A short memory (beta_2 = 0.5) makes u reach the scale of eps within a few steps.
    opt = NVAEAdamax(learning_rate=1e-2, beta_2=0.5, l2=0.0, epsilon=1e-3)
    keras_opt = keras.optimizers.Adamax(learning_rate=1e-2, beta_2=0.5, epsilon=1e-3)
    for g in grads:
        opt.apply_gradients([(np.array([g], "float32"), ours)])
        keras_opt.apply_gradients([(np.array([g], "float32"), theirs)])
    expected = numpy_adamax([0.0], lambda t, p: np.array([grads[t - 1]]), 1e-2, len(grads), b2=0.5, l2=0.0)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    assert abs(ours.numpy()[0] - theirs.numpy()[0]) > 1e-3 * abs(expected[0])


def test_weight_decay_is_coupled_l2_on_the_gradient():
    """A zero gradient still moves a parameter through l2 * p, by Adamax's normalised step."""
    var = keras.Variable(np.array([2.0], "float32"))
    opt = NVAEAdamax(learning_rate=0.1, l2=3e-4, epsilon=1e-3)
    opt.apply_gradients([(np.zeros(1, "float32"), var)])
    g = 3e-4 * 2.0
    np.testing.assert_allclose(var.numpy(), [2.0 - 0.1 * (0.1 * g) / 0.1 / (g + 1e-3)], rtol=1e-5)


def numpy_lr(step, lr, lr_min, steps_per_epoch, epochs, warmup_epochs):
    warmup = warmup_epochs * steps_per_epoch
    if step < warmup:
        return lr * step / warmup
    epoch = step // steps_per_epoch
    k = max(epoch - warmup_epochs, 0)
    t_max = epochs - warmup_epochs - 1
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * k / t_max)) / 2


@pytest.mark.parametrize("step", [0, 1, 49, 50, 99, 250, 499, 500, 501, 999, 1234, 19999])
def test_learning_rate_schedule_matches_its_formula(step):
    schedule = NVAELearningRate(1e-2, 1e-4, steps_per_epoch=100, epochs=200, warmup_epochs=5)
    np.testing.assert_allclose(float(schedule(step)), numpy_lr(step, 1e-2, 1e-4, 100, 200, 5), rtol=1e-5)


def test_learning_rate_is_zero_at_step_zero_peaks_after_warmup_and_ends_at_the_minimum():
    schedule = NVAELearningRate(8e-3, 1e-4, steps_per_epoch=10, epochs=20, warmup_epochs=5)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(8e-3)
    assert float(schedule(20 * 10 - 1)) == pytest.approx(1e-4, rel=1e-4)
    # Constant within an epoch after the warm-up (the cosine is stepped per epoch).
    assert float(schedule(61)) == float(schedule(69))
    assert float(schedule(70)) < float(schedule(69))


def test_optimizer_uses_the_schedule():
    schedule = NVAELearningRate(1.0, 0.0, steps_per_epoch=1, epochs=10, warmup_epochs=2)
    var = keras.Variable(np.zeros(1, "float32"))
    opt = NVAEAdamax(learning_rate=schedule, l2=0.0)
    opt.apply_gradients([(np.ones(1, "float32"), var)])
    assert var.numpy()[0] == 0.0  # lr is 0 at step 0
    opt.apply_gradients([(np.ones(1, "float32"), var)])
    assert var.numpy()[0] < 0.0


def test_stacked_update_of_many_variables_matches_the_numpy_reference_per_variable(monkeypatch):
    """Variables of equal and different shapes, split over several buckets (a bucket limit of 40 elements), each
    follow NVAE's Adamax exactly as if updated alone."""
    from nvae_tf import optim
    monkeypatch.setattr(optim, "BUCKET_ELEMENTS", 40)
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (5,), (3, 4), (2, 2, 2), (3, 4), (5,), (50,), (3, 4)]
    starts = [rng.normal(size=s) for s in shapes]
    grads = [rng.normal(size=(6, *s)) * 10.0 ** rng.integers(-4, 2) for s in shapes]
    variables = [keras.Variable(s.astype("float32")) for s in starts]
    opt = NVAEAdamax(learning_rate=1e-2, l2=3e-4)
    opt.build(variables)
    assert len(opt.buckets) == 5  # (3,4) x4 in runs of 3 and 1, (5,) x2, (2,2,2), (50,)
    assert sorted(i for b in opt.buckets for i in b) == list(range(len(shapes)))
    for t in range(6):
        opt.apply_gradients([(g[t].astype("float32"), v) for g, v in zip(grads, variables)])
    for start, g, v in zip(starts, grads, variables):
        expected = numpy_adamax(start, lambda t, p, g=g: g[t - 1], 1e-2, 6)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert int(opt.iterations.numpy()) == 6


def test_a_missing_gradient_is_refused_by_name():
    variables = [keras.Variable(np.zeros(2, "float32")), keras.Variable(np.zeros(3, "float32"))]
    opt = NVAEAdamax()
    opt.build(variables)
    with pytest.raises(ValueError, match="one gradient for each of its 2 variables"):
        opt.apply([np.zeros(2, "float32"), None])


def test_a_closed_gate_keeps_every_variable_slot_and_the_iteration_count():
    """`apply_stacked(gate=False)` with non-finite gradients changes nothing; the next open gate updates exactly
    as if the closed step had not been (NumPy reference over the open steps only)."""
    import tensorflow as tf
    rng = np.random.default_rng(2)
    shapes = [(3, 4), (5,), (3, 4)]
    starts = [rng.normal(size=s) for s in shapes]
    grads = [rng.normal(size=(3, *s)) for s in shapes]
    variables = [keras.Variable(s.astype("float32")) for s in starts]
    opt = NVAEAdamax(learning_rate=1e-2, l2=3e-4)
    opt.build(variables)
    step = tf.function(lambda gs, gate: opt.apply_stacked(opt.stack_gradients(gs), gate=gate))
    step([g[0].astype("float32") for g in grads], tf.constant(True))
    slots = [s.numpy().copy() for s in (*opt._m, *opt._u)]
    values = [v.numpy().copy() for v in variables]
    bad = [np.full(s, np.nan, "float32") for s in shapes]
    bad[1][2] = np.inf
    step(bad, tf.constant(False))
    assert int(opt.iterations.numpy()) == 1
    for v, before in zip(variables, values):
        np.testing.assert_array_equal(v.numpy(), before)
    for s, before in zip((*opt._m, *opt._u), slots):
        np.testing.assert_array_equal(s.numpy(), before)
    step([g[1].astype("float32") for g in grads], tf.constant(True))
    assert int(opt.iterations.numpy()) == 2
    for start, g, v in zip(starts, grads, variables):
        np.testing.assert_allclose(v.numpy(), numpy_adamax(start, lambda t, p, g=g: g[t - 1], 1e-2, 2),
                                   rtol=1e-5, atol=1e-6)
