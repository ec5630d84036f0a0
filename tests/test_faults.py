"""Faults injected on purpose: non-finite steps, diverging runs, damaged run directories, two trainers on one
directory, bad flags, a full disk, signals, and long evaluations.

Each test breaks something the way a user's run can break and checks that the state that matters (model,
optimiser, schedules, checkpoints) is exactly what it was, and that the user is told in one line what happened.
Command lines run as subprocesses on the small digits NVAE of test_train.py or on the run trained once per
session (conftest.trained_run).
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from conftest import assert_cli_error, child_env, load_flagfile, run_side_by_side, small_tmpfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(num_channels_enc=4, num_channels_dec=4, num_latent_scales=1, num_groups_per_scale=1,
             min_groups_per_scale=1, num_preprocess_cells=1, num_postprocess_cells=1, num_latent_per_group=2)


def train_args(model_dir, *extra, **overrides):
    """Arguments of `python -m nvae_tf.train` on the small digits config."""
    values = {**SMALL, "batch_size": 8, "epochs": 2, "eval_batches": 2, "num_summary_images": 2, **overrides}
    return ["--flagfile=configs/digits.flags", *[f"--{k}={v}" for k, v in values.items()],
            f"--model_dir={model_dir}", *extra]


def checkpoint_steps(model_dir):
    return sorted(int(m.group(1)) for m in (re.match(r"ckpt-(\d+)\.index$", os.path.basename(p))
                                            for p in glob.glob(os.path.join(model_dir, "checkpoints", "*.index")))
                  if m)


def all_finite_checkpoint(prefix):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(prefix)
    values = [reader.get_tensor(name) for name, _ in tf.train.list_variables(prefix)
              if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    floats = [v for v in values if np.asarray(v).dtype.kind == "f"]
    return len(floats) > 100 and all(np.all(np.isfinite(v)) for v in floats)


def warnings_of(stderr):
    return [line for line in stderr.splitlines() if "damaged" in line]


# ===================================================================== 1. a skipped step changes nothing
SKIP_SCRIPT = r'''
import json, sys
from nvae_tf.distribute import split_cpu
if int(sys.argv[3]) > 1:
    split_cpu(int(sys.argv[3]))
import numpy as np
import tensorflow as tf
from nvae_tf import data as data_lib, objective
from nvae_tf.config import from_flagfile
from nvae_tf.distribute import make_strategy
from nvae_tf.options import TrainOptions
from nvae_tf.trainer import Trainer

small, base, replicas, remats = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])


def state(t):
    """Bytes of every copy (one per replica) of every model and optimiser variable, and the schedules."""
    out = {}
    for v in [*t.model.variables, *t.optimizer.variables]:
        for i, copy in enumerate(t.strategy.experimental_local_results(v.value)):
            out[f"{v.path}#{i}"] = np.array(copy.numpy()).tobytes()
    it = t.optimizer.iterations
    out["schedule/learning_rate"] = np.float32(t.schedule(it)).tobytes()
    out["schedule/kl_beta"] = np.float32(objective.kl_coefficient(it, t.config, t.total_steps)).tobytes()
    return out


results = {}
strategy = make_strategy(cpu_replicas=replicas)
assert strategy.num_replicas_in_sync == replicas
for remat in remats:
    if True:
        config = from_flagfile("configs/digits.flags", **small, num_nf=1, batch_size=8 // replicas, epochs=2)
        t = Trainer(config, strategy, data_lib.open_source(config),
                    TrainOptions(model_dir=f"{base}/r{replicas}_{remat}", remat=remat))
        batches = iter(t.distribute(t.source.dataset("train", 8, training=True, deterministic=True, seed=3)))
        t.train_step(next(batches))  # optimiser slots and BN statistics away from their initial values
        bias = t.model.stem.bias
        clean = bias.numpy().copy()
        bias.assign(np.full(clean.shape, np.nan, "float32"))  # the forward pass, loss and gradients become NaN
        counters = (int(t.step.numpy()), int(t.skipped.numpy()))
        before = state(t)
        skipped = t.train_step(next(batches))
        after = state(t)
        bias.assign(clean)
        good_before = state(t)
        applied = t.train_step(next(batches))
        good_after = state(t)
        results[f"{replicas} replicas, remat {remat}"] = dict(
            applied=[bool(skipped["applied"]), bool(applied["applied"])],
            compared=sorted(before), copies=sum(len(t.strategy.experimental_local_results(v.value))
                                                for v in [*t.model.variables, *t.optimizer.variables]),
            changed_by_skip=[k for k in before if before[k] != after[k]],
            changed_by_good_step=[k for k in good_before if good_before[k] != good_after[k]],
            counters=[counters, (int(t.step.numpy()), int(t.skipped.numpy()))],
            schedules=[[float(m["learning_rate"]), float(m["beta"])] for m in (skipped, applied)])
print("RESULT " + json.dumps(results))
'''


@pytest.fixture(scope="module")
def skipped_steps(tmp_path_factory):
    """One NaN step on 1 and 2 replicas (MirroredStrategy on two logical CPUs), with and without remat."""
    from concurrent.futures import ThreadPoolExecutor
    base = tmp_path_factory.mktemp("skip")

    def run(replicas, remats):
        # One strategy per process: MirroredStrategies made one after another in a process can share collective
        # instance keys.
        r = subprocess.run([sys.executable, "-c", SKIP_SCRIPT, json.dumps(SMALL), str(base), str(replicas),
                            json.dumps(remats)], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                           timeout=900)
        lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        assert r.returncode == 0 and lines, r.stderr[-4000:]
        return json.loads(lines[0][len("RESULT "):])

    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda args: run(*args), [(1, [False, True]), (2, [False]), (2, [True])]))
    return {k: v for part in parts for k, v in part.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["1 replicas, remat False", "2 replicas, remat False", "1 replicas, remat True",
                                  "2 replicas, remat True"])
def test_a_skipped_step_leaves_every_variable_and_schedule_bit_identical(skipped_steps, case):
    r = skipped_steps[case]
    assert r["applied"] == [False, True], r["applied"]
    replicas = int(case[0])
    # Every copy of every model and optimiser variable is compared, and the schedules.
    assert len(r["compared"]) == r["copies"] + 2
    for kind in ("moving_mean", "moving_variance", "power_iteration_u", "power_iteration_v",
                 "power_iteration_started", "seed_generator", "nvae_adamax/iteration", "schedule/learning_rate",
                 "schedule/kl_beta"):
        assert any(kind in name for name in r["compared"]), kind
    assert any(name.endswith("#1") for name in r["compared"]) == (replicas == 2)
    assert r["changed_by_skip"] == [], r["changed_by_skip"][:10]
    # The step counter (data position) and the skip counter move; nothing else does.
    step0, skipped0 = r["counters"][0]
    # The step after the skipped one trains with the learning rate and KL weight the skipped one had.
    assert r["schedules"][0] == r["schedules"][1] and r["schedules"][0][0] > 0, r["schedules"]
    assert r["counters"][1] == [step0 + 2, skipped0 + 1]
    # The comparison can see changes: the next (finite) step changes the weights, the optimiser, the BN
    # statistics of every replica, the power iteration, the noise generator and the schedules.
    changed = r["changed_by_good_step"]
    for kind in ("moving_mean", "moving_variance", "power_iteration_u", "seed_generator", "nvae_adamax/iteration",
                 "schedule/learning_rate", "schedule/kl_beta", "stem/kernel"):
        assert any(kind in name for name in changed), (kind, changed[:10])
    if replicas == 2:
        assert any("moving_mean" in name and name.endswith("#1") for name in changed)


# ========================================================== 2. the last good checkpoint really is kept
@pytest.fixture
def small_trainer(tmp_path):
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf.options import TrainOptions
    from nvae_tf.trainer import Trainer
    config = load_flagfile("digits", **SMALL, batch_size=8, epochs=2)
    return Trainer(config, tf.distribute.get_strategy(), data_lib.open_source(config),
                   TrainOptions(model_dir=str(tmp_path / "run")))


def test_no_checkpoint_is_written_while_a_variable_is_not_finite(small_trainer):
    from nvae_tf.errors import TrainingError
    t = small_trainer
    variance = t.model.batchnorm_layers[3].moving_variance
    value = variance.numpy()
    value[1] = np.inf
    variance.assign(value)
    with pytest.raises(TrainingError, match=re.escape(variance.path)):
        t.save()
    assert checkpoint_steps(t.model_dir) == []


def test_no_checkpoint_is_written_while_the_model_cannot_be_evaluated(small_trainer, caplog):
    """Finite but exploded weights (as a diverging run leaves them): evaluation gives a non-finite ELBO, so no
    checkpoint is written; sane weights are written."""
    t = small_trainer
    scale = t.model.stem.log_weight_norm  # the stem's weight norm is exp(g): g = 100 overflows float32
    clean = scale.numpy().copy()
    scale.assign(clean + 100.0)
    with caplog.at_level("WARNING"):
        assert t.save() is None
    assert "no checkpoint written: the model's validation negative ELBO is not finite" in caplog.text
    assert checkpoint_steps(t.model_dir) == []
    scale.assign(clean)
    assert t.save().endswith("ckpt-0")
    assert checkpoint_steps(t.model_dir) == [0]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """A run trained normally for 4 steps, then resumed with --learning_rate=1e3 until it stops, then evaluated."""
    base = tmp_path_factory.mktemp("diverged")
    model_dir = str(base / "run")
    first = run_side_by_side("nvae_tf.train", {"first": train_args(model_dir, "--max_steps=4",
                                                                    "--checkpoint_every=2", batch_size=32)})
    second = run_side_by_side("nvae_tf.train", {"second": train_args(
        model_dir, "--max_steps=80", "--checkpoint_every=2", "--max_skipped_steps=5", batch_size=32,
        learning_rate=1e3)})
    evaluation = run_side_by_side("nvae_tf.evaluate", {"eval": [
        f"--model_dir={model_dir}", "--num_iw_samples=2", "--max_images=32"]})
    return types.SimpleNamespace(model_dir=model_dir, first=first["first"], second=second["second"],
                                 evaluation=evaluation["eval"])


@pytest.mark.slow
def test_a_diverged_run_keeps_a_finite_newest_checkpoint_that_evaluates(diverged):
    d = diverged
    assert d.first.rc == 0, d.first.stderr[-3000:]
    assert d.second.rc == 3, d.second.stderr[-3000:]
    errors = [line for line in d.second.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "5 consecutive steps had a non-finite loss or gradient" in errors[0]
    steps = checkpoint_steps(d.model_dir)
    assert steps and steps[-1] >= 4
    newest = os.path.join(d.model_dir, "checkpoints", f"ckpt-{steps[-1]}")
    assert f"The last good checkpoint is kept: {newest}" in errors[0]
    assert all_finite_checkpoint(newest)
    assert d.evaluation.rc == 0, d.evaluation.stderr[-3000:]
    match = re.search(r"-log p\(x\) = ([0-9.]+) nats, ([0-9.]+) bits/dim", d.evaluation.stdout)
    assert match, d.evaluation.stdout
    assert np.isfinite(float(match.group(1))) and 0.0 < float(match.group(2)) < 5.0
    assert f"(ckpt-{steps[-1]})" in d.evaluation.stdout


@pytest.fixture(scope="module")
def non_finite_run(trained_run, tmp_path_factory):
    """The trained run with a newer checkpoint (ckpt-200) whose first BN layer holds an infinite variance."""
    import tensorflow as tf

    from nvae_tf import runs
    model_dir = str(tmp_path_factory.mktemp("nonfinite") / "run")
    shutil.copytree(trained_run.model_dir, model_dir)
    _, model, _ = runs.load_model(model_dir)
    variance = model.batchnorm_layers[0].moving_variance
    value = variance.numpy()
    value[0] = np.inf
    variance.assign(value)
    tf.train.Checkpoint(model_variables=runs.model_variables(model)).write(
        os.path.join(runs.checkpoint_dir(model_dir), "ckpt-200"))
    out = str(tmp_path_factory.mktemp("nonfinite_out"))
    results = {**run_side_by_side("nvae_tf.evaluate", {"evaluate": [f"--model_dir={model_dir}",
                                                                   "--num_iw_samples=1", "--max_images=8"]}),
               **run_side_by_side("nvae_tf.sample", {"sample": [f"--model_dir={model_dir}",
                                                               f"--out={out}/s.png"]}),
               **run_side_by_side("nvae_tf.export", {"export": [f"--model_dir={model_dir}",
                                                               f"--export_dir={out}/export", "--notflite"]})}
    return types.SimpleNamespace(model_dir=model_dir, variable=variance.path, out=out, results=results)


@pytest.mark.parametrize("command", ["evaluate", "sample", "export"])
def test_commands_refuse_a_checkpoint_with_a_non_finite_variable(non_finite_run, command):
    r = non_finite_run.results[command]
    assert_cli_error(r, ["ckpt-200", "non-finite", non_finite_run.variable, "--checkpoint="])
    assert not os.path.exists(os.path.join(non_finite_run.model_dir, "eval_validation.json"))
    assert os.listdir(non_finite_run.out) == []


# ================================================================== 3. a damaged run directory recovers
def damage(model_dir, how, step=150):
    prefix = os.path.join(model_dir, "checkpoints", f"ckpt-{step}")
    data = prefix + ".data-00000-of-00001"
    if how == "truncated":  # a few bytes short: only a restore notices
        os.truncate(data, os.path.getsize(data) - 64)
    elif how == "half":  # visibly short
        os.truncate(data, os.path.getsize(data) // 2)
    elif how == "no_index":
        os.remove(prefix + ".index")
    elif how == "garbage_index":
        with open(prefix + ".index", "r+b") as f:
            f.seek(64)
            f.write(b"\0" * 256)
    elif how == "temp":
        os.makedirs(os.path.join(model_dir, "checkpoints", "ckpt-160_temp"))
        with open(os.path.join(model_dir, "checkpoints", "ckpt-160_temp",
                               "part-00000-of-00001.data-00000-of-00001"), "wb") as f:
            f.write(b"\0" * 100)


@pytest.fixture(scope="module")
def damaged_runs(trained_run, tmp_path_factory):
    """Copies of the trained run (ckpt-100, ckpt-150) with ckpt-150 damaged in four ways, and one with every
    checkpoint damaged, each given to the command that reads it."""
    base = tmp_path_factory.mktemp("damaged")
    dirs = {}
    for name, hows in {"truncated": [("truncated", 150), ("temp", 0)], "no_index": [("no_index", 150)],
                       "garbage_index": [("garbage_index", 150)], "half": [("half", 150)],
                       "none_intact": [("half", 150), ("no_index", 100)]}.items():
        for command in ("evaluate", "sample", "export", "train"):
            model_dir = str(base / f"{name}_{command}")
            shutil.copytree(trained_run.model_dir, model_dir)
            for how, step in hows:
                damage(model_dir, how, step)
            dirs[(name, command)] = model_dir
    args = {
        "evaluate": lambda d: [f"--model_dir={d}", "--num_iw_samples=1", "--max_images=8"],
        "sample": lambda d: [f"--model_dir={d}", f"--out={d}/s.png", "--num_samples=4"],
        "export": lambda d: [f"--model_dir={d}", f"--export_dir={d}/export", "--notflite"],
        "train": lambda d: train_args(d, "--max_steps=160", "--log_every=5", **{k: v for k, v in
                                      TINY_RUN_FLAGS.items()}),
    }
    cases = {"truncated": ["evaluate", "sample", "export", "train"], "no_index": ["evaluate", "train"],
             "garbage_index": ["sample", "train"], "half": ["export"],
             "none_intact": ["evaluate", "sample", "export", "train"]}
    results = {}
    for command in ("evaluate", "sample", "export", "train"):
        jobs = {(name, command): args[command](dirs[(name, command)]) for name, commands in cases.items()
                if command in commands}
        done = run_side_by_side(f"nvae_tf.{command}", {f"{n}|{c}": a for (n, c), a in jobs.items()})
        results.update({tuple(k.split("|")): v for k, v in done.items()})
    return types.SimpleNamespace(dirs=dirs, results=results)


# The trained run's config (conftest.TINY_RUN): train must be given the same structure to resume it.
TINY_RUN_FLAGS = dict(num_channels_enc=4, num_channels_dec=4, num_latent_scales=1, num_groups_per_scale=1,
                      min_groups_per_scale=1, num_preprocess_cells=1, num_postprocess_cells=1,
                      num_latent_per_group=2, num_nf=1, batch_size=8, epochs=2)


@pytest.mark.slow
@pytest.mark.parametrize("name, command", [("truncated", "evaluate"), ("truncated", "sample"),
                                           ("truncated", "export"), ("no_index", "evaluate"),
                                           ("garbage_index", "sample"), ("half", "export")])
def test_a_reading_command_names_the_damaged_checkpoint_and_uses_the_older_one(damaged_runs, name, command):
    r = damaged_runs.results[(name, command)]
    model_dir = damaged_runs.dirs[(name, command)]
    assert r.rc == 0, r.stderr[-3000:]
    warned = warnings_of(r.stderr)
    assert warned and "ckpt-150" in warned[0], r.stderr[-3000:]
    expected = {"truncated": "Read less bytes than requested", "no_index": "ckpt-150.index is missing",
                "garbage_index": "ckpt-150.index cannot be read", "half": "is truncated"}[name]
    assert expected in warned[0]
    assert "Traceback" not in r.stderr
    if command == "evaluate":
        with open(os.path.join(model_dir, "eval_validation.json")) as f:
            assert os.path.basename(json.load(f)["checkpoint"]) == "ckpt-100"
    elif command == "sample":
        assert "ckpt-100" in r.stdout and os.path.exists(os.path.join(model_dir, "s.png"))
    else:
        with open(os.path.join(model_dir, "export", "manifest.json")) as f:
            assert json.load(f)["step"] == 100
    # A reading command moves nothing: the damaged files are where they were.
    assert os.path.exists(os.path.join(model_dir, "checkpoints", "ckpt-150.data-00000-of-00001"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["truncated", "no_index", "garbage_index"])
def test_train_sets_the_damaged_checkpoint_aside_and_resumes_from_the_older_one(damaged_runs, name):
    r = damaged_runs.results[(name, "train")]
    model_dir = damaged_runs.dirs[(name, "train")]
    checkpoints = os.path.join(model_dir, "checkpoints")
    assert r.rc == 0, r.stderr[-3000:]
    assert any("ckpt-150" in line for line in warnings_of(r.stderr)), r.stderr[-3000:]
    assert f"resumed from {checkpoints}/ckpt-100 at step 100" in r.stderr
    assert "steps 100..160" in r.stderr and "stopped at step 160" in r.stderr
    kept = sorted(os.listdir(os.path.join(checkpoints, "damaged")))
    assert kept and all(f.startswith("ckpt-150.") for f in kept), kept
    assert checkpoint_steps(model_dir)[-1] == 160
    assert not glob.glob(os.path.join(checkpoints, "*_temp"))
    if name == "truncated":
        assert "removed " + os.path.join(checkpoints, "ckpt-160_temp") in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "sample", "export", "train"])
def test_no_intact_checkpoint_is_a_clear_error_naming_the_files(damaged_runs, command):
    r = damaged_runs.results[("none_intact", command)]
    assert r.rc in (2, 3), r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "ckpt-150" in errors[0] and "ckpt-100" in errors[0], r.stderr[-3000:]
    assert "no intact checkpoint" in errors[0]
    assert "Traceback" not in r.stderr


def test_train_refuses_a_malformed_or_foreign_config(tmp_path):
    cases = {"malformed": "{not json", "foreign": json.dumps({"model": "resnet50", "lr": 0.1}),
             "list": "[1, 2, 3]"}
    jobs = {}
    for name, text in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
        jobs[name] = train_args(str(tmp_path / name))
    results = run_side_by_side("nvae_tf.train", jobs)
    for name, text in cases.items():
        assert_cli_error(results[name], [str(tmp_path / name / "config.json"), "is not a valid nvae_tf config"])
        assert (tmp_path / name / "config.json").read_text() == text
        assert not (tmp_path / name / "checkpoints").exists()


def test_a_run_whose_data_is_missing_leaves_no_run_directory(tmp_path):
    """Missing data stops the run before its first step with one message; a run directory the run created is
    gone again, an empty one it was given stays empty, and one that holds a run keeps it as it was, so the same
    command works once the data is there."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "held").mkdir()
    load_flagfile("cifar10").save(str(tmp_path / "held" / "config.json"))
    (tmp_path / "held" / "events.out.tfevents.1").write_text("earlier training")
    (tmp_path / "held" / ".train.lock").write_text("")  # as every run that has ended leaves it
    held = {name: (tmp_path / "held" / name).read_bytes() for name in os.listdir(tmp_path / "held")}
    jobs = {name: ["--flagfile=configs/cifar10.flags", f"--data_dir={tmp_path / 'data'}", "--nodownload",
                   f"--model_dir={tmp_path / name}"] for name in ("new", "empty", "held")}
    results = run_side_by_side("nvae_tf.train", jobs)
    for name in jobs:
        assert_cli_error(results[name], ["cifar10", str(tmp_path / "data"), "--nodownload", "--data_dir"])
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path / "empty") == [] and os.listdir(tmp_path / "data") == []
    assert {name: (tmp_path / "held" / name).read_bytes() for name in os.listdir(tmp_path / "held")} == held


