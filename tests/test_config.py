"""Configuration: the paper flagfiles carry the spec section 6 settings, derived structure (groups per scale,
latent shapes, data dims), validation errors that name the flag, JSON round trips and absl flag parsing."""

import dataclasses
import json
import os

import pytest
from absl import flags
from conftest import CONFIGS, load_flagfile

from nvae_tf import config as config_lib
from nvae_tf.config import ConfigError, NVAEConfig

# Spec section 6, one row per README run. "groups" is the spec's top (lowest resolution) -> bottom list;
# "z_res" the latent resolutions top -> bottom; "N" and "z0" from the shapes table.
PAPER = {
    "mnist": dict(image_size=32, bits=None, batch=200, epochs=400, channels=32, P=2, cells=3, L=2,
                  groups=[5, 10], z_res=[4, 8], nf=0, wdn=1e-2, anneal=False, wdn_init=None, lr=1e-2,
                  warmup=5, N=15, data_dims=784),
    "cifar10": dict(image_size=32, bits=8, batch=32, epochs=400, channels=128, P=1, cells=2, L=1,
                    groups=[30], z_res=[16], nf=1, wdn=1e-2, anneal=False, wdn_init=None, lr=1e-2,
                    warmup=5, N=30, data_dims=3072),
    "celeba64": dict(image_size=64, bits=8, batch=16, epochs=90, channels=64, P=1, cells=2, L=3,
                     groups=[5, 10, 20], z_res=[8, 16, 32], nf=1, wdn=1e-1, anneal=False, wdn_init=None,
                     lr=1e-2, warmup=5, N=35, data_dims=12288),
    "imagenet32": dict(image_size=32, bits=8, batch=24, epochs=45, channels=192, P=1, cells=2, L=1,
                       groups=[28], z_res=[16], nf=1, wdn=1e-2, anneal=True, wdn_init=1.0, lr=1e-2,
                       warmup=1, N=28, data_dims=3072),
    "celebahq": dict(image_size=256, bits=5, batch=4, epochs=300, channels=30, P=1, cells=2, L=5,
                     groups=[4, 4, 4, 8, 16], z_res=[8, 16, 32, 64, 128], nf=2, wdn=1e-2, anneal=True,
                     wdn_init=1.0, lr=1e-2, warmup=5, N=36, data_dims=196608),
    "ffhq": dict(image_size=256, bits=5, batch=4, epochs=200, channels=30, P=1, cells=2, L=5,
                 groups=[4, 4, 4, 8, 16], z_res=[8, 16, 32, 64, 128], nf=2, wdn=1e-1, anneal=True,
                 wdn_init=1.0, lr=8e-3, warmup=5, N=36, data_dims=196608),
}
# "groups per scale (high -> low res)" column of the shapes table.
GROUPS_PER_SCALE = {"mnist": [10, 5], "cifar10": [30], "celeba64": [20, 10, 5], "imagenet32": [28],
                    "celebahq": [16, 8, 4, 4, 4], "ffhq": [16, 8, 4, 4, 4]}
NZ = 20


@pytest.fixture(scope="module")
def paper_configs():
    return {name: load_flagfile(name) for name in PAPER}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_flagfile_matches_spec_table(name, paper_configs):
    c, row = paper_configs[name], PAPER[name]
    assert c.dataset == name
    assert c.image_size == row["image_size"]
    if row["bits"] is None:
        assert c.dataset_info.binary  # MNIST: binarised, Bernoulli decoder
        assert c.image_channels == 1
    else:
        assert c.num_x_bits == row["bits"]
        assert not c.dataset_info.binary and c.image_channels == 3
    assert c.batch_size == row["batch"]
    assert c.epochs == row["epochs"]
    assert c.num_channels_enc == c.num_channels_dec == row["channels"]
    assert c.num_preprocess_blocks == c.num_postprocess_blocks == row["P"]
    assert c.num_preprocess_cells == c.num_postprocess_cells == row["cells"]
    assert c.num_latent_scales == row["L"]
    assert c.num_nf == row["nf"]
    assert c.weight_decay_norm == pytest.approx(row["wdn"])
    assert c.weight_decay_norm_anneal == row["anneal"]
    if row["anneal"]:
        assert c.weight_decay_norm_init == pytest.approx(row["wdn_init"])
    assert c.learning_rate == pytest.approx(row["lr"])
    assert c.warmup_epochs == row["warmup"]
    # Shared by every run.
    assert c.num_latent_per_group == NZ
    assert c.num_cell_per_cond_enc == c.num_cell_per_cond_dec == 2
    assert c.use_se and c.res_dist
    assert c.learning_rate_min == pytest.approx(1e-4)
    assert c.weight_decay == pytest.approx(3e-4)
    assert c.kl_anneal_portion == pytest.approx(0.3)
    assert c.kl_const_portion == pytest.approx(1e-4)
    assert c.kl_const_coeff == pytest.approx(1e-4)
    assert c.num_mixture_dec == 10


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_structure(name, paper_configs):
    c, row = paper_configs[name], PAPER[name]
    assert c.groups_per_scale == GROUPS_PER_SCALE[name]
    assert list(reversed(c.groups_per_scale)) == row["groups"]
    assert c.num_groups == row["N"]
    expected = [(r, r, NZ) for r, n in zip(row["z_res"], row["groups"]) for _ in range(n)]
    assert [tuple(s) for s in c.latent_shapes] == expected
    assert len(c.latent_shapes) == row["N"]
    assert c.data_dims == row["data_dims"]
    # z0 resolution = H / 2^(P + L - 1).
    assert c.latent_shapes[0][0] == row["image_size"] // 2 ** (row["P"] + row["L"] - 1)


