"""The NVAE model: Keras 3 layers and `keras.ops` only."""

from nvae_tf.model.nvae import NVAE, LatentGroup

__all__ = ["NVAE", "LatentGroup"]
