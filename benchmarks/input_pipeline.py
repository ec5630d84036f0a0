"""Input-pipeline throughput of nvae_tf.data against the training step it has to feed, on this machine.

    python benchmarks/input_pipeline.py                   # every pipeline that runs here, a few minutes on 2 cores
    python benchmarks/input_pipeline.py --quick           # smoke run: less data, fewer batches, one train step
    python benchmarks/input_pipeline.py --only=digits,folder

Every pipeline reads local data that this script makes in a temporary directory (removed at the end):

  digits       scikit-learn's digits, built into nvae_tf (real data)
  tiny         the image folder below at 16x16 (configs/tiny.flags), paired with the tiny model's step
  folder       a folder of PNG and JPEG images of mixed sizes, at 64x64 (configs/folder64.flags)
  ffhq         a folder of 1024x1024 PNGs (the size of FFHQ's images1024x1024), resized to 256
  celebahq     GLOW-format TFRecords of 256x256 images, over 4 train files
  mnist, cifar10, celeba64, imagenet32
               TFDS through tfds.testing.mock_data: random examples made in Python by the mock, so these
               measure nvae_tf's preprocessing (crop, resize, pad, cache, shuffle, flips, binarisation), not
               reading TFDS files from disk

Each pipeline is the training one (`training=True`: shuffle, flips or binarisation, full batches) at the
batch size of its config file. The first epoch is timed from the creation of its iterator (it fills the
in-memory cache and the shuffle buffer); the steady rate over whole further epochs for a few seconds. ffhq
and celebahq run with `cache=False`: at their full size (63,000 and 27,000 images of 256x256x3) the decoded
images exceed data.CACHE_LIMIT_BYTES, so every epoch decodes from disk again. The mocked TFDS datasets use
the default cache decision (the small mocks are cached).

The training step is a `tf.function` that computes the negative ELBO of `model(images, training=True)` and
applies its gradients with keras.optimizers.Adamax, timed after its trace on one fixed batch. Pipelines are
timed alone, each with both cores; in training the pipeline and the step share them.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402


def _import_tensorflow_quietly():
    """TF 2.21 writes oneDNN INFO lines to stderr at import whatever TF_CPP_MIN_LOG_LEVEL says (they come
    before absl::InitializeLog); hide stderr for the import only. Python errors still show."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tensorflow


tf = _import_tensorflow_quietly()
from absl import logging as absl_logging  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nvae_tf import config as config_lib  # noqa: E402
from nvae_tf import data  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs")
THRESHOLD = 3.0  # the pipeline should deliver at least this many times the images a training step consumes
TFDS_DATASETS = ("mnist", "cifar10", "celeba64", "imagenet32")
ALL = ("digits", "tiny", "folder", "ffhq", "celebahq") + TFDS_DATASETS
STEPS = {"digits": ("digits", None), "tiny": ("tiny", None), "folder": ("folder64", 4)}  # row: (config, batch)


def silence():
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    tf.get_logger().setLevel("ERROR")
    tf.autograph.set_verbosity(0)
    warnings.filterwarnings("ignore")


def load_flagfile(name, **overrides):
    """An NVAEConfig from configs/<name>.flags with field overrides."""
    return config_lib.from_flagfile(os.path.join(CONFIGS, name + ".flags"), **overrides)