# ======================================================================== 4. one run per model_dir
@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    model_dir = str(tmp_path / "run")
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([sys.executable, "-m", "nvae_tf.train", *train_args(model_dir, "--max_steps=100000")],
                             cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        lock = os.path.join(model_dir, ".train.lock")
        deadline = time.time() + 240
        config = os.path.join(model_dir, "config.json")
        while not (os.path.exists(lock) and str(first.pid) in open(lock).read() and os.path.exists(config)):
            assert first.poll() is None and time.time() < deadline, open(tmp_path / "first.log").read()[-3000:]
            time.sleep(0.2)
        config_before = open(config).read()
        second = run_side_by_side("nvae_tf.train", {"second": train_args(model_dir, "--max_steps=3")})["second"]
        assert_cli_error(second, [model_dir, "in use by another training run", f"PID {first.pid}",
                                  f"host {os.uname().nodename}"])
        assert open(config).read() == config_before
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.wait()
        log.close()
    third = run_side_by_side("nvae_tf.train", {"third": train_args(model_dir, "--max_steps=2")})["third"]
    assert third.rc == 0, third.stderr[-3000:]
    assert f"took over the lock of {model_dir} left by a run that has ended (PID {first.pid}" in third.stderr
    assert "stopped at step 2" in third.stderr


def test_the_lock_is_exclusive_within_one_host(tmp_path):
    from nvae_tf import runs
    with runs.TrainingLock(str(tmp_path)):
        with pytest.raises(runs.RunLockedError, match=f"PID {os.getpid()}"):
            runs.TrainingLock(str(tmp_path)).acquire()
    with runs.TrainingLock(str(tmp_path)) as lock:  # released: it can be taken again, and nobody is recorded
        assert lock.previous is None


# ======================================================================== 6. clear, early errors
@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no run can write to: a tmpfs mounted read-only (which even root cannot write to), or without
    write permission for a user who is not root."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        target.chmod(0o555)
        yield str(target)
        target.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.decode().strip()}")
    yield str(target)
    subprocess.run(["umount", str(target)], check=False)


