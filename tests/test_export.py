"""Export: `python -m nvae_tf.export`, the SavedModel for TF Serving, the TFLite sampler, HashNoise, the client.

Two runs are exported once per module, side by side (module-scoped fixtures):
  digits  the digits quick-start config (configs/digits.flags, ~569k parameters, Bernoulli decoder, 1 channel),
          untrained: built and saved as a checkpoint at step 0 (big enough for the TFLite size check);
  tiny    configs/tiny.flags (16x16 RGB, mixture of logistics, flows, 5-bit pixels), trained a few steps by
          `python -m nvae_tf.train` on a folder of random PNG files.
Both are exported by the CLI with --tflite_batch=2 (tiny with --tflite_quantize=float16 too). The SavedModels
are then loaded in fresh Python processes that cannot import nvae_tf, shown by `saved_model_cli show`, and fed
good and malformed requests through TensorFlow's C session API, the way TF Serving feeds them (SERVER).
A third run (a very small digits NVAE, untrained) serves the export CLI's error cases and, exported as version
2 of an existing export directory, the in-process tests of the client and of the SavedModel's input checks.

Subprocesses run from the root of the nvae_tf package that this process imports (normally the repository), so
running the tests with PYTHONPATH pointing at a copy of the package tests the copy throughout.
"""

import functools
import hashlib
import http.server
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

import nvae_tf

from conftest import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nvae_tf.__file__)))
CLIENT = os.path.join(ROOT, "export", "client.py")
TIMEOUT = 420  # seconds for one subprocess
TFLITE_BATCH = 2
MAX_SAMPLES = 64
SMALL = dict(num_channels_enc=4, num_channels_dec=4, num_latent_scales=1, num_groups_per_scale=1,
             min_groups_per_scale=1, num_preprocess_cells=1, num_postprocess_cells=1, num_latent_per_group=2)
TINY_STEPS = 3
KINDS = ("digits", "tiny")
FLT_MIN = float(np.finfo(np.float32).tiny)  # the smallest normal float32: the lowest temperature accepted
ABOVE_2 = float(np.nextafter(np.float32(2.0), np.float32(3.0)))  # the float32 just above the highest
# (seed, temperature) pairs at which the TFLite samplers are compared with the SavedModel; and the range's ends.
TFLITE_PAIRS = ((1, 0.7), (123456789, 1.0), (-5, 0.4))
TFLITE_ENDS = ((7, 2.0), (8, FLT_MIN))


# --------------------------------------------------------------------------------------------- helpers
class Proc:
    """A subprocess whose stdout and stderr go to files."""

    def __init__(self, args, log, cwd=ROOT, env=None):
        self.args, self.log = args, str(log)
        self._out, self._err = open(self.log + ".out", "w"), open(self.log + ".err", "w")
        self.start = time.time()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env or child_env(), stdout=self._out, stderr=self._err,
                                     text=True)
        self.rc = self.seconds = self.cpu = None
        self.stdout = self.stderr = ""

    def done(self):
        """True once the process has ended (its output is then read)."""
        if self.rc is None and self.proc.returncode is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.cpu = round(usage.ru_utime + usage.ru_stime, 1)
        if self.rc is None and self.proc.returncode is not None:
            self._finish(self.proc.returncode)
        return self.rc is not None

    def _finish(self, rc):
        self.rc, self.seconds = rc, round(time.time() - self.start, 1)
        self._out.close()
        self._err.close()
        with open(self.log + ".out") as f:
            self.stdout = f.read()
        with open(self.log + ".err") as f:
            self.stderr = f.read()

    def wait(self, timeout=TIMEOUT):
        deadline = time.time() + timeout
        while not self.done():
            if time.time() > deadline:
                self.kill()
                self._finish("timeout")
                break
            time.sleep(0.05)
        return self.rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def describe(self):
        # Error lines first (a TFLite converter error is followed by a long MLIR dump), then the tails.
        errors = [line[:1000] for line in self.stderr.splitlines() if re.search(r"Error\b|error:", line)]
        return (f"{' '.join(map(str, self.args))}\nexit {self.rc}\n--- error lines\n" + "\n".join(errors[-8:]) +
                f"\n--- stdout\n{self.stdout[-2000:]}\n--- stderr\n{self.stderr[-3000:]}")


def export_args(model_dir, export_dir, *extra):
    return [sys.executable, "-m", "nvae_tf.export", f"--model_dir={model_dir}", f"--export_dir={export_dir}",
            *extra]


def flagfile_config(name, **overrides):
    from nvae_tf.config import from_flagfile
    return from_flagfile(os.path.join(ROOT, "configs", name + ".flags"), **overrides)


def save_untrained_run(model_dir, config):
    """A run directory as training leaves it, at step 0: config.json and checkpoints/ckpt-0 (+ state file)."""
    from nvae_tf import runs
    from nvae_tf.model import NVAE
    model = NVAE(config)
    model.build()
    path = runs.save_model(model_dir, model, step=0)
    assert runs.find_checkpoint(model_dir) == path
    return path, int(sum(int(np.prod(v.shape)) for v in model.trainable_variables))


def write_random_pngs(folder, count=40, size=16):
    import tensorflow as tf
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        tf.io.write_file(os.path.join(folder, f"img_{i:03d}.png"), tf.io.encode_png(image))


def tree_digest(directory):
    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha1(f.read()).hexdigest()
    return out


