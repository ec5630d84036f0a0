"""Sampling from a run (`nvae_tf.sample`): BatchNorm readjustment, reproducible grids, the three modes, and the
command line, on the run trained once per session (conftest).

BN readjustment is checked against a NumPy replay of the running averages from the batch statistics that the
BN layers see under the same noise; grids are checked tile by tile against `draw`, the dataset and the model.
"""

import contextlib
import math
import os
import shutil
import types

import numpy as np
import pytest

from conftest import TINY_RUN_STEPS, assert_cli_error, run_side_by_side

IMAGE = 16  # digits are 16x16 ...
SCALE = 4  # ... shown 4x enlarged (make_grid's min_size 64)
TILE = IMAGE * SCALE
PAD = 2
MOMENTUM = 0.95  # running <- 0.95 running + 0.05 batch


# ---------------------------------------------------------------------------------------------- helpers
def run_sample(model_dir, **kwargs):
    from nvae_tf import sample
    return sample.run(sample.SampleOptions(model_dir=model_dir, **kwargs))


def load(trained_run, checkpoint=None):
    from nvae_tf import runs
    return runs.load_model(trained_run.model_dir, checkpoint)[1]


def fresh_noise(seed):
    import keras

    from nvae_tf.model.distributions import KerasNoise
    return KerasNoise(keras.random.SeedGenerator(seed))


def bn_stats(model):
    return {bn.path: (bn.moving_mean.numpy().astype(np.float64), bn.moving_variance.numpy().astype(np.float64))
            for bn in model.batchnorm_layers}


def decoder_bns(model):
    """The BN layers on the sampling path (the post-process cell; this model has one group, so no decoder
    cells)."""
    layers = [bn for bn in model.batchnorm_layers if "/post_" in bn.path or "/group_" in bn.path
              or "/dec_up_" in bn.path]
    assert layers
    return layers


@contextlib.contextmanager
def capture_inputs(layers):
    """Record the (eager) input of every call of `layers`: {path: [ndarray, ...]}."""
    seen = {bn.path: [] for bn in layers}
    for bn in layers:
        original = bn.call

        def call(inputs, *args, _original=original, _path=bn.path, **kwargs):
            seen[_path].append(np.asarray(inputs, np.float64))
            return _original(inputs, *args, **kwargs)
        bn.call = call
    try:
        yield seen
    finally:
        for bn in layers:
            del bn.call


def batch_moments(x):
    """Per-channel mean and (biased) variance over batch, height and width."""
    return x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))


def replay_readjustment(model, temperature, passes, batch, seed):
    """NumPy running averages from (0, 1), fed the batch statistics each BN layer sees in `passes` eager
    training-mode sampling passes with a fresh generator seeded `seed` (the draws readjustment makes)."""
    layers = decoder_bns(model)
    noise = fresh_noise(seed)
    with capture_inputs(layers) as seen:
        for _ in range(passes):
            model.sample(batch, temperature, noise=noise, mode="mean", training=True)
    expected = {}
    for bn in layers:
        assert len(seen[bn.path]) == passes
        mean, var = np.zeros(bn.moving_mean.shape), np.ones(bn.moving_variance.shape)
        for x in seen[bn.path]:
            m, v = batch_moments(x)
            mean, var = MOMENTUM * mean + (1 - MOMENTUM) * m, MOMENTUM * var + (1 - MOMENTUM) * v
        expected[bn.path] = (mean, var)
    return expected


def sample_statistics(model, temperature, batches, batch, seed):
    """Average batch statistics of each sampling-path BN input at `temperature` (training mode)."""
    layers = decoder_bns(model)
    noise = fresh_noise(seed)
    with capture_inputs(layers) as seen:
        for _ in range(batches):
            model.sample(batch, temperature, noise=noise, mode="mean", training=True)
    return {path: tuple(np.mean([batch_moments(x)[i] for x in xs], axis=0) for i in (0, 1))
            for path, xs in seen.items()}


def readjust(model, temperature=0.6, passes=4, batch=8, seed=9):
    from nvae_tf.sampling import readjust_batchnorm
    readjust_batchnorm(model, temperature, passes=passes, batch=batch, seed=seed, progress=False)
    return bn_stats(model)


