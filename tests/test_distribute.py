"""The runtime's BatchNorm for training: one fused op on one replica, synchronised moments on several."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from nvae_tf import distribute  # noqa: E402
from nvae_tf.model.cells import batch_norm  # noqa: E402


def numpy_batch_norm(x, gamma, beta, moving_mean, moving_variance, momentum=0.95, eps=1e-5):
    """Training-mode BatchNorm in float64: batch mean and biased variance; the running statistics move by
    running <- momentum running + (1 - momentum) batch."""
    x = x.astype(np.float64)
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    y = (x - mean) / np.sqrt(variance + eps) * gamma + beta
    return (y, momentum * moving_mean + (1 - momentum) * mean,
            momentum * moving_variance + (1 - momentum) * variance)


def make_layer(channels, rng):
    layer = batch_norm()
    layer.build((None, None, None, channels))
    layer.gamma.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
    layer.beta.assign(rng.normal(size=channels).astype("float32"))
    layer.moving_mean.assign(rng.normal(size=channels).astype("float32"))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype("float32"))
    return layer


@pytest.mark.parametrize("training_hook", ["fused", "synchronized_moments"])
def test_training_batch_norm_matches_numpy_and_updates_the_running_statistics(training_hook):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 5, 7, 4)) * 3.0 + 2.0).astype("float32")
    layer = make_layer(4, rng)
    expected = numpy_batch_norm(x, layer.gamma.numpy(), layer.beta.numpy(), layer.moving_mean.numpy(),
                                layer.moving_variance.numpy())
    if training_hook == "fused":
        layer.training_fn = distribute.fused_batch_norm
    else:
        layer.moments_fn = distribute.synchronized_moments
    y = layer(tf.constant(x), training=True)
    np.testing.assert_allclose(y.numpy(), expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected[2], rtol=1e-6, atol=1e-6)


def test_deferred_statistics_leave_the_variables_alone_and_give_the_numpy_updates_grouped_by_shape():
    """Three layers (two of 4 channels, one of 3; the first run twice): nothing is assigned during the passes, and
    the groups hold the values before and the chained updates of float64 NumPy."""
    rng = np.random.default_rng(3)
    layers = [make_layer(4, rng), make_layer(3, rng), make_layer(4, rng)]
    for layer in layers:
        layer.training_fn = distribute.fused_batch_norm
    inputs = [(rng.normal(size=(5, 3, 2, c)) * 2.0 + 1.0).astype("float32") for c in (4, 3, 4, 4)]
    before = {id(v): v.numpy().copy() for layer in layers for v in (layer.moving_mean, layer.moving_variance)}
    expected = dict(before)
    with distribute.deferred_statistics() as statistics:
        for layer, x in zip([layers[0], layers[1], layers[2], layers[0]], inputs):
            layer(tf.constant(x), training=True)
            _, expected[id(layer.moving_mean)], expected[id(layer.moving_variance)] = numpy_batch_norm(
                x, 1.0, 0.0, expected[id(layer.moving_mean)], expected[id(layer.moving_variance)])
    for layer in layers:
        for v in (layer.moving_mean, layer.moving_variance):
            np.testing.assert_array_equal(v.numpy(), before[id(v)])
    groups = statistics.groups()
    # layer 0 (two updates), layer 2 (one) of 4 channels and layer 1 (one) of 3: three kinds, six variables.
    assert sorted((len(vs), tuple(b.shape)) for vs, b, _ in groups) == [(2, (2, 3)), (2, (2, 4)), (2, (2, 4))]
    for variables, before_step, after in groups:
        for k, v in enumerate(variables):
            np.testing.assert_array_equal(before_step[k].numpy(), before[id(v)])
            np.testing.assert_allclose(after[k].numpy(), expected[id(v)], rtol=1e-6, atol=1e-6)
    # Outside the context the update is immediate again.
    layers[1](tf.constant(inputs[1]), training=True)
    assert not np.array_equal(layers[1].moving_mean.numpy(), before[id(layers[1].moving_mean)])


def test_fused_batch_norm_leaves_the_running_statistics_alone_when_told_and_has_keras_gradients():
    rng = np.random.default_rng(1)
    x = tf.constant((rng.normal(size=(4, 3, 3, 5)) * 2.0 - 1.0).astype("float32"))
    fused, plain = make_layer(5, rng), batch_norm()
    plain.build((None, None, None, 5))
    for a, b in zip(plain.weights, fused.weights):
        a.assign(b)
    fused.training_fn = distribute.fused_batch_norm
    fused.update_statistics = plain.update_statistics = False
    before = [v.numpy().copy() for v in fused.non_trainable_weights]
    weights = rng.normal(size=x.shape).astype("float32")
    grads = []
    for layer in (fused, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) ** 2 * weights)
        grads.append(tape.gradient(loss, [x, layer.gamma, layer.beta]))
    for v, b in zip(fused.non_trainable_weights, before):
        np.testing.assert_array_equal(v.numpy(), b)
    for g_fused, g_plain in zip(*grads):
        np.testing.assert_allclose(g_fused.numpy(), g_plain.numpy(), rtol=1e-4, atol=1e-4)


def numpy_batch_norm_swish_gradients(x, gamma, beta, d_out, eps=1e-5):
    """Gradients of sum(d_out * swish(BN(x))) for x, gamma and beta in float64 (training-mode BatchNorm)."""
    x, d_out = x.astype(np.float64), d_out.astype(np.float64)
    mean, variance = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    x_hat = (x - mean) / np.sqrt(variance + eps)
    z = x_hat * gamma + beta
    s = 1.0 / (1.0 + np.exp(-z))
    d_z = d_out * (s + z * s * (1.0 - s))
    d_x_hat = d_z * gamma
    d_x = (d_x_hat - d_x_hat.mean(axis=(0, 1, 2)) - x_hat * (d_x_hat * x_hat).mean(axis=(0, 1, 2))) / np.sqrt(
        variance + eps)
    return d_x, (d_z * x_hat).sum(axis=(0, 1, 2)), d_z.sum(axis=(0, 1, 2))


def test_fused_batch_norm_with_swish_matches_numpy_values_gradients_and_running_statistics():
    """swish(BN(x)) in one call, whose gradient recomputes the normalised tensor: values, the three gradients and
    the running statistics against float64 NumPy, and the same values as the layer without the runtime's hook."""
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(3, 6, 5, 4)) * 2.5 + 1.5).astype("float32")
    d_out = rng.normal(size=x.shape).astype("float32")
    layer = make_layer(4, rng)
    gamma, beta = layer.gamma.numpy().astype(np.float64), layer.beta.numpy().astype(np.float64)
    bn, moving_mean, moving_variance = numpy_batch_norm(x, gamma, beta, layer.moving_mean.numpy(),
                                                        layer.moving_variance.numpy())
    expected = bn / (1.0 + np.exp(-bn))
    plain = make_layer(4, rng)
    for a, b in zip(plain.weights, layer.weights):
        a.assign(b)
    layer.training_fn = distribute.fused_batch_norm
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True, with_swish=True)
        loss = tf.reduce_sum(y * d_out)
    d_x, d_gamma, d_beta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), moving_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), moving_variance, rtol=1e-6, atol=1e-6)
    for got, want in zip((d_x, d_gamma, d_beta), numpy_batch_norm_swish_gradients(x, gamma, beta, d_out)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)
    # The layer without the hook (Keras's BatchNormalization, then swish) gives the same values.
    np.testing.assert_allclose(plain(xt, training=True, with_swish=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    # In inference mode: swish of the normalisation by the running statistics.
    z = (x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + 1e-5) * gamma + beta
    np.testing.assert_allclose(layer(xt, training=False, with_swish=True).numpy(), z / (1.0 + np.exp(-z)),
                               rtol=1e-5, atol=1e-5)


def numpy_convolution(z, kernel, stride, depthwise, d_out):
    """(output, d z, d kernel) in float64 of the convolution of `z` by `kernel` (`[k, k, in, out]`, or
    `[k, k, channels, 1]` when `depthwise`) with (k - 1) / 2 zeros on every side and stride `stride`, for the
    output gradient `d_out`: every output as the sum over its k x k window, every gradient by the chain rule."""
    z, kernel, d_out = (a.astype(np.float64) for a in (z, kernel, d_out))
    k, p = kernel.shape[0], (kernel.shape[0] - 1) // 2
    padded = np.pad(z, ((0, 0), (p, p), (p, p), (0, 0)))
    rows, cols = (padded.shape[1] - k) // stride + 1, (padded.shape[2] - k) // stride + 1
    windows = np.stack([np.stack([padded[:, u:u + stride * rows:stride, v:v + stride * cols:stride]
                                  for v in range(k)], axis=3) for u in range(k)], axis=3)  # [b, i, j, u, v, c]
    if depthwise:
        y = np.einsum("bijuvc,uvc->bijc", windows, kernel[..., 0])
        d_windows = np.einsum("bijc,uvc->bijuvc", d_out, kernel[..., 0])
        d_kernel = np.einsum("bijuvc,bijc->uvc", windows, d_out)[..., None]
    else:
        y = np.einsum("bijuvc,uvco->bijo", windows, kernel)
        d_windows = np.einsum("bijo,uvco->bijuvc", d_out, kernel)
        d_kernel = np.einsum("bijuvc,bijo->uvco", windows, d_out)
    d_padded = np.zeros_like(padded)
    for u in range(k):
        for v in range(k):
            d_padded[:, u:u + stride * rows:stride, v:v + stride * cols:stride] += d_windows[:, :, :, u, v]
    return y, d_padded[:, p:p + z.shape[1], p:p + z.shape[2]], d_kernel


@pytest.mark.parametrize("kernel_size,strides,depthwise,use_bias", [
    (3, 1, False, True), (3, 2, False, True), (5, 1, True, False), (1, 1, False, False)])
def test_fused_batch_norm_swish_conv_matches_numpy_values_and_gradients(kernel_size, strides, depthwise, use_bias):
    """conv(swish(BN(x))) in one call, whose gradient recomputes the convolution's input: the value, the gradients
    of x, gamma, beta, the kernel and the bias, and the running statistics against float64 NumPy, for the
    convolutions of the model's cells (3x3 at stride 1 and 2, depthwise 5x5, 1x1)."""
    from nvae_tf.model.ops import Conv2D
    rng = np.random.default_rng(11)
    channels = 4
    filters = channels if depthwise else 3
    x = (rng.normal(size=(2, 7, 6, channels)) * 2.0 - 1.0).astype("float32")
    layer = make_layer(channels, rng)
    conv = Conv2D(filters, kernel_size, strides=strides, use_bias=use_bias, weight_norm=False, depthwise=depthwise)
    conv.build((None, None, None, channels))
    conv.kernel.assign(rng.normal(size=conv.kernel.shape).astype("float32"))
    if use_bias:
        conv.bias.assign(rng.normal(size=filters).astype("float32"))
    gamma, beta = layer.gamma.numpy().astype(np.float64), layer.beta.numpy().astype(np.float64)
    bn, moving_mean, moving_variance = numpy_batch_norm(x, gamma, beta, layer.moving_mean.numpy(),
                                                        layer.moving_variance.numpy())
    z = bn / (1.0 + np.exp(-bn))
    rows, cols = (7 - 1) // strides + 1, (6 - 1) // strides + 1
    d_out = rng.normal(size=(2, rows, cols, filters)).astype("float32")
    expected, d_z, d_kernel = numpy_convolution(z, conv.kernel.numpy(), strides, depthwise, d_out)
    if use_bias:
        expected = expected + conv.bias.numpy()
    d_x, d_gamma, d_beta = numpy_batch_norm_swish_gradients(x, gamma, beta, d_z)
    layer.training_fn = distribute.fused_batch_norm
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True, with_swish=True, conv=conv)
        loss = tf.reduce_sum(y * d_out)
    got = tape.gradient(loss, [xt, layer.gamma, layer.beta, conv.kernel] + ([conv.bias] if use_bias else []))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)
    want = [d_x, d_gamma, d_beta, d_kernel] + ([d_out.astype(np.float64).sum(axis=(0, 1, 2))] if use_bias else [])
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), moving_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), moving_variance, rtol=1e-6, atol=1e-6)