def load_client():
    spec = importlib.util.spec_from_file_location("nvae_export_client", CLIENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grid_values(bits):
    """The uint8 values of pixels on the `bits`-bit grid, as the exporter rounds them."""
    levels = 2 ** bits - 1
    return set(np.round(np.arange(levels + 1) / levels * 255.0).astype(int).tolist())


# The code of a fresh process that loads a SavedModel without nvae_tf and calls every signature.
FRESH = r'''
import sys
sys.modules["nvae_tf"] = None  # any `import nvae_tf` (editable install or cwd) now raises ImportError
try:
    import nvae_tf
except ImportError:
    pass
else:
    raise SystemExit("nvae_tf is importable in the fresh process")
import json
import numpy as np
import tensorflow as tf

path, out, batch, pairs = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
model = tf.saved_model.load(path)
sigs = model.signatures
info = {"signatures": sorted(sigs),
        "inputs": {name: {k: s.dtype.name for k, s in sig.structured_input_signature[1].items()}
                   for name, sig in sigs.items()},
        "outputs": {name: {k: s.dtype.name for k, s in sig.structured_outputs.items()} for name, sig in sigs.items()}}


def sample(n, t, seed):
    return sigs["serving_default"](num_samples=tf.constant(n, tf.int32), temperature=tf.constant(t, tf.float32),
                                   seed=tf.constant(seed, tf.int64))["images"].numpy()


arrays = {"a": sample(3, 0.7, 11), "a_again": sample(3, 0.7, 11), "b": sample(3, 0.7, 12),
          "a_t1": sample(3, 1.0, 11), "a_mod": sample(3, 0.7, 11 + 2 ** 31 - 1), "one": sample(1, 0.5, 3)}
for seed, t in pairs:
    arrays[f"pair_{seed}_{t}"] = sample(batch, t, seed)
h, w, c = arrays["a"].shape[1:]
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (4, h, w, c)).astype(np.uint8)
if c == 1:
    images = (images >= 128).astype(np.uint8) * 255  # binary images, like the binarised digits
arrays["inputs"] = images
arrays["recon"] = sigs["reconstruct"](images=tf.constant(images))["images"].numpy()
arrays["recon_again"] = sigs["reconstruct"](images=tf.constant(images))["images"].numpy()
arrays["bpd"] = sigs["nelbo"](images=tf.constant(images))["bpd"].numpy()
arrays["bpd_again"] = sigs["nelbo"](images=tf.constant(images))["bpd"].numpy()
info["loaded_nvae_tf"] = sorted(m for m in sys.modules if m.split(".")[0] == "nvae_tf" and sys.modules[m] is not None)
np.savez(out, **arrays)
print("RESULT " + json.dumps(info))
'''


# The code of a process that feeds a SavedModel the way TF Serving does. The graph is loaded into a
# tf.compat.v1 Session and run through TF_SessionRun, the C API of the Session::Run that TF Serving calls: no
# Python code compares the fed tensors with the signature's shapes (Session.run and saved_model_cli would
# refuse a tensor of another shape before it reaches the graph). Each call's outputs (shape, dtype) or error
# (class, first line) is reported; the process ends with exit 0 only if it survived every call.
SERVER = r"""
import sys
sys.modules["nvae_tf"] = None
import json
import numpy as np
import tensorflow as tf

path, out, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
tf.compat.v1.disable_eager_execution()
session = tf.compat.v1.Session(graph=tf.Graph())
with session.graph.as_default():
    signatures = tf.compat.v1.saved_model.loader.load(session, ["serve"], path).signature_def


def run(signature, inputs):
    sig, graph = signatures[signature], session.graph
    feeds = {graph.get_tensor_by_name(sig.inputs[k].name)._as_tf_output(): v for k, v in inputs.items()}
    names = sorted(sig.outputs)
    fetches = [graph.get_tensor_by_name(sig.outputs[k].name)._as_tf_output() for k in names]
    return dict(zip(names, session._call_tf_sessionrun(None, feeds, fetches, [], None)))


results, arrays = [], {}
for signature, inputs in calls:
    feed = {k: np.array(v["value"], v["dtype"]) if "value" in v else np.zeros(v["shape"], v["dtype"])
            for k, v in inputs.items()}
    try:
        outputs = run(signature, feed)
    except tf.errors.OpError as e:
        results.append({"error": type(e).__name__, "message": e.message.splitlines()[0]})
    else:
        results.append({"outputs": {k: [list(v.shape), v.dtype.name] for k, v in outputs.items()}})
        for k, v in outputs.items():
            arrays[f"{len(results) - 1}_{k}"] = v
np.savez(out, **arrays)
print("RESULT " + json.dumps(results))
"""

def _scalars(dtypes=(), **values):
    """serving_default's inputs: a valid request with `values` replaced, fed with the dtypes `dtypes`."""
    values = {"num_samples": 2, "temperature": 0.7, "seed": 0, **values}
    dtypes = {"num_samples": "int32", "temperature": "float32", "seed": "int64", **dict(dtypes)}
    return {name: {"value": value, "dtype": dtypes[name]} for name, value in values.items()}


def _images(*shape, dtype="uint8"):
    return {"images": {"shape": list(shape), "dtype": dtype}}


def bad_requests(channels):
    """[(label, signature, inputs, refused input, end of the message)]: requests a server must refuse with
    InvalidArgument "assertion failed: [<input> must be <requirement>, <end of the message>". Wrong dtypes have
    None for both: the graph's placeholders refuse them before any op runs, with TensorFlow's own message."""
    c, other = channels, 3 if channels == 1 else 1
    shapes = {"rank 2": (16, 16), "rank 3 (one image)": (16, 16, c), "rank 3 (no channel axis)": (2, 16, 16),
              "rank 5": (2, 16, 16, c, 1), "rank 5 (extra axis first)": (1, 2, 16, 16, c), "rank 0": (),
              "height 8": (2, 8, 16, c), "height 17": (2, 17, 16, c), "width 15": (2, 16, 15, c),
              "width 32": (2, 16, 32, c), f"{other} channels": (2, 16, 16, other), "4 channels": (2, 16, 16, 4),
              "0 channels": (2, 16, 16, 0), "empty batch": (0, 16, 16, c),
              "batch above max_samples": (MAX_SAMPLES + 1, 16, 16, c)}
    out = []
    for signature in ("reconstruct", "nelbo"):
        for label, shape in shapes.items():
            out.append((f"{signature} {label}", signature, _images(*shape), "images",
                        "got shape] [" + " ".join(map(str, shape)) + "]"))
        for dtype in ("float32", "int32"):
            out.append((f"{signature} {dtype} images", signature, _images(2, 16, 16, c, dtype=dtype), None, None))
    for label, inputs, name, shown in (
            ("num_samples rank 1", dict(num_samples=[2, 3]), "num_samples", "[2 3]"),
            ("num_samples rank 2", dict(num_samples=[[2]]), "num_samples", "[[2]]"),
            ("num_samples empty", dict(num_samples=[]), "num_samples", "[]"),
            ("num_samples 0", dict(num_samples=0), "num_samples", "[0]"),
            ("num_samples -1", dict(num_samples=-1), "num_samples", "[-1]"),
            ("num_samples above max_samples", dict(num_samples=MAX_SAMPLES + 1), "num_samples",
             f"[{MAX_SAMPLES + 1}]"),
            ("temperature rank 1", dict(temperature=[0.5, 0.7]), "temperature", "[0.5 0.7]"),
            ("temperature NaN", dict(temperature=math.nan), "temperature", "[nan]"),
            ("temperature 0", dict(temperature=0.0), "temperature", "[0]"),
            ("temperature -0", dict(temperature=-0.0), "temperature", "[-0]"),
            ("temperature -1", dict(temperature=-1.0), "temperature", "[-1]"),
            ("temperature 3", dict(temperature=3.0), "temperature", "[3]"),
            ("temperature above 2 by one ulp", dict(temperature=ABOVE_2), "temperature", "[2.00000024]"),
            ("temperature inf", dict(temperature=math.inf), "temperature", "[inf]"),
            ("temperature denormal", dict(temperature=FLT_MIN / 2), "temperature", "[0]"),
            ("seed rank 1", dict(seed=[1, 2]), "seed", "[1 2]"),
            ("seed rank 2", dict(seed=[[1]]), "seed", "[[1]]")):
        out.append((f"serving_default {label}", "serving_default", _scalars(**inputs), name, f"got] {shown}"))
    for name, dtype in (("num_samples", "int64"), ("temperature", "float64"), ("seed", "int32")):
        out.append((f"serving_default {dtype} {name}", "serving_default", _scalars({name: dtype}), None, None))
    return out


def good_requests(channels):
    """[(label, signature, inputs, expected outputs {name: (shape, dtype)})]: requests at the limits."""
    image = (16, 16, channels)
    return [("serving_default 3 at t = 0.7, seed 11", "serving_default",
             _scalars(num_samples=3, temperature=0.7, seed=11), {"images": ((3, *image), "uint8")}),
            (f"serving_default {MAX_SAMPLES} at t = 2", "serving_default",
             _scalars(num_samples=MAX_SAMPLES, temperature=2.0, seed=5), {"images": ((MAX_SAMPLES, *image), "uint8")}),
            ("serving_default 1 at the smallest normal temperature", "serving_default",
             _scalars(num_samples=1, temperature=FLT_MIN, seed=6), {"images": ((1, *image), "uint8")}),
            ("reconstruct 1 image", "reconstruct", _images(1, *image), {"images": ((1, *image), "uint8")}),
            (f"reconstruct {MAX_SAMPLES} images", "reconstruct", _images(MAX_SAMPLES, *image),
             {"images": ((MAX_SAMPLES, *image), "uint8")}),
            ("nelbo 1 image", "nelbo", _images(1, *image), {"bpd": ((1,), "float32")}),
            (f"nelbo {MAX_SAMPLES} images", "nelbo", _images(MAX_SAMPLES, *image),
             {"bpd": ((MAX_SAMPLES,), "float32")})]


def server_calls(channels):
    """The calls of the server-like process: one good request, every bad one, then every good one."""
    good, bad = good_requests(channels), bad_requests(channels)
    return [(signature, inputs) for _, signature, inputs, *_ in [good[0], *bad, *good]]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Every subprocess of the module, each started as soon as what it needs is there (2 cores, no waiting):

        tiny:   train (subprocess) -> export (CLI) -> fresh process without nvae_tf + saved_model_cli show
                                                    + server-like process (SERVER: good and bad requests)
        digits: build + checkpoint (here) -> export (CLI) -> fresh process + saved_model_cli show + server-like
        CLI:    (after the digits export) no checkpoint; --version=1 over an existing version; a second export
                of a small run (auto version 2, --notflite)
    """
    base = tmp_path_factory.mktemp("export")
    start = time.time()
    procs = {}
    runs = {"digits": types.SimpleNamespace(kind="digits", channels=1, pixels="mean", step=0, error=None),
            "tiny": types.SimpleNamespace(kind="tiny", channels=3, pixels="sample", step=TINY_STEPS, error=None)}
    for kind, ns in runs.items():
        ns.model_dir, ns.export_dir = str(base / f"{kind}_run"), str(base / f"{kind}_export")
        ns.version_dir = os.path.join(ns.export_dir, "1")
        ns.npz, ns.server_npz = str(base / f"{kind}_fresh.npz"), str(base / f"{kind}_server.npz")
    common = [f"--tflite_batch={TFLITE_BATCH}"]
    fresh_env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}
    fresh_cwd = str(tmp_path_factory.mktemp("fresh_cwd"))  # outside the repository: nothing there to import
    cli = types.SimpleNamespace(base=str(base / "cli"))

    def start_served(kind):
        ns = runs[kind]
        procs[f"{kind}_fresh"] = Proc([sys.executable, "-c", FRESH, ns.version_dir, ns.npz, str(TFLITE_BATCH),
                                       json.dumps(TFLITE_PAIRS + TFLITE_ENDS)], base / f"{kind}_fresh",
                                      cwd=fresh_cwd, env=fresh_env)
        procs[f"{kind}_server"] = Proc([sys.executable, "-c", SERVER, ns.version_dir, ns.server_npz,
                                        json.dumps(server_calls(ns.channels))], base / f"{kind}_server",
                                       cwd=fresh_cwd, env=fresh_env)
        procs[f"{kind}_show"] = Proc([os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), "show",
                                      "--dir", ns.version_dir, "--all"], base / f"{kind}_show", cwd=fresh_cwd,
                                     env=fresh_env)

    def start_cli():
        cli.small_dir, cli.empty_dir = os.path.join(cli.base, "small_run"), os.path.join(cli.base, "no_ckpt_run")
        save_untrained_run(cli.small_dir, flagfile_config("digits", **SMALL))
        os.makedirs(cli.empty_dir)
        shutil.copy(os.path.join(cli.small_dir, "config.json"), cli.empty_dir)
        cli.existing, cli.second = os.path.join(cli.base, "existing"), os.path.join(cli.base, "second")
        for d in (cli.existing, cli.second):
            shutil.copytree(runs["digits"].version_dir, os.path.join(d, "1"))
        cli.before, cli.first_digest = tree_digest(cli.existing), tree_digest(os.path.join(cli.second, "1"))
        procs["cli_no_checkpoint"] = Proc(export_args(cli.empty_dir, os.path.join(cli.base, "never")),
                                          base / "cli_no_checkpoint")
        procs["cli_existing"] = Proc(export_args(cli.small_dir, cli.existing, "--version=1", "--notflite"),
                                     base / "cli_existing")
        procs["cli_second"] = Proc(export_args(cli.small_dir, cli.second, "--notflite"), base / "cli_second")

    try:
        images = str(base / "images")
        write_random_pngs(images)
        procs["tiny_train"] = Proc(
            [sys.executable, "-m", "nvae_tf.train", "--flagfile=configs/tiny.flags", f"--data_dir={images}",
             f"--model_dir={runs['tiny'].model_dir}", f"--max_steps={TINY_STEPS}", "--eval_batches=1",
             "--num_summary_images=2"], base / "tiny_train")
        _, runs["digits"].parameters = save_untrained_run(runs["digits"].model_dir, flagfile_config("digits"))
        procs["digits_export"] = Proc(export_args(runs["digits"].model_dir, runs["digits"].export_dir, *common),
                                      base / "digits_export")
        # Then: start whatever has become possible, until every process has ended.
        deadline = time.time() + 2 * TIMEOUT
        while time.time() < deadline:
            for name, p in procs.items():
                if not p.done() and time.time() - p.start > TIMEOUT:
                    p.kill()
                    p._finish("timeout")
            ended = {name for name, p in procs.items() if p.done()}
            ok = {name for name in ended if procs[name].rc == 0}
            if "tiny_train" in ok and "tiny_export" not in procs:
                procs["tiny_export"] = Proc(export_args(runs["tiny"].model_dir, runs["tiny"].export_dir, *common,
                                                        "--tflite_quantize=float16"), base / "tiny_export")
                continue
            for kind in runs:
                if f"{kind}_export" in ok and f"{kind}_fresh" not in procs:
                    start_served(kind)
            if "digits_export" in ok and "cli_second" not in procs:
                start_cli()
            if len(ended) == len(procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs.values():
            p.kill()
    for ns in runs.values():
        failed = [p for name, p in procs.items() if name in (f"{ns.kind}_train", f"{ns.kind}_export") and p.rc != 0]
        if failed or f"{ns.kind}_export" not in procs:
            ns.error = f"the {ns.kind} run was not exported:\n" + "\n".join(p.describe() for p in failed)
            continue
        ns.proc = procs[f"{ns.kind}_export"]
        with open(os.path.join(ns.export_dir, "manifest.json")) as f:
            ns.manifest = json.load(f)
        ns.fresh, ns.show, ns.info, ns.arrays = procs[f"{ns.kind}_fresh"], procs[f"{ns.kind}_show"], None, None
        lines = [x for x in ns.fresh.stdout.splitlines() if x.startswith("RESULT ")]
        if ns.fresh.rc == 0 and lines:
            ns.info = json.loads(lines[-1][len("RESULT "):])
            with np.load(ns.npz) as f:
                ns.arrays = {k: f[k] for k in f.files}
        ns.server, ns.server_results, ns.server_arrays = procs[f"{ns.kind}_server"], None, None
        lines = [x for x in ns.server.stdout.splitlines() if x.startswith("RESULT ")]
        if ns.server.rc == 0 and lines:
            ns.server_results = json.loads(lines[-1][len("RESULT "):])
            with np.load(ns.server_npz) as f:
                ns.server_arrays = {k: f[k] for k in f.files}
    cli.procs = {name[4:]: p for name, p in procs.items() if name.startswith("cli_")}
    timing = ", ".join(f"{name} {p.seconds} s ({p.cpu} s CPU)" for name, p in procs.items())
    print(f"pipeline: {time.time() - start:.0f} s ({timing})")
    return types.SimpleNamespace(runs=runs, cli=cli, procs=procs)


@pytest.fixture(scope="module")
def exports(pipeline):
    return pipeline.runs


def get_export(exports, kind):
    ns = exports[kind]
    if ns.error:
        pytest.fail(ns.error, pytrace=False)
    return ns


def get_served(exports, kind):
    ns = get_export(exports, kind)
    assert ns.fresh.rc == 0 and ns.info, ns.fresh.describe()
    return ns


@pytest.fixture(scope="module")
def small_model(pipeline):
    """The small digits run's SavedModel (version 2 of the CLI's auto-version export), loaded in this process."""
    import tensorflow as tf
    p = pipeline.cli.procs.get("second")
    if p is None or p.rc != 0:
        pytest.fail("the small run was not exported:\n" + (p.describe() if p else "(not started)"), pytrace=False)
    return tf.saved_model.load(os.path.join(pipeline.cli.second, "2"))


# ====================================================================================== the export layout
@pytest.mark.parametrize("kind", KINDS)
def test_export_writes_the_tf_serving_layout_and_manifest(exports, kind):
    ns = get_export(exports, kind)
    assert "SavedModel: " + os.path.join(ns.export_dir, "1") in ns.proc.stdout
    # TF Serving's layout: <base>/<version>/saved_model.pb + variables/.
    tflite = ["sampler.tflite"] + (["sampler_float16.tflite"] if kind == "tiny" else [])  # --tflite_quantize
    assert sorted(os.listdir(ns.export_dir)) == ["1", "config.json", "manifest.json", *tflite]  # no staging left
    version = ns.version_dir
    assert os.path.isfile(os.path.join(version, "saved_model.pb"))
    variables = os.listdir(os.path.join(version, "variables"))
    assert "variables.index" in variables and any(v.startswith("variables.data-") for v in variables)
    assert os.path.getsize(os.path.join(version, "variables", "variables.index")) > 0
    # The manifest and config beside the versions and inside <version>/assets.extra/ (served with the model).
    for name in ("manifest.json", "config.json"):
        with open(os.path.join(ns.export_dir, name)) as a, open(os.path.join(version, "assets.extra", name)) as b:
            assert json.load(a) == json.load(b), name
    with open(os.path.join(ns.export_dir, "config.json")) as a, open(os.path.join(ns.model_dir, "config.json")) as b:
        assert json.load(a) == json.load(b)  # the run's own config
    m = ns.manifest
    assert m["version"] == 1
    assert m["image_shape"] == [16, 16, ns.channels] and m["channels"] == ns.channels
    assert m["step"] == ns.step and m["checkpoint"].endswith(f"ckpt-{ns.step}")
    assert m["pixels"] == ns.pixels
    assert m["limits"]["num_samples"] == [1, MAX_SAMPLES]
    assert m["limits"]["temperature"] == [0.0, 2.0]
    if kind == "digits":
        assert m["parameters"] == ns.parameters
    # Each input with the shape and the requirement that the graph checks (the text of its error message).
    images = [{"name": "images", "dtype": "uint8", "shape": [None, 16, 16, ns.channels],
               "requirement": f"[1..{MAX_SAMPLES}, 16, 16, {ns.channels}] uint8"}]
    assert m["signatures"] == {
        "serving_default": {
            "inputs": [{"name": "num_samples", "dtype": "int32", "shape": [],
                        "requirement": f"an int32 scalar in [1, {MAX_SAMPLES}]"},
                       {"name": "temperature", "dtype": "float32", "shape": [],
                        "requirement": "a float32 scalar in (0, 2]"},
                       {"name": "seed", "dtype": "int64", "shape": [], "requirement": "an int64 scalar"}],
            "outputs": {"images": {"dtype": "uint8", "shape": [None, 16, 16, ns.channels]}}},
        "reconstruct": {"inputs": images,
                        "outputs": {"images": {"dtype": "uint8", "shape": [None, 16, 16, ns.channels]}}},
        "nelbo": {"inputs": images, "outputs": {"bpd": {"dtype": "float32", "shape": [None]}}}}
    assert m["tflite"]["files"] == tflite
    assert m["tflite"]["batch"] == TFLITE_BATCH
    assert set(m["tflite"]["outputs"]) == {"images", "valid"}
    assert "all zero when valid is 0" in m["tflite"]["outputs"]["images"]
    assert "1 if 0 < temperature <= 2, else 0" in m["tflite"]["outputs"]["valid"]


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_runs_every_signature_in_a_process_without_nvae_tf(exports, kind):
    ns = get_served(exports, kind)
    info, a = ns.info, ns.arrays
    assert info["loaded_nvae_tf"] == []
    assert info["signatures"] == ["nelbo", "reconstruct", "serving_default"]
    assert info["inputs"] == {"serving_default": {"num_samples": "int32", "temperature": "float32", "seed": "int64"},
                              "reconstruct": {"images": "uint8"}, "nelbo": {"images": "uint8"}}
    assert info["outputs"] == {"serving_default": {"images": "uint8"}, "reconstruct": {"images": "uint8"},
                               "nelbo": {"bpd": "float32"}}
    shape = (16, 16, ns.channels)
    # serving_default: uint8 [n, H, W, C]; the same seed gives identical images, another seed others.
    assert a["a"].dtype == np.uint8 and a["a"].shape == (3, *shape)
    assert a["one"].shape == (1, *shape)
    np.testing.assert_array_equal(a["a"], a["a_again"])
    assert np.mean(a["a"] != a["b"]) > 0.2, "another seed should give other images"
    # (tiny, barely trained: its pixel noise dominates, and the latents move ~15 % of the values)
    assert np.mean(a["a"] != a["a_t1"]) > 0.05, "another temperature should give other images"
    assert not np.array_equal(a["a"][0], a["a"][1]), "the images of one request should differ"
    # Seeds are reduced modulo 2^31 - 1 (documented).
    np.testing.assert_array_equal(a["a"], a["a_mod"])
    # reconstruct: uint8 of the input's shape, deterministic (fixed noise).
    assert a["recon"].dtype == np.uint8 and a["recon"].shape == a["inputs"].shape
    np.testing.assert_array_equal(a["recon"], a["recon_again"])
    # nelbo: float32 bits/dim per image, finite and positive.
    bpd = a["bpd"]
    assert bpd.dtype == np.float32 and bpd.shape == (len(a["inputs"]),)
    assert np.all(np.isfinite(bpd)) and np.all(bpd > 0), bpd
    np.testing.assert_array_equal(bpd, a["bpd_again"])
    if kind == "digits":
        # Untrained Bernoulli decoder: p(x) ~ 0.5 per pixel, about 1 bit/dim plus a small KL.
        assert np.all((bpd > 0.9) & (bpd < 2.0)), bpd
        assert len(np.unique(a["a"])) > 1
    else:
        # Pixels drawn from the mixture of logistics lie on the 5-bit grid (num_x_bits=5).
        grid = grid_values(5)
        for key in ("a", "b", "recon"):
            assert set(np.unique(a[key]).tolist()) <= grid, key
        assert len(np.unique(a["a"])) > 8
        # Worse than nothing would be > 8 bits/dim; a few steps on uniform noise sit around the 5 bits of it.
        assert np.all(bpd < 12.0), bpd


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_refuses_malformed_requests_fed_like_a_server(exports, kind):
    """Tensors fed straight into the graph (as TF Serving feeds them) of every wrong rank, size, batch, dtype and
    value: each call gets one InvalidArgument naming the input and what it must be, and the process lives on."""
    ns = get_export(exports, kind)
    assert ns.server.rc == 0 and ns.server_results, ns.server.describe()
    results = ns.server_results
    good, bad = good_requests(ns.channels), bad_requests(ns.channels)
    assert len(results) == 1 + len(bad) + len(good)
    requirement = {(signature, i["name"]): i["requirement"]
                   for signature, entry in ns.manifest["signatures"].items() for i in entry["inputs"]}
    for (label, signature, inputs, name, end), result in zip(bad, results[1:]):
        assert result.get("error") == "InvalidArgumentError", (label, result)
        if name is None:
            assert re.fullmatch(r"Expects arg\[\d\] to be \w+ but \w+ is provided", result["message"]), (label, result)
        else:
            assert result["message"] == f"assertion failed: [{name} must be {requirement[signature, name]}, {end}", \
                (label, result)
    # Good requests before and after the bad ones: right shapes and dtypes, as many images as asked for.
    indices = [0] + list(range(1 + len(bad), len(results)))
    for i, (label, signature, inputs, expected) in zip(indices, [good[0], *good]):
        assert results[i] == {"outputs": {k: [list(shape), dtype] for k, (shape, dtype) in expected.items()}}, \
            (label, results[i])
    # The same graph as the Python API runs: the images of the fresh process for (3, 0.7, seed 11).
    a = get_served(exports, kind).arrays["a"]
    np.testing.assert_array_equal(ns.server_arrays["0_images"], a)
    np.testing.assert_array_equal(ns.server_arrays[f"{1 + len(bad)}_images"], a)
    bpd = ns.server_arrays[f"{len(results) - 1}_bpd"]
    assert np.all(np.isfinite(bpd)) and np.all(bpd > 0), bpd


def _show_sections(text):
    """{signature: {"inputs": {name: (dtype, shape)}, "outputs": {...}}} from `saved_model_cli show --all`."""
    out = {}
    for block in re.split(r"\n(?=signature_def\[')", text):
        m = re.match(r"signature_def\['(\w+)'\]:", block)
        if not m or m.group(1) == "__saved_model_init_op":
            continue
        parts = re.split(r"contains the following output\(s\):", block)
        entry = {}
        for key, part in zip(("inputs", "outputs"), parts):
            entry[key] = {n: (d, s) for n, d, s in re.findall(
                rf"{key}\['(\w+)'\] tensor_info:\s*dtype: (\w+)\s*shape: (\([^)]*\)|unknown_rank)", part)}
        method = re.search(r"Method name is: (\S*)", block)
        entry["method"] = method.group(1) if method else None
        out[m.group(1)] = entry
    return out


PREDICT = "tensorflow/serving/predict"  # the method TF Serving's REST predict API calls


@pytest.mark.parametrize("kind", KINDS)
def test_saved_model_cli_shows_the_three_signatures(exports, kind):
    ns = get_export(exports, kind)
    show = ns.show
    assert show.rc == 0, show.describe()
    sections = _show_sections(show.stdout)
    image, unknown = f"(-1, 16, 16, {ns.channels})", "unknown_rank"  # inputs: shapes checked in the graph
    assert sections == {
        "serving_default": {"inputs": {"num_samples": ("DT_INT32", unknown), "temperature": ("DT_FLOAT", unknown),
                                       "seed": ("DT_INT64", unknown)},
                            "outputs": {"images": ("DT_UINT8", image)}, "method": PREDICT},
        "reconstruct": {"inputs": {"images": ("DT_UINT8", unknown)}, "outputs": {"images": ("DT_UINT8", image)},
                        "method": PREDICT},
        "nelbo": {"inputs": {"images": ("DT_UINT8", unknown)}, "outputs": {"bpd": ("DT_FLOAT", "(-1)")},
                  "method": PREDICT},
    }, show.stdout[-4000:]


# ============================================================================================ TFLite
def tflite_interpreter(path):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(interpreter, seed, temperature):
    """The sampler's outputs (images uint8 [batch, H, W, C], valid int32 scalar) for one seed and temperature."""
    runner = interpreter.get_signature_runner("sampler")
    out = runner(temperature=np.array(temperature, np.float32), seed=np.array(seed, np.int64))
    return out["images"], out["valid"]