def png_size(path):
    from PIL import Image
    with Image.open(path) as image:
        return image.size, image.mode  # (width, height)


def read_png(path):
    from PIL import Image
    with Image.open(path) as image:
        return np.asarray(image)


def tile(grid, index, columns):
    r, c = divmod(index, columns)
    top, left = PAD + r * (TILE + PAD), PAD + c * (TILE + PAD)
    return grid[top:top + TILE, left:left + TILE]


def enlarged(images):
    """Float images in [0, 1] `[n, 16, 16, 1]` as the uint8 tiles of a grid `[n, 64, 64, 1]`."""
    from nvae_tf.imaging import to_uint8
    return to_uint8(images).repeat(SCALE, axis=1).repeat(SCALE, axis=2)


def grid_shape(n, columns):
    rows = math.ceil(n / columns)
    return rows * (TILE + PAD) + PAD, columns * (TILE + PAD) + PAD


# ================================================================================ BN readjustment
def test_readjustment_is_the_running_average_of_sampled_batch_statistics_from_0_1(trained_run):
    model = load(trained_run)
    got = readjust(model, temperature=0.6, passes=4, batch=8, seed=9)
    expected = replay_readjustment(load(trained_run), 0.6, passes=4, batch=8, seed=9)
    for path, (mean, var) in expected.items():
        np.testing.assert_allclose(got[path][0], mean, rtol=1e-4, atol=1e-5, err_msg=path)
        np.testing.assert_allclose(got[path][1], var, rtol=1e-4, atol=1e-5, err_msg=path)
    # The temperature is the one asked for: at another one the batch statistics, and so the result, differ.
    other = replay_readjustment(load(trained_run), 1.0, passes=4, batch=8, seed=9)
    assert any(not np.allclose(got[p][1], other[p][1], rtol=1e-3) for p in expected)


def test_readjustment_does_not_depend_on_the_previous_running_statistics(trained_run):
    model = load(trained_run)
    trained = bn_stats(model)
    reference = readjust(model, seed=9)
    perturbed_model = load(trained_run)
    rng = np.random.default_rng(0)
    for bn in perturbed_model.batchnorm_layers:
        bn.moving_mean.assign(rng.normal(0.0, 3.0, bn.moving_mean.shape).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.05, 20.0, bn.moving_variance.shape).astype("float32"))
    perturbed = bn_stats(perturbed_model)
    assert all(not np.allclose(perturbed[p][0], trained[p][0]) for p in trained)
    result = readjust(perturbed_model, seed=9)
    assert set(result) == set(reference)
    sampling = [bn.path for bn in model.sampling_batchnorm_layers]
    assert set(sampling) == {bn.path for bn in decoder_bns(model)}
    for path in sampling:
        np.testing.assert_allclose(result[path][0], reference[path][0], rtol=1e-5, atol=1e-6, err_msg=path)
        np.testing.assert_allclose(result[path][1], reference[path][1], rtol=1e-5, atol=1e-6, err_msg=path)
    # And readjustment did change the sampling path's statistics.
    assert any(not np.allclose(reference[bn.path][1], trained[bn.path][1], rtol=1e-3) for bn in decoder_bns(model))


def test_readjustment_leaves_every_other_variable_unchanged(trained_run):
    model = load(trained_run)
    moving = {id(v) for bn in model.batchnorm_layers for v in (bn.moving_mean, bn.moving_variance)}
    others = [v for v in model.variables if id(v) not in moving]
    assert {id(v) for v in model.trainable_variables} <= {id(v) for v in others}
    assert len(model.trainable_variables) > 20 and len(others) > len(model.trainable_variables)
    before = [np.array(v.numpy()).copy() for v in others]
    readjust(model, passes=5, seed=3)
    changed = [v.path for v, b in zip(others, before) if not np.array_equal(b, v.numpy())]
    assert not changed, changed


