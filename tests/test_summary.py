"""`python -m nvae_tf.summary` against the reference structure of spec section 6."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def latent_shapes(top, groups_top_to_bottom, nz=20):
    shapes = []
    for j, n in enumerate(groups_top_to_bottom):
        shapes += [[top * 2 ** j, top * 2 ** j, nz]] * n
    return shapes


# Spec section 6, "Shapes and totals": parameters, conv / BN layers, groups per scale (high -> low resolution).
PAPER = {
    "mnist": (33_363_134, 255, 214, [10, 5], latent_shapes(4, [5, 10])),
    "cifar10": (130_852_480, 610, 364, [30], latent_shapes(16, [30])),
    "celeba64": (153_281_364, 730, 436, [20, 10, 5], latent_shapes(8, [5, 10, 20])),
    "imagenet32": (268_509_444, 570, 340, [28], latent_shapes(16, [28])),
    "celebahq": (330_798_664, 986, 460, [16, 8, 4, 4, 4], latent_shapes(8, [4, 4, 4, 8, 16])),
    "ffhq": (330_798_664, 986, 460, [16, 8, 4, 4, 4], latent_shapes(8, [4, 4, 4, 8, 16])),
}


def run_summary(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "nvae_tf.summary", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PAPER))
def test_summary_json_of_paper_configs_equals_the_reference_structure(name):
    result = run_summary(f"--flagfile=configs/{name}.flags", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    parameters, convs, bns, groups, shapes = PAPER[name]
    assert info["parameters"] == parameters
    assert info["conv_layers"] == convs
    assert info["batchnorm_layers"] == bns
    assert info["groups_per_scale"] == groups
    assert info["latent_shapes"] == shapes
    assert f"{parameters:,}" in result.stdout  # the human-readable part


def test_summary_without_json_prints_a_table_and_no_json():
    result = run_summary("--flagfile=configs/tiny.flags")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parameters" in result.stdout and "latent shapes" in result.stdout
    assert not result.stdout.strip().splitlines()[-1].startswith("{")


@pytest.mark.parametrize("flag, message", [
    ("--num_groups_per_scale=0", "--num_groups_per_scale: must be at least 1"),
    ("--image_size=18", "--image_size: 18 is not divisible by the total down-sampling"),
])
def test_summary_rejects_an_invalid_config_naming_the_flag(flag, message):
    result = run_summary("--flagfile=configs/tiny.flags", flag)
    assert result.returncode != 0
    assert message in result.stderr


def test_summary_rejects_an_unknown_dataset_naming_it():
    result = run_summary("--dataset=svhn")
    assert result.returncode != 0
    assert "svhn" in result.stderr and "dataset" in result.stderr