def assert_like_the_saved_model(images, expected, variant, what):
    diff = np.abs(images.astype(np.int32) - expected.astype(np.int32))
    if variant == "sampler.tflite":
        # float32 kernels round differently from TensorFlow's: a value that lands on a bin edge can move to the
        # next level (8 units at 5 bits; one value of 1,536 at temperature 2 in a CI run), nothing more.
        assert np.mean(diff <= 1) >= 0.995 and diff.mean() < 0.1, \
            (what, diff.max(), np.mean(diff > 1), diff.mean())
    else:
        # float16 weights: measured 99.9-100 % of pixels equal (an RGB pixel can pick another mixture
        # component now and then, a 5-bit level = 8 units away or more).
        assert np.median(diff) == 0 and np.mean(diff <= 1) >= 0.98 and diff.mean() < 0.5, \
            (what, diff.max(), np.mean(diff > 0), diff.mean())


TFLITE_VARIANTS = [("digits", "sampler.tflite"), ("tiny", "sampler.tflite"), ("tiny", "sampler_float16.tflite")]


@pytest.mark.parametrize("kind,variant", TFLITE_VARIANTS)
def test_tflite_sampler_uses_builtin_ops_and_matches_the_saved_model(exports, kind, variant):
    ns = get_served(exports, kind)
    arrays = ns.arrays
    interpreter = tflite_interpreter(os.path.join(ns.export_dir, variant))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not [op for op in ops if op.startswith("Flex")], ops
    assert not ops & {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CUSTOM"}, ops
    assert {"CONV_2D", "BITWISE_XOR", "FLOOR_MOD"} <= ops  # weights are convolved; noise is HashNoise
    assert ("DEQUANTIZE" in ops) == (variant == "sampler_float16.tflite")
    assert interpreter.get_signature_list() == {"sampler": {"inputs": ["seed", "temperature"],
                                                            "outputs": ["images", "valid"]}}
    shape = (TFLITE_BATCH, 16, 16, ns.channels)
    for seed, temperature in TFLITE_PAIRS:
        images, valid = run_tflite(interpreter, seed, temperature)
        assert images.dtype == np.uint8 and images.shape == shape
        assert valid.dtype == np.int32 and valid.shape == () and valid == 1
        assert_like_the_saved_model(images, arrays[f"pair_{seed}_{temperature}"], variant, (seed, temperature))
    # The same seed again gives the same images; another seed others.
    seed, temperature = TFLITE_PAIRS[0]
    first = run_tflite(interpreter, seed, temperature)[0]
    np.testing.assert_array_equal(run_tflite(interpreter, seed, temperature)[0], first)
    assert np.mean(run_tflite(interpreter, seed + 1, temperature)[0] != first) > 0.2


@pytest.mark.parametrize("kind,variant", TFLITE_VARIANTS)
def test_tflite_sampler_flags_temperatures_outside_the_range(exports, kind, variant):
    """Outside (0, 2] (NaN, infinities and denormals included): valid = 0 and all-zero images, whatever the
    seed. At both ends of the range: valid = 1 and the SavedModel's images."""
    ns = get_served(exports, kind)
    interpreter = tflite_interpreter(os.path.join(ns.export_dir, variant))
    zeros = np.zeros((TFLITE_BATCH, 16, 16, ns.channels), np.uint8)
    refused = (math.nan, -math.nan, 0.0, -0.0, -1.0, 3.0, ABOVE_2, math.inf, -math.inf, FLT_MIN / 2)
    for temperature in refused:
        for seed in (1, -5):
            images, valid = run_tflite(interpreter, seed, temperature)
            assert valid.dtype == np.int32 and valid.shape == () and valid == 0, (temperature, valid)
            assert images.dtype == np.uint8
            np.testing.assert_array_equal(images, zeros, err_msg=f"temperature {temperature}")
    for seed, temperature in TFLITE_ENDS:
        images, valid = run_tflite(interpreter, seed, temperature)
        assert valid == 1, (temperature, valid)
        assert_like_the_saved_model(images, ns.arrays[f"pair_{seed}_{temperature}"], variant, (seed, temperature))
        assert np.any(images != 0)


def test_tflite_file_size_is_about_the_sampler_weights(exports):
    ns = get_export(exports, "digits")
    weights = ns.manifest["tflite"]["sampler_weights"]
    # The sampler reads the decoder side only: a good part of the ~569k parameters, never more than them all.
    assert 0.25 * ns.parameters < weights <= ns.parameters, (weights, ns.parameters)
    size = os.path.getsize(os.path.join(ns.export_dir, "sampler.tflite"))
    # Measured: 1.06 x 4 bytes a weight (graph overhead ~50 KB). A sampler that lost its weights (see
    # tf_notes.md, "Export traps") would be a few KB.
    assert 4 * weights <= size <= 1.2 * 4 * weights, (size, weights)


def test_tflite_sampler_is_the_same_from_frozen_weights_and_from_variables(tmp_path, monkeypatch):
    """A sampler up to FROZEN_SAMPLER_LIMIT weights is converted with its weights frozen into the graph, a larger
    one from its variables: both give the same images and the same refusals."""
    from nvae_tf import serving
    from nvae_tf.model import NVAE
    model = NVAE(flagfile_config("tiny"))
    model.build()
    paths = {"frozen": str(tmp_path / "frozen.tflite"), "variables": str(tmp_path / "variables.tflite")}
    frozen = []
    freeze = serving.convert_variables_to_constants_v2
    monkeypatch.setattr(serving, "convert_variables_to_constants_v2", lambda f: frozen.append(f) or freeze(f))
    weights = serving.export_tflite(model, paths["frozen"], batch=1)
    monkeypatch.setattr(serving, "FROZEN_SAMPLER_LIMIT", weights - 1)
    assert serving.export_tflite(model, paths["variables"], batch=1) == weights
    assert len(frozen) == 1  # the first conversion only
    interpreters = {k: tflite_interpreter(p) for k, p in paths.items()}
    for interpreter in interpreters.values():
        assert interpreter.get_signature_list() == {"sampler": {"inputs": ["seed", "temperature"],
                                                                "outputs": ["images", "valid"]}}
    for seed, temperature in (*TFLITE_PAIRS, (3, math.nan), (4, 2.5)):
        (a, valid_a), (b, valid_b) = (run_tflite(interpreters[k], seed, temperature) for k in paths)
        assert int(valid_a) == int(valid_b) == int(0 < temperature <= 2), (seed, temperature)
        assert np.abs(a.astype(np.int32) - b.astype(np.int32)).max() <= 1, (seed, temperature)
        assert a.any() == bool(valid_a)


# ========================================================================================== HashNoise
def lowbias32(x):
    """Reference 32-bit hash in NumPy uint64 arithmetic (mod 2^32), independent of TensorFlow."""
    mask = np.uint64(0xFFFFFFFF)
    x = np.asarray(x, np.int64).astype(np.uint64) & mask
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & mask
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & mask
    x ^= x >> np.uint64(16)
    return x


class ReferenceNoise:
    """HashNoise as documented, in NumPy: key = h(h(seed mod (2^31 - 1)) + 1); draw d's stream =
    h(key ^ (d * 0x2545F491 mod 2^32)); element j = h(j ^ stream); uniform = (top 24 bits + 0.5) / 2^24."""

    def __init__(self, seed):
        self.key = lowbias32((int(lowbias32(seed % (2 ** 31 - 1))) + 1) % 2 ** 32)
        self.draws = 0

    def bits(self, n):
        self.draws += 1
        stream = lowbias32(int(self.key) ^ (self.draws * 0x2545F491) % 2 ** 32)
        return lowbias32(np.arange(n, dtype=np.uint64) ^ stream)

    def uniform(self, n):  # float32 arithmetic, as in the graph
        return (((self.bits(n) >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) *
                np.float32(2.0 ** -24)).astype(np.float32)


def _noise(seed):
    import tensorflow as tf

    from nvae_tf.serving import HashNoise
    return HashNoise(tf.constant(seed, tf.int64))


def test_hash32_equals_a_numpy_reference():
    import tensorflow as tf

    from nvae_tf.serving import hash32
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(-2 ** 31, 2 ** 31, 200_000), np.arange(-1000, 1000),
                        [-2 ** 31, -2 ** 31 + 1, -65536, -65537, -1, 0, 1, 65535, 65536, 2 ** 31 - 1]])
    x = x.astype(np.int32)
    assert np.sum(x < 0) > 90_000
    got = hash32(tf.constant(x)).numpy()
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got.view(np.uint32).astype(np.uint64), lowbias32(x))
    # The same inside a graph (how the SavedModel and the TFLite sampler run it).
    graph = tf.function(hash32)(tf.constant(x)).numpy()
    np.testing.assert_array_equal(graph, got)
    # An avalanche-style sanity check: consecutive inputs give unrelated outputs.
    bits = np.unpackbits(got[:-1].view(np.uint8) ^ got[1:].view(np.uint8))
    assert 0.45 < bits.mean() < 0.55


