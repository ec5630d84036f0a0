"""`python -m nvae_tf.train --flagfile=configs/X.flags --model_dir=runs/X`: train NVAE.

One device, all local GPUs (MirroredStrategy), several machines (MultiWorkerMirroredStrategy when TF_CONFIG
names a cluster), or `--cpu_replicas=N` logical CPU devices. `batch_size` is per replica; BatchNorm statistics
are synchronised over the global batch. Checkpoints (model, optimizer, step, power-iteration state, loss
scale) go to `model_dir/checkpoints`; a second run with the same `model_dir` resumes from the newest intact
checkpoint, while a run that is still alive keeps the directory to itself. SIGTERM or Ctrl-C writes a
checkpoint after the current step and exits. TensorBoard summaries go to `model_dir`.

A step whose loss, gradient or new BatchNorm statistics are not finite is skipped: it changes no model variable
(weights, BatchNorm statistics, power-iteration vectors, noise generator), no optimiser slot and no schedule;
only the step counter (the data position), the skip counters and, under mixed_float16, the loss scale move.
No checkpoint is written while any model or optimiser variable is non-finite (`nvae_tf.trainer`).
"""

import signal
import sys

from absl import logging

from nvae_tf import cli, options, runs
from nvae_tf import config as config_lib
from nvae_tf.errors import RunError, TrainingError
from nvae_tf.options import TrainOptions


def run(config, run_options, handle_signals=False):
    """Train `config` as `run_options` say; returns (final step, newest checkpoint).

    The flags are checked and the run directory locked before TensorFlow starts, so a wrong value or a second
    run on the same directory stops at once. With `handle_signals`, SIGTERM and SIGINT once training has started
    write a checkpoint after the current step and end the run."""
    options.check(run_options)
    runs.check_model_dir(run_options.model_dir)
    chief = cli.process_is_chief()
    model_dir = run_options.model_dir
    before = runs.FolderSnapshot(model_dir)
    fresh = not before.before  # absent or empty
    # The lock is taken before TensorFlow starts, so a second run on the same directory stops at once.
    lock = runs.open_for_training(model_dir) if chief else None
    trainer = None
    try:
        import nvae_tf
        caveat = nvae_tf.choose_cpu_kernels(config, run_options.deterministic)  # before TensorFlow is imported
        if caveat:
            logging.warning("%s", caveat)
        from nvae_tf import distribute
        if run_options.cpu_replicas > 1:
            distribute.split_cpu(run_options.cpu_replicas)
        import tensorflow as tf

        from nvae_tf import data as data_lib
        from nvae_tf.trainer import Trainer
        if run_options.deterministic:
            tf.config.experimental.enable_op_determinism()
        strategy = distribute.make_strategy(run_options.cpu_replicas)
        logging.info("running on %s", distribute.describe(strategy))
        runs.write_config(run_options.model_dir, config, write=chief)
        source = data_lib.open_source(config, run_options.data_dir, strict=run_options.strict_data,
                                      download=run_options.download)
        if chief:
            runs.record_data_dir(run_options.model_dir, run_options.data_dir)
        trainer = Trainer(config, strategy, source, run_options)
        stop = []
        if handle_signals:
            def request_stop(signum, _frame):
                logging.warning("received signal %d: saving a checkpoint after the current step", signum)
                stop.append(signum)

            signal.signal(signal.SIGTERM, request_stop)
            signal.signal(signal.SIGINT, request_stop)
        try:
            step = trainer.train(max_steps=run_options.max_steps, stop_requested=lambda: bool(stop))
        except tf.errors.InvalidArgumentError as e:
            if "unreadable image" not in str(e):
                raise
            raise RunError(f"{data_lib.read_error_text(e)} (--strict_data); the newest checkpoint is "
                           f"{trainer.manager.latest_checkpoint or 'none'}") from None
        return step, trainer.manager.latest_checkpoint
    except BaseException:
        if lock and fresh and not (trainer and trainer.first_step_done):
            # Failed before its first step (missing data, a bad flag TensorFlow refused, ...): the new run
            # directory is taken away again, so the same command can simply be run again.
            lock.release()
            lock = None
            before.undo()
        raise
    finally:
        if lock:
            lock.release()


def run_from_flags(fv):
    config = config_lib.from_flags(fv)
    run_options = options.from_flags(TrainOptions, fv)
    try:
        step, checkpoint = run(config, run_options, handle_signals=True)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    logging.info("stopped at step %d; checkpoint %s", step, checkpoint)
    return 0


def main():
    cli.main("nvae_tf.train", __doc__, [config_lib.NVAEConfig, TrainOptions], run_from_flags,
             usage="--flagfile=configs/X.flags --model_dir=DIR [flags]")


if __name__ == "__main__":
    main()
