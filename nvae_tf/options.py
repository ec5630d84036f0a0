"""Options as frozen dataclasses; every field is a command-line flag of the same name.

A field is declared with `option(default, help, group=..., ...)`; its metadata says which part of `--help` lists
it (data, model, training, run), the smallest value it takes, its choices, whether it is required and, for the
model configuration, whether it is structural (changes the weights, so a run cannot resume with another value).
`define_flags(cls)` turns a dataclass into absl flags, `from_flags(cls)` reads them back, `check(options)`
applies the bounds. Needs no TensorFlow, so a wrong flag is reported in well under a second.
"""

import dataclasses
from dataclasses import dataclass, field

from nvae_tf.errors import ConfigError, RunError

GROUPS = ("data", "model", "training", "run")


def option(default, help, group="run", minimum=None, choices=None, required=False, structural=False):
    """A dataclass field that is also a flag (see the module docstring)."""
    return field(default=default, metadata={"help": help, "group": group, "minimum": minimum,
                                            "choices": tuple(choices) if choices else None, "required": required,
                                            "structural": structural})


def fields(cls):
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def define_flags(cls, flag_values=None):
    """Define one absl flag per field of `cls` (a field already defined by another class is left as it is)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    for f in fields(cls):
        if f.name in fv:
            continue
        help_text, choices = f.metadata["help"], f.metadata["choices"]
        default = "" if f.default is None else f.default
        if choices:
            flags.DEFINE_enum(f.name, f.default, list(choices), help_text, flag_values=fv)
        elif f.type in (bool, "bool"):
            flags.DEFINE_bool(f.name, f.default, help_text, flag_values=fv)
        elif f.type in (int, "int"):
            flags.DEFINE_integer(f.name, f.default, help_text, flag_values=fv)
        elif f.type in (float, "float"):
            flags.DEFINE_float(f.name, f.default, help_text, flag_values=fv)
        else:
            flags.DEFINE_string(f.name, default, help_text, flag_values=fv)


def from_flags(cls, flag_values=None, **overrides):
    """An instance of `cls` from parsed absl flags (with field overrides)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    values = {f.name: fv[f.name].value for f in fields(cls)}
    values.update(overrides)
    return cls(**values)


def check(options):
    """`RunError` naming the first flag of `options` that is missing or below its minimum."""
    for f in fields(type(options)):
        value, minimum = getattr(options, f.name), f.metadata["minimum"]
        if f.metadata["required"] and not value:
            raise RunError(f"--{f.name} is required")
        if minimum is not None and value < minimum:
            raise ConfigError(f.name, f"must be >= {minimum}, got {value}")
    return options


def replace(options, **changes):
    return dataclasses.replace(options, **changes)


# ------------------------------------------------------------------------------------------ shared options
@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how strictly it is read (every command that reads images)."""
    data_dir: str = option("", "Where the dataset is: a TFDS data directory (default ~/tensorflow_datasets), a "
                           "folder of images, or GLOW TFRecords.", group="data")
    strict_data: bool = option(False, "Stop at an unreadable image instead of skipping it.", group="data")
    download: bool = option(True, "Let TFDS download and prepare a dataset that is not there yet "
                            "(--nodownload: fail at once if it is missing).", group="data")
    deterministic: bool = option(False, "Reproducible input order and augmentation under --seed (slower).",
                                 group="data")


@dataclass(frozen=True)
class RunOptions:
    """A run directory written by `nvae_tf.train` and the checkpoint to read from it."""
    model_dir: str = option(None, "Run directory written by nvae_tf.train.", required=True)
    checkpoint: str = option(None, "Checkpoint prefix or step number (default: the newest intact one).")


@dataclass(frozen=True)
class ReplicaOptions:
    cpu_replicas: int = option(0, "Split the CPU into this many logical devices and run on all of them "
                               "(testing multi-replica runs anywhere).", minimum=0)


PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclass(frozen=True)
class SamplingOptions:
    """How images are drawn from a trained model (`sample` and `export`)."""
    pixels: str = option("auto", "Pixel values: a draw from p(x|z), its mean, or auto (mean for binary images, a "
                         "draw otherwise).", choices=("auto", "sample", "mean"))
    readjust_bn: bool = option(False, "Re-estimate the BatchNorm statistics from samples at the temperature "
                               "first (NVAE's procedure for better samples).")
    bn_passes: int = option(500, "Sampling passes for --readjust_bn.", minimum=1)
    bn_batch: int = option(16, "Images per pass for --readjust_bn.", minimum=2)