@pytest.mark.parametrize("seed", [0, 7, -3, 2 ** 40 + 5, -2 ** 63])
def test_hash_noise_uniforms_equal_the_reference_stream(seed):
    import tensorflow as tf
    noise, ref = _noise(seed), ReferenceNoise(seed)
    for shape in ([5], [3, 4], [1000], [2, 2, 2], [7], [11], [3]):  # draws 1..7: past d * c >= 2^31 and 2^32
        got = noise.uniform(shape).numpy()
        want = ref.uniform(int(np.prod(shape))).reshape(shape)
        np.testing.assert_array_equal(got, want)
    # Normals: Box-Muller on the next two uniform draws.
    z = noise.normal([500]).numpy()
    u1, u2 = ref.uniform(500).astype(np.float64), ref.uniform(500).astype(np.float64)
    np.testing.assert_allclose(z, np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2), rtol=1e-4, atol=1e-5)
    # Traced in a graph, the draws are the same.
    graph = _draws_in_a_graph()(tf.constant(seed, tf.int64))
    eager = _draws(tf.constant(seed, tf.int64))
    for g, e in zip(graph, eager):
        np.testing.assert_array_equal(g.numpy(), e.numpy())


@functools.lru_cache(maxsize=None)
def _draws_in_a_graph():
    import tensorflow as tf
    return tf.function(_draws)


