"""The command lines: flags generated from the option dataclasses, a readable --help, a quiet console, and the
layering of the package (commands on a runtime on a backend-neutral model)."""

import ast
import dataclasses
import os
import subprocess
import sys

import pytest
from absl import flags

from conftest import CONFIGS, child_env
import nvae_tf
from nvae_tf import config as config_lib
from nvae_tf import options

ROOT = os.path.dirname(CONFIGS)
PACKAGE = os.path.join(ROOT, "nvae_tf")
COMMANDS = {"train": [config_lib.NVAEConfig, options.TrainOptions],
            "evaluate": [options.EvaluateOptions],
            "sample": [options.SampleOptions],
            "export": [options.ExportOptions],
            "data": [config_lib.NVAEConfig, options.InspectOptions],
            "summary": [config_lib.NVAEConfig, options.SummaryOptions]}
COMMAND_MODULES = set(COMMANDS)


def run_module(module, *args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env or child_env(),
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------ options and flags
@pytest.mark.parametrize("cls", [options.TrainOptions, options.EvaluateOptions, options.SampleOptions,
                                 options.ExportOptions, options.InspectOptions, config_lib.NVAEConfig])
def test_every_field_is_a_flag_that_reads_back_into_the_dataclass(cls):
    fv = flags.FlagValues()
    options.define_flags(cls, fv)
    fields = options.fields(cls)
    assert {f.name for f in fields} <= set(fv)
    args = []
    for f in fields:
        if f.metadata["choices"]:
            args.append(f"--{f.name}={f.metadata['choices'][-1]}")
        elif f.type in (bool, "bool"):
            args.append(f"--{'no' if f.default else ''}{f.name}")
        elif f.type in (int, "int") and f.name not in ("image_size",):
            args.append(f"--{f.name}={(f.metadata['minimum'] or 0) + 3}")
        elif f.metadata["required"]:
            args.append(f"--{f.name}=/{f.name}")
    fv(["prog", *args])
    if cls is config_lib.NVAEConfig:
        return  # the flag values of a config are checked by its own tests (test_config.py)
    opts = options.from_flags(cls, fv)
    for f in fields:
        if f.metadata["choices"]:
            assert getattr(opts, f.name) == f.metadata["choices"][-1], f.name
        elif f.type in (bool, "bool"):
            assert getattr(opts, f.name) is (not f.default), f.name
        elif f.type in (int, "int"):
            assert getattr(opts, f.name) == (f.metadata["minimum"] or 0) + 3, f.name
        elif f.metadata["required"]:
            assert getattr(opts, f.name) == f"/{f.name}", f.name
    assert options.check(opts) is opts


def test_check_names_the_flag_below_its_minimum_and_the_missing_required_one():
    with pytest.raises(config_lib.ConfigError, match=r"--keep_checkpoints: must be >= 1, got 0"):
        options.check(options.TrainOptions(model_dir="/m", keep_checkpoints=0))
    with pytest.raises(config_lib.ConfigError, match=r"--bn_batch: must be >= 2, got 1"):
        options.check(options.SampleOptions(model_dir="/m", bn_batch=1))
    from nvae_tf.errors import RunError
    with pytest.raises(RunError, match="--export_dir is required"):
        options.check(options.ExportOptions(model_dir="/m"))
    assert options.check(options.EvaluateOptions(model_dir="/m", num_iw_samples=1)).num_iw_samples == 1


def test_structural_fields_are_the_model_and_data_fields_of_the_config():
    structural = set(config_lib.structural_fields())
    groups = {f.name: f.metadata["group"] for f in dataclasses.fields(config_lib.NVAEConfig)}
    compatibility = {"flow_elu_twice", "reference_logistic", "pixel_temperature"}  # change no weight
    assert structural == {name for name, group in groups.items() if group in ("data", "model")} - compatibility
    assert {groups[name] for name in compatibility} == {"model"}
    # Training hyperparameters can change on resume; the architecture cannot.
    assert {"batch_size", "epochs", "learning_rate", "seed"}.isdisjoint(structural)
    assert {"num_channels_enc", "num_latent_scales", "num_nf", "num_x_bits", "dataset"} <= structural


# --------------------------------------------------------------------------------------------------- help
@pytest.fixture(scope="module")
def helps():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(COMMANDS, pool.map(lambda c: run_module(f"nvae_tf.{c}", "--help"), COMMANDS)))
    return results