def test_bad_run_flags_stop_before_the_model_is_built(tmp_path, read_only_dir):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {
        "model_dir_is_a_file": (train_args(str(a_file)), [str(a_file), "is a file, not a directory"]),
        "parent_is_a_file": (train_args(str(a_file / "run")), ["--model_dir", str(a_file), "is a file"]),
        "keep_checkpoints": (train_args(str(tmp_path / "a"), "--keep_checkpoints=0"),
                             ["--keep_checkpoints: must be >= 1, got 0"]),
        "log_every": (train_args(str(tmp_path / "b"), "--log_every=0"), ["--log_every: must be >= 1, got 0"]),
        "checkpoint_every": (train_args(str(tmp_path / "c"), "--checkpoint_every=-5"),
                             ["--checkpoint_every: must be >= 1, got -5"]),
        "unwritable": (train_args(os.path.join(read_only_dir, "run")),
                       ["--model_dir: cannot write to", read_only_dir]),
    }
    results = run_side_by_side("nvae_tf.train", {k: v[0] for k, v in cases.items()})
    for name, (_, expected) in cases.items():
        assert_cli_error(results[name], expected)
        assert "building" not in results[name].stderr and "training digits" not in results[name].stderr
        assert results[name].seconds < 15, (name, results[name].seconds)  # long before a model could be traced
    for name in ("a", "b", "c"):
        assert not (tmp_path / name).exists()  # nothing written