def _draws(seed):
    from nvae_tf.serving import HashNoise
    noise = HashNoise(seed)
    return [noise.uniform([9]), noise.normal([4, 3]), noise.uniform([2])]


def test_hash_noise_uniforms_have_the_moments_of_u01():
    u = _noise(2024).uniform([1_000_000]).numpy().astype(np.float64)
    assert u.min() > 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.002  # standard error 0.0003
    assert abs(u.var() - 1.0 / 12.0) < 0.001
    counts = np.histogram(u, bins=100, range=(0, 1))[0]
    chi2 = np.sum((counts - 10_000) ** 2 / 10_000)
    assert chi2 < 170, chi2  # 99 degrees of freedom: p ~ 1e-5 at 170
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.005


def test_hash_noise_normals_are_standard_normal():
    z = _noise(99).normal([1_000_000]).numpy().astype(np.float64)
    assert np.all(np.isfinite(z))
    assert abs(z.mean()) < 0.005 and abs(z.std() - 1.0) < 0.005
    assert abs(np.mean(z ** 3)) < 0.02 and abs(np.mean(z ** 4) - 3.0) < 0.05
    # Kolmogorov-Smirnov distance to the normal CDF (math.erf), on every draw.
    z = np.sort(z)
    cdf = 0.5 * (1.0 + np.frompyfunc(math.erf, 1, 1)(z / math.sqrt(2.0)).astype(np.float64))
    n = len(z)
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert d < 1.95 / math.sqrt(n), d  # the 0.1 % critical value


