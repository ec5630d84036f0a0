"""A run directory as training leaves it: `config.json`, `checkpoints/ckpt-<step>`, TensorBoard logs.

`evaluate`, `sample` and `export` start from a run directory alone: `load_model(model_dir)` reads the saved
config, builds the model and restores its weights (every model variable: BN statistics included) from the
latest checkpoint or a chosen one.
"""

import os

from nvae_tf import config as config_lib


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used, with what is wrong."""


def checkpoint_dir(model_dir):
    return os.path.join(model_dir, "checkpoints")


def model_variables(model):
    """Every model variable by its path: the form in which training checkpoints store the model."""
    return {v.path: v for v in model.variables}


def load_config(model_dir):
    if not model_dir:
        raise RunError("--model_dir is required")
    if not os.path.isdir(model_dir):
        raise RunError(f"--model_dir: {model_dir} does not exist")
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise RunError(f"--model_dir: {model_dir} has no config.json; is it a directory written by "
                       f"`python -m nvae_tf.train`?")
    try:
        return config_lib.NVAEConfig.load(path)
    except (ValueError, TypeError, KeyError) as e:
        raise RunError(f"{path} is not a valid nvae_tf config: {e}") from e


def find_checkpoint(model_dir, checkpoint=None):
    """The checkpoint prefix to restore: `checkpoint` (a prefix, or a step number of this run) or the latest."""
    import tensorflow as tf
    directory = checkpoint_dir(model_dir)
    if checkpoint:
        if str(checkpoint).isdigit():
            checkpoint = os.path.join(directory, f"ckpt-{int(checkpoint)}")
        if not tf.io.gfile.exists(str(checkpoint) + ".index"):
            available = tf.train.get_checkpoint_state(directory)
            names = [os.path.basename(p) for p in available.all_model_checkpoint_paths] if available else []
            raise RunError(f"--checkpoint: {checkpoint} does not exist (available in {directory}: "
                           f"{', '.join(names) or 'none'})")
        return str(checkpoint)
    latest = tf.train.latest_checkpoint(directory)
    if not latest:
        raise RunError(f"--model_dir: {model_dir} has no checkpoint in {directory}; train first "
                       f"(python -m nvae_tf.train --model_dir={model_dir} ...)")
    return latest


def checkpoint_step(path):
    tail = os.path.basename(path).rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def restore(model, path):
    """Restore every variable of a built `model` from the training checkpoint at `path`."""
    import tensorflow as tf
    try:
        status = tf.train.Checkpoint(model_variables=model_variables(model)).read(path)
        status.expect_partial().assert_existing_objects_matched()
    except (tf.errors.OpError, AssertionError, ValueError) as e:
        raise RunError(f"cannot restore the model from {path}: {str(e).splitlines()[0][:300]}") from e


def load_model(model_dir, checkpoint=None, remat=False):
    """(config, model with restored weights, checkpoint path). Build it inside a strategy scope to replicate."""
    from nvae_tf.model import NVAE
    config = load_config(model_dir)
    path = find_checkpoint(model_dir, checkpoint)
    model = NVAE(config, remat=remat)
    model.build()
    restore(model, path)
    return config, model, path