def test_groups_per_scale_ada_rule():
    # n_{s+1} = max(min_groups, floor(n_s / 2)) with --ada_groups, else constant (spec section 1.1).
    c = load_flagfile("celebahq", num_groups_per_scale=10, min_groups_per_scale=3)
    assert c.groups_per_scale == [10, 5, 3, 3, 3]
    c = load_flagfile("celebahq", ada_groups=False, num_groups_per_scale=3)
    assert c.groups_per_scale == [3] * 5
    c = load_flagfile("celeba64", num_groups_per_scale=7, min_groups_per_scale=1)
    assert c.groups_per_scale == [7, 3, 1]


# ---------------------------------------------------------------------------------------------- errors
def _cifar(**overrides):
    values = load_flagfile("cifar10").to_dict()
    values.update(overrides)
    return NVAEConfig(**values)


@pytest.mark.parametrize("overrides,flag", [
    # 32 / 2^(1 + 6 - 1) is not an integer.
    (dict(num_latent_scales=6), "image_size"),
    (dict(dataset="folder", image_size=36, num_latent_scales=3), "image_size"),  # 36 % 2^3 != 0
    (dict(num_groups_per_scale=0), "num_groups_per_scale"),
    (dict(dataset="svhn"), "dataset"),
    (dict(num_x_bits=0), "num_x_bits"),
    (dict(num_x_bits=9), "num_x_bits"),
    (dict(dataset="folder", image_size=0), "image_size"),
    (dict(image_size=64), "image_size"),  # CIFAR-10 images are 32x32
    (dict(dataset="celebahq", image_size=128, num_latent_scales=3), "image_size"),
])
def test_invalid_config_names_the_flag(overrides, flag):
    with pytest.raises(ConfigError) as err:
        _cifar(**overrides)
    assert flag in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("overrides", [
    dict(weight_decay_norm=0.0), dict(weight_decay_norm_init=0.0), dict(weight_decay_norm_init=-1.0),
    dict(weight_decay_norm=0.0, weight_decay_norm_init=0.0)])
def test_weight_decay_norm_anneal_needs_positive_values(overrides):
    with pytest.raises(ConfigError) as err:
        _cifar(weight_decay_norm_anneal=True, **overrides)
    assert "weight_decay_norm" in str(err.value)
    # The same values are fine without the log-linear anneal.
    _cifar(weight_decay_norm_anneal=False, **{k: max(v, 0.0) for k, v in overrides.items()})


def test_folder_dataset_takes_explicit_image_size():
    c = _cifar(dataset="folder", image_size=48, num_latent_scales=2)  # 48 % 4 == 0
    assert c.image_size == 48 and c.image_shape == (48, 48, 3) and c.data_dims == 3 * 48 * 48
    # A fixed dataset fills in its own size.
    assert _cifar(image_size=0).image_size == 32
    # The built-in digits (8x8 originals) are resized to any size, 16 by default.
    for dataset in ("digits", "digits_grey"):
        assert NVAEConfig(dataset=dataset, num_latent_scales=1).image_shape == (16, 16, 1)
        assert NVAEConfig(dataset=dataset, image_size=8, num_latent_scales=1).image_shape == (8, 8, 1)


def test_valid_bit_depths_accepted():
    for bits in (1, 5, 8):
        assert _cifar(num_x_bits=bits).num_x_bits == bits


# ------------------------------------------------------------------------------------------ JSON / dict
@pytest.mark.parametrize("name", list(PAPER) + ["tiny", "folder64"])
def test_json_round_trip(name):
    c = load_flagfile(name)
    text = c.to_json()
    assert json.loads(text) == c.to_dict()
    back = NVAEConfig.from_json(text)
    assert back == c
    assert back.groups_per_scale == c.groups_per_scale and back.latent_shapes == c.latent_shapes


def test_save_and_load(tmp_path):
    c = load_flagfile("celebahq", seed=7)
    path = os.path.join(tmp_path, "config.json")
    c.save(path)
    assert NVAEConfig.load(path) == c


def test_from_dict_rejects_unknown_keys():
    values = load_flagfile("cifar10").to_dict()
    assert NVAEConfig.from_dict(values) == load_flagfile("cifar10")
    with pytest.raises(ValueError) as err:
        NVAEConfig.from_dict({**values, "num_latnet_scales": 2})
    assert "num_latnet_scales" in str(err.value)
    with pytest.raises(ValueError):
        NVAEConfig.from_json(json.dumps({**values, "bogus": 1}))


def test_from_json_validates():
    values = load_flagfile("cifar10").to_dict()
    with pytest.raises(ConfigError) as err:
        NVAEConfig.from_json(json.dumps({**values, "num_x_bits": 9}))
    assert "num_x_bits" in str(err.value)


def test_config_is_frozen():
    c = load_flagfile("cifar10")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.num_nf = 3


# ------------------------------------------------------------------------------------------ absl flags
def test_flag_after_flagfile_overrides_it():
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["prog", f"--flagfile={os.path.join(CONFIGS, 'cifar10.flags')}", "--num_nf=0"])
    assert fv.num_nf == 0
    c = config_lib.from_flags(fv)
    assert c.num_nf == 0
    # The rest still comes from the flagfile.
    assert c.num_channels_enc == 128 and c.num_groups_per_scale == 30 and c.batch_size == 32


def test_every_config_field_is_a_flag_with_its_default():
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    config_lib.define_flags(fv)  # defining twice is harmless
    fv(["prog"])
    defaults = NVAEConfig()
    for f in dataclasses.fields(NVAEConfig):
        assert f.name in fv
    assert config_lib.from_flags(fv) == defaults
    fv2 = flags.FlagValues()
    config_lib.define_flags(fv2)
    with pytest.raises(flags.IllegalFlagValueError):
        fv2(["prog", "--dataset=svhn"])
