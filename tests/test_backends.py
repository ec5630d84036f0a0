"""`nvae_tf/model/` under more than one Keras backend: TensorFlow and JAX.

The model package is pure Keras 3 (layers and `keras.ops`). This file runs in two interpreters:

- The TensorFlow run (`python -m pytest`, in .venv). Besides the backend-neutral tests, two tests drive the
  TensorFlow-free JAX interpreter (`.venv-jax/bin/python`, made by `bash .ci/jax_env`; another one with
  NVAE_JAX_PYTHON) in subprocesses, started together so that they share the two cores:
  * `test_tensorflow_and_jax_give_the_same_terms`: the same tiny NVAE, the same weights (saved here as
    `.weights.h5`, loaded there; the variable paths, shapes and order are checked to be the same) and latents
    at their means (`ZeroNoise`): eval-mode reconstruction log-likelihood and KL per group agree to 1e-4
    relative. Negative control: with one log weight norm raised by 0.01 (both sides compute this too, and agree)
    the JAX terms must differ from TensorFlow's unperturbed ones by more than the tolerance.
  * `test_model_tests_pass_under_jax`: runs JAX_TEST_FILES under KERAS_BACKEND=jax and asserts they passed
    (and that the JAX-only tests of this file were among them, not skipped).
  Without a JAX interpreter both are skipped, or fail when NVAE_REQUIRE_JAX=1 (as in CI).
- The JAX run (`KERAS_BACKEND=jax .venv-jax/bin/python -m pytest -q tests/test_backends.py ...`): the tests marked
  `jax_only` below: gradients by `jax.value_and_grad` over `model.stateless_call` under `jax.jit`, and jitted
  sampling through `keras.StatelessScope`.

The JAX subprocesses compile with cheaper XLA:CPU settings (JAX_TEST_XLA_FLAGS: LLVM optimisation off, no
fast-math: results move by float32 rounding only; the TF-vs-JAX figures are the same order with XLA's default
settings) and keep compiled programs in a persistent cache
(~/.cache/nvae_tf/jax-compilation, or NVAE_JAX_CACHE_DIR): on two CPU cores, eager JAX spends most of its time
compiling one small program per operation and shape.
"""

import json
import os
import subprocess
import threading
import time
import xml.etree.ElementTree as ET

import keras
import numpy as np
import pytest

import backend_terms
from conftest import child_env, load_flagfile, tensorflow_backend
from nvae_tf.model import NVAE
from nvae_tf.model.distributions import KerasNoise, ZeroNoise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Trainable parameters and variables (trainable, BN statistics, power-iteration and noise state) of the tiny
# NVAE (configs/tiny.flags), the same under every backend.
TINY_TRAINABLE_PARAMETERS = 101_704
TINY_TRAINABLE_VARIABLES = 269
TINY_VARIABLES = 395
RTOL = 1e-4
# The model test files the TensorFlow run executes under JAX, in two shards run side by side.
JAX_TEST_SHARDS = (["tests/test_model.py"],
                   ["tests/test_backends.py", "tests/test_distributions.py", "tests/test_ops.py",
                    "tests/test_flows.py", "tests/test_spectral.py"])
JAX_TEST_FILES = [f for shard in JAX_TEST_SHARDS for f in shard]
# Tests that must have run (not been skipped) under JAX.
JAX_REQUIRED_TESTS = (
    "test_backends.py::test_jax_gradients_of_the_negative_elbo_are_finite_and_reach_every_weight",
    "test_backends.py::test_jax_jitted_sampling_has_the_configured_shape_range_and_grid",
    "test_backends.py::test_tiny_model_structure",
    "test_backends.py::test_zero_noise_puts_every_latent_at_its_mean",
    "test_model.py::test_forward_terms_are_finite_with_the_documented_shapes",
    "test_model.py::test_structure_counts_match_an_enumeration_of_the_tiny_config",
    "test_model.py::test_sample_has_the_configured_shape_and_range[sample]",
    "test_distributions.py::test_dmol_log_prob_matches_numpy_reference[3-8]",
    "test_distributions.py::test_zero_noise_draws_zeros_and_halves_so_samples_are_the_means",
)
JAX_TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")
JAX_TIMEOUT = 900

jax_only = pytest.mark.skipif(keras.backend.backend() != "jax",
                              reason="runs under KERAS_BACKEND=jax (the TensorFlow run executes it in "
                                     "test_model_tests_pass_under_jax)")


def tiny_model(**overrides):
    model = NVAE(load_flagfile("tiny", **overrides))
    model.build()
    return model


def random_images(config, batch, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, *config.image_shape)).astype("uint8")


