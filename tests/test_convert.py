"""NVIDIA NVAE checkpoints in nvae_tf: the PyTorch-free reader, the key map and what a converted model computes.

The fixtures are in `../shared/reference/` (its README): two checkpoints saved by the reference's training
script, what the reference computes on 8 images with zero latent noise, and the state_dict listing of every
paper config. Tolerances: the README measured how much the reference's own figures move with the float32
summation order (two threads instead of one): up to 5e-3 nats in a reconstruction term, 5e-4 in log q / log p,
3e-6 in a logit. Terms are compared at 1e-4 relative; logits and probabilities, many of which are near zero,
at 1e-4 relative plus 1e-5 absolute (the order of that summation noise).
"""

import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest

from conftest import assert_cli_error, load_flagfile, run_side_by_side, small_tmpfs, tensorflow_backend

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                         "reference")
PAPER_CONFIGS = ("mnist", "cifar10", "celeba64", "imagenet32", "celebahq", "ffhq")

if not os.path.isdir(REFERENCE) and os.environ.get("NVAE_REQUIRE_REFERENCE") == "1":
    raise RuntimeError(f"NVAE_REQUIRE_REFERENCE=1 but there are no reference fixtures at {REFERENCE}")
pytestmark = pytest.mark.skipif(not os.path.isdir(REFERENCE), reason=f"no reference fixtures at {REFERENCE}")


def reference_file(name):
    return os.path.join(REFERENCE, name)