def test_hash_noise_streams_differ_by_seed_and_draw():
    a, b = _noise(1), _noise(2)
    ua, ub = a.uniform([10_000]).numpy(), b.uniform([10_000]).numpy()
    assert np.mean(ua == ub) < 0.01
    assert abs(np.corrcoef(ua, ub)[0, 1]) < 0.05
    # Two draws of one HashNoise: different streams.
    ua2 = a.uniform([10_000]).numpy()
    assert np.mean(ua == ua2) < 0.01
    assert abs(np.corrcoef(ua, ua2)[0, 1]) < 0.05
    # Normals too.
    za, zb = _noise(5).normal([1000]).numpy(), _noise(6).normal([1000]).numpy()
    assert np.mean(za == zb) < 0.01
    # A fresh HashNoise with the same seed repeats the first one's draws.
    np.testing.assert_array_equal(_noise(1).uniform([10_000]).numpy(), ua)


def test_hash_noise_reduces_seeds_modulo_2_31_minus_1():
    modulus = 2 ** 31 - 1
    for seed in (0, 1, 12345, modulus - 1):
        np.testing.assert_array_equal(_noise(seed).uniform([64]).numpy(),
                                      _noise(seed + modulus).uniform([64]).numpy())
        np.testing.assert_array_equal(_noise(seed).normal([16]).numpy(),
                                      _noise(seed + 3 * modulus).normal([16]).numpy())
    np.testing.assert_array_equal(_noise(-1).uniform([64]).numpy(), _noise(modulus - 1).uniform([64]).numpy())
    # ... and no further: seeds that differ by less than the modulus differ.
    assert np.mean(_noise(1).uniform([64]).numpy() == _noise(1 + 2 ** 31).uniform([64]).numpy()) < 0.1


