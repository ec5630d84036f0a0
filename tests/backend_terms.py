"""The numbers tests/test_backends.py compares between Keras backends, computed under the current one.

The TensorFlow side calls these functions in the test process; the JAX side runs this file in the TensorFlow-
free interpreter (`.venv-jax`, see `.ci/jax_env`) on the weights the TensorFlow side saved:

    KERAS_BACKEND=jax .venv-jax/bin/python tests/backend_terms.py DIR

DIR holds `model.weights.h5` and `images.npy`; the script writes `DIR/<backend>_terms.npz` (the terms below, the
terms again with one weight perturbed as a negative control, and the per-variable checksums after loading) and
`DIR/<backend>_variables.json` (every variable's path and shape, in `model.variables` order, as built before the
weights were loaded).

Every latent is at its mean (`ZeroNoise`), so the terms are deterministic and the same in every backend.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIG = "tiny"
BATCH = 3
SAMPLES = 2
TEMPERATURE = 0.8
# The negative control: PERTURBATION is added to this weight (the log weight norms of a convolution, so its
# effective kernel is scaled by exp(0.01), about 1.01) before the eval-mode terms are computed again.
PERTURBED_WEIGHT = "nvae/group_1/decoder_combiner/log_weight_norm"
PERTURBATION = 1e-2


def build_model():
    from nvae_tf.config import from_flagfile
    from nvae_tf.model import NVAE
    model = NVAE(from_flagfile(os.path.join(ROOT, "configs", CONFIG + ".flags")))
    model.build()
    return model


def images(config, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (BATCH, *config.image_shape)).astype("uint8")


def variable_table(model):
    """[path, shape] of every variable (trainable, BatchNorm statistics, power-iteration and noise state)."""
    return [[v.path, [int(d) for d in v.shape]] for v in model.variables]


def checksums(model):
    """{path: [sum, sum of squares]} in float64 of every floating-point variable."""
    out = {}
    for v in model.variables:
        value = np.asarray(v.numpy())
        if np.issubdtype(value.dtype, np.floating):
            value = value.astype("float64")
            out[v.path] = [float(value.sum()), float(np.square(value).sum())]
    return out


def eval_terms(model, x):
    """Eval-mode terms with every latent at its posterior mean: {name: float64 array}."""
    from nvae_tf.model.distributions import ZeroNoise
    out = model(x, training=False, noise=ZeroNoise())
    return {"recon_log_prob": out.recon_log_prob, "kl": out.kl, "log_q": out.log_q, "log_p": out.log_p,
            "decoder_params": out.decoder_params}


def all_terms(model, x):
    """The eval-mode terms, the prior-mean decoder images at TEMPERATURE, then the training-mode terms (batch
    statistics in BatchNorm; computed last, as they update the running statistics)."""
    from nvae_tf.model.distributions import ZeroNoise
    terms = eval_terms(model, x)
    terms["sample_mean"] = model.sample(SAMPLES, TEMPERATURE, noise=ZeroNoise(), mode="mean")
    train = model(x, training=True, noise=ZeroNoise())
    terms["train_recon_log_prob"], terms["train_kl"] = train.recon_log_prob, train.kl
    return {k: np.asarray(v, dtype="float64") for k, v in terms.items()}


def perturbed_terms(model, x):
    """The eval-mode terms with PERTURBATION added to PERTURBED_WEIGHT."""
    (variable,) = [v for v in model.variables if v.path == PERTURBED_WEIGHT]
    original = variable.numpy()
    variable.assign(original + PERTURBATION)
    try:
        return {k: np.asarray(v, dtype="float64") for k, v in eval_terms(model, x).items()}
    finally:
        variable.assign(original)


def compute(directory):
    """Everything the comparison needs, from DIR/model.weights.h5 and DIR/images.npy; returns the backend name."""
    import keras
    backend = keras.backend.backend()
    model = build_model()
    table = variable_table(model)
    model.load_weights(os.path.join(directory, "model.weights.h5"))
    x = np.load(os.path.join(directory, "images.npy"))
    results = {"checksums": checksums(model)}
    results.update({"control_" + k: v for k, v in perturbed_terms(model, x).items()})
    results.update(all_terms(model, x))
    np.savez(os.path.join(directory, f"{backend}_terms.npz"),
             checksums=json.dumps(results.pop("checksums")), **results)
    with open(os.path.join(directory, f"{backend}_variables.json"), "w") as f:
        json.dump(table, f)
    return backend


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    print(compute(sys.argv[1]))
