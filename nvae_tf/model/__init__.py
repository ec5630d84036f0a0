"""The NVAE model: Keras 3 layers and `keras.ops` only, under any Keras backend."""

from nvae_tf.model.nvae import NVAE, ForwardTerms, LatentGroup

__all__ = ["NVAE", "ForwardTerms", "LatentGroup"]