# ============================================================================================ client
def test_rest_request_matches_the_serving_default_signature(small_model):
    client = load_client()
    body = client.rest_request(4, 0.8, 12345)
    assert body["signature_name"] == "serving_default"
    signature = small_model.signatures[body["signature_name"]]
    specs = signature.structured_input_signature[1]
    assert set(body["inputs"]) == set(specs)
    json_type = {"int32": int, "int64": int, "float32": float}
    for name, value in body["inputs"].items():
        assert type(value) is json_type[specs[name].dtype.name], (name, value, specs[name])
    assert body["inputs"] == {"num_samples": 4, "temperature": 0.8, "seed": 12345}
    # JSON-serialisable, and the body's values in the signature's dtypes run the signature.
    inputs = json.loads(json.dumps(body))["inputs"]
    import tensorflow as tf
    images = signature(**{k: tf.constant(v, specs[k].dtype) for k, v in inputs.items()})["images"]
    assert images.shape == (4, 16, 16, 1)
    # Large seeds are kept as ints.
    assert client.rest_request(1, 1, 2 ** 62)["inputs"] == {"num_samples": 1, "temperature": 1.0, "seed": 2 ** 62}


def run_client(*args):
    return subprocess.run([sys.executable, CLIENT, *args], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=120)


def test_client_print_request_prints_the_body():
    client = load_client()
    done = run_client("--print_request", "--num_samples=3", "--temperature=0.5", "--seed=-9")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == client.rest_request(3, 0.5, -9)
    done = run_client("--print_request", "--num_samples=100", "--max_samples=128")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inputs"]["num_samples"] == 100


@pytest.mark.parametrize("args,what", [
    (["--num_samples=0"], "num_samples"),
    ([f"--num_samples={MAX_SAMPLES + 1}"], "num_samples"),
    (["--num_samples=9", "--max_samples=8"], "num_samples"),
    (["--temperature=0"], "temperature"),
    (["--temperature=-0.5"], "temperature"),
    (["--temperature=2.01"], "temperature"),
])
def test_client_rejects_bad_requests(args, what):
    client = load_client()
    done = run_client("--print_request", *args)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("error: " + what), done.stderr
    values = {"num_samples": 8, "temperature": 0.7, "seed": 0, "max_samples": MAX_SAMPLES}
    for arg in args:
        name, value = arg[2:].split("=")
        values[name] = type(values[name])(float(value)) if name != "temperature" else float(value)
    with pytest.raises(client.RequestError, match=what):
        client.rest_request(values["num_samples"], values["temperature"], values["seed"], values["max_samples"])


def test_client_accepts_the_limits():
    client = load_client()
    for n, t in ((1, 2.0), (MAX_SAMPLES, 1e-3)):
        assert client.rest_request(n, t, 0)["inputs"]["num_samples"] == n
    for bad in (True, 2.5, "3"):
        with pytest.raises(client.RequestError, match="num_samples"):
            client.rest_request(bad, 0.7, 0)
    with pytest.raises(client.RequestError, match="seed"):
        client.rest_request(1, 0.7, 2 ** 63)


NUM_SAMPLES_MUST = f"num_samples must be an int32 scalar in [1, {MAX_SAMPLES}], got] "
TEMPERATURE_MUST = "temperature must be a float32 scalar in (0, 2], got] "


@pytest.mark.parametrize("inputs,message", [
    (dict(num_samples=0), NUM_SAMPLES_MUST + "[0]"),
    (dict(num_samples=MAX_SAMPLES + 1), NUM_SAMPLES_MUST + f"[{MAX_SAMPLES + 1}]"),
    (dict(num_samples=[2, 3]), NUM_SAMPLES_MUST + "[2 3]"),
    (dict(temperature=0.0), TEMPERATURE_MUST + "[0]"),
    (dict(temperature=-1.0), TEMPERATURE_MUST + "[-1]"),
    (dict(temperature=2.5), TEMPERATURE_MUST + "[2.5]"),
    (dict(temperature=math.nan), TEMPERATURE_MUST + "[nan]"),
    (dict(seed=[[1]]), "seed must be an int64 scalar, got] [[1]]"),
])
def test_saved_model_rejects_bad_requests(small_model, inputs, message):
    """The same checks through the Python API of a SavedModel loaded in this process (its inputs declare no
    shape, so Python lets every shape through to the graph)."""
    import tensorflow as tf
    values = {"num_samples": 2, "temperature": 0.7, "seed": 0, **inputs}
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape("assertion failed: [" + message)):
        small_model.signatures["serving_default"](num_samples=tf.constant(values["num_samples"], tf.int32),
                                                   temperature=tf.constant(values["temperature"], tf.float32),
                                                   seed=tf.constant(values["seed"], tf.int64))