def test_readjustment_moves_the_statistics_to_those_of_samples_at_its_temperature(trained_run):
    """After 60 passes at t the running statistics are within a few percent of the average batch statistics
    of fresh samples at t (estimated with other noise), and nearer to them than to those at another t."""
    stats = {t: sample_statistics(load(trained_run), t, batches=12, batch=16, seed=77) for t in (0.3, 1.0)}
    remaining = MOMENTUM ** 60  # weight left on the reset values (0, 1)
    for t, other in ((0.3, 1.0), (1.0, 0.3)):
        got = readjust(load(trained_run), temperature=t, passes=60, batch=16, seed=5)
        own_error, other_error = 0.0, 0.0
        for path, (mean, var) in stats[t].items():
            expected_var = (1 - remaining) * var + remaining
            expected_mean = (1 - remaining) * mean
            spread = np.sqrt(var)
            assert np.all(np.abs(got[path][0] - expected_mean) < 0.05 * spread + 1e-3), path
            assert np.all(np.abs(got[path][1] - expected_var) < 0.1 * expected_var + 1e-3), path
            own_error += np.sum(np.abs(np.log(got[path][1] / expected_var)))
            other_var = (1 - remaining) * stats[other][path][1] + remaining
            other_error += np.sum(np.abs(np.log(got[path][1] / other_var)))
        assert own_error < other_error, (t, own_error, other_error)


def test_readjustment_rejects_too_few_passes_or_images(trained_run):
    from nvae_tf import runs
    from nvae_tf.sampling import readjust_batchnorm
    model = load(trained_run)
    before = bn_stats(model)
    for passes, batch in ((0, 16), (10, 1)):
        with pytest.raises(runs.RunError, match="--bn_passes"):
            readjust_batchnorm(model, 0.7, passes=passes, batch=batch, progress=False)
    after = bn_stats(model)
    assert all(np.array_equal(before[p][0], after[p][0]) for p in before)  # refused before resetting


def test_restarted_noise_draws_what_a_new_source_of_that_seed_draws():
    """`restart_noise` (the readjustment pass and the TensorBoard pictures restart their noise with it) gives the
    draws of a source just made with that seed, in eager code and at every call of a traced function."""
    import tensorflow as tf

    from nvae_tf.sampling import restart_noise, seeded_noise
    fresh = seeded_noise(7, "fresh").normal([6]).numpy()
    noise = seeded_noise(5, "used")
    assert not np.array_equal(noise.normal([6]).numpy(), fresh)
    restart_noise(noise, 7)
    np.testing.assert_array_equal(noise.normal([6]).numpy(), fresh)

    @tf.function
    def restarted():
        restart_noise(noise, 7)
        return noise.normal([6])

    for _ in range(2):
        np.testing.assert_array_equal(restarted().numpy(), fresh)


def test_readjusting_again_at_other_temperatures_and_seeds_reuses_one_trace_and_matches_a_fresh_model(trained_run):
    from nvae_tf.sampling import readjustment_pass
    model = load(trained_run)
    for t, seed in ((0.4, 9), (1.0, 9), (0.7, 3), (0.4, 9)):
        stats = readjust(model, temperature=t, seed=seed)
        fresh = readjust(load(trained_run), temperature=t, seed=seed)
        for path in fresh:
            for i in (0, 1):
                np.testing.assert_array_equal(stats[path][i], fresh[path][i], err_msg=f"{path} at t = {t}")
    assert readjustment_pass(model, 8, 0).experimental_get_tracing_count() == 1


# ======================================================================================== drawing
def test_draw_is_reproducible_by_seed(trained_run):
    from nvae_tf.sampling import draw
    model = load(trained_run)
    for pixels in ("sample", "mean"):
        a = draw(model, 6, 0.7, seed=1, pixels=pixels)
        b = draw(model, 6, 0.7, seed=1, pixels=pixels)
        c = draw(model, 6, 0.7, seed=2, pixels=pixels)
        assert a.shape == (6, IMAGE, IMAGE, 1) and a.min() >= 0.0 and a.max() <= 1.0
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c), pixels
    # A drawn pixel is binary (the decoder's Bernoulli draw); the mean is not.
    assert set(np.unique(draw(model, 6, 0.7, seed=1, pixels="sample"))) <= {0.0, 1.0}