# --------------------------------------------------------------------------------------- any backend
def test_tiny_model_structure():
    model = tiny_model()
    c = model.config
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == TINY_TRAINABLE_PARAMETERS
    assert len(model.trainable_variables) == TINY_TRAINABLE_VARIABLES
    assert len(model.variables) == TINY_VARIABLES
    paths = [v.path for v in model.variables]
    assert len(set(paths)) == len(paths)
    assert len(model.latent_groups) == c.num_groups == 3
    assert c.latent_shapes == [(4, 4, 4), (8, 8, 4), (8, 8, 4)]
    # No BatchNorm of the model is synchronised: a replicating runtime switches that on (TensorFlow only).
    assert model.batchnorm_layers and not any(bn.synchronized for bn in model.batchnorm_layers)


def test_zero_noise_puts_every_latent_at_its_mean():
    """With ZeroNoise the terms are deterministic, and a prior-mean sample does not depend on the temperature
    (it only scales sigma); with random noise both change."""
    model = tiny_model()
    x = random_images(model.config, batch=3)
    a = model(x, training=False, noise=ZeroNoise())
    b = model(x, training=False, noise=ZeroNoise())
    c = model(x, training=False, noise=KerasNoise(keras.random.SeedGenerator(3)))
    for key in ("recon_log_prob", "kl", "log_q", "log_p"):
        np.testing.assert_array_equal(np.asarray(getattr(a, key)), np.asarray(getattr(b, key)))
    assert np.abs(np.asarray(a.log_q) - np.asarray(c.log_q)).max() > 1e-3
    cold = np.asarray(model.sample(2, 0.3, noise=ZeroNoise(), mode="mean"))
    hot = np.asarray(model.sample(2, 1.0, noise=ZeroNoise(), mode="mean"))
    np.testing.assert_allclose(cold, hot, atol=1e-6)
    drawn = np.asarray(model.sample(2, 1.0, noise=KerasNoise(keras.random.SeedGenerator(3)), mode="mean"))
    assert np.abs(drawn - hot).max() > 1e-3


# ------------------------------------------------------------------------------------------ JAX only
@jax_only
def test_jax_gradients_of_the_negative_elbo_are_finite_and_reach_every_weight():
    import jax
    import jax.numpy as jnp
    model = tiny_model()
    # A squeeze-and-excitation block has 4 hidden ReLUs in the tiny model, and a random initialisation can
    # silence all of them for every image, which takes the block's weights out of the gradient under any
    # backend. A positive squeeze bias keeps them active, so that every weight must receive a gradient.
    for layer in model._flatten_layers(include_self=False):
        if layer.name == "squeeze":
            layer.bias.assign(np.ones(layer.bias.shape, "float32"))
    x = random_images(model.config, batch=4)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss_fn(trainable, non_trainable, x):
        terms, non_trainable = model.stateless_call(trainable, non_trainable, x, training=True, noise=ZeroNoise())
        return jnp.mean(terms.negative_elbo()), (terms, non_trainable)

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, (terms, updated)), grads = step(trainable, non_trainable, x)
    n = model.config.num_groups
    assert terms.recon_log_prob.shape == (4,) and terms.kl.shape == (4, n)
    assert terms.decoder_params.shape == (4, 16, 16, 10 * model.config.num_mixture_dec)
    for value in (terms.recon_log_prob, terms.kl, terms.log_q, terms.log_p):
        assert np.all(np.isfinite(np.asarray(value)))
    assert np.isfinite(float(loss))
    paths = [v.path for v in model.trainable_variables]
    assert [p for p, g in zip(paths, grads) if not np.all(np.isfinite(np.asarray(g)))] == []
    assert [p for p, g in zip(paths, grads) if not np.any(np.asarray(g))] == []
    # Stateless: the BatchNorm statistics moved in the returned state only.
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b, v in
             zip(updated, non_trainable, model.non_trainable_variables) if v.path.endswith("moving_mean")]
    assert moved and max(moved) > 0
    np.testing.assert_array_equal(np.asarray(model.non_trainable_variables[0].value), np.asarray(non_trainable[0]))
    # The gradient is a descent direction: a small step against it lowers the (deterministic) loss.
    norm2 = sum(float(jnp.sum(jnp.square(g))) for g in grads)
    lr = 1e-3 * float(loss) / norm2
    (lower, _), _ = step([w - lr * g for w, g in zip(trainable, grads)], non_trainable, x)
    assert float(lower) < float(loss)