def test_help_lists_every_option_of_the_command_grouped_and_nothing_of_absl(helps):
    for command, classes in COMMANDS.items():
        r = helps[command]
        assert r.returncode == 0, (command, r.stderr[-2000:])
        text = r.stdout
        for cls in classes:
            for f in options.fields(cls):
                assert f"--{f.name}" in text or f"--[no]{f.name}" in text, (command, f.name)
        assert "--logtostderr" not in text and "--only_check_args" not in text, command
        assert "Traceback" not in r.stderr
    train = helps["train"].stdout
    assert [line for line in train.splitlines() if line.endswith(":") and not line.startswith(" ")] == \
        ["data:", "model:", "training:", "run:"]
    for flag in ("dataset", "data_dir", "model_dir", "epochs", "batch_size", "learning_rate", "precision"):
        assert f"--{flag}=" in train, flag
    assert len(train.splitlines()) < 100


def test_helpfull_still_lists_absl_flags():
    r = run_module("nvae_tf.sample", "--helpfull")
    assert r.returncode == 0
    assert "logtostderr" in r.stdout and "--temperature:" in r.stdout


def test_unknown_flag_and_stray_argument_are_one_error_line():
    bad = run_module("nvae_tf.sample", "--model_dir=/nowhere", "--temprature=0.5")
    assert bad.returncode == 2 and bad.stderr.startswith("error: Unknown command line flag 'temprature'")
    stray = run_module("nvae_tf.evaluate", "--model_dir=/nowhere", "extra")
    assert stray.returncode == 2 and "error: unexpected arguments: extra" in stray.stderr
    for r in (bad, stray):
        assert "Traceback" not in r.stderr


INTERRUPTED_RUNS = {  # what a command's run raises -> exit code, last line of stderr
    "interrupt": ("raise KeyboardInterrupt", 130, "interrupted: demo stopped before it finished"),
    # TensorFlow leaving a graph context mid-way turns Ctrl-C into another error raised while handling it.
    "interrupt_turned_into_another_error": (
        "try:\n        raise KeyboardInterrupt\n    except KeyboardInterrupt:\n        raise AssertionError('nesting')",
        130, "interrupted: demo stopped before it finished"),
    "another_error": ("raise AssertionError('a bug')", 1, "AssertionError: a bug"),
    # Ctrl-C landing in a `__del__` (TensorFlow frees graph functions there): Python would only print it and go on.
    "interrupt_in_a_destructor": (
        "class Freed:\n        def __del__(self):\n            raise KeyboardInterrupt\n    Freed()\n"
        "    import time\n    time.sleep(5)\n    print('went on after the interrupt')",
        130, "interrupted: demo stopped before it finished"),
}


@pytest.mark.parametrize("case", sorted(INTERRUPTED_RUNS))
def test_ctrl_c_is_one_line_and_exit_130_even_when_turned_into_another_error(case):
    body, rc, last = INTERRUPTED_RUNS[case]
    script = f"from nvae_tf import cli\ndef run(fv):\n    {body}\ncli.main('demo', 'doc', [], run)\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(CONFIGS), env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == rc, r.stderr
    assert r.stderr.strip().splitlines()[-1] == last, r.stderr
    assert ("Traceback" in r.stderr) == (rc != 130), r.stderr  # a bug keeps its traceback
    assert "Exception ignored" not in r.stderr and "went on" not in r.stdout, (r.stdout, r.stderr)


# ------------------------------------------------------------------------------------------------ console
START_UP = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
            "I0000 00:00:1795821954.276210   21362 port.cc:153] oneDNN custom operations are on.\n",
            "W0000 00:00:1795821954.276210   21362 some.cc:12] a warning\n",
            "E1127 23:29:01.123456   21362 other.cc:7] an error\n",
            "/x/y.py:3: DeprecationWarning: a Python warning\n",
            "I0000 is not a log line\n"]


