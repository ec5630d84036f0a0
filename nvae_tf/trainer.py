"""The training loop of NVAE under a distribution strategy (`python -m nvae_tf.train` runs it).

`batch_size` is per replica; BatchNorm statistics are synchronised over the global batch. Checkpoints (model,
optimizer, step, power-iteration state, loss scale) go to `model_dir/checkpoints`; TensorBoard summaries to
`model_dir`.

A step whose loss, gradient or new BatchNorm statistics are not finite is skipped: it changes no model variable
(weights, BatchNorm statistics, power-iteration vectors, noise generator), no optimiser slot and no schedule;
only the step counter (the data position), the skip counters and, under mixed_float16, the loss scale move.
No checkpoint is written while any model or optimiser variable is non-finite.
"""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf import data as data_lib
from nvae_tf import distribute, imaging, objective, runs, sampling
from nvae_tf.errors import CheckpointWriteError, TrainingError, os_reason
from nvae_tf.model import NVAE
from nvae_tf.optim import NVAEAdamax, NVAELearningRate

LOSS_SCALE_INITIAL = 2.0 ** 10
LOSS_SCALE_GROWTH_STEPS = 2000
SAMPLE_TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0)
# Without --image_every / --eval_every: pictures after the first step and then this often, validation this often
# (seconds of training), besides every epoch's end.
AUTO_IMAGE_SECONDS = 600
AUTO_EVAL_SECONDS = 1800
# Measured on 2 CPU cores (benchmarks/startup.py, digits to CIFAR-10): tracing the training step took 2.5 to 4
# times as long as building the model and the optimiser, optimising its graph plus the first run 1.5 to 3.5
# times (more when one step itself computes for long, as MNIST's batch of 200 does).
TRACE_PER_BUILD_SECOND = 3.5
FIRST_RUN_PER_BUILD_SECOND = 2.5


