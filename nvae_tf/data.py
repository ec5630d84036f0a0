"""tf.data input pipelines: every dataset of the paper, a folder of the user's own images, built-in digits.

    source = open_source(config, data_dir)              # checks the data at once; split sizes in source.sizes
    ds = source.dataset("train", batch_size=16, training=True, input_context=ctx)

Every pipeline yields uint8 images `[batch, H, W, C]`; the model reduces them to `num_x_bits` itself, so
training and evaluation see identical data. Per dataset (spec section 7):

| dataset | source | preprocessing | splits |
|---|---|---|---|
| mnist | TFDS `mnist` | pad to 32x32, binarised anew at every read | train; validation = test = TFDS test |
| digits | scikit-learn's digits (inside the package) | 8x8 -> 16x16, binarised anew at every read | seeded 1497 / 300 |
| digits_grey | the same, in grey levels | 8x8 -> 16x16 | seeded 1497 / 300 |
| cifar10 | TFDS `cifar10` | flips (training) | train; validation = test = TFDS test |
| celeba64 | TFDS `celeb_a` | crop box (15, 40, 163, 188), resize to 64, flips | train, validation, test |
| imagenet32 | TFDS `imagenet_resized/32x32` | flips | train, validation |
| celebahq | GLOW TFRecords (`train/`, `validation/`) or TFDS `celeb_a_hq/256` | flips | 27,000 / 3,000 |
| ffhq | folder of PNGs | resize to 256, flips | seeded, saved 63,000 / 7,000 |
| folder | folder of PNG / JPEG / WebP | centre crop, resize, flips | `train/` + `validation/`, else seeded 90 % / 10 % |

Unreadable images in a folder are found once (a parallel decode of every file), skipped, counted and logged
by name, and remembered in a manifest beside the data; with `strict=True` they are an error. Dangling symbolic
links and link loops are unreadable images too; linked folders are followed, each folder listed once. The
manifest keeps a fingerprint of every image's bytes: a file that differs when read (changed in place,
truncated, deleted) is decoded in Python instead and, if it fails, skipped and logged by name once (with
`strict=True`, the pipeline stops with an error naming it). A GLOW TFRecord file damaged or removed after it
was counted is read up to the damage and named the same way.
"""

import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import re
import threading

import numpy as np
import tensorflow as tf
from absl import logging

from nvae_tf import options, runs
from nvae_tf.errors import RunError

AUTOTUNE = tf.data.AUTOTUNE
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CACHE_LIMIT_BYTES = 2 << 30  # decoded images up to this size are cached in memory
SHUFFLE_LIMIT_BYTES = 1 << 30  # largest shuffle buffer
UNCACHED_SHUFFLE_IMAGES = 1000  # buffer after a file-level shuffle
MANIFEST = ".nvae_tf_manifest.json"
CELEBA_CROP = (15, 40, 163, 188)  # (left, upper, right, lower) of the 178x218 aligned CelebA images
GLOW_FEATURES = {"shape": tf.io.FixedLenFeature([3], tf.int64), "data": tf.io.FixedLenFeature([], tf.string)}
CELEBAHQ_TFDS_ARCHIVE = "data256x256.tar"


class DataError(RunError):
    """The data cannot be read as configured; the message names the path and what is expected there."""


# ------------------------------------------------------------------------------------------- preprocessing
def pad_to(image, size):
    """Pad `[h, w, c]` with zeros, centred, to `[size, size, c]`."""
    h, w = image.shape[0], image.shape[1]
    top, left = (size - h) // 2, (size - w) // 2
    return tf.pad(image, [[top, size - h - top], [left, size - w - left], [0, 0]])


def resize(image, size):
    """Bilinear (antialiased) resize of uint8 `[h, w, c]` to `[size, size, c]`, rounded back to uint8."""
    out = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def center_crop_resize(image, size):
    """Largest centred square, resized to `size`."""
    shape = tf.shape(image)
    side = tf.minimum(shape[0], shape[1])
    top, left = (shape[0] - side) // 2, (shape[1] - side) // 2
    return resize(image[top:top + side, left:left + side], size)


def celeba64_crop(image):
    """NVAE's CelebA 64 preprocessing: the crop box (15, 40, 163, 188) -> 148x148, then resize to 64."""
    left, upper, right, lower = CELEBA_CROP
    return resize(image[upper:lower, left:right], 64)


