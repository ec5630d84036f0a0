"""nvae_tf: NVAE (Vahdat & Kautz, NeurIPS 2020) in TensorFlow 2 / Keras 3."""

__version__ = "0.1.0"