def test_fused_batch_norm_swish_conv_of_a_weight_normalised_kernel_has_the_plain_layers_gradients():
    """Through the weight normalisation, and within a traced function: the same value and gradients (of x, the
    kernel's direction and log norm, the bias, gamma and beta) as the layers without the runtime's hook."""
    from nvae_tf.model.ops import Conv2D
    rng = np.random.default_rng(12)
    x = tf.constant((rng.normal(size=(3, 6, 6, 5)) * 1.5).astype("float32"))
    results = []
    for hooked in (True, False):
        layer, conv = make_layer(5, np.random.default_rng(1)), Conv2D(4, 3, strides=2)
        conv.build((None, None, None, 5))
        for v in conv.weights:
            v.assign(np.random.default_rng(2).normal(size=v.shape).astype("float32"))
        layer.training_fn = distribute.fused_batch_norm if hooked else None
        variables = [layer.gamma, layer.beta, conv.kernel, conv.log_weight_norm, conv.bias]

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, with_swish=True, conv=conv)
                loss = tf.reduce_sum(tf.square(y))
            return y, tape.gradient(loss, [x] + variables)

        y, grads = step()
        results.append([y.numpy()] + [g.numpy() for g in grads])
    for fused, plain in zip(*results):
        np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-4)


def test_lean_swish_has_silus_values_and_gradients_and_numpys():
    rng = np.random.default_rng(4)
    x = tf.constant((rng.normal(size=(3, 5, 4, 6)) * 4.0).astype("float32"))
    upstream = tf.constant(rng.normal(size=x.shape).astype("float32"))
    results = []
    for fn in (distribute.lean_swish, tf.nn.silu):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        results.append((y.numpy(), tape.gradient(y, x, output_gradients=upstream).numpy()))
    for lean, silu in zip(*results):
        np.testing.assert_array_equal(lean, silu)
    x64, dy = x.numpy().astype(np.float64), upstream.numpy().astype(np.float64)
    s = 1.0 / (1.0 + np.exp(-x64))
    np.testing.assert_allclose(results[0][0], x64 * s, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results[0][1], dy * (s + x64 * s * (1.0 - s)), rtol=1e-5, atol=1e-5)