# ------------------------------------------------------------------------------------------ local data
def synthetic_image(rng, height, width, channels):
    """A smooth random field plus pixel noise: compresses like a photo, unlike uniform noise."""
    coarse = rng.uniform(0, 255, (max(2, height // 32), max(2, width // 32), channels)).astype(np.float32)
    image = tf.image.resize(coarse[None], (height, width), method="bicubic")[0].numpy()
    image += rng.normal(0.0, 3.0, image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def write_images(root, specs, workers=2):
    """specs: [(relative path, height, width, channels, 'png' | 'jpeg', seed)]; returns the bytes written."""
    def write(spec):
        path, h, w, c, fmt, seed = spec
        image = synthetic_image(np.random.default_rng(seed), h, w, c)
        encoded = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=90)
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        tf.io.write_file(full, encoded)
        return os.path.getsize(full)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(write, specs))


def make_folder(root, n, seed=0):
    """n images of 100..300 px a side: alternately PNG and JPEG, every tenth PNG grayscale, some nested."""
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(100, 301, 2))
        fmt = "png" if i % 2 == 0 else "jpeg"
        channels = 1 if i % 10 == 0 else 3
        sub = ("", "people", "places/outdoor")[i % 3]
        specs.append((os.path.join(sub, f"{i:04d}.{'png' if fmt == 'png' else 'jpg'}"), h, w, channels, fmt, i))
    nbytes = write_images(root, specs)
    return f"{n} PNG+JPEG 100-300px", nbytes


def make_ffhq(root, n, side):
    specs = [(os.path.join(f"images{side}x{side}", "00000", f"{i:05d}.png"), side, side, 3, "png", 1000 + i)
             for i in range(n)]
    nbytes = write_images(root, specs)
    return f"{n} PNG {side}x{side}", nbytes


def make_glow(root, n_train, n_files, n_validation=32):
    rng = np.random.default_rng(3)
    per_file = n_train // n_files
    for f in range(n_files):
        images = rng.integers(0, 256, (per_file, 256, 256, 3), dtype=np.uint8)
        data.write_glow_records(os.path.join(root, "train", f"train-r08-s-{f:04d}-of-{n_files:04d}.tfrecords"), images)
    images = rng.integers(0, 256, (n_validation, 256, 256, 3), dtype=np.uint8)
    data.write_glow_records(os.path.join(root, "validation", "validation-r08-s-0000-of-0001.tfrecords"), images)
    nbytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    return f"GLOW TFRecords, {per_file * n_files} in {n_files} files", nbytes


# ------------------------------------------------------------------------------------------- timing
class OtherLoad:
    """The share of the machine's CPU that other processes used since creation (from /proc/stat)."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        import resource
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
        own = sum(getattr(resource.getrusage(who), k) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for k in ("ru_utime", "ru_stime"))
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own

    def fraction(self):
        end = self._snapshot()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return float("nan")
        wall, busy, own = (e - s for e, s in zip(end, self.start))
        return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


@dataclasses.dataclass
class Row:
    name: str
    source: str
    shape: tuple = ()
    batch: int = 0
    train_images: int = 0
    open_seconds: float = float("nan")
    first: float = float("nan")  # images/s of the first epoch
    steady: float = float("nan")  # images/s over later epochs
    cached: bool = True
    step: float = float("nan")  # images/s of a training step
    step_config: str = ""
    step_batch: int = 0
    step_trace_seconds: float = float("nan")
    others: float = float("nan")  # share of the CPU that other processes used meanwhile
    error: str = ""


def time_pipeline(row, source, batch_size, min_seconds, cache=None):
    """First-epoch and steady images/s of the training pipeline of `source`'s train split."""
    row.shape, row.batch, row.train_images = tuple(source.image_shape), batch_size, source.sizes["train"]
    image_bytes = int(np.prod(source.image_shape))
    row.cached = cache if cache is not None else source.sizes["train"] * image_bytes <= data.CACHE_LIMIT_BYTES
    ds = source.dataset("train", batch_size, training=True, cache=cache)

    def epoch():
        n = 0
        for batch in ds:  # a new iterator per epoch, as a training loop over epochs has
            n += int(batch.shape[0])
        return n

    start = time.perf_counter()
    n = epoch()
    row.first = n / (time.perf_counter() - start)
    # Whole epochs only: an in-memory cache is kept only when an epoch is read to its end.
    n, start = 0, time.perf_counter()
    while True:
        n += epoch()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            break
    row.steady = n / elapsed


def time_train_step(row, config_name, batch_size, min_seconds, min_steps):
    """Images/s of one Adamax step on the negative ELBO, after the trace, on one fixed batch."""
    import keras

    from nvae_tf.model import NVAE
    overrides = {"batch_size": batch_size} if batch_size else {}
    config = load_flagfile(config_name, **overrides)
    keras.utils.set_random_seed(1)
    model = NVAE(config)
    model.build()
    optimizer = keras.optimizers.Adamax(learning_rate=1e-3)
    optimizer.build(model.trainable_variables)
    rng = np.random.default_rng(0)
    shape = (config.batch_size, *config.image_shape)
    if config.decoder == "bernoulli":
        images = (rng.integers(0, 2, shape) * 255).astype(np.uint8)
    else:
        images = synthetic_image(rng, shape[0] * shape[1], shape[2], shape[3]).reshape(shape)
    images = tf.constant(images)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(-out.recon_log_prob + tf.reduce_sum(out.kl, axis=1))
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    start = time.perf_counter()
    step(images).numpy()  # trace
    row.step_trace_seconds = time.perf_counter() - start
    step(images).numpy()  # one more warm-up run
    steps, start = 0, time.perf_counter()
    while True:
        step(images).numpy()
        steps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and steps >= min_steps:
            break
    row.step = steps * config.batch_size / elapsed
    row.step_config, row.step_batch = f"{config_name}.flags", config.batch_size


# --------------------------------------------------------------------------------------------- output
def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def fmt_rate(x):
    if x != x:  # nan
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def table(rows):
    header = ["dataset", "source", "image shape", "batch", "train imgs", "open s", "pipeline img/s",
              "", "train-step img/s", "step config", "ratio"]
    sub = ["", "", "", "", "", "", "first epoch", "steady", "", "(batch)", "steady/step"]
    lines = []
    for r in rows:
        if r.error:
            lines.append([r.name, r.source, "-", "-", "-", "-", "error", "-", "-", "-", "-"])
            continue
        ratio = f"{r.steady / r.step:,.0f}x" if r.step == r.step else "-"
        steady = fmt_rate(r.steady) + ("" if r.cached else " (uncached)")
        step_cfg = f"{r.step_config} ({r.step_batch})" if r.step_config else "-"
        lines.append([r.name, r.source, "x".join(map(str, r.shape)), str(r.batch), f"{r.train_images:,}",
                      f"{r.open_seconds:.1f}", fmt_rate(r.first), steady, fmt_rate(r.step), step_cfg, ratio])
    widths = [max(len(x[i]) for x in [header, sub] + lines) for i in range(len(header))]
    right = {3, 4, 5, 6, 7, 8, 10}

    def render(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [render(header), render(sub), "  ".join("-" * w for w in widths)]
    out += [render(x) for x in lines]
    return "\n".join(line.rstrip() for line in out)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Smoke run: less data, fewer batches, one step.")
    parser.add_argument("--only", default="", help=f"Comma-separated subset of: {','.join(ALL)}.")
    parser.add_argument("--no_steps", action="store_true", help="Time the pipelines only.")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ALL)
    unknown = sorted(set(names) - set(ALL))
    if unknown:
        parser.error(f"unknown dataset(s) {', '.join(unknown)}; choose from {','.join(ALL)}")
    names = [n for n in ALL if n in names]
    silence()

    quick = args.quick
    pipe_seconds = 0.5 if quick else 3.0
    step_seconds, step_min = (1.0, 2) if quick else (4.0, 3)
    n_folder = 96 if quick else 300
    n_ffhq, ffhq_side = (16, 1024) if quick else (64, 1024)
    n_glow, glow_files = (128, 4) if quick else (512, 4)
    mock_examples = {"mnist": 2000, "cifar10": 2000, "celeba64": 640, "imagenet32": 2000}
    if quick:
        mock_examples = {k: max(v // 5, 200) for k, v in mock_examples.items()}
    # Steps that run in --quick: only the tiny model's (its trace is the shortest).
    step_rows = {n for n in STEPS if n in names and not args.no_steps and (not quick or n == "tiny")}

    t_start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="nvae_tf_bench_")
    rows, notes = [], []
    run_others = OtherLoad()
    print(f"nvae_tf input pipelines vs training step; {os.cpu_count()} CPU cores, TensorFlow {tf.__version__}"
          f"{', --quick' if quick else ''}; local data in {tmp}", flush=True)
    try:
        folder_dir = os.path.join(tmp, "folder")
        folder_desc = None
        for name in names:
            t0 = time.perf_counter()
            print(f"  {name} ...", end="", flush=True)
            row = Row(name, "")
            others = OtherLoad()
            try:
                if name == "digits":
                    config = load_flagfile("digits")
                    row.source = "scikit-learn digits (real)"
                    t = time.perf_counter()
                    source = data.open_source(config)
                    row.open_seconds = time.perf_counter() - t
                    time_pipeline(row, source, config.batch_size, pipe_seconds)
                elif name in ("tiny", "folder"):
                    first_open = folder_desc is None
                    if first_open:
                        folder_desc, nbytes = make_folder(folder_dir, n_folder)
                        notes.append(f"folder images: {folder_desc}, {nbytes / n_folder / 1e3:.0f} kB each on "
                                     "average (every tenth grayscale), in three sub-folders")
                    config = load_flagfile("tiny" if name == "tiny" else "folder64")
                    row.source = folder_desc
                    t = time.perf_counter()
                    source = data.open_source(config, folder_dir)
                    row.open_seconds = time.perf_counter() - t
                    if first_open:
                        notes.append(f"folder open ({name} row): {row.open_seconds:.1f} s for {n_folder} images, "
                                     "with check_images's one decode of every image (its result is kept in the "
                                     "manifest, so the next open of the same folder skips it)")
                    time_pipeline(row, source, config.batch_size, pipe_seconds)
                elif name == "ffhq":
                    root = os.path.join(tmp, "ffhq")
                    row.source, nbytes = make_ffhq(root, n_ffhq, ffhq_side)
                    notes.append(f"ffhq: {n_ffhq} PNGs of {ffhq_side}x{ffhq_side} (the size of FFHQ's "
                                 f"images1024x1024), {nbytes / n_ffhq / 1e6:.2f} MB each (real FFHQ: ~1.3 MB)")
                    config = load_flagfile("ffhq")
                    t = time.perf_counter()
                    source = data.open_source(config, root)
                    row.open_seconds = time.perf_counter() - t
                    rate = n_ffhq / row.open_seconds
                    notes.append(f"ffhq open: check_images decoded {n_ffhq} PNGs in {row.open_seconds:.1f} s "
                                 f"({rate:.1f}/s): the first open of the 70,000 FFHQ PNGs would take "
                                 f"~{duration(70000 / rate)}")
                    time_pipeline(row, source, config.batch_size, pipe_seconds, cache=False)
                elif name == "celebahq":
                    root = os.path.join(tmp, "celebahq")
                    row.source, _ = make_glow(root, n_glow, glow_files)
                    config = load_flagfile("celebahq")
                    t = time.perf_counter()
                    source = data.open_source(config, root)
                    row.open_seconds = time.perf_counter() - t
                    time_pipeline(row, source, config.batch_size, pipe_seconds, cache=False)
                else:
                    import tensorflow_datasets as tfds
                    tfds.disable_progress_bar()
                    config = load_flagfile(name)
                    n = mock_examples[name]
                    row.source = f"TFDS mock, {n:,} examples"
                    with tfds.testing.mock_data(num_examples=n):
                        t = time.perf_counter()
                        source = data.open_source(config, os.path.join(tmp, "tfds"), download=False)
                        row.open_seconds = time.perf_counter() - t
                        time_pipeline(row, source, config.batch_size, pipe_seconds)
                if name in ("ffhq", "celebahq"):
                    buffer = data.UNCACHED_SHUFFLE_IMAGES
                    full = {"ffhq": 63000, "celebahq": 27000}[name]
                    notes.append(f"{name} at full size ({full:,} train images, not cached, shuffled by file): each "
                                 f"epoch starts by filling a {buffer:,}-image shuffle buffer, "
                                 f"~{buffer / row.steady:.0f} s at the "
                                 f"steady rate here before the first batch; an epoch takes "
                                 f"~{duration(full / row.steady)} of pipeline time")
                if name in step_rows:
                    config_name, batch = STEPS[name]
                    print(" step ...", end="", flush=True)
                    time_train_step(row, config_name, batch, step_seconds, step_min)
                    notes.append(f"{config_name} step: trace {row.step_trace_seconds:.0f} s, then "
                                 f"{row.step_batch / row.step * 1e3:,.0f} ms per step of {row.step_batch} images")
            except Exception as e:  # noqa: BLE001 - report and go on with the other datasets
                row.error = f"{type(e).__name__}: {e}"
                notes.append(f"{name}: failed: {row.error[:500]}")
            row.others = others.fraction()
            rows.append(row)
            print(f" {time.perf_counter() - t0:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(table(rows))
    print()
    print("Verdicts (steady pipeline rate alone on both cores vs one training step; the step itself needs "
          "the same cores):")
    pairs = [r for r in rows if r.step == r.step and not r.error]
    for r in pairs:
        ratio = r.steady / r.step
        ok = ratio >= THRESHOLD
        first = "" if r.first / r.step >= THRESHOLD else (
            f"; its first epoch ({fmt_rate(r.first)} img/s) is only {r.first / r.step:.1f}x")
        print(f"  {r.name}: pipeline {fmt_rate(r.steady)} img/s vs {r.step_config} step {fmt_rate(r.step)} img/s "
              f"= {ratio:,.0f}x: {'OK, at least' if ok else 'NOT'} {THRESHOLD:.0f}x faster than the step{first}")
    if not pairs:
        print("  (no training step measured)")
    print()
    print("Notes:")
    mocked = [n for n in names if n in TFDS_DATASETS]
    if mocked:
        print(f"  {', '.join(mocked)} read tfds.testing.mock_data examples (random, made in Python by the mock): "
              "their rates measure nvae_tf's preprocessing, cache, shuffle and augmentation on mocked examples, "
              "not reads of TFDS files from disk; their first epoch is mostly the mock's Python generator.")
    if "imagenet32" in names:
        print("  imagenet32 at full size (1.28 M images, 3.9 GB decoded) exceeds CACHE_LIMIT_BYTES and would not "
              "be cached; its mock is.")
    if any(not r.cached for r in rows if not r.error):
        print("  (uncached) rows decode from disk every epoch, as at full size; the files were just written, so "
              "they come from the OS page cache, not the disk.")
    for note in notes:
        print(f"  {note}")
    share = run_others.fraction()
    if share == share:
        busy = [f"{r.name} {r.others:.0%}" for r in rows if r.others == r.others and r.others >= 0.1]
        print(f"  other processes used {share:.0%} of the CPU during the run"
              + (f"; 10% or more while timing {', '.join(busy)}: those rates are lower and noisier than on an "
                 "idle machine" if busy else ""))
    print(f"  total time {time.perf_counter() - t_start:.0f} s")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