def read_listing(name):
    """{normalised key: shape} and the parameter total of `state_dict_<name>.tsv`."""
    from nvae_tf import convert
    listing, total, aliases = {}, None, 0
    with open(reference_file(f"state_dict_{name}.tsv")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if parts[0] == "total_parameters":
                total = int(parts[1])
                continue
            listing[convert.normalize_key(parts[0])] = tuple(json.loads(parts[1]))
            aliases += parts[3] == "parameter_alias"
    return listing, total, aliases


# ------------------------------------------------------------------------------------------ the reader
def test_reader_returns_the_checkpoint_dict_with_numpy_tensors():
    from nvae_tf import convert, torch_checkpoint
    saved = torch_checkpoint.load(reference_file("ckpt_binary32.pt"))
    assert list(saved) == ["epoch", "state_dict", "optimizer", "global_step", "args", "arch_instance", "scheduler",
                           "grad_scalar"]
    assert saved["epoch"] == 4 and saved["global_step"] == 200
    assert saved["args"].dataset == "mnist" and saved["args"].num_channels_enc == 16
    state = saved["state_dict"]
    listing, _, _ = read_listing("binary32")
    assert len(state) == len(listing) == 380
    for key, value in state.items():
        assert isinstance(value, np.ndarray)
        assert value.shape == listing[convert.normalize_key(key)], key
    assert state["prior_ftr0"].dtype == np.float32
    assert state["pre_process.0._ops.0.bn_act.num_batches_tracked"].dtype == np.int64
    assert int(state["pre_process.0._ops.0.bn_act.num_batches_tracked"]) == 200
    # An alias is the same tensor under a second name.
    plain = "dec_tower.1._ops.0.conv.4.weight"  # the projection of an up cell
    np.testing.assert_array_equal(state[plain], state[plain + "_normalized"])


def test_reader_honours_storage_offsets_and_strides():
    """Tensors that are views into a shared storage (NVAE's fast Adamax stacks same-shaped parameters) must be
    read at their offset: same-shaped parameters that share a storage differ."""
    from nvae_tf import torch_checkpoint
    state = torch_checkpoint.load(reference_file("ckpt_rgb32.pt"))["state_dict"]
    same_shape = [k for k, v in state.items() if v.shape == state["enc_tower.0._ops.0.conv_0.weight"].shape]
    assert len(same_shape) > 4
    values = [state[k] for k in same_shape]
    assert all(not np.array_equal(values[0], v) for v in values[1:])
    # A transposed view rebuilt by hand: storage [0..5], size (3, 2), stride (1, 3), offset 0.
    storage = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(torch_checkpoint.rebuild_tensor(storage, 0, (3, 2), (1, 3)),
                                  np.arange(6, dtype=np.float32).reshape(2, 3).T)
    np.testing.assert_array_equal(torch_checkpoint.rebuild_tensor(storage, 2, (2, 2), (2, 1)), [[2, 3], [4, 5]])
    with pytest.raises(torch_checkpoint.CheckpointReadError, match="damaged"):
        torch_checkpoint.rebuild_tensor(storage, 4, (2, 2), (2, 1))


class _RunsCode:
    """Pickles as a call of os.system: what a malicious checkpoint does."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _zip_checkpoint(path, payload, name="archive"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/data.pkl", payload)
        z.writestr(f"{name}/version", "3\n")


def test_restricted_unpickler_refuses_another_global_by_name_and_runs_nothing(tmp_path):
    from nvae_tf import torch_checkpoint
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _zip_checkpoint(path, pickle.dumps({"state_dict": {}, "args": _RunsCode(marker)}, protocol=2))
    with pytest.raises(torch_checkpoint.CheckpointReadError) as info:
        torch_checkpoint.load(str(path))
    assert f"{os.system.__module__}.system" in str(info.value) and "not allowed" in str(info.value)
    assert not marker.exists()
    # The same payload is harmful under plain pickle: the refusal is what kept the marker from being written.
    pickle.loads(pickle.dumps(_RunsCode(marker), protocol=2))
    assert marker.exists()


def test_restricted_unpickler_refuses_builtins_eval(tmp_path):
    from nvae_tf import torch_checkpoint
    path = tmp_path / "eval.pt"
    payload = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    _zip_checkpoint(path, payload)
    with pytest.raises(torch_checkpoint.CheckpointReadError, match=r"builtins\.eval"):
        torch_checkpoint.load(str(path))


# ------------------------------------------------------------------------------------- damaged inputs
def _truncated(tmp_path):
    data = open(reference_file("ckpt_binary32.pt"), "rb").read()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[:len(data) // 2])
    return path


def _not_a_zip(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def _legacy(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"state_dict": {}}, protocol=2))
    return path


def _zip_without_pickle(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    return path


def _storage_missing(tmp_path):
    """Every entry of the real checkpoint but one storage."""
    path = tmp_path / "missing_storage.pt"
    with zipfile.ZipFile(reference_file("ckpt_binary32.pt")) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            if not item.filename.endswith("/data/0"):
                dst.writestr(item, src.read(item))
    return path


def _not_nvae(tmp_path):
    path = tmp_path / "weights_only.pt"
    _zip_checkpoint(path, pickle.dumps({"weights": [1, 2, 3]}, protocol=2))
    return path


@pytest.mark.parametrize("make, expected", [
    (_truncated, "truncated"), (_not_a_zip, "not a PyTorch zip-format checkpoint"),
    (_legacy, "legacy (pre-1.6) format"), (_zip_without_pickle, "not a PyTorch checkpoint"),
    (_storage_missing, "storage 0 is missing"), (_not_nvae, "not an NVAE training checkpoint"),
])
def test_damaged_or_foreign_files_give_one_clear_line_and_write_nothing(tmp_path, make, expected):
    from nvae_tf import convert
    path = make(tmp_path)
    model_dir = tmp_path / "run"
    with pytest.raises(convert.ConversionError) as info:
        convert.convert(str(path), str(model_dir), log=lambda *_: None)
    message = str(info.value)
    assert expected in message and "\n" not in message, message
    assert not model_dir.exists()


# --------------------------------------------------------------------------------------- args -> config
def _args(name):
    from nvae_tf import torch_checkpoint
    return torch_checkpoint.load(reference_file(f"ckpt_{name}.pt"))


def test_args_map_to_the_config_with_the_reference_fields_on():
    from nvae_tf import convert
    saved = _args("rgb32")
    config = convert.config_from_args(saved["args"], saved["arch_instance"])
    assert config.dataset == "cifar10" and config.image_shape == (32, 32, 3)
    assert config.groups_per_scale == [4, 2] and config.num_nf == 1 and config.num_mixture_dec == 10
    assert (config.num_channels_enc, config.num_latent_per_group, config.num_cell_per_cond_dec) == (32, 8, 1)
    assert config.flow_elu_twice and config.reference_logistic and config.pixel_temperature
    assert config.weight_decay_norm == 1e-2 and config.epochs == 10 and config.warmup_epochs == 1


@pytest.mark.parametrize("change, expected", [
    ({"dataset": "lsun_church_128"}, "args.dataset 'lsun_church_128' is not supported"),
    ({"arch_instance": "res_wnelu"}, "args.arch_instance 'res_wnelu' is not supported"),
    ({"num_postprocess_blocks": 2}, "args.num_postprocess_blocks"),
    ({"num_x_bits": 9}, "args.num_x_bits"),
])
def test_unsupported_args_are_refused_by_name(change, expected):
    from nvae_tf import convert
    saved = _args("binary32")
    args = dict(vars(saved["args"]), **change)
    with pytest.raises(convert.ConversionError, match=expected.replace(".", r"\.").replace("(", r"\(")):
        convert.config_from_args(args, saved["arch_instance"])


def test_missing_args_and_another_cell_architecture_are_refused():
    from nvae_tf import convert
    saved = _args("binary32")
    args = dict(vars(saved["args"]))
    del args["num_nf"]
    with pytest.raises(convert.ConversionError, match="lack num_nf"):
        convert.config_from_args(args)
    # A training setting that an older reference did not record takes nvae_tf's default.
    args = dict(vars(saved["args"]))
    del args["weight_decay_norm"]
    from nvae_tf.config import NVAEConfig
    assert saved["args"].weight_decay_norm == 1e-2
    assert convert.config_from_args(args).weight_decay_norm == NVAEConfig().weight_decay_norm == 0.0
    arch = dict(saved["arch_instance"], normal_dec=["mconv_e3k5g0"])
    with pytest.raises(convert.ConversionError, match="arch_instance\\['normal_dec'\\]"):
        convert.config_from_args(saved["args"], arch)


# ------------------------------------------------------------------------------------------- the key map
@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_key_listing_maps_one_to_one_onto_the_model(name):
    """Every entry of the reference's state_dict for the paper config, by name and shape, is an entry of the
    nvae_tf model built from `configs/<name>.flags`, and nothing else is."""
    from nvae_tf import convert
    from nvae_tf.model import NVAE
    listing, total, aliases = read_listing(name)
    model = NVAE(load_flagfile(name))
    model.build()
    ours = convert.reference_listing(model)
    assert set(ours) - set(listing) == set()
    assert set(listing) - set(ours) == set()
    assert {k: v for k, v in ours.items() if listing[k] != v} == {}
    kinds = [kind for _, _, kind in convert.reference_entries(model)]
    assert kinds.count(convert.ALIAS) == aliases
    variables = {id(v) for _, v, kind in convert.reference_entries(model) if kind not in (convert.ALIAS,
                                                                                         convert.COUNTER)}
    # Each entry sets its own variable, and every trainable variable and BN statistic is set by one.
    assert len(variables) == len(kinds) - kinds.count(convert.ALIAS) - kinds.count(convert.COUNTER)
    assert sum(int(np.prod(v.shape)) for v in model.trainable_weights) == total
    assert {id(v) for v in model.trainable_weights} <= variables


def test_sync_bn_and_plain_bn_names_are_both_accepted():
    from nvae_tf import convert
    assert convert.normalize_key("dec_tower.1._ops.0.conv.0.bn.running_mean") == \
        convert.normalize_key("dec_tower.1._ops.0.conv.0.running_mean")
    assert convert.normalize_key("module.stem.weight") == "stem.weight"


@pytest.fixture(scope="module")
def binary32_state():
    from nvae_tf import convert
    saved = _args("binary32")
    return saved, convert.config_from_args(saved["args"], saved["arch_instance"])


def _fresh_model(config):
    from nvae_tf.model import NVAE
    model = NVAE(config)
    model.build()
    return model


@pytest.mark.parametrize("damage, expected", [
    (lambda s: s.update(extra_weight=np.zeros(3, np.float32)), "match no nvae_tf variable of this configuration, "
                                                                "first 'extra_weight'"),
    (lambda s: s.pop("enc_tower.1.conv.bias"), "missing from the state_dict, first 'enc_tower.1.conv.bias'"),
    (lambda s: s.update({"stem.weight": np.zeros((16, 1, 5, 5), np.float32)}),
     "'stem.weight' has shape [16, 1, 5, 5], the configuration needs [16, 1, 3, 3]"),
    (lambda s: s.update({"dec_tower.2._ops.0.conv.3.weight_normalized":
                         np.ones_like(s["dec_tower.2._ops.0.conv.3.weight"])}),
     "differs from 'dec_tower.2._ops.0.conv.3.weight'"),
    (lambda s: s["prior_ftr0"].__setitem__((0, 0, 0), np.nan), "'prior_ftr0' holds a non-finite value"),
])
def test_state_dict_faults_are_named(binary32_state, damage, expected):
    from nvae_tf import convert
    saved, config = binary32_state
    state = {k: v.copy() for k, v in saved["state_dict"].items()}
    damage(state)
    with pytest.raises(convert.ConversionError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        convert.assign_state_dict(_fresh_model(config), state)


def test_every_entry_sets_exactly_its_variable(binary32_state):
    """After the assignment each variable holds its entry (transposed as documented), and the power-iteration
    vectors of the spectral regulariser (which the reference does not save) are left as they were built."""
    from nvae_tf import convert
    saved, config = binary32_state
    model = _fresh_model(config)
    before = {v.path: np.array(v) for v in model.non_trainable_weights if "power_iteration" in v.path}
    assert convert.assign_state_dict(model, saved["state_dict"]) == 380
    state = saved["state_dict"]
    stem = model.stem
    np.testing.assert_array_equal(np.array(stem.kernel), state["stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.array(stem.log_weight_norm), state["stem.log_weight_norm"][:, 0, 0, 0])
    dw = model.latent_groups[1].cells[0].branch[0].depthwise  # dec_tower: 0 combiner, 1 up cell, 2 this cell
    np.testing.assert_array_equal(np.array(dw.kernel), state["dec_tower.2._ops.0.conv.2.conv.0.weight"]
                                  .transpose(2, 3, 0, 1))
    se = model.preprocess[0].se.squeeze
    np.testing.assert_array_equal(np.array(se.kernel), state["pre_process.0.se.se.0.weight"].T)
    bn = model.postprocess[0].branch[0].bn_out
    np.testing.assert_array_equal(np.array(bn.moving_variance), state["post_process.0._ops.0.conv.5.bn.running_var"])
    np.testing.assert_array_equal(np.array(model.prior_ftr0), state["prior_ftr0"].transpose(1, 2, 0))
    for v in model.non_trainable_weights:
        if v.path in before:
            np.testing.assert_array_equal(np.array(v), before[v.path])


# ------------------------------------------------------------------ what the converted model computes
def _model_input(name, images, config):
    """What the converted model reads for the fixture's images (uint8 NHWC; binary digits padded to 32x32 as
    the reference's loader does, 0/1 as 0/255)."""
    if config.decoder == "bernoulli":
        return np.pad(images.astype(np.uint8) * 255, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return images


@pytest.fixture(scope="module", params=["rgb32", "binary32"])
def converted(request, tmp_path_factory):
    """The fixture checkpoint converted into a run directory by `convert.convert`, and the model read back from
    that directory as `evaluate` reads it."""
    tensorflow_backend()
    from nvae_tf import convert, runs
    name = request.param
    model_dir = str(tmp_path_factory.mktemp(f"converted_{name}") / "run")
    lines = []
    convert.convert(reference_file(f"ckpt_{name}.pt"), model_dir, log=lines.append)
    config, model, path = runs.load_model(model_dir)
    expected = dict(np.load(reference_file(f"expected_{name}.npz")))
    return name, config, model, path, expected, lines


def _assert_terms(terms, expected, prefix):
    np.testing.assert_allclose(np.array(terms.recon_log_prob), expected[prefix + "recon_log_prob"], rtol=1e-4)
    for key in ("kl", "log_q", "log_p"):
        np.testing.assert_allclose(np.array(getattr(terms, key)), expected[prefix + key], rtol=1e-4, err_msg=key)
    logits = np.transpose(np.array(terms.decoder_params[0]), (2, 0, 1))
    np.testing.assert_allclose(logits, expected[prefix + "decoder_logits_0"], rtol=1e-4, atol=1e-5)


def test_converted_run_is_at_the_checkpoint_step_and_records_its_source(converted):
    name, config, _, path, _, lines = converted
    assert os.path.basename(path) == "ckpt-200"
    with open(os.path.join(os.path.dirname(os.path.dirname(path)), "converted_from.json")) as f:
        source = json.load(f)
    assert source["global_step"] == 200 and source["state_dict_entries"] == {"rgb32": 608, "binary32": 380}[name]
    assert any("used all" in line for line in lines)


def test_eval_mode_terms_equal_the_reference(converted):
    from nvae_tf.model.distributions import ZeroNoise
    name, config, model, _, expected, _ = converted
    images = _model_input(name, expected["images"], config)
    terms = model(images, training=False, noise=ZeroNoise())
    _assert_terms(terms, expected, "")
    np.testing.assert_allclose(np.sum(np.array(terms.log_q), axis=1), expected["log_q_total"], rtol=1e-4)
    np.testing.assert_allclose(np.sum(np.array(terms.log_p), axis=1), expected["log_p_total"], rtol=1e-4)


def test_prior_sample_with_zero_noise_equals_the_reference(converted):
    from nvae_tf.model.distributions import ZeroNoise
    name, config, model, _, expected, _ = converted
    params = model.prior_decoder_params(1, temperature=1.0, noise=ZeroNoise())
    np.testing.assert_allclose(np.transpose(np.array(params[0]), (2, 0, 1)), expected["prior_logits_0"],
                               rtol=1e-4, atol=1e-5)
    mean = model.decode_pixels(params, mode="mean")
    np.testing.assert_allclose(np.transpose(np.array(mean), (0, 3, 1, 2)), expected["prior_mean_image"],
                               rtol=1e-4, atol=1e-5)


def test_training_mode_terms_and_bn_update_equal_the_reference(converted):
    """Training mode (batch statistics) on the 8 images as one batch. The reference's running variance takes
    the unbiased batch variance, ours the biased one (README, differences): ours must be the reference's with
    the batch variance times (n - 1) / n, n the values per channel."""
    from nvae_tf.model.distributions import ZeroNoise
    name, config, model, _, expected, _ = converted
    assert expected["train_mode_bn_key"] == "pre_process.0._ops.0.bn_act."
    bn = model.preprocess[0].branch[0].bn
    np.testing.assert_allclose(np.array(bn.moving_mean), expected["train_mode_bn_running_mean_before"], rtol=1e-6)
    np.testing.assert_allclose(np.array(bn.moving_variance), expected["train_mode_bn_running_var_before"], rtol=1e-6)
    copy_weights = [np.array(v) for v in model.weights]
    try:
        images = _model_input(name, expected["images"], config)
        _assert_terms(model(images, training=True, noise=ZeroNoise()), expected, "train_mode_")
        np.testing.assert_allclose(np.array(bn.moving_mean), expected["train_mode_bn_running_mean_after"],
                                   rtol=1e-4, atol=1e-6)
        before, after = expected["train_mode_bn_running_var_before"], expected["train_mode_bn_running_var_after"]
        unbiased = (after - 0.95 * before) / 0.05
        n = len(images) * config.image_size ** 2
        np.testing.assert_allclose(np.array(bn.moving_variance), 0.95 * before + 0.05 * unbiased * (n - 1) / n,
                                   rtol=1e-4)
    finally:
        for v, value in zip(model.weights, copy_weights):
            v.assign(value)


# -------------------------------------------------------------------------------- the command lines
@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """`python -m nvae_tf.convert` on both fixtures and on the error cases, side by side."""
    base = tmp_path_factory.mktemp("convert_cli")
    existing = base / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    evil = base / "evil.pt"
    _zip_checkpoint(evil, pickle.dumps({"args": _RunsCode(base / "pwned")}, protocol=2))
    commands = {
        "binary32": [f"--checkpoint={reference_file('ckpt_binary32.pt')}", f"--model_dir={base / 'binary32'}"],
        "missing": [f"--checkpoint={base / 'nope.pt'}", f"--model_dir={base / 'missing_run'}"],
        "existing": [f"--checkpoint={reference_file('ckpt_binary32.pt')}", f"--model_dir={existing}"],
        "evil": [f"--checkpoint={evil}", f"--model_dir={base / 'evil_run'}"],
        "no_checkpoint_flag": [f"--model_dir={base / 'x'}"],
    }
    return base, run_side_by_side("nvae_tf.convert", commands)


def test_cli_converts_and_says_what_to_do_next(cli_runs):
    base, results = cli_runs
    r = results["binary32"]
    assert r.rc == 0, r.stderr[-3000:]
    assert "converted" in r.stdout and "ckpt-200" in r.stdout and "nvae_tf.evaluate" in r.stdout
    assert "[nvae_tf] reading" in r.stderr and "used all 380 entries" in r.stderr
    assert "Traceback" not in r.stderr
    assert os.path.exists(base / "binary32" / "config.json")


@pytest.mark.parametrize("case, expected", [
    ("missing", ["nope.pt: no such file"]),
    ("existing", ["--model_dir", "already holds a run"]),
    ("evil", ["posix.system" if os.name == "posix" else ".system", "not allowed"]),
    ("no_checkpoint_flag", ["--checkpoint is required"]),
])
def test_cli_errors_are_one_line(cli_runs, case, expected):
    base, results = cli_runs
    assert_cli_error(results[case], expected)
    assert not (base / "pwned").exists()
    assert not (base / "missing_run").exists() and not (base / "evil_run").exists()
    assert (base / "existing" / "config.json").read_text() == "{}"


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system: too small for the binary32 checkpoint (1.6 MB)."""
    yield from small_tmpfs(tmp_path, "1m")


def test_a_full_disk_gives_one_line_and_leaves_nothing_behind(small_disk):
    result = run_side_by_side("nvae_tf.convert", {"full": [f"--checkpoint={reference_file('ckpt_binary32.pt')}",
                                                           f"--model_dir={small_disk / 'run'}"]})["full"]
    assert_cli_error(result, [f"--model_dir: cannot write {small_disk / 'run'}", "nothing was written"])
    assert os.listdir(small_disk) == []


def test_converted_run_evaluates_samples_and_exports(cli_runs, tmp_path):
    """The converted binary32 run through `evaluate --num_iw_samples=4` (on TFDS's mock MNIST, in process: no
    dataset can be downloaded here), and `sample` and `export` as command lines."""
    tensorflow_backend()
    import tensorflow_datasets as tfds

    from nvae_tf import evaluate
    from nvae_tf.options import EvaluateOptions
    base, results = cli_runs
    assert results["binary32"].rc == 0, results["binary32"].stderr[-3000:]
    model_dir = str(tmp_path / "run")
    shutil.copytree(base / "binary32", model_dir)
    commands = {
        "sample": [f"--model_dir={model_dir}", f"--out={tmp_path / 'samples.png'}", "--num_samples=4",
                   "--mode=temperatures", "--temperatures=0.6,1.0"],
        "export": [f"--model_dir={model_dir}", f"--export_dir={tmp_path / 'export'}"],
    }
    sample = run_side_by_side("nvae_tf.sample", {"sample": commands["sample"]}, workers=1)["sample"]
    export = run_side_by_side("nvae_tf.export", {"export": commands["export"]}, workers=1, timeout=400)["export"]
    with tfds.testing.mock_data(num_examples=8):
        result = evaluate.run(EvaluateOptions(model_dir=model_dir, num_iw_samples=4, max_images=8, batch_size=4),
                              progress=False)
    assert sample.rc == 0, sample.stderr[-3000:]
    import tensorflow as tf
    grid = tf.io.decode_png(tf.io.read_file(str(tmp_path / "samples.png"))).numpy()
    assert grid.shape[0] >= 2 * 32 and grid.shape[1] >= 4 * 32  # two rows of four 32x32 samples
    assert export.rc == 0, export.stderr[-3000:]
    version = tmp_path / "export" / "1"
    assert (version / "saved_model.pb").exists()
    assert any(f.endswith(".tflite") for _, _, files in os.walk(tmp_path / "export") for f in files)
    assert result["num_images"] == 8 and result["num_iw_samples"] == 4
    assert np.isfinite(result["nll_nats"]) and result["nll_nats"] > 0
    assert result["dataset"] == "mnist"
    with open(os.path.join(model_dir, "eval_validation.json")) as f:
        assert json.load(f)["num_images"] == 8
