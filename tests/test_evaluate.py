"""Importance-weighted evaluation (`nvae_tf.evaluate`): the estimator, the Evaluator on a trained model, and the
command line.

The estimator is checked against independent references: a NumPy float64 log-sum-exp of fixed weights, and a
linear-Gaussian model whose marginal likelihood is known in closed form. The Evaluator is checked against the
trained model's own forward terms under the same noise, recomputed in NumPy. The command line runs as
subprocesses (all started side by side in one fixture) on the run trained once per session (conftest).
"""

import json
import math
import os
import shutil
import types

import numpy as np
import pytest

from conftest import TINY_RUN_STEPS, assert_cli_error, run_side_by_side

DIGITS_VALIDATION = 300  # images in the validation split of the built-in digits


# ---------------------------------------------------------------------------------------------- helpers
def np_log_mean_exp(w):
    """log (1/K) sum_k exp(w_k) over axis 0, in float64, stably."""
    w = np.asarray(w, np.float64)
    m = w.max(axis=0)
    return m + np.log(np.exp(w - m).sum(axis=0)) - math.log(w.shape[0])


def fixed_weights_estimate(weights, chunk, pad_value=1e3, graph=False):
    """`importance_weighted_log_likelihood` fed the rows of `weights` `[K, batch]` in order, `chunk` rows per
    call. The last call is padded with `pad_value` rows (samples beyond K, which must be masked out).
    Returns (estimate `[batch]`, number of calls)."""
    import tensorflow as tf

    from nvae_tf.likelihood import importance_weighted_log_likelihood
    weights = np.asarray(weights)
    k, batch = weights.shape
    passes = -(-k // chunk)
    padded = np.concatenate([weights, np.full((passes * chunk - k, batch), pad_value, weights.dtype)])
    table = tf.constant(padded)
    calls = tf.Variable(0)

    def sample_log_weights():
        i = calls.assign_add(1) - 1
        return table[i * chunk:(i + 1) * chunk]

    def estimate():
        return importance_weighted_log_likelihood(sample_log_weights, k, chunk, batch)

    result = tf.function(estimate)() if graph else estimate()
    return result.numpy(), int(calls.numpy())


def fresh_noise(seed):
    import keras

    from nvae_tf.model.distributions import KerasNoise
    return KerasNoise(keras.random.SeedGenerator(seed))


def forward_log_weights_np(out):
    """w = log p(x|z) + sum_groups log p(z) - sum_groups log q(z|x), from the model's outputs, in NumPy float64."""
    recon = np.asarray(out.recon_log_prob, np.float64)
    log_p = np.asarray(out.log_p, np.float64).sum(axis=1)
    log_q = np.asarray(out.log_q, np.float64).sum(axis=1)
    return recon + log_p - log_q


# ===================================================================== the estimator on fixed weights
CHUNKINGS = [(10, 1), (10, 3), (10, 4), (10, 7), (10, 10), (10, 16), (7, 5), (1, 1), (1, 4), (33, 8)]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("num_samples, chunk", CHUNKINGS)
def test_chunked_estimate_equals_numpy_logsumexp_and_one_big_chunk(num_samples, chunk, graph):
    rng = np.random.default_rng(num_samples * 100 + chunk)
    weights = rng.normal(-50.0, 4.0, size=(num_samples, 5))
    expected = np_log_mean_exp(weights)
    got, calls = fixed_weights_estimate(weights, chunk, graph=graph)
    assert calls == -(-num_samples // chunk)  # ceil(K / chunk) draws of `chunk` samples
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10)
    whole, _ = fixed_weights_estimate(weights, num_samples, graph=graph)
    np.testing.assert_allclose(got, whole, rtol=0, atol=1e-10)


def test_samples_beyond_k_in_the_last_chunk_are_masked_whatever_their_value():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(10, 3))
    expected = np_log_mean_exp(weights)
    for pad in (1e3, 0.0, -1e3, float("nan")):
        got, _ = fixed_weights_estimate(weights, 4, pad_value=pad)  # 3 calls, 2 samples of the last one unused
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12, err_msg=f"pad {pad}")


