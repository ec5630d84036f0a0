"""The configuration of an NVAE model and its training run: one frozen dataclass.

Each field is an absl flag of the same name (NVAE's flag names). Entry points call `define_flags()` and
`from_flags()`; everything below them takes an `NVAEConfig`. A run saves its config as JSON, and evaluation,
sampling and export rebuild the model from that file alone.
"""

import dataclasses
import json
from dataclasses import dataclass

from nvae_tf import options
from nvae_tf.errors import ConfigError
from nvae_tf.options import option


@dataclass(frozen=True)
class DatasetInfo:
    """What the model needs to know about a dataset's images."""
    image_size: int  # 0: set by --image_size
    channels: int
    binary: bool  # Bernoulli decoder on binarised images; otherwise a mixture of logistics
    likelihood_crop: int = 0  # pixels on each side left out of the likelihood (MNIST is padded 28 -> 32)
    resizable: bool = False  # image_size is a default that --image_size may change


DATASETS = {
    "mnist": DatasetInfo(32, 1, True, likelihood_crop=2),
    "cifar10": DatasetInfo(32, 3, False),
    "celeba64": DatasetInfo(64, 3, False),
    "imagenet32": DatasetInfo(32, 3, False),
    "celebahq": DatasetInfo(256, 3, False),
    "ffhq": DatasetInfo(256, 3, False),
    "folder": DatasetInfo(0, 3, False),
    "digits": DatasetInfo(16, 1, True, resizable=True),
    "digits_grey": DatasetInfo(16, 1, False, resizable=True),
}


def _data(default, help_text, **kwargs):
    return option(default, help_text, group="data", structural=True, **kwargs)


def _model(default, help_text):
    return option(default, help_text, group="model", structural=True)


def _compat(default, help_text):
    return option(default, help_text, group="model")


def _training(default, help_text):
    return option(default, help_text, group="training")