def binarize(image, seed):
    """Draw binary pixels {0, 255} with P(255) = intensity / 255 (dynamic binarisation)."""
    p = tf.cast(image, tf.float32) / 255.0
    u = tf.random.stateless_uniform(tf.shape(image), seed=seed)
    return tf.cast(u < p, tf.uint8) * 255


# ----------------------------------------------------------------------------------------------- sources
@dataclasses.dataclass
class Source:
    """A dataset's splits: `read(split, shard, shuffle_files, seed)` yields decoded, deterministically
    preprocessed uint8 images, in a shuffled file order if asked."""
    name: str
    image_shape: tuple
    sizes: dict
    read: callable
    flips: bool = True
    binarize: bool = False
    location: str = ""
    # {relative path: reason} of the skipped files: found at open, and (folders) added as they fail while read
    unreadable: dict = dataclasses.field(default_factory=dict)

    def dataset(self, split, batch_size, training, input_context=None, deterministic=False, seed=1,
                shuffle=None, cache=None):
        """The `tf.data.Dataset` of uint8 batches `[batch_size, H, W, C]` of `split`.

        Args:
          batch_size: images per replica (per batch of this pipeline).
          training: shuffle, augment (flips) and drop the last partial batch.
          input_context: a `tf.distribute.InputContext`; the data is sharded over its input pipelines.
          deterministic: reproducible order and augmentation under `seed`.
          shuffle: override whether to shuffle (default: `training`).
          cache: override whether to cache decoded images in memory (default: when they fit in 2 GiB).
        """
        if split not in self.sizes:
            raise DataError(f"dataset {self.name!r} has no split {split!r}; it has {', '.join(self.sizes)}")
        shard = None
        if input_context is not None and input_context.num_input_pipelines > 1:
            shard = (input_context.num_input_pipelines, input_context.input_pipeline_id)
        size = self.sizes[split] // (shard[0] if shard else 1)
        if training and size < batch_size:
            replicas = input_context.num_replicas_in_sync if input_context else 1
            raise DataError(f"the {split} split of {self.name!r} ({self.location}) has {self.sizes[split]} images, "
                            f"fewer than one global batch ({batch_size} per replica x {replicas} replicas)")
        image_bytes = int(np.prod(self.image_shape))
        cached = cache if cache is not None else size * image_bytes <= CACHE_LIMIT_BYTES
        shuffle = training if shuffle is None else shuffle
        shuffle_seed = seed if deterministic else None
        # Uncached data is shuffled at the file level before decoding (cheap and complete) and then only
        # lightly; cached data is shuffled in memory after the cache.
        ds = self.read(split, shard, shuffle and not cached, shuffle_seed)
        if cached:
            ds = ds.cache()
        if shuffle:
            limit = SHUFFLE_LIMIT_BYTES if cached else UNCACHED_SHUFFLE_IMAGES * image_bytes
            buffer = int(max(1, min(size, limit // image_bytes)))
            ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
        flips = training and self.flips
        if flips or self.binarize:
            randoms = tf.data.Dataset.random(seed=seed if deterministic else None, rerandomize_each_iteration=True)
            ds = tf.data.Dataset.zip(ds, randoms).map(
                lambda image, r: self._augment(image, r, flips), num_parallel_calls=AUTOTUNE)
        ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
        options = tf.data.Options()
        options.deterministic = bool(deterministic or not training)  # evaluation order is always stable
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        # A pipeline is made for every epoch and every validation, and freeing an iterator waits for tf.data's
        # autotuning thread: 2 to 8 s at every epoch's end on 2 cores. Without it, parallel maps use every core
        # and prefetch buffers still grow as needed.
        options.autotune.enabled = False
        return ds.with_options(options).prefetch(AUTOTUNE)

    def _augment(self, image, r, flips):
        if flips:
            image = tf.image.stateless_random_flip_left_right(image, seed=tf.stack([r, 0]))
        if self.binarize:
            image = binarize(image, seed=tf.stack([r, 1]))
        return image


def open_source(config, data_dir="", strict=False, download=True):
    """The data of `config.dataset`, checked at once: a missing or empty `data_dir` raises `DataError`."""
    data_dir = os.path.expanduser(data_dir or "")
    name = config.dataset
    if name in ("digits", "digits_grey"):
        return _digits_source(config)
    if name in ("mnist", "cifar10", "celeba64", "imagenet32"):
        return _tfds_source(config, data_dir, download)
    if name == "celebahq":
        if data_dir and _glow_files(data_dir, "train"):
            return _glow_source(config, data_dir, strict)
        return _tfds_source(config, data_dir, download)
    if name in ("ffhq", "folder"):
        return _folder_source(config, data_dir, strict)
    raise DataError(f"no data source for dataset {name!r}")


# TFDS ---------------------------------------------------------------------------------------------------
TFDS = {
    # dataset: (TFDS name, {split: TFDS split}); NVAE validates MNIST and CIFAR-10 on their test sets.
    "mnist": ("mnist", {"train": "train", "validation": "test", "test": "test"}),
    "cifar10": ("cifar10", {"train": "train", "validation": "test", "test": "test"}),
    "celeba64": ("celeb_a", {"train": "train", "validation": "validation", "test": "test"}),
    "imagenet32": ("imagenet_resized/32x32", {"train": "train", "validation": "validation"}),
    "celebahq": ("celeb_a_hq/256", {"train": "train[:90%]", "validation": "train[90%:]"}),
}


# Where TFDS downloads each dataset from: one connection is tried before a download starts, so that a machine
# without network access hears so in seconds instead of after minutes of retries.
DOWNLOAD_HOSTS = {"mnist": "storage.googleapis.com", "cifar10": "www.cs.toronto.edu", "celeb_a": "drive.google.com",
                  "imagenet_resized/32x32": "www.image-net.org"}
PROBE_SECONDS = 10


def _reachable(host, timeout=PROBE_SECONDS):
    """None if a TCP connection to `host`:443 opens within `timeout` seconds, else the reason it did not."""
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def _tfds_source(config, data_dir, download):
    import tensorflow_datasets as tfds
    tfds_name, splits = TFDS[config.dataset]
    where = _tfds_folder(data_dir)
    if config.dataset == "mnist":
        prep = lambda x: pad_to(x, 32)  # noqa: E731
    elif config.dataset == "celeba64":
        prep = celeba64_crop
    else:
        prep = lambda x: x  # noqa: E731
    shape = config.image_shape

    def load(split, shard=None, shuffle_files=False, seed=None, download=False):
        tfds_split = splits[split]
        if shard:
            tfds_split = tfds.even_splits(tfds_split, shard[0])[shard[1]]
        try:
            ds = tfds.load(tfds_name, split=tfds_split, shuffle_files=shuffle_files, data_dir=data_dir or None,
                           download=download, read_config=tfds.ReadConfig(shuffle_seed=seed))
        except (AssertionError, tfds.core.registered.DatasetNotFoundError, OSError) as e:
            raise DataError(_tfds_missing_message(config.dataset, tfds_name, data_dir, e, download)) from e
        return ds.map(lambda ex: tf.ensure_shape(prep(ex["image"]), shape), num_parallel_calls=AUTOTUNE)

    first = next(iter(splits))
    try:
        load(first)
    except DataError:
        if not download:
            raise
        # Not prepared yet: one connection to the download host first, then one download.
        host = DOWNLOAD_HOSTS.get(tfds_name)
        unreachable = host and _reachable(host)
        if unreachable:
            raise DataError(f"{config.dataset}: TFDS dataset {tfds_name} is not prepared in {where}, and it cannot "
                            f"be downloaded: {host} is unreachable ({unreachable}). Run once on a machine with "
                            f"network access (TFDS downloads and prepares it in {where}), or copy a TFDS data "
                            f"directory that has it and give it as --data_dir. With --nodownload a run stops at "
                            f"once when the data is missing.") from None
        logging.info("%s: downloading and preparing TFDS %s in %s (once)", config.dataset, tfds_name, where)
        with runs.FolderSnapshot(where):  # a failed download leaves the folder as it was
            load(first, download=True)

    sizes = {}
    for split in splits:
        n = int(load(split).cardinality())
        sizes[split] = n if n >= 0 else sum(1 for _ in load(split))
    location = f"TFDS {tfds_name} in {where}"
    return Source(config.dataset, shape, sizes, load, flips=config.dataset != "mnist",
                  binarize=config.dataset == "mnist", location=location)


def _tfds_folder(data_dir):
    return data_dir or os.path.expanduser("~/tensorflow_datasets")


def _tfds_missing_message(dataset, tfds_name, data_dir, error, download):
    where = _tfds_folder(data_dir)
    if dataset == "celebahq":
        manual = os.path.join(where, "downloads", "manual", CELEBAHQ_TFDS_ARCHIVE)
        return (f"celebahq: no data found. Give --data_dir either (a) a folder with the GLOW CelebA-HQ TFRecords "
                f"in train/*.tfrecords and validation/*.tfrecords (the celeba-tfr files that NVAE's data "
                f"preparation starts from), or (b) a TFDS data directory where the CelebA-HQ archive "
                f"{CELEBAHQ_TFDS_ARCHIVE} (made with Progressive GAN's dataset_tool) is at {manual}, so that TFDS "
                f"builds celeb_a_hq/256 from it (README, Data).")
    if not download:
        return (f"{dataset}: TFDS dataset {tfds_name} is not prepared in {where} (--nodownload). Run once without "
                f"--nodownload on a machine with network access, or give --data_dir a TFDS data directory that "
                f"has it.")
    return (f"{dataset}: TFDS dataset {tfds_name} could not be downloaded and prepared in {where}: "
            f"{str(error).splitlines()[0][:300] if str(error) else type(error).__name__}. Run again with network "
            f"access, or give --data_dir a TFDS data directory that has it.")


# GLOW TFRecords ------------------------------------------------------------------------------------------
def _glow_files(data_dir, split):
    return sorted(tf.io.gfile.glob(os.path.join(data_dir, split, "*.tfrecords")))


def parse_glow_record(record):
    """A GLOW-format example (`shape` int64[3], `data` raw uint8 bytes) -> uint8 `[h, w, c]`."""
    example = tf.io.parse_single_example(record, GLOW_FEATURES)
    return tf.reshape(tf.io.decode_raw(example["data"], tf.uint8), example["shape"])


def write_glow_records(path, images):
    """Write uint8 images `[n, h, w, c]` as GLOW-format TFRecords (the inverse of `parse_glow_record`)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for image in images:
            image = np.asarray(image, np.uint8)
            feature = {
                "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=list(image.shape))),
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
                "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
            }
            writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def _glow_source(config, data_dir, strict):
    shape = config.image_shape
    files = {}
    for split in ("train", "validation"):
        files[split] = _glow_files(data_dir, split)
        if not files[split]:
            raise DataError(f"celebahq: GLOW TFRecords found in {os.path.join(data_dir, 'train')} but none in "
                            f"{os.path.join(data_dir, split)} (expected {split}/*.tfrecords)")
        first = files[split][0]
        try:
            record = next(iter(tf.data.TFRecordDataset(first).take(1)))
            got = tuple(parse_glow_record(record).shape)
        except (StopIteration, tf.errors.OpError) as e:
            raise DataError(f"celebahq: cannot read a GLOW example from {first}: {e}") from e
        if got != tuple(shape):
            raise DataError(f"celebahq: {first} holds images of shape {got}, expected {tuple(shape)}")

    def count(path):
        """`[records, damage]`: the records of `path` before its first damaged one, and the damage ("" if none)."""
        fault = _open_fault(path)
        if fault:
            return [0, fault]
        try:
            return [int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)), ""]
        except tf.errors.OpError as e:
            return [int(tf.data.TFRecordDataset(path).ignore_errors().reduce(np.int64(0), lambda n, _: n + 1)),
                    read_error_text(e)]

    counted = {}
    for split in files:
        per_file = _cached(data_dir, f"glow_records/{split}", _signature(files[split]),
                           lambda s=split: [count(f) for f in files[s]])
        counted.update(zip(files[split], per_file))
    damaged = "; ".join(f"{f}: {damage} (after record {n})" for f, (n, damage) in sorted(counted.items()) if damage)
    if damaged and strict:
        raise DataError(f"celebahq: damaged GLOW TFRecords: {damaged}")
    if damaged:
        logging.warning("celebahq: reading only the records before the damage in: %s", damaged)
    counted_stats = {f: _stat_key(f) for f in counted}
    reported = set()

    def check(path):
        """Whether GLOW file `path` opens now, and why it will not yield the records counted at open ("" if it
        will): a file changed since it was counted is counted again. A failure is reported once per file."""
        path = path.numpy().decode()
        expected = counted[path][0]
        fault = _open_fault(path)
        if fault:
            reason = f"cannot be opened since it was counted: {fault}"
        elif _stat_key(path) == counted_stats[path]:
            return True, ""
        else:
            n, damage = count(path)
            if n >= expected:
                return True, ""
            reason = f"changed since it was counted: {n} of its {expected} records readable" + (
                f" ({damage})" if damage else "")
        if path not in reported and not strict:
            logging.warning("celebahq: skipping records of %s: %s", path, reason)
        reported.add(path)
        return fault is None, f"celebahq: {path} {reason}"

    def records(path):
        # Under ignore_errors a damaged record ends its file, but a file that fails to open is retried forever:
        # only a file that opens now is read.
        opens, message = tf.py_function(check, [path], (tf.bool, tf.string))
        if strict:
            with tf.control_dependencies([tf.debugging.Assert(tf.equal(message, ""), [message])]):
                opens = tf.identity(opens)
        names = tf.boolean_mask(tf.reshape(path, [1]), tf.reshape(opens, [1]))
        return tf.data.TFRecordDataset(names).ignore_errors()

    def read(split, shard=None, shuffle_files=False, seed=None):
        ds = tf.data.Dataset.from_tensor_slices(files[split])
        if shard:
            ds = ds.shard(*shard)
        if shuffle_files:
            ds = ds.shuffle(len(files[split]), seed=seed, reshuffle_each_iteration=True)
        ds = ds.interleave(records, cycle_length=4, num_parallel_calls=AUTOTUNE, deterministic=True)
        return ds.map(lambda r: tf.ensure_shape(parse_glow_record(r), shape), num_parallel_calls=AUTOTUNE)

    sizes = {split: sum(counted[f][0] for f in files[split]) for split in files}
    return Source("celebahq", shape, sizes, read, location=f"GLOW TFRecords in {data_dir}")


# Folders of images -----------------------------------------------------------------------------------------
def list_images(root):
    """`(files, skipped)`: the relative paths of the PNG / JPEG / WebP images below `root`, sorted, and
    `{relative path: reason}` of what the listing leaves out: image names that are dangling symbolic links,
    symbolic-link loops or not regular files, links back to an enclosing folder, further paths to a folder
    already listed, and folders that cannot be listed. Symbolic links to folders are followed; hidden names
    are ignored."""
    files, skipped = [], {}
    top = {_folder_key(os.stat(root)): "."}
    listed = dict(top)  # (device, inode) of every folder listed -> its relative path
    pending = [(root, top)]  # (folder, {key: relative path} of it and its enclosing folders)
    links = []  # linked folders, followed after the real ones so that a real folder keeps its own path

    def add(path, rel, key, enclosing):
        if key in enclosing:
            where = root if enclosing[key] == "." else enclosing[key]
            skipped[rel] = f"symlink loop: links to the enclosing folder {where}"
        elif key in listed:
            skipped[rel] = f"the same folder as {listed[key]}, listed already"
        else:
            listed[key] = rel
            pending.append((path, {**enclosing, key: rel}))

    while pending or links:
        if not pending:
            add(*links.pop(0))
            continue
        folder, enclosing = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped[os.path.relpath(folder, root)] = f"cannot list the folder: {e.strerror or e}"
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = os.path.relpath(entry.path, root)
            is_image = entry.name.lower().endswith(IMAGE_EXTENSIONS)
            try:
                if entry.is_symlink():
                    entry.stat()  # a dangling link or a loop of links fails here
                key = _folder_key(entry.stat()) if entry.is_dir() else None
            except OSError as e:
                if is_image:
                    skipped[rel] = _os_fault(entry.path, e)
                continue
            if key is None:
                if is_image and entry.is_file():
                    files.append(rel)
                elif is_image:
                    skipped[rel] = "not a regular file"
            elif entry.is_symlink():
                links.append((entry.path, rel, key, enclosing))
            else:
                add(entry.path, rel, key, enclosing)
    return sorted(files), skipped


def _folder_key(st):
    return st.st_dev, st.st_ino


def _os_fault(path, error):
    """The reason an `OSError` on `path` gives, naming dangling symbolic links and loops of links."""
    if error.errno == errno.ELOOP:
        return "symlink loop"
    if error.errno == errno.ENOENT and os.path.islink(path):
        try:
            return f"dangling symlink to {os.readlink(path)}"
        except OSError:
            return "dangling symlink"
    return error.strerror or str(error)


def _stat_key(path):
    """`(size, whole-second mtime)` of `path`, as the manifest's signatures see it, or None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, int(st.st_mtime)


def _open_fault(path):
    """Why `path` cannot be opened for reading (see `_os_fault`), or None if it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return _os_fault(path, e)


def read_error_text(error):
    """A TensorFlow error's message on one line: the text of a failed assertion, or the message without
    TensorFlow's function-node and op annotations."""
    text = " ".join((error.message or "").split())
    assertion = re.search(r"assertion failed: \[(.*?)\] \[\[", text)
    if assertion:
        return assertion.group(1)
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*(\[\[|\[Op:).*$", "", text)
    return text or type(error).__name__


def fingerprint(contents):
    """A 63-bit fingerprint (FarmHash) of a string tensor: what an image file held when it was checked."""
    return tf.strings.to_hash_bucket_fast(contents, np.iinfo(np.int64).max)


def check_images(root, files):
    """`{"unreadable": {relative path: reason}, "fingerprints": [...]}`: the files that do not decode as images
    (one parallel pass) and, for every file in order, the fingerprint of the bytes that decoded (0 if none)."""
    paths = [os.path.join(root, f) for f in files]

    def decodes(i):
        contents = tf.io.read_file(tf.gather(paths, i))
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        return i, fingerprint(contents), tf.shape(image)[0]

    ds = tf.data.Dataset.range(len(paths)).map(decodes, num_parallel_calls=AUTOTUNE, deterministic=False)
    logging.info("checking that the %d images in %s decode (once; the result is kept in %s)", len(paths), root,
                 _manifest_path(root))
    fingerprints = [0] * len(paths)
    checked = 0
    for i, value, _ in ds.ignore_errors().as_numpy_iterator():
        fingerprints[i] = int(value)
        checked += 1
        if checked % 5000 == 0:
            logging.info("checked %d of %d images", checked, len(paths))
    bad = {}
    for i in (i for i, value in enumerate(fingerprints) if not value):
        try:
            os.stat(paths[i])
            tf.io.decode_image(tf.io.read_file(paths[i]), channels=3, expand_animations=False)
            bad[files[i]] = "unreadable"
        except OSError as e:
            bad[files[i]] = _os_fault(paths[i], e)
        except tf.errors.OpError as e:
            bad[files[i]] = read_error_text(e)
    return {"unreadable": bad, "fingerprints": fingerprints}


def _folder_source(config, data_dir, strict):
    name = config.dataset
    expected = ("the FFHQ PNG images (any layout below it, e.g. images1024x1024/00000/00000.png)" if name == "ffhq"
                else "PNG, JPEG or WebP images (in any sub-folders; or in train/ and validation/)")
    if not data_dir:
        raise DataError(f"{name}: --data_dir is required: a folder with {expected}")
    if not os.path.isdir(data_dir):
        raise DataError(f"{name}: data_dir {data_dir} does not exist; expected a folder with {expected}")
    files, bad = list_images(data_dir)
    if not files and not bad:
        raise DataError(f"{name}: no images in {data_dir}; expected {expected}")
    checked = _cached(data_dir, "images", _signature([os.path.join(data_dir, f) for f in files]),
                      lambda: check_images(data_dir, files))
    bad.update(checked["unreadable"])
    if bad:
        listing = "; ".join(f"{f}: {reason}" for f, reason in sorted(bad.items())[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        if strict:
            raise DataError(f"{name}: {len(bad)} unreadable image(s) in {data_dir}: {listing}{more}")
        logging.warning("%s: skipping %d unreadable image(s) in %s: %s%s", name, len(bad), data_dir, listing, more)
    fingerprints = dict(zip(files, checked["fingerprints"]))
    good = [f for f in files if f not in bad]
    if not good:
        raise DataError(f"{name}: no readable images in {data_dir}; expected {expected}")
    splits = _folder_splits(data_dir, good, config.seed, validation_fraction=0.1)
    size, channels = config.image_size, config.image_channels
    failed = {}  # path -> message of the files that failed while read; they are not tried again
    lock = threading.Lock()

    def changed(path):
        """`(image, decodes, message)` of a file whose bytes are not those checked at open (or that is gone):
        its preprocessed image, or zeros, False and a message naming it. The first failure is logged."""
        path = path.numpy().decode()
        blank = tf.zeros((size, size, channels), tf.uint8)
        if path in failed:
            return blank, False, failed[path]
        try:
            os.stat(path)
            image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
            return center_crop_resize(image, size), True, ""
        except OSError as e:
            reason = f"gone since the folder check: {_os_fault(path, e)}"
        except tf.errors.OpError as e:
            reason = f"changed since the folder check and no longer decodes: {read_error_text(e)}"
        with lock:
            first = path not in failed
            failed[path] = f"{name}: unreadable image {path}: {reason}"
            bad[os.path.relpath(path, data_dir)] = reason
        if first and not strict:
            logging.warning("%s: skipping %s: %s", name, path, reason)
        return blank, False, failed[path]

    def load(path, pattern, checked_fingerprint):
        # Bytes identical to those checked at open are decoded here; anything else (a file changed in place,
        # truncated, deleted or replaced) is decoded in Python, where a failure can be caught and the file named.
        present = tf.size(tf.io.matching_files(pattern)) > 0
        contents = tf.cond(present, lambda: tf.io.read_file(path), lambda: tf.constant(""))

        def unchanged():
            image = tf.io.decode_image(contents, channels=channels, expand_animations=False)
            return center_crop_resize(image, size), tf.constant(True)

        def other():
            image, ok, message = tf.py_function(changed, [path], (tf.uint8, tf.bool, tf.string))
            if strict:
                with tf.control_dependencies([tf.debugging.Assert(ok, [message])]):
                    ok = tf.identity(ok)
            return image, ok

        same = tf.logical_and(present, tf.equal(fingerprint(contents), checked_fingerprint))
        image, ok = tf.cond(same, unchanged, other)
        return tf.ensure_shape(image, (size, size, channels)), ok

    def read(split, shard=None, shuffle_files=False, seed=None):
        paths = [os.path.join(data_dir, f) for f in splits[split]]
        patterns = [re.sub(r"([*?\[\\])", r"\\\1", p) for p in paths]  # matched literally by matching_files
        checked_fingerprints = np.array([fingerprints[f] for f in splits[split]], np.int64)
        ds = tf.data.Dataset.from_tensor_slices((paths, patterns, checked_fingerprints))
        if shard:
            ds = ds.shard(*shard)
        if shuffle_files:
            ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(load, num_parallel_calls=AUTOTUNE).filter(lambda image, ok: ok)
        return ds.map(lambda image, ok: image)

    sizes = {split: len(names) for split, names in splits.items()}
    return Source(name, config.image_shape, sizes, read, location=data_dir, unreadable=bad)


def _folder_splits(data_dir, files, seed, validation_fraction):
    """train/ and validation/ sub-folders if present, else a seeded split saved in the manifest."""
    if any(f.startswith("train" + os.sep) for f in files) and any(f.startswith("validation" + os.sep) for f in files):
        return {split: [f for f in files if f.startswith(split + os.sep)] for split in ("train", "validation")}

    def split():
        order = np.random.default_rng(seed).permutation(len(files))
        n_val = max(1, int(round(validation_fraction * len(files))))
        validation = sorted(files[i] for i in order[:n_val])
        return {"train": sorted(set(files) - set(validation)), "validation": validation}

    return _cached(data_dir, f"split/seed{seed}", _signature(files, stat=False), split)


# Built-in digits ----------------------------------------------------------------------------------------------
DIGITS_VALIDATION = 300


def digits_images():
    """scikit-learn's 1,797 handwritten digits, `[1797, 8, 8]` float64 in 0..16, as `load_digits().images`. Read
    straight from the file scikit-learn ships (importing scikit-learn takes a second or two); through
    `load_digits` if that file is not where it is expected."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        if table.shape == (1797, 65):
            return table[:, :64].reshape(-1, 8, 8)
    from sklearn.datasets import load_digits
    return load_digits().images


def _digits_source(config):
    images = np.round(digits_images() * (255.0 / 16.0)).astype(np.uint8)[..., None]  # [1797, 8, 8, 1]
    images = resize(tf.constant(images), config.image_size).numpy()
    order = np.random.default_rng(config.seed).permutation(len(images))
    parts = {"train": images[np.sort(order[DIGITS_VALIDATION:])], "validation": images[np.sort(order[:DIGITS_VALIDATION])]}

    def read(split, shard=None, shuffle_files=False, seed=None):
        ds = tf.data.Dataset.from_tensor_slices(parts[split])
        return ds.shard(*shard) if shard else ds

    return Source(config.dataset, config.image_shape, {k: len(v) for k, v in parts.items()}, read, flips=False,
                  binarize=config.decoder == "bernoulli", location="scikit-learn digits")


# Manifest: results of slow passes over the data, remembered beside it -------------------------------------------------
def _signature(paths, stat=True):
    """A hash of `paths` and, with `stat`, of each file's size and whole-second mtime (or its stat error)."""
    h = hashlib.sha1()
    for p in paths:
        h.update(p.encode())
        if stat:
            try:
                st = os.stat(p)
                h.update(f":{st.st_size}:{int(st.st_mtime)}".encode())
            except OSError as e:  # gone since it was listed: the signature then differs from any earlier one
                h.update(f":{e.errno}".encode())
    return h.hexdigest()


def _manifest_path(data_dir):
    path = os.path.join(data_dir, MANIFEST)
    if os.access(data_dir, os.W_OK):
        return path
    key = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:16]
    return os.path.join(os.path.expanduser("~/.cache/nvae_tf"), key + ".json")


def _cached(data_dir, key, signature, compute):
    """`compute()` once per (key, signature); the JSON result is kept in the data folder's manifest."""
    path = _manifest_path(data_dir)
    manifest = {}
    if os.path.exists(path):
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = {}
    entry = manifest.get(key)
    if entry and entry.get("signature") == signature:
        return entry["value"]
    value = compute()
    manifest[key] = {"signature": signature, "value": value}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("could not save %s: %s", path, e)
    return value


# -------------------------------------------------------------------------------------------- command line
def _inspect(config, source, split, out, deterministic):
    from nvae_tf.imaging import make_grid, write_png
    print(f"dataset     {config.dataset} ({source.location})")
    print("splits      " + ", ".join(f"{k} {v:,}" for k, v in source.sizes.items()))
    batch_size = min(config.batch_size, source.sizes[split]) if split != "train" else config.batch_size
    batch = next(iter(source.dataset(split, batch_size, training=split == "train", deterministic=deterministic,
                                     seed=config.seed)))
    x = batch.numpy()
    print(f"batch       shape {list(x.shape)}, dtype {x.dtype}, values {x.min()}..{x.max()}, "
          f"{len(np.unique(x))} distinct")
    if config.decoder == "bernoulli":
        print("model sees  binary pixels (Bernoulli likelihood)")
    else:
        bits = config.num_x_bits
        print(f"model sees  {bits}-bit values ({2 ** bits} levels) after its num_x_bits reduction")
    if out:
        write_png(out, make_grid(x))
        print(f"wrote       {out}")


def run_from_flags(fv):
    from nvae_tf import config as config_lib
    config = config_lib.from_flags(fv)
    opts = options.from_flags(options.InspectOptions, fv)
    source = open_source(config, opts.data_dir, strict=opts.strict_data, download=opts.download)
    try:
        if not opts.inspect:
            print("splits: " + ", ".join(f"{k} {v:,}" for k, v in source.sizes.items()) + " (add --inspect)")
            return 0
        _inspect(config, source, opts.split, opts.out, opts.deterministic)
    except tf.errors.OpError as e:  # a file that failed while read, e.g. under --strict_data
        raise DataError(read_error_text(e)) from None
    return 0


def main():
    from nvae_tf import cli
    from nvae_tf import config as config_lib
    cli.main("nvae_tf.data", __doc__, [config_lib.NVAEConfig, options.InspectOptions], run_from_flags,
             usage="--flagfile=configs/X.flags [--inspect --out=batch.png]")


if __name__ == "__main__":
    main()