def test_same_seed_same_png_bytes_and_another_seed_another_png(trained_run, tmp_path):
    paths = {name: str(tmp_path / f"{name}.png") for name in ("a", "b", "c")}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_sample(trained_run.model_dir, num_samples=9, seed=seed, out=paths[name])
    data = {name: open(path, "rb").read() for name, path in paths.items()}
    assert data["a"].startswith(b"\x89PNG")
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]


@pytest.mark.parametrize("num_samples, columns", [(1, 0), (5, 0), (10, 0), (7, 3)])
def test_sample_mode_writes_a_grid_of_the_requested_samples(trained_run, tmp_path, num_samples, columns):
    from nvae_tf import imaging, sampling
    out = str(tmp_path / "grid.png")
    grid, path = run_sample(trained_run.model_dir, num_samples=num_samples, temperature=0.8, seed=4,
                            columns=columns, out=out)
    assert os.path.basename(path) == f"ckpt-{TINY_RUN_STEPS}"
    cols = columns or math.ceil(math.sqrt(num_samples))
    height, width = grid_shape(num_samples, cols)
    assert imaging.make_grid(np.zeros((num_samples, IMAGE, IMAGE, 1)), columns or None).shape == (height, width, 1)
    assert png_size(out) == ((width, height), "L")
    png = read_png(out)
    np.testing.assert_array_equal(png, grid[..., 0])
    # The tiles are the samples of `draw` with the same seed (pixel means: the digits decoder is Bernoulli).
    expected = enlarged(sampling.draw(load(trained_run), num_samples, 0.8, seed=4, pixels="mean"))
    for i in range(num_samples):
        np.testing.assert_array_equal(tile(png, i, cols), expected[i, ..., 0], err_msg=f"tile {i}")
    rows = math.ceil(num_samples / cols)
    for i in range(num_samples, rows * cols):
        assert np.all(tile(png, i, cols) == 255)  # unused cells stay blank


def test_temperatures_mode_writes_one_row_per_temperature_with_the_same_noise(trained_run, tmp_path):
    from nvae_tf import imaging, sampling
    temperatures = [0.3, 0.8, 1.0]
    out = str(tmp_path / "t.png")
    grid, _ = run_sample(trained_run.model_dir, mode="temperatures", temperatures="0.3, 0.8,1.0", num_samples=5,
                         seed=2, out=out)
    height, width = grid_shape(5 * len(temperatures), 5)
    png = read_png(out)
    # A margin left of the rows holds each row's temperature; the tiles follow it.
    margin = png.shape[1] - width
    assert png_size(out) == ((width + margin, height), "L") and margin > 0
    labels, png = png[:, :margin], png[:, margin:]
    row_height = (height - 2) // len(temperatures)
    strips = [labels[2 + r * row_height:2 + (r + 1) * row_height] for r in range(len(temperatures))]
    for strip, t in zip(strips, temperatures):
        text = imaging.render_text(f"t={t:g}")
        assert int((strip == 0).sum()) == int(text.sum()), t  # exactly the label's dark pixels
        assert np.all(np.isin(strip, (0, 255)))
    assert not np.array_equal(strips[0], strips[1])
    model = load(trained_run)
    rows = []
    for r, t in enumerate(temperatures):
        expected = enlarged(sampling.draw(model, 5, t, seed=2, pixels="mean"))
        row = np.stack([tile(png, r * 5 + c, 5) for c in range(5)])
        np.testing.assert_array_equal(row, expected[..., 0], err_msg=f"row {r} (t = {t})")
        rows.append(row)
    assert not np.array_equal(rows[0], rows[2])