@pytest.fixture
def small_disk(tmp_path):
    """A 420 KiB file system: room for three checkpoints of the small digits model, not for a fourth."""
    for target in small_tmpfs(tmp_path, "420k"):
        yield str(target)


def test_a_full_disk_stops_training_naming_the_directory_and_keeps_the_previous_checkpoints(small_disk):
    model_dir = os.path.join(small_disk, "run")
    r = run_side_by_side("nvae_tf.train", {"full": train_args(
        model_dir, "--max_steps=40", "--checkpoint_every=5", "--keep_checkpoints=10", "--log_every=5")})["full"]
    checkpoints = os.path.join(model_dir, "checkpoints")
    assert r.rc == 3, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    steps = checkpoint_steps(model_dir)
    assert steps and steps[-1] < 40
    failed = steps[-1] + 5
    assert errors[0] == (f"error: cannot write checkpoint ckpt-{failed} to {checkpoints}: No space left on "
                         f"device; the newest intact checkpoint is {checkpoints}/ckpt-{steps[-1]}"), errors[0]
    # Nothing of the failed checkpoint is left, and every earlier one is intact and listed.
    assert not glob.glob(os.path.join(checkpoints, f"ckpt-{failed}*"))
    import tensorflow as tf

    from nvae_tf import runs
    state = tf.train.get_checkpoint_state(checkpoints)
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [f"ckpt-{s}" for s in steps]
    for s in steps:
        assert runs.checkpoint_problem(os.path.join(checkpoints, f"ckpt-{s}")) is None
        assert all_finite_checkpoint(os.path.join(checkpoints, f"ckpt-{s}"))