def test_saved_model_rejects_bad_image_batches(small_model):
    import tensorflow as tf
    must = f"assertion failed: [images must be [1..{MAX_SAMPLES}, 16, 16, 1] uint8, got shape] "
    for name in ("reconstruct", "nelbo"):
        for shape in ((0, 16, 16, 1), (MAX_SAMPLES + 1, 16, 16, 1), (16, 16, 1), (2, 16, 16, 4)):
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match=re.escape(must + "[" + " ".join(map(str, shape)) + "]")):
                small_model.signatures[name](images=tf.zeros(shape, tf.uint8))
    # The limits themselves are accepted.
    out = small_model.signatures["serving_default"](num_samples=tf.constant(1), temperature=tf.constant(2.0),
                                                     seed=tf.constant(0, tf.int64))["images"]
    assert out.shape == (1, 16, 16, 1)
    bpd = small_model.signatures["nelbo"](images=tf.zeros([MAX_SAMPLES, 16, 16, 1], tf.uint8))["bpd"]
    assert bpd.shape == (MAX_SAMPLES,)


@pytest.mark.parametrize("channels,shape", [(1, (5, 7)), (3, (16, 16)), (3, (1, 1))])
def test_png_bytes_decodes_to_the_same_pixels(channels, shape):
    import tensorflow as tf
    client = load_client()
    image = np.random.default_rng(channels).integers(0, 256, (*shape, channels), dtype=np.uint8)
    image[0, 0] = 0
    image[-1, -1] = 255
    data = client.png_bytes(image.tolist())
    decoded = tf.io.decode_png(data, channels=0).numpy()
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, image)
    with pytest.raises(client.RequestError, match="channels"):
        client.png_bytes(np.zeros((2, 2, 2), np.uint8).tolist())


class FakeServing:
    """A local HTTP server that answers predict calls like TF Serving's REST API, by running a SavedModel."""

    def __init__(self, model, name="nvae"):
        import tensorflow as tf
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Content-Type"), body))
                if not re.fullmatch(rf"/v1/models/{name}(/versions/\d+)?:predict", self.path):
                    return self.reply(404, {"error": f"no model at {self.path}"})
                try:
                    signature = model.signatures[body["signature_name"]]
                    specs = signature.structured_input_signature[1]
                    inputs = {k: tf.constant(v, specs[k].dtype) for k, v in body["inputs"].items()}
                    images = signature(**inputs)["images"].numpy()
                except tf.errors.InvalidArgumentError as e:
                    return self.reply(400, {"error": e.message})
                self.reply(200, {"outputs": images.tolist()})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_serving(small_model):
    server = FakeServing(small_model)
    yield server
    server.close()


def test_client_predicts_through_a_rest_server(small_model, fake_serving, tmp_path):
    import tensorflow as tf
    client = load_client()
    direct = small_model.signatures["serving_default"](num_samples=tf.constant(3), temperature=tf.constant(0.6),
                                                        seed=tf.constant(77, tf.int64))["images"].numpy()
    images = client.predict_rest(fake_serving.url, "nvae", client.rest_request(3, 0.6, 77))
    np.testing.assert_array_equal(np.array(images, np.uint8), direct)
    path, content_type, body = fake_serving.requests[-1]
    assert path == "/v1/models/nvae:predict" and content_type == "application/json"
    # The command line: request, PNG files that decode to the server's images.
    rc = client.main([f"--server={fake_serving.url}", "--model=nvae", "--version=1", "--num_samples=3",
                      "--temperature=0.6", "--seed=77", f"--out_dir={tmp_path / 'pngs'}"])
    assert rc == 0
    assert fake_serving.requests[-1][0] == "/v1/models/nvae/versions/1:predict"
    files = sorted(os.listdir(tmp_path / "pngs"))
    assert files == ["sample_000.png", "sample_001.png", "sample_002.png"]
    for i, name in enumerate(files):
        decoded = tf.io.decode_png(tf.io.read_file(str(tmp_path / "pngs" / name))).numpy()
        np.testing.assert_array_equal(decoded, direct[i])


def test_client_reports_server_errors(fake_serving, capsys):
    client = load_client()
    # The client's own limit raised above the export's: the server's check answers (HTTP 400).
    body = client.rest_request(MAX_SAMPLES + 1, 0.7, 0, max_samples=1000)
    refused = re.escape(NUM_SAMPLES_MUST + f"[{MAX_SAMPLES + 1}]")
    with pytest.raises(client.RequestError, match=r"(?s)\(400\).*" + refused):
        client.predict_rest(fake_serving.url, "nvae", body)
    with pytest.raises(client.RequestError, match=r"\(404\)"):
        client.predict_rest(fake_serving.url, "other", client.rest_request(1, 0.7, 0))
    rc = client.main([f"--server={fake_serving.url}", "--num_samples=65", "--max_samples=100"])
    assert rc == 2
    assert NUM_SAMPLES_MUST + "[65]" in capsys.readouterr().err
    # No server at all.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(client.RequestError, match="cannot reach"):
        client.predict_rest(f"http://127.0.0.1:{port}", "nvae", client.rest_request(1, 0.7, 0), timeout=10)


# ========================================================================================= CLI errors
@pytest.fixture(scope="module")
def cli_runs(pipeline):
    if not pipeline.cli.__dict__.get("procs"):
        pytest.fail("the CLI runs were not started (the digits export failed)", pytrace=False)
    return pipeline.cli


def test_export_cli_without_a_checkpoint_exits_2_naming_the_run(cli_runs):
    p = cli_runs.procs["no_checkpoint"]
    assert p.rc == 2, p.describe()
    assert "error:" in p.stderr and cli_runs.empty_dir in p.stderr and "checkpoint" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not os.path.exists(os.path.join(cli_runs.base, "never"))


def test_export_cli_refuses_an_existing_version_without_overwrite(cli_runs):
    p = cli_runs.procs["existing"]
    assert p.rc == 2, p.describe()
    assert os.path.join(cli_runs.existing, "1") in p.stderr and "--overwrite" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(os.listdir(cli_runs.existing)) == ["1"]  # nothing written beside it
    assert tree_digest(cli_runs.existing) == cli_runs.before  # the version is left as it was


def test_export_cli_version_auto_increments(cli_runs):
    p = cli_runs.procs["second"]
    assert p.rc == 0, p.describe()
    assert "SavedModel: " + os.path.join(cli_runs.second, "2") in p.stdout
    assert sorted(os.listdir(cli_runs.second)) == ["1", "2", "config.json", "manifest.json"]  # --notflite
    assert os.path.isfile(os.path.join(cli_runs.second, "2", "saved_model.pb"))
    with open(os.path.join(cli_runs.second, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["version"] == 2 and manifest["tflite"] is None
    with open(os.path.join(cli_runs.second, "2", "assets.extra", "manifest.json")) as f:
        assert json.load(f) == manifest
    assert tree_digest(os.path.join(cli_runs.second, "1")) == cli_runs.first_digest


def test_saved_model_stores_each_variable_once(exports):
    """The SavedModel's checkpoint holds every model variable exactly once (Keras's ExportArchive would store
    each weight twice, doubling the file and the server's memory)."""
    import tensorflow as tf

    from nvae_tf.model import NVAE
    ns = get_export(exports, "digits")
    model = NVAE(flagfile_config("digits"))
    model.build()
    expected = sum(int(np.prod(v.shape)) for v in model.variables)
    reader = tf.train.load_checkpoint(os.path.join(ns.export_dir, "1", "variables", "variables"))
    shapes = {k: s for k, s in reader.get_variable_to_shape_map().items() if k != "_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert sum(int(np.prod(s)) for s in shapes.values()) == expected
    assert len(shapes) == len(model.variables)