def test_prepare_model_fuses_on_one_replica():
    from conftest import load_flagfile

    from nvae_tf.model import NVAE
    model = NVAE(load_flagfile("tiny"))
    model.build()
    distribute.prepare_model(model, tf.distribute.get_strategy())
    assert all(bn.training_fn is distribute.fused_batch_norm for bn in model.batchnorm_layers)
    from nvae_tf.model import ops as model_ops
    assert model_ops._swish is distribute.lean_swish
    assert model_ops._remat is distribute.lean_remat
    assert model_ops._after is distribute.after_dependency


@pytest.mark.parametrize("compiled,remat", [(False, False), (True, False), (False, True), (True, True)])
def test_kernels_shared_by_the_forward_pass_and_the_regulariser_give_the_same_loss_and_gradients(compiled, remat):
    """`NVAE.shared_kernels()` computes each effective kernel once for the forward pass and the spectral
    regulariser, runs the power iteration on entry and forms the regulariser's gradient with the kernels' own:
    the loss, every gradient and the new power-iteration state must be those of computing it all separately.
    Under `--remat` (`lean_remat`) each rematerialised cell takes its shared kernels as inputs: their gradient,
    from the recomputation, must reach the kernels' variables as it does when each cell computes its own."""
    from conftest import load_flagfile

    from nvae_tf.model import NVAE
    from nvae_tf.model import ops as model_ops
    config = load_flagfile("tiny")
    model = NVAE(config, remat=remat)
    model.build()
    inputs_per_cell = {False: [], True: []}  # shared: the number of tensors each rematerialised cell takes

    def counting_lean_remat(f):
        rematerialised = distribute.lean_remat(f)

        def call(*inputs):
            shared = getattr(model_ops.SHARED_KERNELS, "by_layer", None) is not None
            inputs_per_cell[shared].append(len(inputs))
            return rematerialised(*inputs)
        return call

    previous_remat = model_ops._remat
    model_ops.set_remat(counting_lean_remat)
    try:
        _compare_shared_kernels(model, config, compiled)
    finally:
        model_ops.set_remat(previous_remat)
    if remat:  # the cells took their input alone, then with the shared kernels of their convolutions
        assert inputs_per_cell[False] and set(inputs_per_cell[False]) == {1}
        assert len(inputs_per_cell[True]) == len(inputs_per_cell[False]) and min(inputs_per_cell[True]) > 1
    else:
        assert not inputs_per_cell[False] and not inputs_per_cell[True]