@jax_only
def test_jax_jitted_sampling_has_the_configured_shape_range_and_grid():
    import jax
    model = tiny_model()
    variables = model.variables

    def sample(values, temperature):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
            images = model.sample(4, temperature)
            values = [scope.get_current_value(v) for v in variables]
        return images, values

    sample = jax.jit(sample)
    values = [v.value for v in variables]
    a, after = sample(values, 0.8)
    a_again, _ = sample(values, 0.8)
    b, _ = sample(after, 0.8)  # the noise state moved on
    a, a_again, b = np.asarray(a), np.asarray(a_again), np.asarray(b)
    assert a.shape == (4, *model.config.image_shape)
    assert a.min() >= 0.0 and a.max() <= 1.0
    levels = a * (2 ** model.config.num_x_bits - 1)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    np.testing.assert_array_equal(a, a_again)
    assert np.abs(a - b).mean() > 0


# ------------------------------------------------------------------- TensorFlow run: JAX subprocesses
def _jax_cache_dir():
    return os.environ.get("NVAE_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nvae_tf",
                                                                "jax-compilation")


def _jax_env(xla_flags):
    env = child_env()
    env.update(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags,
               JAX_COMPILATION_CACHE_DIR=_jax_cache_dir(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    env.pop("PYTHONPATH", None)
    return env


def _missing_jax(message):
    if os.environ.get("NVAE_REQUIRE_JAX") == "1":
        pytest.fail(f"NVAE_REQUIRE_JAX=1 but {message}", pytrace=False)
    pytest.skip(message)


PROBE = """
import importlib.util, keras, jax.numpy as jnp, nvae_tf.model
assert keras.backend.backend() == "jax", keras.backend.backend()
assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed in the JAX interpreter"
jnp.ones(2).block_until_ready()
print("ok")
"""


class JaxJobs:
    """The JAX subprocesses of the TensorFlow run: two lanes of jobs run side by side (one per core), the jobs of a
    lane one after another; each job's output goes to `<directory>/<name>.log`."""

    def __init__(self, python, xla_flags, directory):
        self.python, self.env, self.directory = python, _jax_env(xla_flags), directory
        self.deadline = time.time() + JAX_TIMEOUT
        self.done, self.results, self.procs, self.stopped = {}, {}, [], False
        self.lock = threading.Lock()

    def lane(self, jobs):
        """Starts a thread running `jobs` ([(name, interpreter arguments)]) one after another."""
        for name, _ in jobs:
            self.done[name] = threading.Event()

        def run():
            for name, args in jobs:
                try:
                    self.results[name] = self._run(name, args)
                finally:
                    self.done[name].set()

        threading.Thread(target=run, daemon=True).start()

    def _run(self, name, args):
        log = os.path.join(self.directory, name + ".log")
        with open(log, "w") as out:
            with self.lock:
                if self.stopped:
                    return "not started", ""
                proc = subprocess.Popen([self.python, *args], cwd=ROOT, env=self.env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                self.procs.append(proc)
            try:
                rc = proc.wait(timeout=max(1.0, self.deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = f"killed after {JAX_TIMEOUT} s"
        with open(log) as f:
            return rc, f.read()

    def wait(self, name):
        """(exit code, output) of job `name`, once it has finished."""
        self.done[name].wait(timeout=max(1.0, self.deadline - time.time()) + 60)
        return self.results.get(name, ("did not finish", ""))

    def stop(self):
        with self.lock:
            self.stopped = True
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def jax_jobs(tmp_path_factory):
    """Checks the JAX interpreter, saves the TensorFlow side's weights and images, and starts the JAX jobs:
    the comparison then the first test shard in one lane, the second shard in the other."""
    tensorflow_backend()
    python = os.environ.get("NVAE_JAX_PYTHON") or os.path.join(ROOT, ".venv-jax", "bin", "python")
    if not os.path.exists(python):
        _missing_jax(f"there is no JAX interpreter at {python} (make it with `bash .ci/jax_env`, or point "
                     "NVAE_JAX_PYTHON at one)")
    probe = None
    for flags in (JAX_TEST_XLA_FLAGS, ""):  # without the compile-speed flags should an XLA not know them
        probe = subprocess.run([python, "-c", PROBE], cwd=ROOT, env=_jax_env(flags), capture_output=True,
                               text=True, timeout=300)
        if probe.returncode == 0:
            break
        if "TensorFlow is installed" in probe.stderr:
            pytest.fail(f"{python} has TensorFlow: the JAX interpreter must be TensorFlow-free", pytrace=False)
    if probe.returncode:
        _missing_jax(f"{python} cannot run the model under JAX:\n{probe.stderr[-3000:]}")

    directory = str(tmp_path_factory.mktemp("backends"))
    keras.utils.set_random_seed(2024)
    model = backend_terms.build_model()
    x = backend_terms.images(model.config)
    for _ in range(3):  # move the BatchNorm running statistics well away from (0, 1)
        model(x, training=True)
    model.save_weights(os.path.join(directory, "model.weights.h5"))
    np.save(os.path.join(directory, "images.npy"), x)

    def pytest_job(i):
        return (f"pytest_{i}", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--durations=5",
                                f"--junitxml={os.path.join(directory, f'pytest_{i}.xml')}", *JAX_TEST_SHARDS[i]])

    jobs = JaxJobs(python, flags, directory)
    jobs.lane([("terms", [os.path.join("tests", "backend_terms.py"), directory]), pytest_job(0)])
    jobs.lane([pytest_job(1)])
    yield jobs
    jobs.stop()


def _max_relative_difference(got, want):
    return float(np.max(np.abs(got - want) / np.abs(want)))


def test_tensorflow_and_jax_give_the_same_terms(jax_jobs):
    directory = jax_jobs.directory
    tf_backend = backend_terms.compute(directory)
    assert tf_backend == "tensorflow"
    rc, log = jax_jobs.wait("terms")
    assert rc == 0, f"the JAX side failed (exit {rc}):\n{log[-5000:]}"
    with open(os.path.join(directory, "tensorflow_variables.json")) as f:
        tf_table = json.load(f)
    with open(os.path.join(directory, "jax_variables.json")) as f:
        jax_table = json.load(f)
    # The same variables, with the same paths and shapes, in the same order under both backends...
    assert len(tf_table) == TINY_VARIABLES
    assert jax_table == tf_table
    tf_terms = dict(np.load(os.path.join(directory, "tensorflow_terms.npz")))
    jax_terms = dict(np.load(os.path.join(directory, "jax_terms.npz")))
    # ... holding the same values after loading the weights.
    tf_sums, jax_sums = (json.loads(str(t.pop("checksums"))) for t in (tf_terms, jax_terms))
    assert jax_sums.keys() == tf_sums.keys() and len(tf_sums) > TINY_TRAINABLE_VARIABLES
    differing = [p for p in tf_sums if not np.allclose(jax_sums[p], tf_sums[p], rtol=1e-6, atol=1e-6)]
    assert not differing, f"weights differ after loading: {differing[:5]}"

    assert tf_terms.keys() == jax_terms.keys()
    report = {}
    for key in sorted(tf_terms):
        if key in ("sample_mean", "decoder_params", "control_decoder_params"):  # relative to the largest value
            report[key] = float(np.abs(jax_terms[key] - tf_terms[key]).max() / np.abs(tf_terms[key]).max())
            continue
        report[key] = _max_relative_difference(jax_terms[key], tf_terms[key])
    print("max relative difference JAX vs TensorFlow (images and decoder parameters: relative to the largest "
          "value):", ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
    # The terms the comparison is about: eval mode, latents at their posterior means.
    assert tf_terms["kl"].shape == (backend_terms.BATCH, 3)
    assert np.all(tf_terms["recon_log_prob"] < 0) and np.all(np.abs(tf_terms["kl"]) > 1e-2)
    for key in ("recon_log_prob", "kl", "log_q", "log_p", "decoder_params", "train_recon_log_prob", "train_kl",
                "sample_mean", "control_recon_log_prob", "control_kl"):
        assert report[key] <= RTOL, (key, report[key])
    # The negative control: with one weight 1 % off the agreement breaks (so the tolerance would catch it).
    worst = max(_max_relative_difference(jax_terms["control_" + k], tf_terms[k]) for k in ("recon_log_prob", "kl"))
    print(f"negative control ({backend_terms.PERTURBED_WEIGHT} + {backend_terms.PERTURBATION} under JAX only): "
          f"max relative difference {worst:.2e}")
    assert worst > 10 * RTOL, worst


def test_model_tests_pass_under_jax(jax_jobs):
    failures, ran = [], {}
    for i, files in enumerate(JAX_TEST_SHARDS):
        rc, log = jax_jobs.wait(f"pytest_{i}")
        if rc != 0:
            failures.append(f"KERAS_BACKEND=jax pytest {' '.join(files)}: exit {rc}\n{log[-6000:]}")
            continue
        print(f"KERAS_BACKEND=jax pytest {' '.join(files)}: {log.strip().splitlines()[-1]}")
        for case in ET.parse(os.path.join(jax_jobs.directory, f"pytest_{i}.xml")).iter("testcase"):
            name = f"{case.get('classname').split('.')[-1]}.py::{case.get('name')}"
            ran[name] = "skipped" if case.find("skipped") is not None else (
                "failed" if case.find("failure") is not None or case.find("error") is not None else "passed")
    assert not failures, "\n\n".join(failures)
    assert not [n for n, s in ran.items() if s == "failed"]
    not_run = [n for n in JAX_REQUIRED_TESTS if ran.get(n) != "passed"]
    assert not not_run, f"did not pass under JAX: {not_run}"
    assert sum(s == "passed" for s in ran.values()) > 100

