"""Speed of one jitted NVAE training step under the JAX backend of Keras 3; prints a table.

    bash .ci/jax_env                                                  # once: creates .venv-jax (no TensorFlow)
    .venv-jax/bin/python benchmarks/jax_train_step.py                 # configs/digits.flags, its batch size
    .venv-jax/bin/python benchmarks/jax_train_step.py --flagfile=configs/tiny.flags --batch=8 --steps=20

The step is pure JAX around the Keras model's stateless API: `jax.value_and_grad` of the mean negative ELBO
over `model.stateless_call(...)` (training mode, so BatchNorm uses and updates batch statistics), then
`keras.optimizers.Adamax(...).stateless_apply(...)`, all under one `jax.jit` with the state buffers donated.
It measures the model and an optimiser update, not the project's training runtime (TensorFlow only): no KL
warm-up or balancing, no spectral or BatchNorm regularisation, Keras's Adamax (eps outside the max) instead
of NVAE's, synthetic uint8 images of the config's shape. `compile s` is the first call (tracing, XLA
compilation and one step); `ms/step` the mean of `--steps` steps after one more warm-up step.
"""

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(flagfile, batch, steps, learning_rate):
    import jax
    import jax.numpy as jnp
    import keras
    import numpy as np

    sys.path.insert(0, ROOT)
    from nvae_tf.config import from_flagfile
    from nvae_tf.model import NVAE

    overrides = {"batch_size": batch} if batch else {}
    config = from_flagfile(flagfile, **overrides)
    batch = config.batch_size
    keras.utils.set_random_seed(config.seed)
    model = NVAE(config)
    model.build()
    optimizer = keras.optimizers.Adamax(learning_rate=learning_rate)
    optimizer.build(model.trainable_variables)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, batch, *config.image_shape), dtype=np.uint8)
    if config.decoder == "bernoulli":
        images = (images > 127).astype(np.uint8) * 255
    images = [jnp.asarray(b) for b in images]

    def loss_fn(trainable, non_trainable, x):
        terms, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.mean(terms.negative_elbo()), non_trainable

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, x):
        trainable, non_trainable, opt_vars = state
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable, x)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return loss, (trainable, non_trainable, opt_vars)

    train_step = jax.jit(step, donate_argnums=0)
    state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))

    start = time.perf_counter()
    loss, state = train_step(state, images[0])
    loss.block_until_ready()
    compile_s = time.perf_counter() - start
    first_loss = float(loss)
    loss, state = train_step(state, images[1])  # a second warm-up step
    loss.block_until_ready()
    start = time.perf_counter()
    for i in range(steps):
        loss, state = train_step(state, images[i % 2])
    loss.block_until_ready()
    elapsed = time.perf_counter() - start
    return {"config": os.path.splitext(os.path.basename(flagfile))[0], "params": params, "batch": batch,
            "compile_s": compile_s, "step_ms": 1000 * elapsed / steps, "images_per_s": batch * steps / elapsed,
            "first_loss": first_loss, "last_loss": float(loss),
            "finite": bool(np.isfinite(first_loss) and np.isfinite(float(loss))),
            "versions": f"jax {jax.__version__}, keras {keras.__version__}, {jax.devices()[0].platform}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flagfile", default=os.path.join(ROOT, "configs", "digits.flags"))
    parser.add_argument("--batch", type=int, default=0, help="images per step (default: the config's batch_size)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps after two warm-up steps")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    args = parser.parse_args()

    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        parser.error(f"this benchmark runs under the JAX backend; KERAS_BACKEND is {backend!r}")
    r = measure(args.flagfile, args.batch, args.steps, args.learning_rate)
    header = (f"{'config':<8} {'parameters':>11} {'batch':>5} {'compile s':>9} {'ms/step':>8} {'images/s':>9} "
              f"{'loss (1st -> last)':>20}")
    print(header)
    print("-" * len(header))
    print(f"{r['config']:<8} {r['params']:>11,} {r['batch']:>5} {r['compile_s']:>9.1f} {r['step_ms']:>8.1f} "
          f"{r['images_per_s']:>9.1f} {r['first_loss']:>9.1f} -> {r['last_loss']:<8.1f}")
    print(f"({r['versions']}; {args.steps} timed steps)")
    if not r["finite"]:
        print("error: the loss is not finite", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