@pytest.mark.parametrize("level,kept", [(0, [0, 1, 2, 3, 4, 5]), (1, [2, 3, 4, 5]), (2, [3, 4, 5]), (3, [4, 5])])
def test_tensorflows_start_up_lines_below_the_level_are_held_back_and_the_rest_passed_on(capfd, level, kept):
    """What TensorFlow prints while it loads, before its logging reads TF_CPP_MIN_LOG_LEVEL, filtered as that
    level would: absl's notice and INFO lines from 1, WARNING lines from 2, ERROR lines from 3; anything that
    is not a C++ log line is passed on, in order, also when the import fails."""
    from nvae_tf import _quiet
    with _quiet.held_back_stderr(level):
        for line in START_UP:
            os.write(2, line.encode())
        assert capfd.readouterr().err == ""  # held back while inside
    assert capfd.readouterr().err == "".join(START_UP[i] for i in kept)
    with pytest.raises(ImportError, match="no such module"):
        with _quiet.held_back_stderr(level):
            os.write(2, (START_UP[1] + START_UP[4]).encode())
            raise ImportError("no such module")
    assert capfd.readouterr().err == (START_UP[4] if level >= 1 else START_UP[1] + START_UP[4])
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # the stderr descriptor is back


def test_console_is_quiet_by_default_and_verbose_brings_tensorflow_back():
    env = {k: v for k, v in child_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    args = [f"--flagfile={CONFIGS}/tiny.flags"]
    quiet = run_module("nvae_tf.summary", *args, env=env)
    verbose = run_module("nvae_tf.summary", *args, "--verbose", env=env)
    own_level = run_module("nvae_tf.summary", *args, env={**env, "TF_CPP_MIN_LOG_LEVEL": "0"})
    for r in (quiet, verbose, own_level):
        assert r.returncode == 0, r.stderr[-2000:]
        assert "parameters" in r.stdout
    # TensorFlow's start-up banner (its CPU feature notice) is a C++ INFO line.
    assert "cpu_feature_guard" not in quiet.stderr and "absl::InitializeLog" not in quiet.stderr, quiet.stderr
    assert quiet.stderr.strip() == "", quiet.stderr
    assert "cpu_feature_guard" in verbose.stderr
    assert "cpu_feature_guard" in own_level.stderr


# ------------------------------------------------------------------------------------------------ layering
def imported_modules(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_command_imports_another_and_the_library_imports_no_command():
    for name in os.listdir(PACKAGE):
        if not name.endswith(".py") or name == "__init__.py":
            continue
        module = name[:-3]
        imported = {m.split(".")[1] for m in imported_modules(os.path.join(PACKAGE, name))
                    if m.startswith("nvae_tf.") and m.count(".") >= 1}
        others = (COMMAND_MODULES - {module, "data"}) & imported
        assert not others, (module, others)


def test_the_model_package_imports_no_tensorflow():
    model_dir = os.path.join(PACKAGE, "model")
    for name in os.listdir(model_dir):
        if name.endswith(".py"):
            imported = imported_modules(os.path.join(model_dir, name))
            assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in imported), name
            assert not any(m.startswith("nvae_tf.") and not m.startswith(("nvae_tf.model", "nvae_tf.config"))
                           for m in imported), (name, imported)


def test_commands_import_tensorflow_without_scikit_learn_which_stays_importable():
    script = ("import sys\n"
              "from nvae_tf import cli\n"
              "cli.hide_scikit_learn_from_keras()\n"
              "print('tensorflow' in sys.modules)\n"
              "import keras, tensorflow\n"
              "print('sklearn' in sys.modules)\n"
              "from sklearn.svm import SVC\n"
              "print(SVC.__name__)\n")
    r = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "False", "SVC"], r.stdout


# ------------------------------------------------------------------------------------ oneDNN kernels
ONEDNN_PROBE = """
import dataclasses, json, os, sys
import nvae_tf
from nvae_tf.config import from_flagfile
for flagfile, batch, deterministic, user in json.loads(sys.argv[1]):
    os.environ.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if user is not None:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = user
    config = dataclasses.replace(from_flagfile(flagfile), batch_size=batch)
    caveat = nvae_tf.choose_cpu_kernels(config, deterministic)
    print(json.dumps([os.environ.get("TF_ENABLE_ONEDNN_OPTS"), caveat]))
import tensorflow
from tensorflow.python.util import _pywrap_util_port as port
print(json.dumps(port.IsMklEnabled()))
"""


