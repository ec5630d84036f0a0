"""The training entry point: learning, resume, signals, strategies, precision, non-finite steps, TensorBoard.

Everything runs a very small NVAE on the built-in digits (no files needed). Tracing a training step costs
several seconds, so expensive runs are module-scoped fixtures shared by the tests that check them, and
subprocess runs that do not depend on each other are started side by side.

In-process: `Trainer` itself (loss goes down, NaN skipping, TensorBoard, restore, mixed precision).
Subprocesses (`python -m nvae_tf.train`): whatever is process-global (op determinism, logical CPU devices,
signals, TF_CONFIG) or is about the command line.
"""

import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
import types

import numpy as np
import pytest

from conftest import Run, child_env, load_flagfile, poll


# A very small digits NVAE (one latent scale, one group): about 7 s to trace a training step on 2 cores.
SMALL = dict(num_channels_enc=4, num_channels_dec=4, num_latent_scales=1, num_groups_per_scale=1,
             min_groups_per_scale=1, num_preprocess_cells=1, num_postprocess_cells=1, num_latent_per_group=2)
DIGITS_TRAIN = 1497  # training images of the built-in digits dataset (1797 - 300 for validation)
SCALAR_TAGS = ("train/loss", "train/bpd", "train/kl", "train/beta", "train/lambda", "train/learning_rate",
               "train/grad_norm", "train/skipped_steps", "train/images_per_second", "kl_per_group/00")
IMAGE_TAGS = ("reconstructions", "samples")


def small_config(**overrides):
    return load_flagfile("digits", **{**SMALL, **overrides})


# --------------------------------------------------------------------------------------------- helpers
def train_args(model_dir, *extra, **overrides):
    """`python -m nvae_tf.train` on the small digits config; `overrides` are config flags."""
    values = {**SMALL, "eval_batches": 2, "num_summary_images": 4, **overrides}
    flags = [f"--{k}={v}" for k, v in values.items()]
    return [sys.executable, "-m", "nvae_tf.train", "--flagfile=configs/digits.flags", *flags,
            f"--model_dir={model_dir}", *extra]


def run_all(*runs, timeout=Run.timeout):
    """Wait for every run; on a timeout or failure of one, kill the others too."""
    deadline = time.time() + timeout
    try:
        return [r.wait(timeout=max(deadline - time.time(), 1)) for r in runs]
    finally:
        for r in runs:
            r.kill()


def run_train(model_dir, *extra, log, **overrides):
    run = Run(train_args(model_dir, *extra, **overrides), log)
    return run.wait(), run.text()