def test_reconstruct_mode_pairs_each_dataset_image_with_its_reconstruction(trained_run, tmp_path):
    from nvae_tf import data as data_lib
    n = 6
    out = str(tmp_path / "r.png")
    grid, _ = run_sample(trained_run.model_dir, mode="reconstruct", num_samples=n, seed=3, out=out)
    columns = 2 * math.ceil(math.sqrt(n))  # pairs of columns: input, reconstruction
    height, width = grid_shape(2 * n, columns)
    assert png_size(out) == ((width, height), "L")
    png = read_png(out)
    source = data_lib.open_source(trained_run.config)
    images = next(iter(source.dataset("validation", n, training=False, deterministic=True, seed=3,
                                      cache=False))).numpy()
    assert set(np.unique(images)) == {0, 255}  # binarised digits
    inputs = np.stack([tile(png, 2 * i, columns) for i in range(n)])
    np.testing.assert_array_equal(inputs, images.repeat(SCALE, axis=1).repeat(SCALE, axis=2)[..., 0])
    # The other column: the decoder mean of one posterior sample of that very image (same seed).
    model = load(trained_run)
    out_terms = model(images, training=False, noise=fresh_noise(3))
    recon = enlarged(model.decode_pixels(out_terms.decoder_params, mode="mean").numpy())
    reconstructions = np.stack([tile(png, 2 * i + 1, columns) for i in range(n)])
    np.testing.assert_array_equal(reconstructions, recon[..., 0])
    assert not np.array_equal(inputs, reconstructions)


def test_sample_loads_a_checkpoint_by_step_number(trained_run, tmp_path):
    from nvae_tf import runs, sampling
    grid_100, path = run_sample(trained_run.model_dir, num_samples=4, seed=1, checkpoint="100",
                                out=str(tmp_path / "a.png"))
    assert os.path.basename(path) == "ckpt-100"
    grid_150, _ = run_sample(trained_run.model_dir, num_samples=4, seed=1, out=str(tmp_path / "b.png"))
    assert not np.array_equal(grid_100, grid_150)
    expected = enlarged(sampling.draw(load(trained_run, "100"), 4, 0.7, seed=1, pixels="mean"))
    np.testing.assert_array_equal(tile(grid_100[..., 0], 3, 2), expected[3, ..., 0])
    with pytest.raises(runs.RunError, match=r"ckpt-7 does not exist .*ckpt-100, ckpt-150"):
        run_sample(trained_run.model_dir, checkpoint="7", out=str(tmp_path / "c.png"))
    assert not os.path.exists(tmp_path / "c.png")


def test_readjust_bn_in_run_is_reproducible_and_changes_the_samples(trained_run, tmp_path):
    kwargs = dict(num_samples=4, temperature=0.5, seed=8, readjust_bn=True, bn_passes=3, bn_batch=4)
    a, _ = run_sample(trained_run.model_dir, out=str(tmp_path / "a.png"), **kwargs)
    b, _ = run_sample(trained_run.model_dir, out=str(tmp_path / "b.png"), **kwargs)
    plain, _ = run_sample(trained_run.model_dir, out=str(tmp_path / "c.png"), **{**kwargs, "readjust_bn": False})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, plain)


def test_readjust_bn_in_temperatures_mode_readjusts_every_row_at_its_own_temperature(trained_run, tmp_path):
    from nvae_tf import sampling
    temperatures = [0.4, 1.0]
    kwargs = dict(mode="temperatures", temperatures="0.4,1.0", num_samples=3, seed=6, readjust_bn=True,
                  bn_passes=3, bn_batch=4)
    grid, _ = run_sample(trained_run.model_dir, out=str(tmp_path / "t.png"), **kwargs)
    png = read_png(str(tmp_path / "t.png"))
    png = png[:, png.shape[1] - grid_shape(6, 3)[1]:]  # the tiles, right of the temperature labels
    rows = [np.stack([tile(png, r * 3 + c, 3) for c in range(3)]) for r in range(len(temperatures))]
    for r, t in enumerate(temperatures):
        model = load(trained_run)
        readjust(model, temperature=t, passes=3, batch=4, seed=6)
        expected = enlarged(sampling.draw(model, 3, t, seed=6, pixels="mean"))[..., 0]
        np.testing.assert_array_equal(rows[r], expected, err_msg=f"row {r} (t = {t})")
    # Statistics of samples at the first row's temperature would draw the second row differently.
    model = load(trained_run)
    readjust(model, temperature=temperatures[0], passes=3, batch=4, seed=6)
    first_only = enlarged(sampling.draw(model, 3, temperatures[1], seed=6, pixels="mean"))[..., 0]
    assert not np.array_equal(rows[1], first_only)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), "--temperature must be in (0, 2]"),
    (dict(temperature=-0.5), "--temperature must be in (0, 2]"),
    (dict(temperature=2.0001), "--temperature must be in (0, 2]"),
    (dict(num_samples=0), "--num_samples: must be >= 1"),
    (dict(num_samples=-4), "--num_samples: must be >= 1"),
    (dict(mode="temperatures", temperatures="0.5,2.5"), "--temperatures must be in (0, 2]"),
    (dict(mode="temperatures", temperatures="0.5,hot"), "--temperatures: expected comma-separated numbers"),
    (dict(mode="temperatures", temperatures=" , "), "--temperatures is empty"),
    (dict(mode="reconstruct", split="test"), "--split: digits has no split 'test'; it has train, validation"),
])
def test_run_refuses_bad_arguments(trained_run, tmp_path, kwargs, message):
    from nvae_tf import runs
    out = tmp_path / "never.png"
    with pytest.raises(runs.RunError) as info:
        run_sample(trained_run.model_dir, out=str(out), **kwargs)
    assert message in str(info.value)
    assert not out.exists()


