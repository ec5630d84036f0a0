"""`python -m nvae_tf.train --flagfile=configs/X.flags --model_dir=runs/X`: train NVAE.

One device, all local GPUs (MirroredStrategy), several machines (MultiWorkerMirroredStrategy when TF_CONFIG
names a cluster), or `--cpu_replicas=N` logical CPU devices. `batch_size` is per replica; BatchNorm statistics
are synchronised over the global batch. Checkpoints (model, optimizer, step, power-iteration state, loss
scale) go to `model_dir/checkpoints`; a second run with the same `model_dir` resumes. SIGTERM or Ctrl-C
writes a checkpoint and exits. TensorBoard summaries go to `model_dir`.
"""

import json
import math
import os
import signal
import sys
import time

from absl import app, flags, logging

from nvae_tf import config as config_lib
from nvae_tf import data as data_lib
from nvae_tf import runs

FLAGS = flags.FLAGS

# Fields that change the model's weights: a run cannot resume with different values.
STRUCTURAL_FIELDS = ("dataset", "image_size", "num_channels_enc", "num_channels_dec", "num_preprocess_blocks",
                     "num_preprocess_cells", "num_postprocess_blocks", "num_postprocess_cells", "num_latent_scales",
                     "num_groups_per_scale", "ada_groups", "min_groups_per_scale", "num_latent_per_group",
                     "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_nf", "num_mixture_dec", "use_se",
                     "res_dist", "num_x_bits")
LOSS_SCALE_INITIAL = 2.0 ** 10
LOSS_SCALE_GROWTH_STEPS = 2000
SAMPLE_TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0)


def define_flags():
    config_lib.define_flags()
    data_lib.define_flags()
    flags.DEFINE_string("model_dir", None, "Run directory: config, checkpoints and TensorBoard logs.")
    flags.DEFINE_enum("precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"], "Compute precision.")
    flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA (slower on CPU).")
    flags.DEFINE_bool("remat", False, "Gradient checkpointing per cell: keep only each cell's input and "
                      "recompute its activations during back-propagation (less memory, about a third more "
                      "compute). Does not change the result.")
    flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into this many logical devices and train on all "
                         "of them with MirroredStrategy (for testing multi-replica training anywhere).")
    flags.DEFINE_integer("max_steps", 0, "Stop after this many steps in total (0: train all epochs).")
    flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints.")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints to keep.")
    flags.DEFINE_integer("log_every", 50, "Steps between log lines and scalar summaries.")
    flags.DEFINE_integer("max_skipped_steps", 20, "Stop after this many consecutive steps with a non-finite "
                         "loss or gradient.")
    flags.DEFINE_integer("eval_batches", 20, "Validation batches for the bits/dim of each epoch (0: all).")
    flags.DEFINE_integer("num_summary_images", 8, "Images in each TensorBoard image summary.")


class TrainingError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ setup
def split_cpu(num):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num)


def make_strategy(cpu_replicas=0):
    """MultiWorkerMirrored with a TF_CONFIG cluster, Mirrored over several GPUs or CPU replicas, else default."""
    import tensorflow as tf
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    workers = sum(len(v) for k, v in tf_config.get("cluster", {}).items() if k in ("worker", "chief"))
    if workers > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS") or 1)
    if not tf_config and "SLURM_JOB_ID" in os.environ and slurm_tasks > 1:
        resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if cpu_replicas > 1:
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return tf.distribute.get_strategy()


def prepare_model_dir(model_dir, config, write=True):
    """Save the config in `model_dir` (`write`: the chief only), or check it against the saved one when resuming."""
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, "config.json")
    if os.path.exists(path):
        saved = config_lib.NVAEConfig.load(path)
        for name in STRUCTURAL_FIELDS:
            if getattr(saved, name) != getattr(config, name):
                raise config_lib.ConfigError(
                    name, f"{model_dir} holds a run with {name}={getattr(saved, name)!r}, but this run asks for "
                    f"{getattr(config, name)!r}; that changes the model, so it cannot resume. Use another "
                    f"--model_dir, or the saved value.")
        changed = [f for f, v in config.to_dict().items() if saved.to_dict()[f] != v]
        if changed:
            logging.warning("resuming with changed settings: %s", ", ".join(
                f"{f} {saved.to_dict()[f]!r} -> {config.to_dict()[f]!r}" for f in changed))
    if write:
        config.save(path + ".tmp")
        os.replace(path + ".tmp", path)