def checkpoint_values(path):
    """{name: array} of every variable in the checkpoint at `path` (prefix or directory)."""
    import tensorflow as tf
    if os.path.isdir(path):
        path = tf.train.latest_checkpoint(path)
    reader = tf.train.load_checkpoint(path)
    return {name: reader.get_tensor(name) for name, _ in tf.train.list_variables(path)
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def checkpoint_step(path):
    return int(checkpoint_values(path)["step/.ATTRIBUTES/VARIABLE_VALUE"])


def compare_checkpoints(a, b, rel=1e-4, atol=1e-6, ignore=("save_counter/.ATTRIBUTES/VARIABLE_VALUE",)):
    """Names whose values differ by more than `rel` of the tensor's largest magnitude plus `atol`.
    Returns (differences, worst) with worst sorted by relative difference."""
    va, vb = checkpoint_values(a), checkpoint_values(b)
    assert set(va) == set(vb), f"different variables: {sorted(set(va) ^ set(vb))[:10]}"
    worst = []
    for name in sorted(va):
        if name in ignore:
            continue
        x, y = np.asarray(va[name], np.float64), np.asarray(vb[name], np.float64)
        assert x.shape == y.shape, name
        if x.size == 0:
            continue
        diff, scale = float(np.max(np.abs(x - y))), float(np.max(np.abs(x)))
        worst.append((diff / (scale + 1e-12), diff, scale, name))
    worst.sort(reverse=True)
    bad = [w for w in worst if w[1] > rel * w[2] + atol]
    return bad, worst


def describe(bad, total):
    lines = [f"{len(bad)} of {total} checkpoint tensors differ:"]
    lines += [f"  {name}: max |diff| {diff:.3g} at scale {scale:.3g}" for _, diff, scale, name in bad[:12]]
    return "\n".join(lines)


def event_tensors(model_dir):
    """{tag: [(step, ndarray)]} of every TF2 summary (scalars and images are both tensors) in `model_dir`."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator
    acc = EventAccumulator(model_dir, size_guidance={TENSORS: 0})
    acc.Reload()
    return {tag: [(e.step, tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
            for tag in acc.Tags()[TENSORS]}


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_trainer(model_dir, config, **kwargs):
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf.options import TrainOptions
    from nvae_tf.trainer import Trainer
    source = data_lib.open_source(config)
    return Trainer(config, tf.distribute.get_strategy(), source, TrainOptions(model_dir=str(model_dir), **kwargs))


def weights_of(trainer):
    """Trainable weights and optimizer state (slots, iterations): what a training step updates."""
    return ([v.numpy().copy() for v in trainer.model.trainable_variables] +
            [np.array(v.numpy()).copy() for v in trainer.optimizer.variables])


def validation_bpd(trainer, batches):
    total = count = 0.0
    for x in batches:
        t, c = trainer._eval_step(x)
        total, count = total + float(t), count + float(c)
    return total / count / (math.log(2.0) * trainer.config.data_dims)


def files_digest(directory):
    import hashlib
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "*"))):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = hashlib.sha1(f.read()).hexdigest()
    return out


# ================================================================================ in-process Trainer
TRAIN_STEPS = 190  # batch 8: 187 steps per epoch, so the first epoch ends (validation, images) and one goes on


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """190 float32 steps of the small digits NVAE in this process, with scalar summaries every 5 steps."""
    config = small_config(batch_size=8, epochs=2)
    model_dir = str(tmp_path_factory.mktemp("inprocess"))
    trainer = make_trainer(model_dir, config, log_every=5, eval_batches=2, num_summary_images=4)
    # Fixed validation batches (binarised once), so the before/after comparison sees the same data.
    batches = [b for b in trainer.source.dataset("validation", 8, training=False, deterministic=True,
                                                 seed=config.seed).take(10)]
    bpd_before = validation_bpd(trainer, batches)
    start = time.time()
    final_step = trainer.train(max_steps=TRAIN_STEPS)
    seconds = time.time() - start
    # The state the checkpoint of step 190 should hold (before the evaluation below draws more noise).
    state = [np.array(v.numpy()).copy() for v in trainer.model.variables]
    paths = [v.path for v in trainer.model.variables]
    bpd_after = validation_bpd(trainer, batches)
    # A copy of the run as it is now, for the restore test (the NaN tests write more checkpoints).
    snapshot_dir = model_dir + "_snapshot"
    shutil.copytree(model_dir, snapshot_dir)
    return types.SimpleNamespace(config=config, model_dir=model_dir, trainer=trainer, final_step=final_step,
                                 bpd_before=bpd_before, bpd_after=bpd_after, seconds=seconds, state=state,
                                 paths=paths, snapshot_dir=snapshot_dir)


def test_training_lowers_the_validation_nelbo_and_the_training_bpd(trained):
    assert trained.final_step == TRAIN_STEPS
    assert int(trained.trainer.step.numpy()) == TRAIN_STEPS
    # Negative ELBO in bits/dim on the same 80 validation images before and after training.
    assert np.isfinite(trained.bpd_after)
    assert trained.bpd_after < trained.bpd_before - 0.1, (trained.bpd_before, trained.bpd_after)
    # The training bpd logged every 5 steps: the last five logs are clearly below the first five.
    bpd = [float(v) for _, v in sorted(event_tensors(trained.model_dir)["train/bpd"])]
    assert len(bpd) >= 20
    assert np.all(np.isfinite(bpd))
    assert np.mean(bpd[-5:]) < np.mean(bpd[:5]) - 0.1, bpd


def test_the_steps_are_traced_once_across_epochs(trained):
    """190 steps span two epochs (a new dataset each), validation and checkpoints: one trace of the training step
    and one of the validation step, so no epoch pays the start-up cost again."""
    assert trained.final_step > trained.trainer.steps_per_epoch
    assert trained.trainer.train_step.experimental_get_tracing_count() == 1
    assert trained.trainer._traced_eval_step.experimental_get_tracing_count() == 1


def test_tensorboard_holds_every_scalar_and_image_tag(trained):
    events = event_tensors(trained.model_dir)
    missing = [t for t in SCALAR_TAGS + IMAGE_TAGS + ("validation/bpd",) if t not in events]
    assert not missing, f"missing tags {missing}; present: {sorted(events)}"
    for tag in SCALAR_TAGS:
        steps = [s for s, _ in events[tag]]
        values = np.array([float(v) for _, v in events[tag]])
        assert 5 in steps and 185 in steps, (tag, steps[:5])
        assert np.all(np.isfinite(values)), tag
    beta = [float(v) for _, v in events["train/beta"]]
    assert all(0.0 < b <= 1.0 for b in beta) and beta[-1] > beta[0]  # KL warm-up rises
    lr = dict((s, float(v)) for s, v in events["train/learning_rate"])
    assert 0.0 < lr[5] < lr[185] <= trained.config.learning_rate  # linear warm-up over the first epoch
    assert all(float(v) == 0 for step, v in events["train/skipped_steps"] if step <= TRAIN_STEPS)
    assert float(events["train/lambda"][0][1]) == pytest.approx(trained.config.weight_decay_norm)
    # Pictures after the first step (no --image_every: the automatic default), at the end of the first epoch
    # (step 187) and at the end (--max_steps 190, inside the second epoch); validation at both ends.
    epoch_end = DIGITS_TRAIN // 8
    assert [s for s, _ in events["validation/bpd"]] == [epoch_end, TRAIN_STEPS]
    assert all(0.0 < float(v) < 2.0 for _, v in events["validation/bpd"])
    for tag in IMAGE_TAGS:
        assert [s for s, _ in events[tag]] == [1, epoch_end, TRAIN_STEPS], tag
    import tensorflow as tf
    for step, image in events["reconstructions"]:
        # An image summary is [width, height, png_1 .. png_n]: inputs beside reconstructions, 16 x 32.
        assert image.shape == (2 + 4,) and all(png.startswith(b"\x89PNG") for png in image[2:]), image.shape
        assert tf.io.decode_png(image[2]).shape == (16, 32, 1)
    # One grid of samples: a row per temperature (five), four samples per row, enlarged 4x, labels on the left.
    grids = [tf.io.decode_png(image[2]).numpy() for _, image in events["samples"]]
    assert all(g.shape[0] == 5 * (64 + 2) + 2 and g.shape[1] > 4 * (64 + 2) + 2 for g in grids), grids[0].shape
    assert not np.array_equal(grids[0], grids[-1])  # the model changed between step 1 and step 190


def test_pictures_are_traced_once_and_draw_what_the_eager_model_draws(tmp_path):
    """The TensorBoard pictures come from one traced function: the same reconstructions and samples as the
    model's eager calls with the seeded summary noise, the same again at the next call (the noise restarts),
    and no new trace for a second call."""
    from nvae_tf import sampling
    from nvae_tf.trainer import SAMPLE_TEMPERATURES
    config = small_config(batch_size=8, epochs=1)
    trainer = make_trainer(tmp_path / "run", config, num_summary_images=3)
    images = next(iter(trainer.source.dataset("validation", 3, training=False)))
    inputs, recon, rows = trainer.picture_arrays(images)
    assert rows.shape == (len(SAMPLE_TEMPERATURES), 3, *config.image_shape)
    noise = sampling.seeded_noise(config.seed, "summary_noise")
    eager_inputs, eager_recon = sampling.reconstruct(trainer.model, images, pixels="mean", noise=noise)
    noise = sampling.seeded_noise(config.seed, "summary_noise")
    eager_rows = [trainer.model.sample(3, t, noise=noise, mode="mean").numpy() for t in SAMPLE_TEMPERATURES]
    np.testing.assert_array_equal(inputs, eager_inputs.numpy())
    np.testing.assert_allclose(recon, eager_recon.numpy(), atol=1e-5)
    np.testing.assert_allclose(rows, np.stack(eager_rows), atol=1e-5)
    assert not np.allclose(rows[0], rows[-1], atol=1e-3)  # the temperatures differ
    again = trainer.picture_arrays(images)
    for a, b in zip(again, (inputs, recon, rows)):
        np.testing.assert_array_equal(a, b)
    assert trainer._pictures.experimental_get_tracing_count() == 1


def test_pictures_and_validation_every_n_steps_leave_the_training_as_it_is(tmp_path):
    """--image_every=3 --eval_every=4 for 8 steps of a 187-step epoch: pictures at 3, 6 and the end (8),
    validation at 4 and 8. They draw no training noise and move no state: every model variable after the 8 steps
    is bit for bit that of a run from the same start with pictures and validation only at the end."""
    config = small_config(batch_size=8, epochs=1)
    common = dict(log_every=100, eval_batches=1, num_summary_images=2, deterministic=True)
    often = make_trainer(tmp_path / "often", config, image_every=3, eval_every=4, **common)
    start = [v.numpy().copy() for v in often.model.variables]
    often.train(max_steps=8)
    rare = make_trainer(tmp_path / "rare", config, image_every=1000, eval_every=1000, **common)
    for v, value in zip(rare.model.variables, start):
        v.assign(value)
    rare.train(max_steps=8)
    events = event_tensors(str(tmp_path / "often"))
    assert [s for s, _ in events["samples"]] == [s for s, _ in events["reconstructions"]] == [3, 6, 8]
    assert [s for s, _ in events["validation/bpd"]] == [4, 8]
    events = event_tensors(str(tmp_path / "rare"))
    assert [s for s, _ in events["samples"]] == [s for s, _ in events["validation/bpd"]] == [8]
    assert int(often.step.numpy()) == int(rare.step.numpy()) == 8
    for a, b in zip(often.model.variables, rare.model.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


class ShortEpochs:
    """The digits source with epochs of `batches` training batches of 8: runs of many epochs in a few steps."""

    def __init__(self, source, batches):
        self.source, self.batches = source, batches
        self.sizes = {**source.sizes, "train": 8 * batches}

    def dataset(self, split, batch_size, **kwargs):
        ds = self.source.dataset(split, batch_size, **kwargs)
        return ds.take(self.batches) if split == "train" else ds

    def __getattr__(self, name):
        return getattr(self.source, name)


def test_epoch_summaries_every_n_epochs_and_at_the_end(tmp_path):
    """Five epochs of 3 steps with --epoch_summaries_every=2: validation and pictures at the ends of epochs 2 and
    4 and at the end of training (step 15), none at the ends of epochs 1 and 3; a
    --image_every step that falls on a skipped epoch end (9) still gets its pictures."""
    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf.options import TrainOptions
    from nvae_tf.trainer import Trainer
    config = small_config(batch_size=8, epochs=5)
    source = ShortEpochs(data_lib.open_source(config), batches=3)
    options = TrainOptions(model_dir=str(tmp_path), log_every=100, eval_batches=1, num_summary_images=2,
                           image_every=9, eval_every=1000, epoch_summaries_every=2)
    trainer = Trainer(config, tf.distribute.get_strategy(), source, options)
    assert (trainer.steps_per_epoch, trainer.total_steps) == (3, 15)
    assert trainer.train() == 15
    events = event_tensors(str(tmp_path))
    assert [s for s, _ in events["validation/bpd"]] == [6, 12, 15]
    assert [s for s, _ in events["samples"]] == [s for s, _ in events["reconstructions"]] == [6, 9, 12, 15]


def test_a_new_trainer_restores_the_complete_model_state(trained):
    """Resuming must bring back every model variable: trainable weights, BatchNorm moving statistics, the
    spectral regulariser's power-iteration vectors and the posterior noise generator's state."""
    restored = make_trainer(trained.snapshot_dir, trained.config, log_every=5, eval_batches=2)
    latest = restored.restore()
    assert latest and latest.endswith(f"ckpt-{TRAIN_STEPS}")
    assert int(restored.step.numpy()) == TRAIN_STEPS
    current = restored.model.variables
    assert len(current) == len(trained.state)
    not_restored = [path for path, saved, v in zip(trained.paths, trained.state, current)
                    if not np.array_equal(saved, v.numpy())]
    kinds = {}
    for path in not_restored:
        kind = ("power-iteration vectors" if "power_iteration" in path else
                "BatchNorm moving statistics" if "moving_" in path else
                "noise generator state" if "seed_generator" in path else "other")
        kinds.setdefault(kind, []).append(path)
    assert not not_restored, (f"{len(not_restored)} of {len(current)} model variables are not restored from "
                              f"the checkpoint: " + "; ".join(f"{k} ({len(v)}): {', '.join(v[:4])}"
                                                              + (" ..." if len(v) > 4 else "")
                                                              for k, v in kinds.items()))


def poisoned(variable):
    """`variable` set to NaN (a fault in the forward pass) until the block ends, then put back."""
    import contextlib

    @contextlib.contextmanager
    def block():
        saved = variable.numpy().copy()
        variable.assign(np.full(saved.shape, np.nan, saved.dtype))
        try:
            yield
        finally:
            variable.assign(saved)
    return block()


@pytest.fixture(scope="module")
def nan_steps(trained):
    """On the trained run: one step with a NaN weight in the stem (so the forward pass, the loss and the
    gradients are all NaN), then a good step and, with the NaN back, steps until max_skipped_steps=3 stops."""
    from nvae_tf.errors import TrainingError
    t = trained.trainer
    step0 = int(t.step.numpy())
    skipped0 = int(t.skipped.numpy())
    before = weights_of(t)
    batches = iter(t.distribute(t.source.dataset("train", 8, training=True, deterministic=True, seed=5)))
    with poisoned(t.model.stem.bias):
        t.train_step(next(batches))
    after_skip = weights_of(t)
    skipped1 = int(t.skipped.numpy())
    t.train_step(next(batches))
    step1 = int(t.step.numpy())
    t.save()
    checkpoint = t.manager.latest_checkpoint
    checkpoint_files = files_digest(os.path.dirname(checkpoint))
    t.options = dataclasses.replace(t.options, max_skipped_steps=3)
    with poisoned(t.model.stem.bias):
        try:
            t.train(max_steps=step1 + 30)
            error = None
        except TrainingError as e:
            error = e
    return types.SimpleNamespace(step0=step0, skipped0=skipped0, before=before, after_skip=after_skip,
                                 skipped1=skipped1, step1=step1, checkpoint=checkpoint,
                                 checkpoint_files=checkpoint_files, error=error, trainer=t,
                                 after_error=weights_of(t), skipped_final=int(t.skipped.numpy()))


def test_a_non_finite_gradient_is_skipped_counted_and_leaves_the_weights_unchanged(nan_steps):
    n = nan_steps
    assert n.step1 == n.step0 + 2  # the skipped step counts
    assert n.skipped1 == n.skipped0 + 1  # and is counted as skipped
    changed = [i for i, (a, b) in enumerate(zip(n.before, n.after_skip)) if not np.array_equal(a, b)]
    assert not changed, f"{len(changed)} weight / optimizer tensors changed on a skipped step"
    assert all(np.all(np.isfinite(w)) for w in n.after_skip)
    # The skipped count is in the checkpoint too.
    assert int(checkpoint_values(n.checkpoint)["skipped/.ATTRIBUTES/VARIABLE_VALUE"]) == n.skipped1
    # A normal step does change them (so the comparison above means something): step0 + 1 was good.
    assert any(not np.array_equal(a, b) for a, b in zip(n.after_skip, n.after_error))


def test_consecutive_non_finite_steps_stop_training_with_advice_and_keep_the_last_checkpoint(nan_steps):
    from nvae_tf.errors import TrainingError
    n = nan_steps
    assert isinstance(n.error, TrainingError), "3 consecutive NaN steps with max_skipped_steps=3 did not raise"
    message = str(n.error)
    assert "3 consecutive" in message
    assert "--learning_rate" in message and "--weight_decay_norm" in message
    assert n.skipped_final == n.skipped1 + 3
    assert all(np.all(np.isfinite(w)) for w in n.after_error)
    # The last checkpoint (written at the end of the previous call) is still the latest and unchanged.
    assert n.trainer.manager.latest_checkpoint == n.checkpoint
    assert files_digest(os.path.dirname(n.checkpoint)) == n.checkpoint_files
    values = checkpoint_values(n.checkpoint)
    assert int(values["step/.ATTRIBUTES/VARIABLE_VALUE"]) == n.step1
    assert all(np.all(np.isfinite(v)) for v in values.values() if np.asarray(v).dtype.kind == "f")


# ------------------------------------------------------------------------------------- mixed precision
@pytest.fixture(scope="module", params=["mixed_bfloat16", "mixed_float16"])
def mixed(request, tmp_path_factory):
    import keras
    config = small_config(batch_size=8, epochs=2, warmup_epochs=0)
    model_dir = str(tmp_path_factory.mktemp(request.param))
    try:
        trainer = make_trainer(model_dir, config, precision=request.param, log_every=1, eval_batches=1)
        initial_scale = float(trainer.loss_scale.numpy())
        compute_dtype = trainer.model.stem.compute_dtype
        before = [v.numpy().copy() for v in trainer.model.trainable_variables]
        trainer.train(max_steps=4)
        after = [v.numpy().copy() for v in trainer.model.variables]
        changed = sum(not np.array_equal(a, b.numpy()) for a, b in zip(before, trainer.model.trainable_variables))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return types.SimpleNamespace(precision=request.param, trainer=trainer, initial_scale=initial_scale,
                                 compute_dtype=compute_dtype, after=after, changed=changed,
                                 events=event_tensors(model_dir))


def test_mixed_precision_trains_finite_steps(mixed):
    import keras
    assert keras.mixed_precision.global_policy().name == "float32"  # reset for the other tests
    assert mixed.compute_dtype == mixed.precision.split("_")[1]
    assert int(mixed.trainer.step.numpy()) == 4
    losses = [float(v) for _, v in mixed.events["train/loss"]]
    assert len(losses) == 4 and np.all(np.isfinite(losses)), losses
    assert np.all(np.isfinite([float(v) for _, v in mixed.events["train/bpd"]]))
    assert int(mixed.trainer.skipped.numpy()) == 0
    assert all(np.all(np.isfinite(w)) for w in mixed.after)
    assert all(w.dtype == np.float32 for w in mixed.after if w.dtype.kind == "f")  # float32 master weights
    assert mixed.changed > 0.5 * len(mixed.trainer.model.trainable_variables)  # it did learn


def test_float16_loss_scale_starts_at_1024(mixed):
    if mixed.precision != "mixed_float16":
        assert mixed.initial_scale == 1.0  # no loss scaling in bfloat16
        assert "train/loss_scale" not in mixed.events
        return
    assert mixed.initial_scale == 1024.0
    scales = [float(v) for _, v in sorted(mixed.events["train/loss_scale"])]
    assert scales[0] == 1024.0 and all(s == 1024.0 for s in scales)  # no overflow, growth only after 2000
    assert float(mixed.trainer.loss_scale.numpy()) == 1024.0


# ============================================================================ subprocesses: resume
RESUME_BATCH = 32  # 1497 // 32 = 46 steps per epoch
RESUME_K = 50  # run B stops at 50 (after the end of epoch 1, 4 steps into epoch 2) and resumes to 100


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """Deterministic runs: A straight to 2k steps; B to k steps, then again in the same model_dir to 2k."""
    base = tmp_path_factory.mktemp("resume")
    a_dir, b_dir = str(base / "a"), str(base / "b")
    common = ("--deterministic",)
    overrides = dict(batch_size=RESUME_BATCH, epochs=3)
    start = time.time()
    a = Run(train_args(a_dir, *common, f"--max_steps={2 * RESUME_K}", **overrides), base / "a.log")
    b1 = Run(train_args(b_dir, *common, f"--max_steps={RESUME_K}", **overrides), base / "b1.log")
    rc_a, rc_b1 = run_all(a, b1)
    rc_b2, b2_log = run_train(b_dir, *common, f"--max_steps={2 * RESUME_K}", log=base / "b2.log", **overrides)
    return types.SimpleNamespace(a_dir=a_dir, b_dir=b_dir, rc=(rc_a, rc_b1, rc_b2), a_log=a.text(),
                                 b1_log=b1.text(), b2_log=b2_log, seconds=time.time() - start)


@pytest.mark.slow
def test_stop_and_resume_equals_an_uninterrupted_run(resume_runs):
    r = resume_runs
    assert r.rc == (0, 0, 0), r.a_log[-3000:] + r.b1_log[-3000:] + r.b2_log[-3000:]
    spe = DIGITS_TRAIN // RESUME_BATCH
    assert spe < RESUME_K < 2 * spe  # B stops mid-epoch 2, after an epoch boundary
    assert f"resumed from {r.b_dir}/checkpoints/ckpt-{RESUME_K} at step {RESUME_K}" in r.b2_log
    assert f"steps {RESUME_K}..{2 * RESUME_K}" in r.b2_log
    a_ckpt = os.path.join(r.a_dir, "checkpoints", f"ckpt-{2 * RESUME_K}")
    b_ckpt = os.path.join(r.b_dir, "checkpoints", f"ckpt-{2 * RESUME_K}")
    assert checkpoint_step(a_ckpt) == checkpoint_step(b_ckpt) == 2 * RESUME_K
    bad, worst = compare_checkpoints(a_ckpt, b_ckpt, rel=1e-5)
    assert not bad, describe(bad, len(worst))


@pytest.mark.slow
def test_resumed_deterministic_run_reports_the_same_validation_bpd(resume_runs):
    """The epoch-2 validation (step 92, after the resume) must not depend on where the run was resumed."""
    r = resume_runs
    assert r.rc == (0, 0, 0)
    pattern = r"epoch 2 done at step (\d+): validation bpd ([0-9.]+)"
    a, b = re.search(pattern, r.a_log), re.search(pattern, r.b2_log)
    assert a and b, "no epoch-2 validation line"
    assert a.group(1) == b.group(1) == str(2 * (DIGITS_TRAIN // RESUME_BATCH))
    assert a.group(2) == b.group(2), f"uninterrupted {a.group(2)} vs resumed {b.group(2)}"


# ======================================================================= subprocesses: kill, SIGTERM
KILL_STEPS = 150


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A run with a checkpoint every 10 steps, killed with SIGKILL after its first checkpoint, then rerun."""
    import tensorflow as tf
    base = tmp_path_factory.mktemp("kill")
    model_dir = str(base / "run")
    ckpt_dir = os.path.join(model_dir, "checkpoints")
    extra = (f"--max_steps={KILL_STEPS}", "--checkpoint_every=10", "--keep_checkpoints=2", "--log_every=10")
    start = time.time()
    run = Run(train_args(model_dir, *extra, batch_size=8, epochs=2), base / "first.log")
    latest = poll(lambda: os.path.isdir(ckpt_dir) and tf.train.latest_checkpoint(ckpt_dir), 240,
                  "the first checkpoint", run=run)
    run.proc.send_signal(signal.SIGKILL)
    killed_rc = run.wait()
    latest = tf.train.latest_checkpoint(ckpt_dir)  # the newest one the state file names after the kill
    state = tf.train.get_checkpoint_state(ckpt_dir)
    listed = list(state.all_model_checkpoint_paths) if state else []
    intact = all(os.path.exists(p + ".index") and glob.glob(p + ".data-*") for p in listed)
    killed_step = checkpoint_step(latest)
    rc, log = run_train(model_dir, *extra, log=base / "second.log", batch_size=8, epochs=2)
    return types.SimpleNamespace(model_dir=model_dir, ckpt_dir=ckpt_dir, killed_rc=killed_rc,
                                 first_log=run.text(), latest=latest, killed_step=killed_step, listed=listed,
                                 intact=intact, rc=rc, log=log, seconds=time.time() - start)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint(killed_run):
    k = killed_run
    assert k.killed_rc == -signal.SIGKILL
    assert "stopped at step" not in k.first_log  # it was killed mid-training
    assert 10 <= k.killed_step < KILL_STEPS and k.killed_step % 10 == 0
    assert k.latest.endswith(f"ckpt-{k.killed_step}")
    assert k.intact and k.listed, "the checkpoint directory after the kill is not intact"
    assert k.rc == 0, k.log[-4000:]
    assert f"resumed from {k.latest} at step {k.killed_step}" in k.log
    assert f"steps {k.killed_step}..{KILL_STEPS}" in k.log
    assert f"stopped at step {KILL_STEPS}" in k.log
    assert checkpoint_step(k.ckpt_dir) == KILL_STEPS


@pytest.mark.slow
def test_at_most_keep_checkpoints_are_kept(killed_run):
    import tensorflow as tf
    k = killed_run
    assert k.rc == 0
    indexes = sorted(glob.glob(os.path.join(k.ckpt_dir, "ckpt-*.index")))
    assert len(indexes) == 2, indexes  # --keep_checkpoints=2 after more than a dozen saves
    state = tf.train.get_checkpoint_state(k.ckpt_dir)
    assert len(state.all_model_checkpoint_paths) == 2
    assert state.model_checkpoint_path.endswith(f"ckpt-{KILL_STEPS}")


SIGTERM_EPOCHS = 3


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """A run sent SIGTERM once it has logged its first training step."""
    base = tmp_path_factory.mktemp("sigterm")
    model_dir = str(base / "run")
    start = time.time()
    run = Run(train_args(model_dir, "--log_every=1", batch_size=8, epochs=SIGTERM_EPOCHS), base / "log")
    poll(lambda: " step 1/" in run.text() or " step 2/" in run.text(), 240, "a training step line", run=run)
    run.proc.send_signal(signal.SIGTERM)
    rc = run.wait()
    return types.SimpleNamespace(model_dir=model_dir, rc=rc, log=run.text(), seconds=time.time() - start,
                                 config=small_config(batch_size=8, epochs=SIGTERM_EPOCHS))


def test_sigterm_writes_a_checkpoint_and_exits_0(sigterm_run):
    r = sigterm_run
    assert r.rc == 0, r.log[-4000:]
    assert "received signal 15" in r.log
    match = re.search(r"stop requested: saving a checkpoint at step (\d+)", r.log)
    assert match, r.log[-4000:]
    step = int(match.group(1))
    assert 1 <= step < SIGTERM_EPOCHS * (DIGITS_TRAIN // 8)  # stopped early, not at the end
    # Saved after the step that was running when the signal came, not one later.
    last_logged = max(int(s) for s in re.findall(r" step (\d+)/", r.log[:r.log.index("received signal 15")]))
    assert last_logged <= step <= last_logged + 1, (last_logged, step)
    ckpt = os.path.join(r.model_dir, "checkpoints", f"ckpt-{step}")
    assert os.path.exists(ckpt + ".index")
    assert checkpoint_step(os.path.join(r.model_dir, "checkpoints")) == step
    assert f"stopped at step {step}" in r.log


def test_the_config_is_saved_in_the_model_dir(sigterm_run):
    from nvae_tf.config import NVAEConfig
    path = os.path.join(sigterm_run.model_dir, "config.json")
    assert os.path.exists(path)
    assert NVAEConfig.load(path) == sigterm_run.config  # every field, as given by the flags
    with open(path) as f:
        assert json.load(f)["num_channels_enc"] == SMALL["num_channels_enc"]


# ===================================================================== subprocesses: replicas, workers
@pytest.mark.slow
def test_two_cpu_replicas_make_the_same_update_as_one_replica_with_the_global_batch(tmp_path):
    """Same seed, same global batch of 16: 2 logical CPU replicas x 8 vs 1 x 16, two deterministic steps.
    BatchNorm is synchronised and the data is split in order, so the gradients, optimizer slots and weights
    must agree up to float32 reduction order."""
    extra = ("--deterministic", "--max_steps=2", "--log_every=1")
    two = Run(train_args(str(tmp_path / "two"), "--cpu_replicas=2", *extra, batch_size=8, warmup_epochs=0),
              tmp_path / "two.log")
    one = Run(train_args(str(tmp_path / "one"), "--cpu_replicas=0", *extra, batch_size=16, warmup_epochs=0),
              tmp_path / "one.log")
    rcs = run_all(two, one)
    assert rcs == [0, 0], two.tail() + one.tail()
    assert "global batch 16 (2 replicas)" in two.text()
    assert "global batch 16 (1 replicas)" in one.text()
    for run in (one, two):  # what the first step spends its time on is said before it is spent
        text = run.text()
        assert re.search(r"built NVAE: [\d.]+M parameters in \d+ variables, in [\d.]+ s", text), text
        tracing = text.index("tracing the training step (about ")
        optimising = text.index("; optimising the graph and running the first step (about ")
        assert tracing < optimising < text.index("first step done in ") < text.index("step 1/2")
    a, b = str(tmp_path / "one" / "checkpoints"), str(tmp_path / "two" / "checkpoints")
    assert checkpoint_step(a) == checkpoint_step(b) == 2
    bad, worst = compare_checkpoints(a, b, rel=1e-4, atol=1e-5)
    assert not bad, describe(bad, len(worst))


@pytest.mark.slow
def test_multi_worker_mirrored_strategy_with_two_local_workers(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = str(tmp_path / "run")
    runs = []
    for index in range(2):
        env = child_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        runs.append(Run(train_args(model_dir, "--max_steps=2", "--log_every=1", batch_size=8),
                        tmp_path / f"worker{index}.log", env=env))
    rcs = run_all(*runs, timeout=240)
    logs = [r.text() for r in runs]
    assert rcs == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    for log in logs:
        assert "MultiWorkerMirroredStrategy" in log
        assert "global batch 16 (2 replicas)" in log
        assert "stopped at step 2" in log
    # The chief (worker 0) writes the checkpoint; the other worker's temporary one is removed.
    assert checkpoint_step(os.path.join(model_dir, "checkpoints")) == 2
    assert not glob.glob(os.path.join(model_dir, "worker_tmp", "*", "ckpt-*"))


# ============================================================================ subprocesses: refusals
@pytest.mark.parametrize("flag, value", [("num_nf", 1), ("num_channels_enc", 8)])
def test_resuming_with_a_structurally_different_flag_is_refused(sigterm_run, tmp_path, flag, value):
    model_dir = tmp_path / "run"
    shutil.copytree(sigterm_run.model_dir, model_dir)  # a real run: config.json and a checkpoint
    before = (model_dir / "config.json").read_text()
    checkpoints = files_digest(str(model_dir / "checkpoints"))
    rc, log = run_train(str(model_dir), log=tmp_path / "log", batch_size=8, epochs=SIGTERM_EPOCHS,
                        **{flag: value})
    assert rc == 2, log[-3000:]
    assert f"--{flag}" in log and "cannot resume" in log
    assert (model_dir / "config.json").read_text() == before  # the saved config is left alone
    assert files_digest(str(model_dir / "checkpoints")) == checkpoints


def test_an_unknown_precision_is_rejected(tmp_path):
    rc, log = run_train(str(tmp_path / "run"), "--precision=fp8", log=tmp_path / "log")
    assert rc != 0
    assert "precision" in log and "fp8" in log
    assert not (tmp_path / "run").exists()


def test_model_dir_is_required(tmp_path):
    args = [a for a in train_args("unused") if not a.startswith("--model_dir")]
    run = Run(args, tmp_path / "log")
    assert run.wait() == 2
    assert "--model_dir is required" in run.text()


def test_a_checkpoint_with_the_per_variable_optimiser_layout_of_earlier_versions_resumes(tmp_path, monkeypatch):
    """Checkpoints written before the optimiser stacked its slots hold one m and one u per variable
    (`optimizer/_variables/1..2n`). Resuming one restores the model and reads those slots into the stacked
    buffers, instead of calling the checkpoint damaged."""
    import keras
    import tensorflow as tf

    from nvae_tf import trainer as trainer_lib

    class PerVariableAdamax(keras.optimizers.Optimizer):
        """The optimiser state layout of earlier versions: m of every variable, then u of every variable."""

        def __init__(self, learning_rate, l2, **kwargs):
            super().__init__(learning_rate=learning_rate, name="nvae_adamax")
            self.l2 = l2

        def build(self, var_list):
            super().build(var_list)
            self._m = [self.add_variable_from_reference(v, "m") for v in var_list]
            self._u = [self.add_variable_from_reference(v, "u") for v in var_list]

        def update_step(self, gradient, variable, learning_rate):
            g = gradient + self.l2 * variable
            i = self._get_variable_index(variable)
            self.assign(self._m[i], 0.9 * self._m[i] + 0.1 * g)
            self.assign(self._u[i], tf.maximum(0.999 * self._u[i], tf.abs(g) + 1e-3))
            self.assign_sub(variable, learning_rate * self._m[i] / self._u[i])

        def stack_gradients(self, grads):  # the trainer's interface, without stacking (every step is finite here)
            return list(grads)

        def apply_stacked(self, grads, gate=None):
            self.apply(grads)

    config = small_config(batch_size=8)
    with monkeypatch.context() as patch:
        patch.setattr(trainer_lib, "NVAEAdamax", PerVariableAdamax)
        old = make_trainer(tmp_path, config, eval_batches=1)
        old.train(max_steps=2)
    m_old = [v.numpy() for v in old.optimizer._m]
    u_old = [v.numpy() for v in old.optimizer._u]
    assert any(np.abs(m).max() > 0 for m in m_old)

    resumed = make_trainer(tmp_path, config, eval_batches=1)
    path = resumed.restore()
    assert path.endswith("ckpt-2") and int(resumed.step.numpy()) == 2
    assert int(resumed.optimizer.iterations.numpy()) == 2
    for a, b in zip(old.model.variables, resumed.model.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    opt = resumed.optimizer
    assert len(opt.buckets) < len(m_old)
    for members, m, u in zip(opt.buckets, opt._m, opt._u):
        for k, i in enumerate(members):
            np.testing.assert_array_equal(m.numpy()[k], m_old[i])
            np.testing.assert_array_equal(u.numpy()[k], u_old[i])
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "damaged"))
    assert resumed.train(max_steps=3) == 3
