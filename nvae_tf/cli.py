"""Pieces of the command lines that need no TensorFlow, so that a wrong flag is reported in a second."""

import json
import os


def define_data_flags(flag_values=None):
    """Flags of every entry point that reads data."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    if "data_dir" in fv:
        return
    flags.DEFINE_string("data_dir", "", "Where the dataset is: a TFDS data directory (default "
                        "~/tensorflow_datasets), a folder of images, or GLOW TFRecords.", flag_values=fv)
    flags.DEFINE_bool("strict_data", False, "Stop at an unreadable image instead of skipping it.", flag_values=fv)
    flags.DEFINE_bool("download", True, "Let TFDS download and prepare a dataset that is not there yet.",
                      flag_values=fv)
    flags.DEFINE_bool("deterministic", False, "Reproducible input order and augmentation under --seed "
                      "(slower).", flag_values=fv)


def process_is_chief(environ=None):
    """Whether this process is the chief of its cluster, from TF_CONFIG or Slurm's variables alone.

    The chief is the task of type "chief", else worker 0; under Slurm (several tasks, no TF_CONFIG) task 0; a
    process outside a cluster is its own chief. `ValueError` if TF_CONFIG is not JSON."""
    environ = os.environ if environ is None else environ
    try:
        tf_config = json.loads(environ.get("TF_CONFIG") or "{}")
    except ValueError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
    cluster = tf_config.get("cluster", {})
    if sum(len(v) for k, v in cluster.items() if k in ("worker", "chief")) > 1:
        task = tf_config.get("task", {})
        return task.get("type") == "chief" or (task.get("type") == "worker" and int(task.get("index", 0)) == 0
                                               and "chief" not in cluster)
    if not tf_config and "SLURM_JOB_ID" in environ and int(environ.get("SLURM_STEP_NUM_TASKS") or 1) > 1:
        return environ.get("SLURM_PROCID", "0") == "0"
    return True