@dataclass(frozen=True)
class NVAEConfig:
    # Data.
    dataset: str = _data("cifar10", "Dataset: " + ", ".join(DATASETS) + ".", choices=DATASETS)
    image_size: int = _data(0, "Image height and width; 0 takes the dataset's own size (required for 'folder'; "
                               "the 8x8 digits are resized to it, 16 by default).")
    num_x_bits: int = _data(8, "Bits per colour channel the model sees (5 for the 256x256 datasets).")
    # Architecture.
    num_channels_enc: int = _model(32, "Channels of the encoder at full resolution (Ce).")
    num_channels_dec: int = _model(32, "Channels of the decoder at full resolution (Cd).")
    num_preprocess_blocks: int = _model(2, "Pre-process blocks, each halving the resolution (P).")
    num_preprocess_cells: int = _model(3, "Cells per pre-process block.")
    num_postprocess_blocks: int = _model(2, "Post-process blocks, each doubling the resolution.")
    num_postprocess_cells: int = _model(3, "Cells per post-process block.")
    num_latent_scales: int = _model(1, "Latent scales (L).")
    num_groups_per_scale: int = _model(10, "Latent groups at the highest-resolution scale.")
    ada_groups: bool = _model(False, "Halve the number of groups at each lower-resolution scale.")
    min_groups_per_scale: int = _model(1, "Fewest groups of a scale with --ada_groups.")
    num_latent_per_group: int = _model(20, "Channels of each latent group (nz).")
    num_cell_per_cond_enc: int = _model(2, "Encoder cells per latent group.")
    num_cell_per_cond_dec: int = _model(2, "Decoder cells per latent group.")
    num_nf: int = _model(0, "Pairs of autoregressive flow cells per latent group.")
    num_mixture_dec: int = _model(10, "Logistic mixture components of the colour decoder.")
    use_se: bool = _model(True, "Squeeze-and-excitation in every residual cell (every paper run uses it).")
    res_dist: bool = _model(True, "Residual posterior relative to the prior (every paper run uses it).")
    # Reference compatibility: what the reference code computes where nvae_tf deliberately differs (README, "Where
    # nvae_tf differs"). `nvae_tf.convert` sets all three for NVIDIA's checkpoints; new runs leave them off.
    flow_elu_twice: bool = _compat(False, "Flow cells apply ELU twice before their last conv, as the reference "
                                   "code does (NVAE issue #25). Set by nvae_tf.convert.")
    reference_logistic: bool = _compat(False, "The discretized logistic as the reference computes it: the upper "
                                       "tail for every pixel above 0.99 (8-bit 254 and 255), and pdf x bin width "
                                       "where a bin's mass is <= 1e-5. Set by nvae_tf.convert.")
    pixel_temperature: bool = _compat(False, "Sampling at temperature t also applies t to the pixels, as the "
                                      "reference does: mixture logits / t and logistic noise / t (more noise "
                                      "below t = 1). Set by nvae_tf.convert.")
    # Training.
    batch_size: int = _training(16, "Images per replica (per GPU) and step.")
    epochs: int = _training(200, "Training epochs.")
    learning_rate: float = _training(1e-2, "Peak learning rate.")
    learning_rate_min: float = _training(1e-4, "Final learning rate of the cosine schedule.")
    warmup_epochs: int = _training(5, "Epochs of linear learning-rate warm-up from 0.")
    weight_decay: float = _training(3e-4, "Coupled L2 weight decay on every parameter.")
    weight_decay_norm: float = _training(0.0, "Weight of the spectral and BN regularisation (lambda).")
    weight_decay_norm_init: float = _training(10.0, "Initial lambda with --weight_decay_norm_anneal.")
    weight_decay_norm_anneal: bool = _training(False, "Anneal lambda log-linearly from its init over the KL warm-up.")
    kl_anneal_portion: float = _training(0.3, "Fraction of training over which the KL weight beta rises to 1.")
    kl_const_portion: float = _training(1e-4, "Fraction of training at the constant smallest beta.")
    kl_const_coeff: float = _training(1e-4, "Smallest beta.")
    kl_max_coeff: float = _training(1.0, "Largest beta, reached at the end of the KL warm-up (1 in NVAE; above 1 "
                                         "the KL weighs more than the likelihood, as in a beta-VAE).")
    seed: int = _training(1, "Random seed.")

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        info = DATASETS[self.dataset]
        if self.image_size == 0 and info.image_size:
            object.__setattr__(self, "image_size", info.image_size)
        self._check_positive("num_channels_enc", "num_channels_dec", "num_preprocess_blocks",
                             "num_preprocess_cells", "num_postprocess_blocks", "num_postprocess_cells",
                             "num_latent_scales", "num_groups_per_scale", "min_groups_per_scale",
                             "num_latent_per_group", "num_cell_per_cond_enc", "num_cell_per_cond_dec",
                             "num_mixture_dec", "batch_size", "epochs")
        if self.image_size <= 0:
            raise ConfigError("image_size", f"dataset {self.dataset!r} needs a positive --image_size")
        if info.image_size and self.image_size != info.image_size and not info.resizable:
            raise ConfigError("image_size", f"dataset {self.dataset!r} has {info.image_size}x{info.image_size} "
                                            f"images, got {self.image_size}")
        if self.num_postprocess_blocks != self.num_preprocess_blocks:
            raise ConfigError("num_postprocess_blocks", "must equal --num_preprocess_blocks "
                              f"({self.num_preprocess_blocks}) so the output has the input's resolution, "
                              f"got {self.num_postprocess_blocks}")
        if self.image_size % self.total_downsampling:
            raise ConfigError("image_size", f"{self.image_size} is not divisible by the total down-sampling "
                              f"2^(num_preprocess_blocks + num_latent_scales - 1) = {self.total_downsampling}")
        if self.num_channels_enc < 2:
            raise ConfigError("num_channels_enc", f"must be at least 2, got {self.num_channels_enc}")
        if not 1 <= self.num_x_bits <= 8:
            raise ConfigError("num_x_bits", f"must be between 1 and 8, got {self.num_x_bits}")
        if self.num_nf < 0:
            raise ConfigError("num_nf", f"must be 0 or more, got {self.num_nf}")
        for name in ("learning_rate", "learning_rate_min", "weight_decay", "weight_decay_norm",
                     "weight_decay_norm_init", "kl_anneal_portion", "kl_const_portion", "kl_const_coeff",
                     "kl_max_coeff"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must not be negative, got {getattr(self, name)}")
        if self.weight_decay_norm_anneal and (self.weight_decay_norm <= 0 or self.weight_decay_norm_init <= 0):
            raise ConfigError("weight_decay_norm_anneal", "a log-linear anneal needs positive "
                              "--weight_decay_norm and --weight_decay_norm_init")
        if self.warmup_epochs < 0:
            raise ConfigError("warmup_epochs", f"must be 0 or more, got {self.warmup_epochs}")

    def _check_positive(self, *names):
        for name in names:
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")

    # Derived structure.
    @property
    def dataset_info(self):
        return DATASETS[self.dataset]

    @property
    def image_channels(self):
        return self.dataset_info.channels

    @property
    def image_shape(self):
        """`[height, width, channels]` of the images the model reads."""
        return (self.image_size, self.image_size, self.image_channels)

    @property
    def decoder(self):
        """'bernoulli' for binarised datasets, otherwise 'logistic_mixture'."""
        return "bernoulli" if self.dataset_info.binary else "logistic_mixture"

    @property
    def likelihood_crop(self):
        return self.dataset_info.likelihood_crop

    @property
    def data_dims(self):
        """Number of dimensions the likelihood covers (the denominator of bits/dim): 784 for MNIST."""
        side = self.image_size - 2 * self.likelihood_crop
        return side * side * self.image_channels

    @property
    def total_downsampling(self):
        return 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    @property
    def groups_per_scale(self):
        """Latent groups per encoder scale, highest resolution first."""
        groups = [self.num_groups_per_scale]
        for _ in range(self.num_latent_scales - 1):
            groups.append(max(self.min_groups_per_scale, groups[-1] // 2) if self.ada_groups else groups[-1])
        return groups

    @property
    def num_groups(self):
        return sum(self.groups_per_scale)

    @property
    def group_scales(self):
        """Decoder scale j (0 = lowest resolution) of every latent group, in top-down order."""
        scales = []
        for j, n in enumerate(reversed(self.groups_per_scale)):
            scales += [j] * n
        return scales

    @property
    def latent_shapes(self):
        """`[height, width, channels]` of every latent group, top (z0) first."""
        top = self.image_size // self.total_downsampling
        return [(top * 2 ** j, top * 2 ** j, self.num_latent_per_group) for j in self.group_scales]

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path):
        with open(path) as f:
            return cls.from_json(f.read())

    def save(self, path):
        with open(path, "w") as f:
            f.write(self.to_json() + "\n")


def structural_fields():
    """The fields that change the model's weights: a run cannot resume with other values."""
    return [f.name for f in dataclasses.fields(NVAEConfig) if f.metadata["structural"]]


def define_flags(flag_values=None):
    """Define one absl flag per config field (once per FlagValues)."""
    options.define_flags(NVAEConfig, flag_values)


def from_flags(flag_values=None):
    """Build the config from parsed absl flags."""
    return options.from_flags(NVAEConfig, flag_values)


def from_flagfile(path, **overrides):
    """The config of an absl flagfile (e.g. `configs/cifar10.flags`), with field overrides."""
    from absl import flags
    fv = flags.FlagValues()
    define_flags(fv)
    fv(["nvae_tf", f"--flagfile={path}"])
    values = from_flags(fv).to_dict()
    values.update(overrides)
    return NVAEConfig(**values)