def test_one_sample_is_its_own_weight():
    weights = np.array([[-3.25, 0.0, 17.5, -1e5]])
    got, calls = fixed_weights_estimate(weights, 1)
    assert calls == 1
    np.testing.assert_array_equal(got, weights[0])


def test_large_magnitude_weights_neither_overflow_nor_underflow():
    rng = np.random.default_rng(1)
    k = 37
    noise = rng.normal(0.0, 3.0, size=(k, 1))
    columns = [-1e5 + noise, 800.0 + noise, -7e4 + 50.0 * noise, noise]  # exp underflows / overflows in float64
    mixed = np.where(np.arange(k)[:, None] == 5, 0.0, -1e5)  # one sample dominates by e^100000
    weights = np.concatenate(columns + [mixed], axis=1)
    with np.errstate(over="ignore", under="ignore", divide="ignore"):
        assert not np.all(np.isfinite(np.log(np.exp(weights).mean(axis=0))))  # the naive way fails
    expected = np_log_mean_exp(weights)
    for chunk in (1, 6, k):
        got, _ = fixed_weights_estimate(weights, chunk)
        assert np.all(np.isfinite(got)), (chunk, got)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(expected[-1], -math.log(k), atol=1e-12)  # sum = e^0 + 36 e^-100000


def test_float32_weights_are_accumulated_in_float64():
    import tensorflow as tf

    from nvae_tf.likelihood import importance_weighted_log_likelihood
    rng = np.random.default_rng(2)
    weights = (-1e5 + rng.normal(size=(64, 4))).astype(np.float32)
    chunks = iter(np.split(weights, 8))
    got = importance_weighted_log_likelihood(lambda: tf.constant(next(chunks)), 64, 8, 4)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), np_log_mean_exp(weights.astype(np.float64)), rtol=0, atol=1e-8)


@pytest.mark.parametrize("num_samples, chunk", [(0, 1), (5, 0), (-1, 2)])
def test_estimator_rejects_non_positive_sizes(num_samples, chunk):
    from nvae_tf.likelihood import importance_weighted_log_likelihood
    with pytest.raises(ValueError, match="must be >= 1"):
        importance_weighted_log_likelihood(lambda: None, num_samples, chunk, 3)


# ========================================================= the estimator on a linear-Gaussian toy model
# z ~ N(0, 1), x | z ~ N(A z + B, S^2)  =>  p(x) = N(x; B, A^2 + S^2), posterior N(m(x), S^2 / (A^2 + S^2)).
A, B, S = 2.0, 0.5, 0.5
TOY_ITEMS = 2000
Q_SHIFT, Q_WIDTH = 1.0, 1.3  # the proposal: mean off by one posterior sd, 1.3 times too wide


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    marginal_var = A * A + S * S
    x = rng.normal(B, math.sqrt(marginal_var), TOY_ITEMS)
    log_px = -0.5 * np.log(2 * np.pi * marginal_var) - (x - B) ** 2 / (2 * marginal_var)
    post_sd = math.sqrt(S * S / marginal_var)
    post_mean = A * (x - B) / marginal_var
    q_mean, q_sd = post_mean + Q_SHIFT * post_sd, Q_WIDTH * post_sd
    # KL(q || posterior), the expected gap of the K = 1 estimate.
    kl = math.log(post_sd / q_sd) + (q_sd ** 2 + (Q_SHIFT * post_sd) ** 2) / (2 * post_sd ** 2) - 0.5

    def estimate(num_samples, chunk, seed):
        import tensorflow as tf

        from nvae_tf.likelihood import importance_weighted_log_likelihood
        from nvae_tf.model.distributions import Normal
        noise = fresh_noise(seed)
        xs = tf.constant(x, tf.float32)
        shape = (chunk, TOY_ITEMS)

        def sample_log_weights():
            q = Normal(tf.broadcast_to(tf.constant(q_mean, tf.float32), shape), tf.fill(shape, np.float32(q_sd)))
            z = q.sample(noise)
            prior = Normal(tf.zeros(shape), tf.ones(shape))
            likelihood = Normal(A * z + B, tf.fill(shape, np.float32(S)))
            return likelihood.log_prob(xs[None]) + prior.log_prob(z) - q.log_prob(z)

        return importance_weighted_log_likelihood(sample_log_weights, num_samples, chunk, TOY_ITEMS).numpy()

    return types.SimpleNamespace(x=x, log_px=log_px, kl=kl, estimate=estimate)