def _compare_shared_kernels(model, config, compiled):
    from nvae_tf import objective
    from nvae_tf.model.distributions import ZeroNoise
    # The tiny model has both kinds of spectral group: kernels of one shape (computed stacked, some of them
    # masked by the flows) and one matrix shape from kernels of two shapes (computed one by one).
    kinds = [{(tuple(c.kernel.shape), c.depthwise, c.weight_norm) for c in group} for group in model._sr_groups]
    assert any(len(k) > 1 for k in kinds) and any(c.mask is not None for c in model.conv_layers)
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (4, *config.image_shape)), tf.uint8)
    state = [v.numpy().copy() for v in model.variables]
    results, spectrals, power_states = [], [], []
    for shared in (False, True):
        for v, value in zip(model.variables, state):  # the same power-iteration state for both
            v.assign(value)
        power_before = [w.numpy() for w in model._sr_u + model._sr_v]

        def step(images, shared=shared):
            with tf.GradientTape() as tape:
                if shared:
                    with model.shared_kernels():
                        out = model(images, training=True, noise=ZeroNoise())
                        loss, metrics = objective.nvae_loss(model, out, 10, 100)
                else:
                    out = model(images, training=True, noise=ZeroNoise())
                    loss, metrics = objective.nvae_loss(model, out, 10, 100)
            return loss, metrics["spectral_norm"], tape.gradient(loss, model.trainable_variables)

        loss, spectral, grads = (tf.function(step) if compiled else step)(images)
        power_state = [w.numpy() for w in model._sr_u + model._sr_v]
        results.append((float(loss), grads))
        spectrals.append(float(spectral))
        power_states.append(power_state)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    assert spectrals[0] > 1.0 and spectrals[1] == pytest.approx(spectrals[0], rel=1e-6)
    for a, b, before in zip(*power_states, power_before):
        assert not np.allclose(a, before)  # the iteration moved u and v ...
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)  # ... the same way with shared kernels
    for v, a, b in zip(model.trainable_variables, grads_a, grads_b):
        # float32 rounding (the stacked kernels are reduced in another order): relative to the gradient's scale
        scale = float(np.abs(a.numpy()).max())
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6 + 1e-5 * scale,
                                   err_msg=v.path)


