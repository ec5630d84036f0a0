"""The whole NVAE on tiny configurations: forward terms, gradients, sampling, reloading, precision.

Backend-neutral (`keras.ops` and NumPy) except the tests that differentiate with `tf.GradientTape`; under
KERAS_BACKEND=jax those are skipped and tests/test_backends.py checks the gradients with `jax.value_and_grad`."""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import load_flagfile, tensorflow_backend
from nvae_tf.model import NVAE
from nvae_tf.model.distributions import KerasNoise


def tiny_model(**overrides):
    model = NVAE(load_flagfile("tiny", **overrides))
    model.build()
    return model


def random_images(config, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    if config.decoder == "bernoulli":
        return (rng.integers(0, 2, (batch, *config.image_shape)) * 255).astype("uint8")
    return rng.integers(0, 256, (batch, *config.image_shape)).astype("uint8")


def fixed_noise(seed=7):
    return KerasNoise(keras.random.SeedGenerator(seed))


def elbo_loss(out):
    return ops.mean(-out.recon_log_prob + ops.sum(out.kl, axis=1))


def test_forward_terms_are_finite_with_the_documented_shapes():
    model = tiny_model()
    config = model.config
    x = random_images(config, batch=3)
    out = model(x, training=True)
    n = config.num_groups
    assert out.recon_log_prob.shape == (3,)
    for key in ("kl", "log_q", "log_p"):
        assert getattr(out, key).shape == (3, n), key
    assert out.decoder_params.shape == (3, *config.image_shape[:2], 10 * config.num_mixture_dec)
    assert [tuple(m.shape) for m in out.posterior_means] == [(3, *shape) for shape in config.latent_shapes]
    for key, value in out._asdict().items():
        for v in value if isinstance(value, list) else [value]:
            assert np.all(np.isfinite(np.asarray(v))), key
    # A log-likelihood of discrete data is at most 0.
    assert np.all(np.asarray(out.recon_log_prob) < 0)


def test_kl_with_flows_is_the_one_sample_estimate_log_q_minus_log_p():
    model = tiny_model()
    assert model.config.num_nf > 0
    out = model(random_images(model.config), training=False)
    np.testing.assert_allclose(np.asarray(out.kl), np.asarray(out.log_q - out.log_p), rtol=1e-6, atol=1e-5)


def test_kl_without_flows_is_analytic_and_its_mean_matches_log_q_minus_log_p():
    model = tiny_model(num_nf=0, num_groups_per_scale=1, num_latent_scales=1)
    x = np.repeat(random_images(model.config, batch=1), 400, axis=0)
    out = model(x, training=False)
    kl = np.asarray(out.kl)
    # Analytic: the same for every copy of the image, and non-negative.
    np.testing.assert_allclose(kl, np.broadcast_to(kl[:1], kl.shape), rtol=1e-4)
    assert np.all(kl >= 0)
    # Monte Carlo over the 400 posterior samples agrees with it within a few standard errors.
    mc = np.asarray(out.log_q - out.log_p)[:, 0]
    assert abs(mc.mean() - kl[0, 0]) < 4 * mc.std() / np.sqrt(len(mc)) + 1e-3


def test_every_trainable_weight_receives_a_gradient_from_the_elbo():
    tf = tensorflow_backend()  # under JAX: tests/test_backends.py
    model = tiny_model()
    x = random_images(model.config, batch=4)
    with tf.GradientTape() as tape:
        loss = elbo_loss(model(x, training=True))
    weights = model.trainable_weights
    grads = tape.gradient(loss, weights)
    without = [w.path for w, g in zip(weights, grads) if g is None or not np.any(g.numpy() != 0)]
    assert not without, f"no gradient for {without}"


def test_every_trainable_weight_of_an_mnist_style_model_receives_a_gradient():
    tf = tensorflow_backend()  # under JAX: tests/test_backends.py
    model = NVAE(load_flagfile("mnist", num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2,
                               num_latent_per_group=2, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1))
    model.build()
    x = random_images(model.config, batch=2)
    with tf.GradientTape() as tape:
        loss = elbo_loss(model(x, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    without = [w.path for w, g in zip(model.trainable_weights, grads) if g is None or not np.any(g.numpy())]
    assert not without, f"no gradient for {without}"


def test_bernoulli_likelihood_covers_only_the_mnist_crop():
    model = NVAE(load_flagfile("mnist", num_channels_enc=4, num_channels_dec=4, num_groups_per_scale=2,
                               num_latent_per_group=2, num_cell_per_cond_enc=1, num_cell_per_cond_dec=1))
    model.build()
    assert model.config.likelihood_crop == 2 and model.config.data_dims == 784
    x = random_images(model.config, batch=2)
    out = model(x, training=False)
    logits = np.asarray(out.decoder_params).astype("float64")[:, 2:30, 2:30, :]
    data = x[:, 2:30, 2:30, :].astype("float64") / 255.0
    log_sig = lambda v: -np.logaddexp(0.0, -v)  # noqa: E731
    expected = (data * log_sig(logits) + (1 - data) * log_sig(-logits)).reshape(2, -1).sum(1)
    np.testing.assert_allclose(np.asarray(out.recon_log_prob), expected, rtol=1e-5)


@pytest.mark.parametrize("bits", [8, 5, 3])
def test_images_are_reduced_to_num_x_bits(bits):
    model = NVAE(load_flagfile("tiny", num_x_bits=bits))
    values = np.arange(256, dtype="uint8").reshape(1, 16, 16, 1).repeat(3, axis=-1)
    x = np.asarray(model.preprocess_images(values))
    u = np.arange(256, dtype="float64")
    expected = np.floor((u / 255.0) * 255.0 / 2 ** (8 - bits)) / (2 ** bits - 1)
    np.testing.assert_allclose(x[0, :, :, 0].ravel(), expected, atol=1e-7)
    assert len(np.unique(x)) == 2 ** bits


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_sample_has_the_configured_shape_and_range(mode):
    model = tiny_model()
    images = np.asarray(model.sample(5, temperature=0.7, mode=mode))
    assert images.shape == (5, *model.config.image_shape)
    assert images.min() >= 0.0 and images.max() <= 1.0
    if mode == "sample":
        levels = images * (2 ** model.config.num_x_bits - 1)
        np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)


def test_sample_is_reproducible_with_the_same_noise_seed_and_varies_with_another():
    model = tiny_model()
    a = np.asarray(model.sample(4, 1.0, noise=fixed_noise(3)))
    b = np.asarray(model.sample(4, 1.0, noise=fixed_noise(3)))
    c = np.asarray(model.sample(4, 1.0, noise=fixed_noise(4)))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0


def test_temperature_scales_the_prior_of_every_group():
    """At t -> 0 the latents collapse to their means, so two draws decode to the same mean image."""
    model = tiny_model()
    a = np.asarray(model.sample(2, 1e-6, noise=fixed_noise(1), mode="mean"))
    b = np.asarray(model.sample(2, 1e-6, noise=fixed_noise(2), mode="mean"))
    np.testing.assert_allclose(a, b, atol=1e-4)
    c = np.asarray(model.sample(2, 1.0, noise=fixed_noise(2), mode="mean"))
    assert np.abs(a - c).max() > 1e-3


def test_reloaded_weights_give_the_same_outputs(tmp_path):
    model = tiny_model()
    x = random_images(model.config, batch=2)
    model(x, training=True)  # move the BatchNorm statistics away from their initial values
    model.spectral_norm_loss()
    path = str(tmp_path / "nvae.weights.h5")
    model.save_weights(path)

    keras.utils.set_random_seed(99)  # a different initialisation
    other = tiny_model()
    before = np.asarray(other(x, training=False, noise=fixed_noise()).recon_log_prob)
    other.load_weights(path)
    expected = model(x, training=False, noise=fixed_noise())
    got = other(x, training=False, noise=fixed_noise())
    assert np.abs(before - np.asarray(expected.recon_log_prob)).max() > 1e-3
    for key in ("recon_log_prob", "kl", "log_q", "log_p"):
        np.testing.assert_allclose(np.asarray(getattr(got, key)), np.asarray(getattr(expected, key)), rtol=1e-5,
                                   atol=1e-4)
    np.testing.assert_array_equal(np.asarray(other.sample(3, 0.8, noise=fixed_noise(5))),
                                  np.asarray(model.sample(3, 0.8, noise=fixed_noise(5))))
    for a, b in zip(model.non_trainable_weights, other.non_trainable_weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_model_round_trips_through_get_config():
    model = tiny_model()
    clone = NVAE.from_config(model.get_config())
    assert clone.config == model.config


def test_training_mode_updates_batchnorm_statistics_and_inference_mode_does_not():
    model = tiny_model()
    bn = model.postprocess[-1].branch[0].bn_out  # on both the reconstruction and the sampling path
    x = random_images(model.config, batch=4)
    before = bn.moving_mean.numpy().copy()
    model(x, training=False)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)
    model(x, training=True)
    assert np.abs(bn.moving_mean.numpy() - before).max() > 0
    before = bn.moving_mean.numpy().copy()
    model.sample(4, 0.8, training=True)  # BN readjustment path
    assert np.abs(bn.moving_mean.numpy() - before).max() > 0


@pytest.mark.skipif(keras.backend.backend() == "jax",
                    reason="mixed precision is an option of the TensorFlow training runtime; under JAX this "
                           "test only costs a minute of compiling")
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_variables_and_terms_in_float32(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = tiny_model()
        out = model(random_images(model.config), training=True)
        assert all(w.dtype == "float32" for w in model.weights if "seed" not in w.path)
        for key in ("recon_log_prob", "kl", "log_q", "log_p"):
            assert keras.backend.standardize_dtype(getattr(out, key).dtype) == "float32"
            assert np.all(np.isfinite(np.asarray(getattr(out, key)))), key
        assert keras.backend.standardize_dtype(model.sample(2, 0.7).dtype) == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_structure_counts_match_an_enumeration_of_the_tiny_config():
    """Count layers of the tiny config by hand from its flags (spec section 1 cell tables)."""
    model = tiny_model()
    c = model.config
    n = c.num_groups
    assert c.groups_per_scale == [2, 1]
    enc_cells = c.num_preprocess_blocks * c.num_preprocess_cells + n * c.num_cell_per_cond_enc + 1
    dec_cells = (n - 1) * c.num_cell_per_cond_dec + 1 + c.num_postprocess_blocks * c.num_postprocess_cells
    down_cells = c.num_preprocess_blocks + 1
    up_cells = 1 + c.num_postprocess_blocks
    convs = (1  # stem
             + 2 * enc_cells + 4 * down_cells  # two convs per encoder cell, FactorizedReduce in down cells
             + 3 * dec_cells + up_cells  # MBConv convs, skip conv of up cells
             + 1  # enc0
             + n + 3 * (n - 1)  # posterior samplers; prior sampler, both combiners for k > 0 ...
             + 1  # ... and the decoder combiner of group 0
             + 2 * c.num_nf * 3 * n  # flow cells
             + 1)  # head
    bns = 2 * enc_cells + 4 * dec_cells
    assert len(model.conv_layers) == convs
    assert len(model.batchnorm_layers) == bns


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("implementation", ["keras.remat", "lean_remat"])
def test_remat_gives_the_same_loss_gradients_and_batchnorm_statistics(compiled, implementation):
    """Gradient checkpointing per cell and per flow recomputes activations; it must not change any number, and the
    recomputation must not update the BN running statistics a second time: with Keras's remat and with the
    training runtime's own (`distribute.lean_remat`). (TensorFlow only: remat under JAX is not supported by this
    project.)"""
    tf = tensorflow_backend()
    from nvae_tf import distribute
    from nvae_tf.model import ops as model_ops
    x = random_images(load_flagfile("tiny"), batch=4)
    results = []
    for remat in (False, True):
        keras.utils.set_random_seed(5)
        model = NVAE(load_flagfile("tiny"), remat=remat)
        model.build()
        noise = fixed_noise(11)
        wrapped, recomputed = [], []

        def counting_remat(f):
            wrapped.append(None)

            def counted(*inputs):
                recomputed.append(None)
                return f(*inputs)
            return (keras.remat if implementation == "keras.remat" else distribute.lean_remat)(counted)

        def step(images):
            with tf.GradientTape() as tape:
                loss = elbo_loss(model(images, training=True, noise=noise))
            return loss, tape.gradient(loss, model.trainable_variables)

        model_ops.set_remat(counting_remat)
        try:
            loss, grads = (tf.function(step) if compiled else step)(tf.constant(x))
        finally:
            model_ops.set_remat(None)
        # Each cell and each flow of a posterior runs twice under remat (forward, then recomputed for the
        # gradient), never otherwise.
        flows = sum(len(group.flows) for group in model.latent_groups)
        cells = (len(model.preprocess) + len(model.encoder_tower) + len(model.decoder_up_cells)
                 + len(model.postprocess) + sum(len(group.cells) for group in model.latent_groups))
        assert flows > 0 and cells > 10
        assert len(wrapped) == (cells + flows if remat else 0), (len(wrapped), cells, flows)
        assert len(recomputed) == 2 * len(wrapped), (len(recomputed), len(wrapped))
        stats = [v.numpy() for bn in model.batchnorm_layers for v in (bn.moving_mean, bn.moving_variance)]
        results.append((loss.numpy(), [g.numpy() for g in grads], stats))
    (loss0, grads0, stats0), (loss1, grads1, stats1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    assert all(g is not None for g in grads1)
    for g0, g1 in zip(grads0, grads1):
        np.testing.assert_allclose(g1, g0, rtol=2e-4, atol=1e-6)
    # One update from the initial (0, 1): the statistics moved, and by the same amount in both models.
    assert any(np.abs(s).max() > 1e-3 for s in stats0[0::2])
    for s0, s1 in zip(stats0, stats1):
        np.testing.assert_allclose(s1, s0, rtol=1e-5, atol=1e-6)