def test_toy_single_sample_is_the_elbo_below_the_true_marginal(toy):
    error = toy.estimate(1, 1, seed=1) - toy.log_px
    standard_error = error.std() / math.sqrt(TOY_ITEMS)
    assert toy.kl > 0.5
    # E[log w] = log p(x) - KL(q || p(z|x)) exactly: the ELBO.
    assert abs(error.mean() + toy.kl) < 4 * standard_error, (error.mean(), -toy.kl, standard_error)
    assert error.mean() < -0.4


@pytest.mark.parametrize("num_samples, chunk", [(4096, 512), (4000, 384)])
def test_toy_estimate_converges_to_the_closed_form_marginal(toy, num_samples, chunk):
    error = toy.estimate(num_samples, chunk, seed=2) - toy.log_px
    assert abs(error.mean()) < 3e-3, error.mean()
    assert np.abs(error).max() < 0.2, np.abs(error).max()


def test_toy_estimate_increases_with_k(toy):
    means = [float(np.mean(toy.estimate(k, k, seed=3) - toy.log_px)) for k in (1, 4, 16, 64)]
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert means[-1] < 1e-2  # a lower bound on average, however many samples
    assert means[0] < means[-1] - 0.4


def test_toy_estimate_is_reproducible_by_seed(toy):
    a, b, c = toy.estimate(10, 4, seed=5), toy.estimate(10, 4, seed=5), toy.estimate(10, 4, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# ========================================================================= bits per dimension
def test_bits_per_dim_divides_by_ln2_and_the_likelihood_dimensions():
    from conftest import load_flagfile
    from nvae_tf.objective import bits_per_dim
    mnist = load_flagfile("mnist")
    assert mnist.data_dims == 28 * 28  # the likelihood crop of the 32x32 padded images
    cifar = load_flagfile("cifar10")
    assert cifar.data_dims == 3 * 32 * 32
    celeba = load_flagfile("celeba64")
    assert celeba.data_dims == 3 * 64 * 64
    for nats, dims in [(78.01, mnist.data_dims), (6200.0, cifar.data_dims), (25000.0, celeba.data_dims),
                       (40.0, 256)]:
        assert bits_per_dim(nats, dims) == pytest.approx(nats / (np.log(2.0) * dims), rel=1e-14)
    # D ln 2 nats is one bit per dimension (Bernoulli(1/2) pixels); 8 D ln 2 nats is uniform 8-bit colour.
    assert bits_per_dim(784 * math.log(2.0), mnist.data_dims) == pytest.approx(1.0, rel=1e-14)
    assert bits_per_dim(8 * 3072 * math.log(2.0), cifar.data_dims) == pytest.approx(8.0, rel=1e-14)


def test_progress_line_reports_nats_and_bits_per_dim():
    import io

    from nvae_tf.likelihood import Progress
    stream = io.StringIO()
    Progress(784, stream=stream)(100, 100, 80.0, 2.0)
    line = stream.getvalue()
    assert "100/100 images" in line and "80.00 nats" in line
    assert f"{80.0 / (math.log(2.0) * 784):.4f} bpd" in line


# ========================================================= the Evaluator on the trained model
@pytest.fixture(scope="module")
def restored(trained_run):
    from nvae_tf import data as data_lib
    from nvae_tf import runs
    config, model, path = runs.load_model(trained_run.model_dir)
    source = data_lib.open_source(config)
    images = [b.numpy() for b in source.dataset("validation", 16, training=False, deterministic=True,
                                                seed=0).take(4)]
    return types.SimpleNamespace(config=config, model=model, path=path, images=images, source=source)


def make_evaluator(model, num_iw_samples, batch_size, forward_batch=0, seed=0):
    import tensorflow as tf

    from nvae_tf.likelihood import Evaluator
    return Evaluator(model, tf.distribute.get_strategy(), num_iw_samples, batch_size, forward_batch, seed)


def test_k1_is_the_negative_elbo_of_the_same_posterior_sample(restored):
    """Evaluator with K = 1 and a seed = -(log p(x|z) + sum log p(z) - sum log q(z|x)) of one forward pass of the
    model drawing from a generator with the same seed (log q includes the flow)."""
    import tensorflow as tf

    from nvae_tf.likelihood import importance_weighted_log_likelihood, log_weights
    model, x = restored.model, restored.images[0]
    assert model.config.num_nf == 1 and all(g.flows for g in model.latent_groups)
    out = model(x, training=False, noise=fresh_noise(11))
    nelbo = -forward_log_weights_np(out)
    assert np.all(np.isfinite(nelbo))
    # The estimator on the model's weights, image by image.
    noise = fresh_noise(11)
    per_image = importance_weighted_log_likelihood(
        lambda: log_weights(model(x, training=False, noise=noise))[None], 1, 1, len(x))
    assert per_image.dtype == tf.float64
    np.testing.assert_allclose(-per_image.numpy(), nelbo, rtol=1e-6)
    # The Evaluator (tiled images, tf.function, running log-sum-exp): the mean over the batch.
    nats, count = make_evaluator(model, 1, len(x), seed=11).evaluate([x])
    assert count == len(x)
    assert nats == pytest.approx(nelbo.mean(), rel=1e-6)
    # The noise matters, so agreeing with it means something.
    other = -forward_log_weights_np(model(x, training=False, noise=fresh_noise(12)))
    assert np.abs(other - nelbo).max() > 1e-3


def test_evaluator_with_a_partial_last_chunk_is_the_log_mean_exp_of_exactly_k_samples(restored):
    """K = 5 with 2 samples per forward pass: 3 passes of the tiled batch, the 6th sample unused. Replayed in
    NumPy from the same noise."""
    model, x = restored.model, restored.images[1][:8]
    batch, k, chunk = len(x), 5, 2
    evaluator = make_evaluator(model, k, batch, forward_batch=chunk * batch, seed=21)
    assert evaluator.chunk == chunk
    nats, count = evaluator.evaluate([x])
    noise = fresh_noise(21)
    tiled = np.tile(x, (chunk, 1, 1, 1))
    rows = [forward_log_weights_np(model(tiled, training=False, noise=noise)).reshape(chunk, batch)
            for _ in range(3)]
    weights = np.concatenate(rows)  # [6, batch]
    expected = -np_log_mean_exp(weights[:k])
    assert count == batch
    assert nats == pytest.approx(expected.mean(), rel=1e-6)
    # An unmasked tail (6 samples) would give other per-image values, far off that tolerance for some image.
    assert np.abs(-np_log_mean_exp(weights) - expected).max() > 1e-3


def test_k64_is_not_worse_than_k1_on_the_trained_model(restored):
    k1, n1 = make_evaluator(restored.model, 1, 16, seed=31).evaluate(restored.images)
    k64, n64 = make_evaluator(restored.model, 64, 16, forward_batch=64 * 16, seed=31).evaluate(restored.images)
    assert n1 == n64 == 64
    assert np.isfinite(k1) and np.isfinite(k64)
    assert k64 < k1, (k1, k64)
    assert 0.0 < k64 < 256 * math.log(2.0)  # tighter than the 1 bit/dim of a coin flip per pixel


@pytest.mark.parametrize("kwargs, flag", [(dict(num_iw_samples=-3), "--num_iw_samples"),
                                          (dict(num_iw_samples=0), "--num_iw_samples"),
                                          (dict(max_images=-1), "--max_images"),
                                          (dict(batch_size=-8), "--batch_size")])
def test_run_refuses_bad_numbers_before_touching_the_run(trained_run, kwargs, flag):
    from nvae_tf import evaluate, runs
    with pytest.raises(runs.RunError, match=flag):
        evaluate.run(evaluate.EvaluateOptions(model_dir=trained_run.model_dir, **kwargs))
    assert not os.path.exists(os.path.join(trained_run.model_dir, "eval_validation.json"))


def test_evaluator_rejects_non_positive_k(restored):
    with pytest.raises(ValueError, match="num_iw_samples"):
        make_evaluator(restored.model, 0, 16)


# =============================================================================== the command line
ERROR_CASES = {
    "no_checkpoint": (lambda d: [f"--model_dir={d['empty']}"], ["has no checkpoint"]),
    "missing_model_dir": (lambda d: [f"--model_dir={d['missing']}"], ["does not exist", "--model_dir"]),
    "zero_iw_samples": (lambda d: [f"--model_dir={d['run']}", "--num_iw_samples=0"], ["--num_iw_samples", ">= 1"]),
    "split_test": (lambda d: [f"--model_dir={d['run']}", "--split=test"],
                   ["--split", "'test'", "train, validation"]),
    "unknown_checkpoint": (lambda d: [f"--model_dir={d['run']}", "--checkpoint=999"],
                           ["ckpt-999 does not exist", "ckpt-100, ckpt-150"]),
}


@pytest.fixture(scope="module")
def cli(trained_run, tmp_path_factory):
    """Every `python -m nvae_tf.evaluate` of this file, started side by side: two evaluations on copies of the
    trained run and the error cases."""
    base = tmp_path_factory.mktemp("evaluate_cli")
    dirs = {"full": str(base / "full"), "step100": str(base / "step100"), "run": trained_run.model_dir,
            "one_replica": str(base / "one_replica"), "two_replicas": str(base / "two_replicas"),
            "empty": str(base / "empty"), "missing": str(base / "missing")}
    shutil.copytree(trained_run.model_dir, dirs["full"])
    shutil.copytree(trained_run.model_dir, dirs["step100"])
    shutil.copytree(trained_run.model_dir, dirs["one_replica"])
    shutil.copytree(trained_run.model_dir, dirs["two_replicas"])
    os.makedirs(dirs["empty"])
    shutil.copy(os.path.join(trained_run.model_dir, "config.json"), dirs["empty"])
    commands = {
        "full": [f"--model_dir={dirs['full']}", "--num_iw_samples=2", "--seed=3"],
        "step100": [f"--model_dir={dirs['step100']}", "--checkpoint=100", "--num_iw_samples=3", "--max_images=20",
                    "--batch_size=8", "--seed=4"],
        "one_replica": [f"--model_dir={dirs['one_replica']}", "--num_iw_samples=8", "--max_images=64",
                        "--batch_size=8", "--seed=5"],
        "two_replicas": [f"--model_dir={dirs['two_replicas']}", "--num_iw_samples=8", "--max_images=64",
                         "--batch_size=8", "--seed=5", "--cpu_replicas=2"],
    }
    commands.update({name: make_args(dirs) for name, (make_args, _) in ERROR_CASES.items()})
    results = run_side_by_side("nvae_tf.evaluate", commands)
    return types.SimpleNamespace(dirs=dirs, results=results)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def evaluate_in_process(model_dir, checkpoint, k, batch_size, seed, max_images=0):
    """What the command line should compute: the same images (binarised with the seed), noise and K.

    The digits are binarised by a tf.data random op seeded with `seed`; TensorFlow combines that op seed with the
    global seed, which the command line never sets, so it is unset here too (the autouse fixture sets it again)."""
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf import runs
    tf.random.set_seed(None)
    config, model, _ = runs.load_model(model_dir, checkpoint)
    ds = data_lib.open_source(config).dataset("validation", batch_size, training=False, deterministic=True,
                                              seed=seed)
    if max_images:
        ds = ds.unbatch().take(max_images).batch(batch_size)
    return make_evaluator(model, k, batch_size, seed=seed).evaluate(ds)


def test_cli_writes_eval_json_for_the_whole_validation_split(cli, trained_run):
    r = cli.results["full"]
    assert r.rc == 0, r.stderr[-3000:]
    model_dir = cli.dirs["full"]
    result = read_json(os.path.join(model_dir, "eval_validation.json"))
    assert result["num_images"] == DIGITS_VALIDATION
    assert result["num_iw_samples"] == 2
    assert result["split"] == "validation" and result["dataset"] == "digits"
    assert os.path.basename(result["checkpoint"]) == f"ckpt-{TINY_RUN_STEPS}"
    assert result["step"] == TINY_RUN_STEPS
    assert result["data_dims"] == 256
    assert result["bpd"] == pytest.approx(result["nll_nats"] / (math.log(2.0) * 256), rel=1e-12)
    assert 0.0 < result["bpd"] < 1.0
    # The same number computed in this process from the same images, noise and K.
    nats, count = evaluate_in_process(trained_run.model_dir, None, 2, trained_run.config.batch_size, seed=3)
    assert count == DIGITS_VALIDATION
    assert result["nll_nats"] == pytest.approx(nats, rel=1e-5)
    assert f"{result['nll_nats']:.2f} nats" in r.stdout and f"{result['bpd']:.4f} bits/dim" in r.stdout
    assert "eval_validation.json" in r.stdout


def test_cli_writes_tensorboard_scalars(cli):
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    assert cli.results["full"].rc == 0
    model_dir = cli.dirs["full"]
    result = read_json(os.path.join(model_dir, "eval_validation.json"))
    acc = EventAccumulator(os.path.join(model_dir, "eval"), size_guidance={TENSORS: 0})
    acc.Reload()
    values = {}
    for tag in ("nll_nats", "bpd", "num_iw_samples"):
        events = acc.Tensors(f"eval_validation/{tag}")
        assert [e.step for e in events] == [TINY_RUN_STEPS], tag
        values[tag] = float(tf.make_ndarray(events[0].tensor_proto))
    assert values["nll_nats"] == pytest.approx(result["nll_nats"], rel=1e-6)
    assert values["bpd"] == pytest.approx(result["bpd"], rel=1e-6)
    assert values["num_iw_samples"] == 2


def test_cli_loads_a_checkpoint_by_step_number_and_honours_max_images(cli, trained_run):
    r = cli.results["step100"]
    assert r.rc == 0, r.stderr[-3000:]
    result = read_json(os.path.join(cli.dirs["step100"], "eval_validation.json"))
    assert os.path.basename(result["checkpoint"]) == "ckpt-100" and result["step"] == 100
    assert result["num_images"] == 20 and result["num_iw_samples"] == 3
    at_100, count = evaluate_in_process(trained_run.model_dir, "100", 3, 8, seed=4, max_images=20)
    at_150, _ = evaluate_in_process(trained_run.model_dir, None, 3, 8, seed=4, max_images=20)
    assert count == 20
    assert result["nll_nats"] == pytest.approx(at_100, rel=1e-5)
    assert abs(at_100 - at_150) > 1e-3 * at_150  # so the weights of step 100 were the ones used


def test_cli_runs_under_two_replicas_and_counts_every_image_once(cli):
    """With --cpu_replicas=2 (MirroredStrategy) every image is evaluated once; the estimate agrees with one
    replica up to Monte Carlo noise (the replicas draw other importance samples)."""
    results = {}
    for name in ("one_replica", "two_replicas"):
        r = cli.results[name]
        assert r.rc == 0, r.stderr[-3000:]
        results[name] = read_json(os.path.join(cli.dirs[name], "eval_validation.json"))
    assert "2 replicas" in cli.results["two_replicas"].stderr
    assert results["one_replica"]["num_images"] == results["two_replicas"]["num_images"] == 64
    assert results["two_replicas"]["nll_nats"] == pytest.approx(results["one_replica"]["nll_nats"], rel=0.02)


def test_run_evaluates_the_split_it_is_asked_for(trained_run, tmp_path):
    """In process, on the training split (the only other split of digits): the images of that split."""
    from nvae_tf import data as data_lib
    from nvae_tf import evaluate, runs
    model_dir = str(tmp_path / "run")
    shutil.copytree(trained_run.model_dir, model_dir)
    result = evaluate.run(evaluate.EvaluateOptions(model_dir=model_dir, split="train", num_iw_samples=1,
                                                   batch_size=8, max_images=16, seed=2), progress=False)
    assert result["split"] == "train" and result["num_images"] == 16
    assert read_json(os.path.join(model_dir, "eval_train.json"))["nll_nats"] == result["nll_nats"]
    config, model, _ = runs.load_model(model_dir)
    source = data_lib.open_source(config)
    expected = {}
    for split in ("train", "validation"):
        ds = source.dataset(split, 8, training=False, deterministic=True, seed=2).unbatch().take(16).batch(8)
        expected[split], _ = make_evaluator(model, 1, 8, seed=2).evaluate(ds)
    assert result["nll_nats"] == pytest.approx(expected["train"], rel=1e-5)
    # Far enough apart that the rel=1e-5 comparison above tells the splits apart.
    assert abs(expected["train"] - expected["validation"]) > 1e-4 * expected["train"]


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors_exit_2_with_a_message(cli, case):
    r = cli.results[case]
    assert_cli_error(r, ERROR_CASES[case][1])
    assert not os.path.exists(os.path.join(cli.dirs["run"], "eval_validation.json"))
    assert not os.path.exists(os.path.join(cli.dirs["empty"], "eval_validation.json"))


def test_a_folder_run_evaluates_and_reconstructs_from_its_recorded_data_dir(tmp_path):
    """A run records where its data is (`data.json`): `evaluate` and `sample --mode=reconstruct` of a folder
    run need no --data_dir; --data_dir still overrides it, and a recorded folder that is gone is named."""
    import tensorflow as tf

    from conftest import load_flagfile
    from nvae_tf import evaluate, runs, sample
    from nvae_tf.errors import RunError
    from nvae_tf.model import NVAE
    from nvae_tf.options import EvaluateOptions, SampleOptions
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for i in range(12):
        os.makedirs(images, exist_ok=True)
        tf.io.write_file(str(images / f"{i}.png"), tf.io.encode_png(rng.integers(0, 256, (16, 16, 3), np.uint8)))
    model = NVAE(load_flagfile("tiny"))
    model.build()
    model_dir = str(tmp_path / "run")
    runs.save_model(model_dir, model, step=0)
    with pytest.raises(RunError, match="--data_dir is required"):
        evaluate.run(EvaluateOptions(model_dir=model_dir, num_iw_samples=1), progress=False)
    runs.record_data_dir(model_dir, str(images))
    result = evaluate.run(EvaluateOptions(model_dir=model_dir, num_iw_samples=1, batch_size=2), progress=False)
    assert result["num_images"] >= 1 and np.isfinite(result["nll_nats"])
    grid, _ = sample.run(SampleOptions(model_dir=model_dir, mode="reconstruct", num_samples=2,
                                       out=str(tmp_path / "recon.png")))
    assert grid.shape[0] >= 16 and os.path.exists(tmp_path / "recon.png")
    shutil.move(str(images), str(tmp_path / "moved"))
    with pytest.raises(RunError, match=str(images)):
        evaluate.run(EvaluateOptions(model_dir=model_dir, num_iw_samples=1), progress=False)
    moved = evaluate.run(EvaluateOptions(model_dir=model_dir, num_iw_samples=1, batch_size=2,
                                         data_dir=str(tmp_path / "moved")), progress=False)
    assert moved["num_images"] == result["num_images"]
    with open(os.path.join(model_dir, runs.DATA_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(RunError, match="data.json is damaged"):
        evaluate.run(EvaluateOptions(model_dir=model_dir, num_iw_samples=1), progress=False)