# ------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds everything of a run inside the strategy's scope and runs the training loop."""

    def __init__(self, config, strategy, source, run_options):
        self.config, self.strategy, self.source, self.options = config, strategy, source, run_options
        self.model_dir = run_options.model_dir
        self.replicas = strategy.num_replicas_in_sync
        self.global_batch = config.batch_size * self.replicas
        self.steps_per_epoch = source.sizes["train"] // self.global_batch
        if self.steps_per_epoch < 1:
            raise data_lib.DataError(f"the training split has {source.sizes['train']} images, fewer than one "
                                     f"global batch of {self.global_batch}")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.chief = distribute.is_chief(strategy)
        self.fp16 = run_options.precision == "mixed_float16"
        keras.mixed_precision.set_global_policy(run_options.precision)
        self.alpha = objective.kl_balance_alpha(config)

        with strategy.scope():
            keras.utils.set_random_seed(config.seed)
            started = time.time()
            self.model = NVAE(config, remat=run_options.remat)
            logging.info("building NVAE (%s, %dx%dx%d)...", config.dataset, *config.image_shape)
            self.model.build()
            distribute.prepare_model(self.model, strategy)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step",
                                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.skipped = tf.Variable(0, dtype=tf.int64, trainable=False, name="skipped_steps",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.consecutive_skipped = tf.Variable(0, dtype=tf.int64, trainable=False,
                                                   aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.loss_scale = tf.Variable(LOSS_SCALE_INITIAL if self.fp16 else 1.0, trainable=False,
                                          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.finite_streak = tf.Variable(0, dtype=tf.int64, trainable=False,
                                             aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.schedule = NVAELearningRate(config.learning_rate, config.learning_rate_min, self.steps_per_epoch,
                                             config.epochs, config.warmup_epochs)
            # The schedules (learning rate, KL warm-up) follow the applied updates, so a skipped step leaves
            # them where they were.
            self.optimizer = NVAEAdamax(learning_rate=lambda: self.schedule(self.optimizer.iterations),
                                        l2=config.weight_decay)
            self.optimizer.build(self.model.trainable_variables)
            # Tracing and optimising the step are Python- and graph-bound work that grows with the model like
            # its build does, so the build's time on this machine predicts theirs.
            self.build_seconds = time.time() - started
            logging.info("built NVAE: %.1fM parameters in %d variables, in %.1f s",
                         sum(int(math.prod(v.shape)) for v in self.model.trainable_variables) / 1e6,
                         len(self.model.trainable_variables), self.build_seconds)
            # Validation draws its posterior samples from a generator of its own, re-seeded by the step, so it
            # leaves the training noise alone and gives the same figure wherever a run was resumed.
            self.eval_seed_generator = keras.random.SeedGenerator(config.seed, name="validation_noise")
        # What a forward pass changes besides the weights: BN running statistics, the power-iteration state and
        # the noise generator. A skipped step puts it back.
        self.forward_state = [v for v in self.model.variables if not v.trainable]

        # Every model variable by its path: BN statistics, power-iteration vectors and the noise generator's
        # state live in lists that a checkpoint of the model object alone would not reach.
        self._checkpointed = dict(model=self.model, model_variables=runs.model_variables(self.model),
                                  optimizer=self.optimizer, step=self.step, skipped=self.skipped,
                                  loss_scale=self.loss_scale, finite_streak=self.finite_streak)
        self.checkpoint = tf.train.Checkpoint(**self._checkpointed)
        directory = runs.checkpoint_dir(self.model_dir)
        if self.chief:
            runs.repair_checkpoints(directory)
        else:
            directory = os.path.join(self.model_dir, "worker_tmp", str(strategy.cluster_resolver.task_id))
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                  max_to_keep=run_options.keep_checkpoints)
        self.writer = (tf.summary.create_file_writer(self.model_dir) if self.chief
                       else tf.summary.create_noop_writer())
        # No autograph: the steps' control flow is explicit (tf.cond), and converting their Python code took
        # seconds of every start.
        self.train_step = tf.function(self._distributed_step, jit_compile=run_options.jit_compile, autograph=False)
        self._traced_eval_step = tf.function(self._distributed_eval, autograph=False)
        self._probe = None
        self._resumed = False
        self._traced = False
        self._pictures = self._picture_inputs = None

    @property
    def first_step_done(self):
        """Whether this process has run a training step."""
        return self._traced

    # -------------------------------------------------------------------------------------------- steps
    def _replica_step(self, images):
        variables = self.model.trainable_variables
        noise = distribute.replica_noise(self.model.seed_generator)
        with tf.GradientTape() as tape, self.model.shared_kernels():
            out = self.model(images, training=True, noise=noise)
            loss, metrics = objective.nvae_loss(self.model, out, self.optimizer.iterations, self.total_steps,
                                                self.alpha)
            scaled = (loss * self.loss_scale if self.fp16 else loss) / self.replicas
        grads = tape.gradient(scaled, variables)
        grads = [tf.zeros_like(v) if g is None else tf.cast(g, tf.float32) for g, v in zip(grads, variables)]
        # One batched all-reduce: every replica then holds the same sum and takes the same decision below.
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        return grads, metrics

    def _distributed_step(self, images):
        """One training step on a distributed batch; returns the metrics (global means).

        The step is applied only if the loss, the gradient norm and every new BatchNorm statistic and
        power-iteration vector are finite (one decision for all replicas). Otherwise the forward pass's changes
        to `forward_state` are undone, so the model, the optimiser and the schedules are exactly as before."""
        strategy = self.strategy
        # The fused BatchNorm layers' running statistics are computed and left unassigned during the pass
        # (`deferred_statistics`); the rest of the forward state is copied before it.
        deferred = {id(v) for bn in self.model.batchnorm_layers if bn.training_fn is distribute.fused_batch_norm
                    for v in (bn.moving_mean, bn.moving_variance)}
        copied = [v for v in self.forward_state if id(v) not in deferred]
        before = [tf.identity(v) for v in copied]
        learning_rate = self.schedule(self.optimizer.iterations)
        with distribute.deferred_statistics() as statistics:
            grads, metrics = strategy.run(self._replica_step, args=(images,))
        statistics = statistics.groups()
        grads = [strategy.experimental_local_results(g)[0] for g in grads]
        if self.fp16:  # without mixed_float16 the loss is not scaled
            grads = [g / self.loss_scale for g in grads]
        metrics = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in metrics.items()}
        # The gradients stacked as the optimiser keeps its slots: the norm and the update read the stacks (a few
        # dozen tensors instead of one per variable).
        stacked = self.optimizer.stack_gradients(grads)
        grad_norm = tf.linalg.global_norm(stacked)
        state_finite = [tf.reduce_all(tf.math.is_finite(v)) for v in copied if tf.as_dtype(v.dtype).is_floating]
        state_finite += [tf.reduce_all(tf.math.is_finite(after)) for _, _, after in statistics]
        finite = tf.logical_and(tf.math.is_finite(grad_norm), tf.math.is_finite(metrics["loss"]))
        finite = tf.logical_and(finite, tf.reduce_all(tf.stack(state_finite)))

        # Every piece of state takes its new value or keeps its old one by `finite`: no branch (a conditional
        # over the whole update cost seconds to trace and thousands of graph nodes).
        with tf.control_dependencies([finite]):  # no stacked copy of the weights before the gradients are done
            self.optimizer.apply_stacked(stacked, gate=finite)
        for variables, before_step, after in statistics:
            for variable, value in zip(variables, tf.unstack(tf.where(finite, after, before_step))):
                variable.assign(value)
        for variable, value in zip(copied, before):
            variable.assign(tf.where(finite, variable, value))
        skipped = tf.cast(tf.logical_not(finite), tf.int64)
        self.skipped.assign_add(skipped)
        self.consecutive_skipped.assign((self.consecutive_skipped + 1) * skipped)
        if self.fp16:
            grow = tf.logical_and(finite, self.finite_streak + 1 >= LOSS_SCALE_GROWTH_STEPS)
            self.loss_scale.assign(tf.where(finite, tf.where(grow, self.loss_scale * 2.0, self.loss_scale),
                                            self.loss_scale * 0.5))
            self.finite_streak.assign(tf.where(finite, tf.where(grow, tf.constant(0, tf.int64),
                                                                self.finite_streak + 1), tf.constant(0, tf.int64)))
        metrics["applied"] = finite
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = learning_rate
        self.step.assign_add(1)
        return metrics

    def _distributed_eval(self, images):
        """Summed negative ELBO (eval mode) and image count of a distributed batch."""


        def replica(x):
            out = self.model(x, training=False, noise=distribute.replica_noise(self.eval_seed_generator))
            return tf.reduce_sum(out.negative_elbo()), tf.cast(tf.shape(x)[0], tf.float32)
        return distribute.total(self.strategy, *self.strategy.run(replica, args=(images,)))

    # ---------------------------------------------------------------------------------------------- data
    def _train_data(self, epoch, offset=0):
        seed = self.config.seed + epoch

        def make(ctx):
            ds = self.source.dataset("train", self.config.batch_size, training=True, input_context=ctx,
                                     deterministic=self.options.deterministic, seed=seed)
            return ds.skip(offset) if offset else ds
        return self.strategy.distribute_datasets_from_function(make)

    # ---------------------------------------------------------------------------------------------- loop
    def distribute(self, dataset):
        """A dataset of global batches as `train_step` takes them."""
        return self.strategy.experimental_distribute_dataset(dataset)

    def restore(self):
        """Resume from the newest checkpoint that restores and holds finite values; returns its path or None.

        A checkpoint that fails to restore or holds a non-finite value is moved to `checkpoints/damaged/` (with
        a warning naming it) and the next older one is tried."""
        # Every worker resumes from the chief's checkpoints; only the chief moves damaged ones aside.
        directory = runs.checkpoint_dir(self.model_dir)
        damaged = []
        candidates = runs.list_checkpoints(directory)
        for path, problem in runs.restore_each(candidates, self._restore_one,
                                               [*self.model.variables, *self.optimizer.variables]):
            if problem:
                if self.chief:
                    runs.quarantine(path, problem)
                damaged.append(f"{os.path.basename(path)} ({problem})")
                continue
            logging.info("resumed from %s at step %d", path, int(self.step.numpy()))
            if self.chief and damaged:  # the state file changed: the manager reads it anew
                self.manager = tf.train.CheckpointManager(self.checkpoint, directory,
                                                          max_to_keep=self.options.keep_checkpoints)
            return path
        quarantined = os.path.join(directory, runs.DAMAGED_DIR)
        if damaged or runs.list_checkpoints(quarantined):
            listing = "; ".join(damaged) or ", ".join(os.path.basename(p) for p in runs.list_checkpoints(quarantined))
            raise TrainingError(f"no intact checkpoint in {directory} to resume from: {listing}. The damaged files "
                                f"are kept in {quarantined}; move that folder away to train from scratch.")
        return None

    def _eval_step(self, images):
        """Summed negative ELBO and image count of a distributed batch (eval mode); the first call traces."""
        if self._traced_eval_step.experimental_get_tracing_count() == 0:
            logging.info("tracing the validation step...")
            started = time.time()
            result = self._traced_eval_step(images)
            logging.info("validation step traced and run in %.0f s", time.time() - started)
            return result
        return self._traced_eval_step(images)

    def _restore_one(self, path):
        """Restore every piece of state from the checkpoint `path`; an optimiser state in the per-variable layout
        of earlier versions is read and stacked."""
        reader = tf.train.load_checkpoint(path)
        slots = self.optimizer.legacy_slots(reader)
        if slots is None:
            self.checkpoint.restore(path).assert_existing_objects_matched()
            return
        rest = tf.train.Checkpoint(**{k: v for k, v in self._checkpointed.items() if k != "optimizer"})
        rest.restore(path).expect_partial().assert_existing_objects_matched()
        self.optimizer.set_slots(*slots)
        self.optimizer.iterations.assign(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"))
        logging.info("read the optimiser state of %s (per-variable layout of earlier versions)", path)

    def _validation_nelbo(self, images, step):
        """Summed negative ELBO and image count of a distributed validation batch, with the noise of `step`."""
        self.eval_seed_generator.state.assign([self.config.seed + 1 + step, 0])
        return self._eval_step(images)

    def model_is_sound(self, step):
        """Whether the model gives a finite negative ELBO in evaluation mode on the first validation batch: a
        checkpoint is written only then, so that evaluating, sampling or resuming from it works."""
        if self._probe is None:
            ds = self.source.dataset("validation", self.config.batch_size, training=False, deterministic=True,
                                     seed=self.config.seed, cache=False).take(1)
            self._probe = next(iter(self.distribute(ds)))
        total, _ = self._validation_nelbo(self._probe, step)
        return bool(np.isfinite(float(total)))

    def save(self):
        """Write a checkpoint of the current step, if every model and optimiser value is finite; returns its path.

        `TrainingError` if a value is not finite (nothing is written), `CheckpointWriteError` if the write fails;
        either way the checkpoints already written stay as they were."""
        step = int(self.step.numpy())
        directory = self.manager.directory
        bad = runs.first_non_finite([*self.model.variables, *self.optimizer.variables])
        if bad:
            raise TrainingError(f"the model holds a non-finite value (in {bad}) at step {step}, so no checkpoint is "
                                f"written; the newest checkpoint is {self.manager.latest_checkpoint or 'none'}")
        if not self.model_is_sound(step):
            logging.warning("step %d: no checkpoint written: the model's validation negative ELBO is not finite; "
                            "the newest checkpoint is %s", step, self.manager.latest_checkpoint or "none")
            return None
        try:
            path = self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as e:
            prefix = os.path.join(directory, f"ckpt-{step}")
            for leftover in [prefix + "_temp", *tf.io.gfile.glob(prefix + ".*")]:
                try:
                    tf.io.gfile.rmtree(leftover) if tf.io.gfile.isdir(leftover) else tf.io.gfile.remove(leftover)
                except (tf.errors.OpError, OSError):
                    pass
            raise CheckpointWriteError(
                f"cannot write checkpoint ckpt-{step} to {directory}: {os_reason(e)}; "
                f"the newest intact checkpoint is {self.manager.latest_checkpoint or 'none'}") from None
        if not self.chief:
            tf.io.gfile.rmtree(os.path.dirname(path))
        return path

    def train(self, max_steps=0, stop_requested=lambda: False):
        """Train until the last epoch, `max_steps` in total, or a stop request; returns the final step.

        `stop_requested()` is asked after every step and every validation batch: a stop writes a checkpoint at
        once. The first call resumes from the newest checkpoint; later calls go on from the state in memory."""
        if not self._resumed:
            self.restore()
            self._resumed = True
        last = self.total_steps if not max_steps else min(max_steps, self.total_steps)
        step = int(self.step.numpy())
        if step >= last:
            logging.info("nothing to do: the run is at step %d of %d", step, last)
            return step
        logging.info("training %s: %d images, global batch %d (%d replicas), %d steps per epoch, steps %d..%d",
                     self.config.dataset, self.source.sizes["train"], self.global_batch, self.replicas,
                     self.steps_per_epoch, step, last)
        start_time, start_step = time.time(), step
        window_time, window_step = start_time, step
        saved_step = step
        self._last_images, self._last_eval = None, start_time
        while step < last and not stop_requested():
            epoch, offset = divmod(step, self.steps_per_epoch)
            batches = 0
            for images in self._train_data(epoch, offset):
                if not self._traced:
                    metrics = self._first_step(images)
                else:
                    metrics = self.train_step(images)
                step += 1
                batches += 1
                if int(self.consecutive_skipped.numpy()) >= self.options.max_skipped_steps:
                    raise TrainingError(
                        f"{self.options.max_skipped_steps} consecutive steps had a non-finite loss or gradient "
                        f"(step {step}). "
                        f"The last good checkpoint is kept: {self.manager.latest_checkpoint or 'none was written'}. "
                        f"Known remedies: a lower "
                        f"--learning_rate (e.g. 5e-3 or 1e-3 for small batches), a larger --weight_decay_norm, or "
                        f"--weight_decay_norm_anneal with --weight_decay_norm_init=1.0; check the data for "
                        f"corrupt images.")
                if step % self.options.log_every == 0 or step == last:
                    now = time.time()
                    rate = (step - window_step) * self.global_batch / max(now - window_time, 1e-9)
                    window_time, window_step = now, step
                    self._log(step, last, epoch, metrics, rate, start_time, start_step)
                if step < last and not self._epoch_summaries_due(step, last) and not stop_requested():
                    self._periodic_summaries(step, stop_requested)  # epoch ends and the end have their own
                if step - saved_step >= self.options.checkpoint_every and int(self.consecutive_skipped.numpy()) == 0:
                    self.save()
                    saved_step = step
                if step >= last or stop_requested():
                    break
            if stop_requested():
                break
            if step < last and step % self.steps_per_epoch:
                # The epoch's data ran out early (images that became unreadable were skipped): the data
                # position moves on to the next epoch.
                end = (epoch + 1) * self.steps_per_epoch
                logging.warning("epoch %d gave %d batches fewer than its %d (images skipped while reading); "
                                "going on at step %d", epoch + 1, end - step, self.steps_per_epoch, end)
                step = end
                self.step.assign(step)
            if self._epoch_summaries_due(step, last):
                self._end_of_epoch(step, epoch, stop_requested)
            elif step >= last and not stop_requested():  # --max_steps ended the run inside an epoch
                self._validate(step, stop_requested=stop_requested)
                self._write_images(step)
        if stop_requested():
            logging.info("stop requested: saving a checkpoint at step %d", step)
        if step != saved_step or not self.manager.latest_checkpoint:
            self.save()
        self.writer.flush()
        return step

    def _first_step(self, images):
        """The first training step of this process, with word of what takes the time: tracing the step into a
        graph, then TensorFlow's optimisation of that graph and the first run."""
        logging.info("tracing the training step (about %s on this machine)...",
                     _about(TRACE_PER_BUILD_SECOND * self.build_seconds))
        started = time.time()
        self.train_step.get_concrete_function(images)
        traced = time.time()
        logging.info("traced in %.0f s; optimising the graph and running the first step (about %s)...",
                     traced - started, _about(FIRST_RUN_PER_BUILD_SECOND * self.build_seconds))
        metrics = self.train_step(images)
        float(metrics["loss"])
        logging.info("first step done in %.0f s", time.time() - traced)
        self._traced = True
        return metrics

    def _log(self, step, last, epoch, metrics, rate, start_time, start_step):
        values = {k: v.numpy() for k, v in metrics.items()}
        elapsed = time.time() - start_time
        eta = elapsed / max(step - start_step, 1) * (last - step)
        logging.info("step %d/%d epoch %d  loss %.4g  bpd %.4f  kl %.4g  beta %.3g  lr %.3g  %.1f img/s  "
                     "skipped %d  ETA %s", step, last, epoch + 1, values["loss"], values["bpd"], values["kl"],
                     values["beta"], values["learning_rate"], rate, int(self.skipped.numpy()), _hms(eta))
        with self.writer.as_default(step=step):
            for name in ("loss", "recon", "kl", "nelbo", "bpd", "beta", "lambda", "learning_rate", "grad_norm",
                         "spectral_norm", "bn_norm"):
                tf.summary.scalar(f"train/{name}", values[name])
            for k, v in enumerate(values["kl_per_group"]):
                tf.summary.scalar(f"kl_per_group/{k:02d}", v)
            for k, v in enumerate(values["active_units_per_group"]):
                tf.summary.scalar(f"active_units_per_group/{k:02d}", v)
            tf.summary.scalar("train/skipped_steps", int(self.skipped.numpy()))
            tf.summary.scalar("train/images_per_second", rate)
            if self.fp16:
                tf.summary.scalar("train/loss_scale", float(self.loss_scale.numpy()))

    def _periodic_summaries(self, step, stop_requested):
        """Pictures every `--image_every` steps and validation every `--eval_every` steps; with 0, pictures after
        the first step of the process and then every `AUTO_IMAGE_SECONDS`, validation every `AUTO_EVAL_SECONDS`
        (on one machine: the workers of a cluster must validate at the same steps, so there it waits for the
        epoch's end)."""
        now = time.time()
        every = self.options.image_every
        if (step % every == 0) if every else (self._last_images is None
                                              or now - self._last_images >= AUTO_IMAGE_SECONDS):
            self._write_images(step)
        every = self.options.eval_every
        single_machine = not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if (step % every == 0) if every else (single_machine and now - self._last_eval >= AUTO_EVAL_SECONDS):
            self._validate(step, stop_requested=stop_requested)

    def _epoch_summaries_due(self, step, last):
        """Whether `step` ends an epoch that gets validation and pictures: every `--epoch_summaries_every`-th
        epoch, and the last one of the run."""
        if step % self.steps_per_epoch:
            return False
        return (step // self.steps_per_epoch) % self.options.epoch_summaries_every == 0 or step >= last

    def _end_of_epoch(self, step, epoch, stop_requested=lambda: False):
        """Validation bits/dim and pictures; abandoned at once if a stop is requested."""
        if self._validate(step, epoch, stop_requested) is not None:
            self._write_images(step)

    def _validation_data(self):
        ds = self.source.dataset("validation", self.config.batch_size, training=False,
                                 deterministic=self.options.deterministic, seed=self.config.seed)
        return ds.take(self.options.eval_batches) if self.options.eval_batches else ds

    def _validate(self, step, epoch=None, stop_requested=lambda: False):
        """Validation bits/dim (negative ELBO) at `step` (the end of `epoch`, if given), logged and summarised;
        None if a stop abandoned it."""
        self._last_eval = time.time()
        batches = self.options.eval_batches or "all"
        where = f"after epoch {epoch + 1} (step {step}, {batches} batches)" if epoch is not None else (
            f"at step {step} ({batches} batches)")
        what = f"of epoch {epoch + 1}" if epoch is not None else f"at step {step}"
        total, count = 0.0, 0.0  # host sums of device scalars, read once after the loop
        logging.info("validating %s", where)
        self.eval_seed_generator.state.assign([self.config.seed + 1 + step, 0])
        for images in self.strategy.experimental_distribute_dataset(self._validation_data()):
            t, c = self._eval_step(images)
            total, count = total + t, count + c
            if stop_requested():
                logging.info("validation %s abandoned: stop requested", what)
                return None
        total, count = float(total), float(count)
        bpd = objective.bits_per_dim(total / max(count, 1.0), self.config.data_dims)
        logging.info("%s: validation bpd %.4f (negative ELBO, %d images)",
                     f"epoch {epoch + 1} done at step {step}" if epoch is not None else f"step {step}", bpd,
                     int(count))
        if self.chief:
            with self.writer.as_default(step=step):
                tf.summary.scalar("validation/bpd", bpd)
            self.writer.flush()
        return bpd

    def picture_arrays(self, images):
        """(inputs, reconstructions, samples `[len(SAMPLE_TEMPERATURES), n, H, W, C]`) as the TensorBoard pictures
        show them, for uint8 `images`: decoder means, the reconstructions and every temperature's samples drawn
        from the same seeded noise (`config.seed`, "summary_noise"), restarted at every call. One traced function
        (traced again only for another batch size), so pictures cost a few decoder passes, not seconds of eager
        ops."""
        if self._pictures is None:
            seed = self.config.seed
            noise = sampling.seeded_noise(seed, "summary_noise")
            n = self.options.num_summary_images

            def pictures(batch):
                sampling.restart_noise(noise, seed)
                inputs, recon = sampling.reconstruct(self.model, batch, pixels="mean", noise=noise)
                sampling.restart_noise(noise, seed)
                rows = [self.model.sample(n, t, noise=noise, mode="mean") for t in SAMPLE_TEMPERATURES]
                return inputs, recon, tf.stack(rows)

            self._pictures = tf.function(pictures, autograph=False)
        return [x.numpy() for x in self._pictures(images)]

    def _write_images(self, step):
        """TensorBoard pictures at `step`: validation images beside their reconstructions, and one grid of
        samples with a row per temperature, each row labelled. The noise is seeded the same way every time (the
        same latents at every step, so the pictures show the model change) and is not the training noise."""
        self._last_images = time.time()
        n = self.options.num_summary_images
        if not self.chief or n == 0:
            return
        started = time.time()
        if self._picture_inputs is None:
            first = next(iter(self._validation_data()), None)
            self._picture_inputs = first[:n] if first is not None else tf.zeros([0, *self.config.image_shape],
                                                                                 tf.uint8)
        inputs, recon, rows = self.picture_arrays(self._picture_inputs)
        with self.writer.as_default(step=step):
            if len(inputs):
                tf.summary.image("reconstructions", np.concatenate([inputs, recon], axis=2), max_outputs=n,
                                 step=step)
            grid = imaging.make_grid(rows.reshape(-1, *rows.shape[2:]), columns=n,
                                     row_labels=[f"t={t:g}" for t in SAMPLE_TEMPERATURES])
            tf.summary.image("samples", grid[None], step=step)
        self.writer.flush()
        logging.info("pictures of step %d written to TensorBoard (%.0f s)", step, time.time() - started)


def _about(seconds):
    """A rough duration for a progress message: "20 s", "3 min"."""
    if seconds < 90:
        return f"{max(5, 5 * round(seconds / 5)):.0f} s"
    return f"{round(seconds / 60):.0f} min"


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