# ======================================================================== 8. signals and progress
def test_sigterm_during_validation_saves_at_once(tmp_path):
    """SIGTERM while the validation of an epoch runs: the validation is abandoned and the checkpoint of the step
    just trained is written, with no further step."""
    model_dir = str(tmp_path / "run")
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        run = subprocess.Popen([sys.executable, "-m", "nvae_tf.train", *train_args(
            model_dir, "--log_every=1", batch_size=32, epochs=3, eval_batches=0)], cwd=ROOT, env=child_env(),
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while "validating after epoch 1" not in log_path.read_text():
            assert run.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        rc = run.wait(timeout=120)
    text = log_path.read_text()
    assert rc == 0, text[-3000:]
    after = text[text.index("received signal 15"):]
    assert "validation of epoch 1 abandoned: stop requested" in after
    assert "stop requested: saving a checkpoint at step 46" in after  # 1497 // 32 = 46 steps in epoch 1
    assert "epoch 1 done" not in text and " step 47/" not in text
    assert checkpoint_steps(model_dir) == [46]


def test_evaluation_reports_progress_within_a_batch_and_gives_the_same_result(trained_run, monkeypatch):
    """With calls of a single pass the progress advances within the batch, and the estimate equals the one of
    calls that each cover many passes (same noise, same running log-sum-exp)."""
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf import runs
    from nvae_tf.likelihood import Evaluator
    config, model, _ = runs.load_model(trained_run.model_dir)
    images = next(iter(data_lib.open_source(config).dataset("validation", 2, training=False)))
    results = {}
    for seconds in (0.0, 1e9):
        monkeypatch.setattr(Evaluator, "CALL_SECONDS", seconds)
        calls = []
        evaluator = Evaluator(model, tf.distribute.get_strategy(), num_iw_samples=40, batch_size=2,
                              forward_batch=8, seed=5)
        results[seconds] = evaluator.evaluate([images], num_images=2, progress=lambda *a: calls.append(a))
        results[seconds, "calls"] = calls
    assert results[0.0][1] == 2
    assert results[0.0][0] == results[1e9][0]
    done = [c[0] for c in results[0.0, "calls"]]
    assert done == [2 * k / 10 for k in range(1, 10)] + [2], done  # 40 samples, 4 per pass: 10 passes
    assert all(c[2] is None for c in results[0.0, "calls"][:-1])  # no figure before the first batch ends
    # Calls of 1 (traced), 1 (timed) and 8 passes.
    assert [c[0] for c in results[1e9, "calls"]] == [0.2, 0.4, 2]


def test_evaluate_shows_progress_before_the_first_batch_ends(trained_run, tmp_path):
    model_dir = str(tmp_path / "run")
    shutil.copytree(trained_run.model_dir, model_dir)
    r = run_side_by_side("nvae_tf.evaluate", {"e": [f"--model_dir={model_dir}", "--num_iw_samples=4000",
                                                    "--max_images=2", "--batch_size=2"]})["e"]
    assert r.rc == 0, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if "/2 images" in line]
    assert lines and "first batch in progress" in lines[0], r.stderr[-3000:]
    assert lines[-1].startswith("[##############################] 2/2 images")


