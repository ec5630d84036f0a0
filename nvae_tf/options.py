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


# ------------------------------------------------------------------------------------------ shared options
@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how strictly it is read (every command that reads images)."""
    data_dir: str = option("", "Where the dataset is: a TFDS data directory (default ~/tensorflow_datasets), a "
                           "folder of images, or GLOW TFRecords. A run records it; evaluate and sample read the "
                           "run's unless given.", group="data")
    strict_data: bool = option(False, "Stop at an unreadable image instead of skipping it.", group="data")
    download: bool = option(True, "Let TFDS download and prepare a dataset that is not there yet "
                            "(--nodownload: fail at once if it is missing).", group="data")
    deterministic: bool = option(False, "Reproducible input order, augmentation and ops under --seed (slower: "
                                 "TensorFlow's deterministic ops, no oneDNN kernels unless TF_ENABLE_ONEDNN_OPTS "
                                 "says so).",
                                 group="data")


@dataclass(frozen=True)
class RunDirOptions:
    model_dir: str = option(None, "Run directory: config.json, checkpoints/ and TensorBoard logs (train writes it, "
                            "and resumes a run that is there).", required=True)


@dataclass(frozen=True)
class RunOptions(RunDirOptions):
    """A run directory written by `nvae_tf.train` and the checkpoint to read from it."""
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
                               "first (NVAE's procedure for better samples; `sample --mode=temperatures`: at "
                               "each row's temperature).")
    bn_passes: int = option(500, "Sampling passes for --readjust_bn.", minimum=1)
    bn_batch: int = option(16, "Images per pass for --readjust_bn.", minimum=2)


# ------------------------------------------------------------------------------------- command options
@dataclass(frozen=True)
class TrainOptions(RunDirOptions, DataOptions, ReplicaOptions):
    """How a run trains (the model and its hyperparameters are the `NVAEConfig`)."""
    precision: str = option("float32", "Compute precision.", group="training", choices=PRECISIONS)
    jit_compile: bool = option(False, "Compile the training step with XLA (slower on CPU).", group="training")
    remat: bool = option(False, "Gradient checkpointing per cell and per posterior flow: keep only each one's "
                         "input and recompute its activations during back-propagation (less memory; 12 % more "
                         "time per step on digits at batch 256, see the README's benchmarks). Does not change the "
                         "result.", group="training")
    max_steps: int = option(0, "Stop after this many steps in total (0: train all epochs).", minimum=0)
    checkpoint_every: int = option(1000, "Steps between checkpoints.", minimum=1)
    keep_checkpoints: int = option(3, "Checkpoints to keep.", minimum=1)
    log_every: int = option(50, "Steps between log lines and scalar summaries.", minimum=1)
    max_skipped_steps: int = option(20, "Stop after this many consecutive steps with a non-finite loss or "
                                    "gradient.", minimum=1)
    eval_batches: int = option(20, "Validation batches for each validation bits/dim (0: all).", minimum=0)
    image_every: int = option(0, "Steps between TensorBoard pictures (reconstructions, samples at each "
                              "temperature), besides those at epoch ends (--epoch_summaries_every) and at the end "
                              "of training (0: after the first step, then every 10 minutes of training).",
                              minimum=0)
    eval_every: int = option(0, "Steps between validation bits/dim, besides those at epoch ends "
                             "(--epoch_summaries_every) and at the end (0: every 30 minutes of training).",
                             minimum=0)
    epoch_summaries_every: int = option(1, "Epochs between the validation bits/dim and pictures of epoch ends "
                                        "(the end of training always has them; more than 1 for datasets whose "
                                        "epochs last seconds).", minimum=1)
    num_summary_images: int = option(8, "Images in each TensorBoard image summary.", minimum=0)


@dataclass(frozen=True)
class EvaluateOptions(RunOptions, DataOptions, ReplicaOptions):
    split: str = option("validation", "Split to evaluate: validation or test (if the dataset has one).",
                        group="data")
    num_iw_samples: int = option(1000, "Importance samples K per image.", minimum=1)
    batch_size: int = option(0, "Images per batch and replica (default: the run's batch_size).", minimum=0)
    forward_batch: int = option(0, "Images per forward pass and replica, i.e. batch_size x samples per pass "
                                "(default: 4 x batch_size; lower it if memory runs out).", minimum=0)
    max_images: int = option(0, "Evaluate only the first N images of the split (0: all).", minimum=0, group="data")
    seed: int = option(0, "Seed of the importance samples.")
    precision: str = option("float32", "Compute precision of the model (the log-sum-exp is float64 regardless).",
                            choices=PRECISIONS)


@dataclass(frozen=True)
class SampleOptions(RunOptions, SamplingOptions, DataOptions):
    mode: str = option("sample", "What to draw: samples, one row per temperature, or reconstructions.",
                       choices=("sample", "temperatures", "reconstruct"))
    temperature: float = option(0.7, "Prior temperature t in (0, 2]: z ~ N(mu, (t sigma)^2).")
    temperatures: str = option("0.5,0.6,0.7,0.8,0.9,1.0", "Comma-separated temperatures (mode temperatures).")
    num_samples: int = option(64, "Images to draw (per row in mode temperatures).", minimum=1)
    seed: int = option(0, "Seed of all noise; the same seed gives the same image.")
    split: str = option("validation", "Split for mode reconstruct.", group="data")
    columns: int = option(0, "Images per grid row (default: square; 2 x pairs for reconstruct).", minimum=0)
    out: str = option("samples.png", "Output PNG.")


@dataclass(frozen=True)
class ExportOptions(RunOptions, SamplingOptions):
    export_dir: str = option(None, "Where to write the SavedModel versions and the TFLite sampler.", required=True)
    version: int = option(0, "SavedModel version directory (default: one above the highest present).", minimum=0)
    overwrite: bool = option(False, "Replace an existing version directory.")
    temperature: float = option(0.7, "Temperature of the samples that --readjust_bn re-estimates the BatchNorm "
                                "statistics from; each request chooses its own sampling temperature.")
    max_samples: int = option(64, "Largest num_samples (and image batch) a request may ask for.", minimum=1)
    tflite: bool = option(True, "Write the TFLite sampler.")
    tflite_batch: int = option(1, "Images per call of the TFLite sampler (fixed).", minimum=1)
    tflite_quantize: str = option("none", "Also write a float16-quantised sampler.", choices=("none", "float16"))


@dataclass(frozen=True)
class ConvertOptions(RunDirOptions):
    checkpoint: str = option(None, "The reference NVAE checkpoint to convert (checkpoint.pt as NVlabs/NVAE's "
                             "train.py writes it).", required=True)


@dataclass(frozen=True)
class InspectOptions(DataOptions):
    inspect: bool = option(False, "Print split sizes and one batch's shape, dtype and value range.")
    out: str = option("", "With --inspect: write the batch as a PNG grid here.")
    split: str = option("train", "With --inspect: the split to look at.", group="data")


@dataclass(frozen=True)
class SummaryOptions:
    json: bool = option(False, "End the output with one line of JSON.")