def test_temperature_two_is_allowed(trained_run, tmp_path):
    grid, _ = run_sample(trained_run.model_dir, num_samples=1, temperature=2.0, out=str(tmp_path / "hot.png"))
    assert grid.shape == (TILE + 2 * PAD, TILE + 2 * PAD, 1)


# =============================================================================== the command line
ERROR_CASES = {
    "temperature_zero": (["--temperature=0"], ["--temperature", "(0, 2]", "got 0"]),
    "temperature_above_2": (["--temperature=2.5"], ["--temperature", "(0, 2]", "2.5"]),
    "no_samples": (["--num_samples=0"], ["--num_samples", ">= 1"]),
    "split_test": (["--mode=reconstruct", "--split=test"], ["--split", "'test'", "train, validation"]),
    "no_checkpoint": (["--model_dir={empty}"], ["has no checkpoint"]),
    "missing_model_dir": (["--model_dir={missing}"], ["--model_dir", "does not exist"]),
}


@pytest.fixture(scope="module")
def cli(trained_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("sample_cli")
    dirs = {"empty": str(base / "empty"), "missing": str(base / "missing")}
    os.makedirs(dirs["empty"])
    shutil.copy(os.path.join(trained_run.model_dir, "config.json"), dirs["empty"])
    commands = {"sample": [f"--model_dir={trained_run.model_dir}", "--num_samples=10", "--seed=3",
                           f"--out={base / 'sample.png'}"]}
    for name, (args, _) in ERROR_CASES.items():
        args = [a.format(**dirs) for a in args]
        if not any(a.startswith("--model_dir") for a in args):
            args.insert(0, f"--model_dir={trained_run.model_dir}")
        commands[name] = [*args, f"--out={base / (name + '.png')}"]
    return types.SimpleNamespace(base=base, results=run_side_by_side("nvae_tf.sample", commands))


def test_cli_writes_the_same_png_as_the_same_seed_in_process(cli, trained_run, tmp_path):
    r = cli.results["sample"]
    assert r.rc == 0, r.stderr[-3000:]
    out = str(cli.base / "sample.png")
    height, width = grid_shape(10, 4)
    assert png_size(out) == ((width, height), "L")
    assert f"wrote {out} ({width}x{height}, mode sample, ckpt-{TINY_RUN_STEPS})" in r.stdout
    run_sample(trained_run.model_dir, num_samples=10, seed=3, out=str(tmp_path / "same.png"))
    run_sample(trained_run.model_dir, num_samples=10, seed=4, out=str(tmp_path / "other.png"))
    with open(out, "rb") as f:
        cli_bytes = f.read()
    assert cli_bytes == (tmp_path / "same.png").read_bytes()
    assert cli_bytes != (tmp_path / "other.png").read_bytes()


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_cli_errors_exit_2_with_a_message(cli, case):
    r = cli.results[case]
    assert_cli_error(r, ERROR_CASES[case][1])
    assert "wrote" not in r.stdout
    assert not (cli.base / f"{case}.png").exists()


INTERRUPTED = {  # command line, the console line after which SIGINT comes, what must be as it was after
    "sample": (["--readjust_bn", "--bn_passes=1000000", "--num_samples=2", "--out={out}/samples.png"],
               "re-estimating BatchNorm statistics", ["samples.png"]),
    "export": (["--export_dir={out}/exports", "--tflite"], "writing the SavedModel", []),
}


@pytest.mark.parametrize("command", sorted(INTERRUPTED))
def test_ctrl_c_ends_with_one_line_and_leaves_the_run_and_earlier_outputs_as_they_were(trained_run, tmp_path,
                                                                                      command):
    """SIGINT mid-way (sample: while BatchNorm is being readjusted; export: while the SavedModel is written): exit
    130 with one `interrupted` line and no traceback; the checkpoint files and a PNG already at `--out` keep their
    bytes, and no temporary file or folder is left behind."""
    import hashlib
    import pathlib
    import signal
    import sys
    import time

    from conftest import Run, poll

    def digests(folder):
        return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in os.listdir(folder)}

    args, wait_for, kept = INTERRUPTED[command]
    model_dir = trained_run.model_dir
    before = digests(pathlib.Path(model_dir) / "checkpoints")
    out = tmp_path / "out"
    out.mkdir()
    for name in kept:
        (out / name).write_bytes(b"an earlier picture")
    log = tmp_path / "log"
    run = Run([sys.executable, "-m", f"nvae_tf.{command}", f"--model_dir={model_dir}",
               *[a.format(out=out) for a in args]], log)
    try:
        poll(lambda: wait_for in run.text(), 240, f"the line '{wait_for}'", run=run, interval=0.1)
        time.sleep(0.5)
        run.proc.send_signal(signal.SIGINT)
        rc = run.wait(timeout=120)
    finally:
        run.kill()
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert text.splitlines()[-1] == f"interrupted: nvae_tf.{command} stopped before it finished", text[-3000:]
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert sorted(os.listdir(out)) == kept
    for name in kept:
        assert (out / name).read_bytes() == b"an earlier picture"
    assert digests(pathlib.Path(model_dir) / "checkpoints") == before