def python_without_kernel_setting(script, *args):
    """stdout of `python -c script args` in an environment without TF_ENABLE_ONEDNN_OPTS; it must succeed."""
    environ = {k: v for k, v in child_env().items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    r = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=environ, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def onednn_probe(*cases):
    """[(TF_ENABLE_ONEDNN_OPTS after the choice, caveat) per case], then whether TensorFlow, imported after the last
    case, runs oneDNN's kernels."""
    import json
    lines = [json.loads(line) for line in python_without_kernel_setting(ONEDNN_PROBE, json.dumps(cases)).splitlines()]
    return [tuple(x) for x in lines[:-1]], lines[-1]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="nvae_tf chooses the kernels on x86-64 only")
def test_large_models_get_onednn_kernels_small_ones_tensorflows_default_deterministic_runs_none():
    digits, mnist = os.path.join(CONFIGS, "digits.flags"), os.path.join(CONFIGS, "mnist.flags")
    # batch x 16 x 16 pixels x 16 encoder channels against 2^18: from batch 64 on
    assert nvae_tf.ONEDNN_MIN_ELEMENTS == 64 * 16 * 16 * 16
    chosen, mkl = onednn_probe([digits, 63, False, None], [digits, 64, False, None], [mnist, 200, False, None])
    assert chosen == [(None, None), ("1", None), ("1", None)]
    assert mkl is True
    # oneDNN's kernels differ from run to run on some CPUs: a deterministic run goes without them
    chosen, mkl = onednn_probe([mnist, 200, False, "0"], [mnist, 200, True, None])
    assert chosen == [("0", None), ("0", None)]
    assert mkl is False
    # ... unless the user asked for them, which is said
    (setting, caveat), = onednn_probe([digits, 8, True, "1"])[0]
    assert setting == "1"
    assert caveat.startswith("--deterministic: TF_ENABLE_ONEDNN_OPTS=1: oneDNN's kernels may differ"), caveat
    # a value TensorFlow does not read is named; TensorFlow's default stands, whatever the model
    chosen, mkl = onednn_probe([mnist, 200, False, "0"], [mnist, 200, True, "TRUE"], [mnist, 200, False, "yes"])
    assert [setting for setting, _ in chosen] == ["0", "TRUE", "yes"]
    assert chosen[0][1] is None and chosen[1][1].startswith("--deterministic: TF_ENABLE_ONEDNN_OPTS=TRUE")
    assert chosen[2][1] == ("TF_ENABLE_ONEDNN_OPTS='yes' is not one of 0, 1, true, false: TensorFlow ignores it "
                            "and uses its default kernels"), chosen
    assert mkl is onednn_probe([digits, 8, False, None])[1]  # TensorFlow's default on this CPU


def test_the_kernels_are_not_chosen_once_tensorflow_is_imported():
    script = ("import os, nvae_tf, tensorflow\n"
              "from nvae_tf.config import from_flagfile\n"
              "print(nvae_tf.choose_cpu_kernels(from_flagfile('configs/mnist.flags')),"
              " os.environ.get('TF_ENABLE_ONEDNN_OPTS'))\n")
    out = python_without_kernel_setting(script)
    assert out.split() == ["None", "None"], out


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="nvae_tf chooses the kernels on x86-64 only")
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_choose_the_kernels_before_tensorflow_is_imported(tmp_path, command):
    """The command calls `choose_cpu_kernels` while TensorFlow is still unimported, so the choice takes effect."""
    script = """
import os, sys
import nvae_tf
from nvae_tf import evaluate, runs, train
from nvae_tf.config import from_flagfile
from nvae_tf.options import EvaluateOptions, TrainOptions
choose = nvae_tf.choose_cpu_kernels
def spy(config, deterministic=False):
    imported = "tensorflow" in sys.modules
    choose(config, deterministic)
    print(imported, os.environ.get("TF_ENABLE_ONEDNN_OPTS"))
    sys.exit(0)
nvae_tf.choose_cpu_kernels = spy
config, run_dir = from_flagfile("configs/mnist.flags"), sys.argv[2]
if sys.argv[1] == "train":
    train.run(config, TrainOptions(model_dir=run_dir))
else:
    runs.write_config(run_dir, config)
    evaluate.run(EvaluateOptions(model_dir=run_dir))
"""
    out = python_without_kernel_setting(script, command, str(tmp_path / "run"))
    assert out.split() == ["False", "1"], out