# ======================================================================== 7. data faults at read time
def test_an_image_that_stops_decoding_during_training_is_skipped_and_the_epoch_ends_short(tmp_path):
    """Nine images (8 for training: 4 steps of 2 per epoch); after the folder check one training image is
    overwritten with garbage of the same size and time stamp, so the check's record still matches. Training
    names it, skips it, ends each epoch a batch early and goes on to the next epoch."""
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    common = ["--flagfile=configs/tiny.flags", f"--data_dir={folder}"]
    inspect = run_side_by_side("nvae_tf.data", {"i": [*common, "--inspect", f"--out={tmp_path}/batch.png"]})["i"]
    assert inspect.rc == 0, inspect.stderr[-3000:]
    with open(folder / ".nvae_tf_manifest.json") as f:
        validation = json.load(f)["split/seed1"]["value"]["validation"]
    bad = folder / sorted(set(os.listdir(folder)) - set(validation) - {".nvae_tf_manifest.json"})[0]
    stat = bad.stat()
    bad.write_bytes(b"\0" * stat.st_size)
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    r = run_side_by_side("nvae_tf.train", {"t": [*common, f"--model_dir={tmp_path}/run", "--batch_size=2",
                                                 "--epochs=2", "--log_every=1", "--eval_batches=1"]})["t"]
    assert r.rc == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert sum(bad.name in line for line in r.stderr.splitlines() if "unreadable" in line or "decode" in line) >= 1
    assert "epoch 1 gave 1 batches fewer than its 4 (images skipped while reading); going on at step 4" in r.stderr
    assert "stopped at step 8" in r.stderr
    assert checkpoint_steps(str(tmp_path / "run")) == [8]