def is_chief(strategy):
    import tensorflow as tf
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and
                                     "chief" not in resolver.cluster_spec().as_dict())


class ReplicaNoise:
    """Each replica draws the noise of the whole global batch and keeps its own slice, so the posterior samples
    of N replicas are those of one replica with the global batch (and no two replicas share noise)."""

    def __init__(self, noise, replica_id, num_replicas):
        self.noise, self.replica_id, self.num_replicas = noise, replica_id, num_replicas

    def _slice(self, draw, shape, dtype):
        if self.num_replicas == 1:
            return draw(shape, dtype)
        batch = shape[0]
        full = draw((batch * self.num_replicas, *shape[1:]), dtype)
        return full[batch * self.replica_id:batch * (self.replica_id + 1)]

    def normal(self, shape, dtype="float32"):
        return self._slice(self.noise.normal, shape, dtype)

    def uniform(self, shape, dtype="float32"):
        return self._slice(self.noise.uniform, shape, dtype)


# ------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Builds everything of a run inside the strategy's scope and runs the training loop."""

    def __init__(self, config, model_dir, strategy, source, precision="float32", jit_compile=False, remat=False,
                 deterministic=False, checkpoint_every=1000, keep_checkpoints=3, log_every=50,
                 max_skipped_steps=20, eval_batches=20, num_summary_images=8):
        import keras
        import tensorflow as tf

        from nvae_tf import objective
        from nvae_tf.model import NVAE
        from nvae_tf.optim import NVAEAdamax, NVAELearningRate

        self.config, self.model_dir, self.strategy, self.source = config, model_dir, strategy, source
        self.deterministic, self.log_every = deterministic, log_every
        self.checkpoint_every, self.max_skipped_steps = checkpoint_every, max_skipped_steps
        self.eval_batches, self.num_summary_images = eval_batches, num_summary_images
        self.replicas = strategy.num_replicas_in_sync
        self.global_batch = config.batch_size * self.replicas
        self.steps_per_epoch = source.sizes["train"] // self.global_batch
        if self.steps_per_epoch < 1:
            raise data_lib.DataError(f"the training split has {source.sizes['train']} images, fewer than one "
                                     f"global batch of {self.global_batch}")
        self.total_steps = config.epochs * self.steps_per_epoch
        self.chief = is_chief(strategy)
        self.fp16 = precision == "mixed_float16"
        keras.mixed_precision.set_global_policy(precision)
        self.alpha = objective.kl_balance_alpha(config)

        with strategy.scope():
            keras.utils.set_random_seed(config.seed)
            self.model = NVAE(config, remat=remat)
            self.model.build()
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
            self.optimizer = NVAEAdamax(learning_rate=lambda: self.schedule(self.step), l2=config.weight_decay)
            self.optimizer.build(self.model.trainable_variables)

        # Every model variable by its path: BN statistics, power-iteration vectors and the noise generator's
        # state live in lists that a checkpoint of the model object alone would not reach.
        self.checkpoint = tf.train.Checkpoint(model=self.model,
                                              model_variables=runs.model_variables(self.model),
                                              optimizer=self.optimizer, step=self.step,
                                              skipped=self.skipped, loss_scale=self.loss_scale,
                                              finite_streak=self.finite_streak)
        directory = runs.checkpoint_dir(model_dir)
        if not self.chief:
            directory = os.path.join(model_dir, "worker_tmp", str(strategy.cluster_resolver.task_id))
        self.manager = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep_checkpoints)
        self.writer = tf.summary.create_file_writer(model_dir) if self.chief else tf.summary.create_noop_writer()
        self._train_step = tf.function(self._distributed_step, jit_compile=jit_compile)
        self._eval_step = tf.function(self._distributed_eval)

    # -------------------------------------------------------------------------------------------- steps
    def _replica_step(self, images):
        import tensorflow as tf

        from nvae_tf import objective
        from nvae_tf.model.distributions import KerasNoise
        variables = self.model.trainable_variables
        context = tf.distribute.get_replica_context()
        noise = ReplicaNoise(KerasNoise(self.model.seed_generator), context.replica_id_in_sync_group,
                             context.num_replicas_in_sync)
        with tf.GradientTape() as tape:
            out = self.model(images, training=True, noise=noise)
            loss, metrics = objective.nvae_loss(self.model, out, self.step, self.total_steps, self.alpha)
            scaled = loss * self.loss_scale / self.replicas
        grads = tape.gradient(scaled, variables)
        grads = [tf.zeros_like(v) if g is None else tf.cast(g, tf.float32) for g, v in zip(grads, variables)]
        # One batched all-reduce: every replica then holds the same sum and takes the same decision below.
        grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        return grads, metrics

    def _distributed_step(self, images, inject_nan=False):
        import tensorflow as tf
        strategy = self.strategy
        grads, metrics = strategy.run(self._replica_step, args=(images,))
        grads = [strategy.experimental_local_results(g)[0] / self.loss_scale for g in grads]
        metrics = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in metrics.items()}
        if inject_nan:
            grads[0] = grads[0] * float("nan")
        grad_norm = tf.linalg.global_norm(grads)
        finite = tf.logical_and(tf.math.is_finite(grad_norm), tf.math.is_finite(metrics["loss"]))

        def apply():
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            self.consecutive_skipped.assign(0)
            if self.fp16:
                grow = self.finite_streak + 1 >= LOSS_SCALE_GROWTH_STEPS
                self.loss_scale.assign(tf.where(grow, self.loss_scale * 2.0, self.loss_scale))
                self.finite_streak.assign(tf.where(grow, tf.constant(0, tf.int64), self.finite_streak + 1))
            return tf.constant(True)

        def skip():
            self.skipped.assign_add(1)
            self.consecutive_skipped.assign_add(1)
            if self.fp16:
                self.loss_scale.assign(self.loss_scale * 0.5)
                self.finite_streak.assign(0)
            return tf.constant(False)

        tf.cond(finite, apply, skip)
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = self.schedule(self.step)
        self.step.assign_add(1)
        return metrics

    def _distributed_eval(self, images):
        import tensorflow as tf

        def replica(x):
            out = self.model(x, training=False)
            nelbo = -out["recon_log_prob"] + tf.reduce_sum(out["kl"], axis=1)
            return tf.reduce_sum(nelbo), tf.cast(tf.shape(x)[0], tf.float32)
        total, count = self.strategy.run(replica, args=(images,))
        return (self.strategy.reduce(tf.distribute.ReduceOp.SUM, total, axis=None),
                self.strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None))

    # ---------------------------------------------------------------------------------------------- data
    def _train_data(self, epoch, offset=0):
        seed = self.config.seed + epoch

        def make(ctx):
            ds = self.source.dataset("train", self.config.batch_size, training=True, input_context=ctx,
                                     deterministic=self.deterministic, seed=seed)
            return ds.skip(offset) if offset else ds
        return self.strategy.distribute_datasets_from_function(make)

    # ---------------------------------------------------------------------------------------------- loop
    def restore(self):
        latest = self.manager.latest_checkpoint
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            logging.info("resumed from %s at step %d", latest, int(self.step.numpy()))
        return latest

    def save(self):
        path = self.manager.save(checkpoint_number=int(self.step.numpy()))
        if not self.chief:
            import tensorflow as tf
            tf.io.gfile.rmtree(os.path.dirname(path))
        return path

    def train(self, max_steps=0, stop_requested=lambda: False, inject_nan_at=()):
        """Train until the last epoch, `max_steps` in total, or a stop request; returns the final step."""
        self.restore()
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
        while step < last:
            epoch, offset = divmod(step, self.steps_per_epoch)
            for images in self._train_data(epoch, offset):
                metrics = self._train_step(images, inject_nan=step in inject_nan_at)
                step += 1
                if int(self.consecutive_skipped.numpy()) >= self.max_skipped_steps:
                    raise TrainingError(
                        f"{self.max_skipped_steps} consecutive steps had a non-finite loss or gradient (step {step}). "
                        f"The last good checkpoint is kept in {self.manager.directory}. Known remedies: a lower "
                        f"--learning_rate (e.g. 5e-3 or 1e-3 for small batches), a larger --weight_decay_norm, or "
                        f"--weight_decay_norm_anneal with --weight_decay_norm_init=1.0; check the data for "
                        f"corrupt images.")
                if step % self.log_every == 0 or step == last:
                    now = time.time()
                    rate = (step - window_step) * self.global_batch / max(now - window_time, 1e-9)
                    window_time, window_step = now, step
                    self._log(step, last, epoch, metrics, rate, start_time, start_step)
                if step - saved_step >= self.checkpoint_every:
                    self.save()
                    saved_step = step
                if step >= last or stop_requested():
                    break
            if stop_requested():
                logging.info("stop requested: saving a checkpoint at step %d", step)
                break
            if step % self.steps_per_epoch == 0:
                self._end_of_epoch(step, epoch)
        if step != saved_step or not self.manager.latest_checkpoint:
            self.save()
        self.writer.flush()
        return step

    def _log(self, step, last, epoch, metrics, rate, start_time, start_step):
        import tensorflow as tf
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

    def _end_of_epoch(self, step, epoch):
        import numpy as np
        import tensorflow as tf
        total, count = 0.0, 0.0  # host sums of device scalars, read once after the loop
        ds = self.source.dataset("validation", self.config.batch_size, training=False,
                                 deterministic=self.deterministic, seed=self.config.seed)
        if self.eval_batches:
            ds = ds.take(self.eval_batches)
        for images in self.strategy.experimental_distribute_dataset(ds):
            t, c = self._eval_step(images)
            total, count = total + t, count + c
        total, count = float(total), float(count)
        bpd = total / max(count, 1.0) / (math.log(2.0) * self.config.data_dims)
        logging.info("epoch %d done at step %d: validation bpd %.4f (negative ELBO, %d images)", epoch + 1, step,
                     bpd, int(count))
        if not self.chief:
            return
        with self.writer.as_default(step=step):
            tf.summary.scalar("validation/bpd", bpd)
            n = self.num_summary_images
            first = next(iter(ds), None)
            if first is not None:
                x = first[:n]
                out = self.model(x, training=False)
                recon = self.model.decode_pixels(out["decoder_params"], mode="mean").numpy()
                inputs = self.model.preprocess_images(x).numpy()
                tf.summary.image("reconstructions", np.concatenate([inputs, recon], axis=2), max_outputs=n, step=step)
            for t in SAMPLE_TEMPERATURES:
                tf.summary.image(f"samples/t{t:.1f}", self.model.sample(n, t, mode="mean").numpy(), max_outputs=n,
                                 step=step)
        self.writer.flush()