def test_graph_optimiser_is_lightened_on_a_machine_without_gpus():
    """`tune_graph_optimizer` on CPU: the MLIR hook, the second optimiser round, the memory, layout, function and
    loop optimisers and the implementation selector are off in the function-call options of this thread,
    constant folding, arithmetic, dependency and remapping passes are not (a change of TensorFlow's private API would show here)."""
    if tf.config.list_physical_devices("GPU"):
        pytest.skip("the graph optimiser is left alone on GPUs")
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.eager import context
    assert distribute.tune_graph_optimizer()
    config = config_pb2.ConfigProto()
    config.ParseFromString(context.context().function_call_options.config_proto_serialized)
    rewrite = config.graph_options.rewrite_options
    assert rewrite.disable_tfg_optimizer
    assert rewrite.meta_optimizer_iterations == rewriter_config_pb2.RewriterConfig.ONE
    rewriter = rewriter_config_pb2.RewriterConfig
    assert rewrite.memory_optimization == rewriter.NO_MEM_OPT
    for toggle in ("layout_optimizer", "function_optimization", "loop_optimization", "implementation_selector"):
        assert getattr(rewrite, toggle) == rewriter.OFF, toggle
    for toggle in ("constant_folding", "arithmetic_optimization", "dependency_optimization", "remapping"):
        assert getattr(rewrite, toggle) != rewriter.OFF, toggle
    assert tf.function(lambda x: x * 2.0 + 1.0)(tf.constant(3.0)).numpy() == 7.0