def test_readjustment_keeps_the_encoder_statistics(trained_run):
    """Sampling passes never reach the encoder, so its BatchNorm statistics stay those of training (and
    reconstructions after a readjustment still encode with them)."""
    model = load(trained_run)
    sampling = {bn.path for bn in model.sampling_batchnorm_layers}
    encoder = [bn for bn in model.batchnorm_layers if bn.path not in sampling]
    assert encoder
    before = {bn.path: (bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()) for bn in encoder}
    assert any(not np.allclose(mean, 0.0) for mean, _ in before.values())
    readjust(model, passes=3, seed=4)
    for bn in encoder:
        np.testing.assert_array_equal(bn.moving_mean.numpy(), before[bn.path][0], err_msg=bn.path)
        np.testing.assert_array_equal(bn.moving_variance.numpy(), before[bn.path][1], err_msg=bn.path)


def test_row_labels_are_drawn_in_a_margin_and_refuse_characters_the_font_lacks():
    from nvae_tf import imaging
    images = np.full((4, 8, 8, 1), 128, np.uint8)
    plain = imaging.make_grid(images, columns=2, min_size=8)
    labelled = imaging.make_grid(images, columns=2, min_size=8, row_labels=["t=0.5", "t=1"])
    margin = labelled.shape[1] - plain.shape[1]
    assert labelled.shape[0] == plain.shape[0] and margin == imaging.render_text("t=0.5").shape[1] + 4
    np.testing.assert_array_equal(labelled[:, margin:], plain)
    # "8" lights 13 of its 15 glyph pixels, "1" 8 (at scale 2: 4 screen pixels each).
    assert imaging.render_text("8").sum() == 4 * 13 and imaging.render_text("1").sum() == 4 * 8
    with pytest.raises(ValueError, match="cannot draw 'x'"):
        imaging.render_text("x=1")
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        imaging.make_grid(images, columns=2, row_labels=["t=1"])