def _hms(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -------------------------------------------------------------------------------------------- entry point
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model_dir:
        print("error: --model_dir is required", file=sys.stderr)
        return 2
    try:
        config = config_lib.from_flags()
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.cpu_replicas > 1:
        split_cpu(FLAGS.cpu_replicas)
    import tensorflow as tf
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    try:
        strategy = make_strategy(FLAGS.cpu_replicas)
        prepare_model_dir(FLAGS.model_dir, config, write=is_chief(strategy))
        source = data_lib.open_source(config, FLAGS.data_dir, strict=FLAGS.strict_data, download=FLAGS.download)
        trainer = Trainer(config, FLAGS.model_dir, strategy, source, precision=FLAGS.precision,
                          jit_compile=FLAGS.jit_compile, remat=FLAGS.remat, deterministic=FLAGS.deterministic,
                          checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=FLAGS.keep_checkpoints,
                          log_every=FLAGS.log_every, max_skipped_steps=FLAGS.max_skipped_steps,
                          eval_batches=FLAGS.eval_batches, num_summary_images=FLAGS.num_summary_images)
    except (config_lib.ConfigError, data_lib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    stop = {"requested": False}

    def request_stop(signum, _frame):
        logging.warning("received signal %d: finishing the current step and saving a checkpoint", signum)
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        step = trainer.train(max_steps=FLAGS.max_steps, stop_requested=lambda: stop["requested"])
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    logging.info("stopped at step %d; checkpoint %s", step, trainer.manager.latest_checkpoint)
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
