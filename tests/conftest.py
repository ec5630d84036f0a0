import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_flagfile(name, **overrides):
    """An NVAEConfig from `configs/<name>.flags` with optional field overrides."""
    from nvae_tf.config import from_flagfile
    return from_flagfile(os.path.join(CONFIGS, name + ".flags"), **overrides)


def tensorflow_backend():
    """The `tensorflow` module for a test that needs TensorFlow itself (`tf.GradientTape`, `tf.function`, ...);
    skips the test under another Keras backend (KERAS_BACKEND=jax) or where TensorFlow is not installed."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"needs the TensorFlow backend (KERAS_BACKEND={keras.backend.backend()})")
    return pytest.importorskip("tensorflow")


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    np.random.seed(1234)
    yield


# ------------------------------------------------------------------------ a trained run (evaluate, sample)
# The small digits NVAE of test_train.py (its SMALL) with one pair of flows, so that log q includes them.
TINY_RUN = dict(num_channels_enc=4, num_channels_dec=4, num_latent_scales=1, num_groups_per_scale=1,
                min_groups_per_scale=1, num_preprocess_cells=1, num_postprocess_cells=1, num_latent_per_group=2,
                num_nf=1, batch_size=8, epochs=2)
TINY_RUN_STEPS = 150
TINY_RUN_CHECKPOINTS = (100, 150)  # checkpoint_every=100, and the final one


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run directory as `python -m nvae_tf.train` leaves it (config.json, checkpoints/ckpt-100 and ckpt-150,
    TensorBoard logs), trained in this process for 150 steps of 8 images (about 15 s on 2 cores).

    Shared by test_evaluate.py and test_sample.py; tests must not write into it (copy it first)."""
    import types

    import tensorflow as tf

    from nvae_tf import data as data_lib
    from nvae_tf import runs
    from nvae_tf.options import TrainOptions
    from nvae_tf.trainer import Trainer
    config = load_flagfile("digits", **TINY_RUN)
    model_dir = str(tmp_path_factory.mktemp("trained_run") / "run")
    runs.write_config(model_dir, config)
    trainer = Trainer(config, tf.distribute.get_strategy(), data_lib.open_source(config),
                      TrainOptions(model_dir=model_dir, checkpoint_every=TINY_RUN_CHECKPOINTS[0], log_every=50,
                                   eval_batches=2, num_summary_images=2))
    step = trainer.train(max_steps=TINY_RUN_STEPS)
    assert step == TINY_RUN_STEPS
    checkpoints = sorted(os.path.basename(p) for p in trainer.manager.checkpoints)
    assert checkpoints == [f"ckpt-{s}" for s in TINY_RUN_CHECKPOINTS], checkpoints
    return types.SimpleNamespace(model_dir=model_dir, config=config, steps=step, checkpoints=TINY_RUN_CHECKPOINTS)


def child_env(**extra):
    """The environment of a command-line subprocess: no cluster settings, quiet TensorFlow, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return env


class Run:
    """A command-line subprocess (run from the repository root) whose stdout and stderr go to `log`."""

    timeout = 300  # seconds

    def __init__(self, args, log, env=None):
        import subprocess
        self.log = str(log)
        self._file = open(self.log, "w")
        self.proc = subprocess.Popen(args, cwd=os.path.dirname(CONFIGS), env=env or child_env(), stdout=self._file,
                                     stderr=subprocess.STDOUT, text=True)

    def text(self):
        with open(self.log) as f:
            return f.read()

    def wait(self, timeout=None):
        import subprocess
        timeout = timeout or self.timeout
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"subprocess did not finish in {timeout} s:\n{self.tail()}")
        self._file.close()
        return rc

    def kill(self, sig=None):
        import signal
        import subprocess
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if sig is None else sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()

    def tail(self, chars=4000):
        return self.text()[-chars:]


def poll(condition, timeout, what, run=None, interval=0.05):
    """The first true value of `condition()` within `timeout` s; fails the test when `run` ends first, or on a
    timeout (killing `run`)."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            pytest.fail(f"the run ended (exit {run.proc.returncode}) before {what}:\n{run.tail()}")
        time.sleep(interval)
    if run is not None:
        run.kill()
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f":\n{run.tail()}" if run else ""))


def run_side_by_side(module, commands, workers=2, timeout=240):
    """{name: result (rc, stdout, stderr, seconds)} of `python -m <module> <args>` for {name: args}, `workers` at a time
    (one per core: more TensorFlow processes than cores slow each other down far more than they gain)."""
    import subprocess
    import sys
    import types
    from concurrent.futures import ThreadPoolExecutor
    root = os.path.dirname(CONFIGS)

    def one(args):
        import time
        start = time.time()
        try:
            r = subprocess.run([sys.executable, "-m", module, *args], cwd=root, env=child_env(),
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return types.SimpleNamespace(rc=None, stdout=e.stdout or "", stderr=f"timed out after {timeout} s",
                                         seconds=timeout)
        return types.SimpleNamespace(rc=r.returncode, stdout=r.stdout, stderr=r.stderr,
                                     seconds=time.time() - start)

    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(one, args) for name, args in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_cli_error(result, expected):
    """A command line that refused its input: exit code 2, an `error: ` line on stderr holding every text of
    `expected`, and no traceback."""
    assert result.rc == 2, (result.rc, result.stderr[-3000:])
    message = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert message, result.stderr[-3000:]
    for text in expected:
        assert text in message[0], (text, message[0])
    assert "Traceback" not in result.stderr


def small_tmpfs(tmp_path, size):
    """Generator for a fixture: a tmpfs of `size` (e.g. "420k") mounted at `tmp_path/disk`, unmounted after the
    test; skips the test where mounting is not permitted."""
    import subprocess
    target = tmp_path / "disk"
    target.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.decode().strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=False)
