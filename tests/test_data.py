"""Input pipelines: TFDS datasets through tfds.testing.mock_data, GLOW TFRecords, image folders, digits."""

import logging
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import load_flagfile
from nvae_tf import data, runs
from nvae_tf.config import NVAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(dataset, **overrides):
    values = dict(dataset=dataset, batch_size=4)
    values.update(overrides)
    return NVAEConfig(**values)


def images_of(ds):
    return np.concatenate([b.numpy() for b in ds], axis=0)


def finishes(fn, seconds=120):
    """`fn()`, failing the test if it has not returned within `seconds` (a loop that never ends)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"did not finish within {seconds} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def warnings_naming(caplog, path):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and path in r.getMessage()]


def write_image(path, array, fmt="png"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "png":
        tf.io.write_file(path, tf.io.encode_png(array))
    elif fmt == "jpeg":
        tf.io.write_file(path, tf.io.encode_jpeg(array, quality=95))
    else:
        from PIL import Image
        Image.fromarray(array.squeeze() if array.shape[-1] == 1 else array).save(path, format=fmt.upper(),
                                                                                  lossless=True)


# ----------------------------------------------------------------------------------------------- TFDS
@pytest.mark.parametrize("dataset, shape", [
    ("mnist", (32, 32, 1)), ("cifar10", (32, 32, 3)), ("celeba64", (64, 64, 3)),
    ("imagenet32", (32, 32, 3)), ("celebahq", (256, 256, 3)),
])
def test_tfds_datasets_yield_uint8_batches_of_the_model_shape(dataset, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        source = data.open_source(config_for(dataset), str(tmp_path), download=False)
        batch = next(iter(source.dataset("train", 4, training=True))).numpy()
        assert set(source.sizes) >= {"train", "validation"}
        assert all(n == 8 for n in source.sizes.values())
    assert batch.shape == (4, *shape) and batch.dtype == np.uint8
    if dataset == "mnist":
        assert set(np.unique(batch)) <= {0, 255}  # binary
        assert batch[:, :2].max() == 0 and batch[:, :, -2:].max() == 0  # the 2-pixel padding stays 0
    else:
        assert len(np.unique(batch)) > 64  # full 8-bit data: neither binarised nor reduced to num_x_bits here


def test_the_model_reduces_celebahq_data_to_five_bits():
    from nvae_tf.model import NVAE
    config = load_flagfile("celebahq")
    x = NVAE(config).preprocess_images(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)).numpy()
    assert config.num_x_bits == 5 and len(np.unique(x)) == 32


@pytest.mark.parametrize("dataset", ["cifar10", "celeba64", "imagenet32"])
def test_flips_happen_in_training_only(dataset, tmp_path):
    with tfds.testing.mock_data(num_examples=24):
        source = data.open_source(config_for(dataset), str(tmp_path), download=False)
        plain = images_of(source.dataset("train", 4, training=False))
        again = images_of(source.dataset("train", 4, training=False))
        train = images_of(source.dataset("train", 4, training=True, shuffle=False, deterministic=True, seed=3))
        validation = images_of(source.dataset("validation", 4, training=False))
        validation_again = images_of(source.dataset("validation", 4, training=False))
    np.testing.assert_array_equal(plain, again)
    np.testing.assert_array_equal(validation, validation_again)
    flipped = [np.array_equal(t, p[:, ::-1]) for t, p in zip(train, plain)]
    same = [np.array_equal(t, p) for t, p in zip(train, plain)]
    assert all(f or s for f, s in zip(flipped, same))
    assert 0 < sum(flipped) < len(train)


def test_mnist_binarisation_is_drawn_anew_at_every_read_with_the_right_mean(tmp_path):
    with tfds.testing.mock_data(num_examples=64):
        source = data.open_source(config_for("mnist"), str(tmp_path), download=False)
        import tensorflow_datasets as t
        raw = np.stack([data.pad_to(ex["image"], 32).numpy() for ex in
                        t.load("mnist", split="test", data_dir=str(tmp_path), download=False)])
        ds = source.dataset("test", 16, training=False)
        first, second = images_of(ds), images_of(ds)
    assert first.shape == raw.shape
    assert set(np.unique(first)) == {0, 255}
    assert np.mean(first != second) > 0.1  # the test set too is re-binarised at every read
    # Each pixel is 255 with probability intensity / 255: check the mean over 2 x 64 x 1024 draws.
    p = raw.astype(np.float64) / 255.0
    observed = (first.astype(np.float64) + second) / 510.0
    se = np.sqrt(np.sum(p * (1 - p))) / p.size
    assert abs(observed.mean() - p.mean()) < 5 * se / np.sqrt(2) + 1e-4
    # Pixels that are 0 or 255 stay so.
    assert np.all(first[raw == 0] == 0) and np.all(first[raw == 255] == 255)


def test_missing_tfds_celebahq_names_the_manual_archive_and_its_place(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.open_source(config_for("celebahq"), str(tmp_path), download=False)
    message = str(e.value)
    assert "data256x256.tar" in message
    assert os.path.join(str(tmp_path), "downloads", "manual", "data256x256.tar") in message
    assert "train/*.tfrecords" in message


def test_missing_tfds_dataset_names_the_directory(tmp_path):
    with pytest.raises(data.DataError, match=str(tmp_path)):
        data.open_source(config_for("cifar10"), str(tmp_path), download=False)


def test_missing_tfds_dataset_with_nodownload_says_so(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.open_source(config_for("mnist"), str(tmp_path), download=False)
    assert "mnist" in str(e.value) and "--nodownload" in str(e.value) and "--data_dir" in str(e.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("existed", [True, False])
def test_a_download_host_out_of_reach_stops_at_once_and_writes_nothing(tmp_path, monkeypatch, existed):
    """Without network access: one connection attempt to the dataset's download host, then one message naming
    the dataset, the host and what to do; nothing written into the data folder (nor the folder created)."""
    import time
    monkeypatch.setitem(data.DOWNLOAD_HOSTS, "cifar10", "nvae-tf-offline-test.invalid")  # never resolves
    calls = []
    real = data._reachable
    monkeypatch.setattr(data, "_reachable", lambda host: calls.append(host) or real(host, timeout=5))
    folder = tmp_path / "tfds"
    if existed:
        folder.mkdir()
        (folder / "keep.txt").write_text("the user's")
    started = time.time()
    with pytest.raises(data.DataError) as e:
        data.open_source(config_for("cifar10"), str(folder), download=True)
    assert time.time() - started < 20
    message = str(e.value)
    assert calls == ["nvae-tf-offline-test.invalid"]
    for part in ("cifar10", "nvae-tf-offline-test.invalid is unreachable", str(folder), "--data_dir",
                 "--nodownload"):
        assert part in message, (part, message)
    assert sorted(os.listdir(folder)) == ["keep.txt"] if existed else not folder.exists()


def test_a_failed_download_leaves_the_data_folder_as_it_was(tmp_path):
    folder = tmp_path / "tfds"
    folder.mkdir()
    (folder / "old").mkdir()
    (folder / "old" / "data").write_text("kept")
    with pytest.raises(OSError):
        with runs.FolderSnapshot(str(folder)):
            (folder / "downloads" / "mnist").mkdir(parents=True)
            (folder / "downloads" / "mnist" / "part.tmp").write_text("partial")
            (folder / "old" / "new_inside").write_text("x")  # inside a folder that was there: not ours to judge
            (folder / "mnist.incomplete").write_text("x")
            raise OSError("connection reset")
    assert sorted(os.listdir(folder)) == ["old"]
    with runs.FolderSnapshot(str(folder)):  # success: everything stays
        (folder / "mnist").mkdir()
    assert sorted(os.listdir(folder)) == ["mnist", "old"]


# ---------------------------------------------------------------------------------------- CelebA 64 crop
def test_celeba64_crop_box_takes_rows_40_to_188_and_columns_15_to_163():
    rng = np.random.default_rng(0)
    inside = rng.integers(0, 256, (148, 148, 3), dtype=np.uint8)
    image = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    image[40:188, 15:163] = inside
    expected = data.resize(tf.constant(inside), 64).numpy()
    out = data.celeba64_crop(tf.constant(image)).numpy()
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out, expected)
    # Pixels outside the box do not matter; the box's corner pixels do.
    other = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    other[40:188, 15:163] = inside
    np.testing.assert_array_equal(data.celeba64_crop(tf.constant(other)).numpy(), expected)
    for y, x in ((40, 15), (187, 162)):
        changed = image.copy()
        changed[y, x] = 255 - changed[y, x]
        assert not np.array_equal(data.celeba64_crop(tf.constant(changed)).numpy(), expected)


def test_celeba64_pipeline_crops_a_white_box_on_black_to_white(tmp_path):
    image = np.zeros((218, 178, 3), np.uint8)
    image[40:188, 15:163] = 200
    out = data.celeba64_crop(tf.constant(image)).numpy()
    assert out.min() == 200 and out.max() == 200


# ----------------------------------------------------------------------------------------- GLOW TFRecords
def test_glow_tfrecords_are_read_back_bit_exactly(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (7, 256, 256, 3), dtype=np.uint8)
    validation = rng.integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)
    data.write_glow_records(str(tmp_path / "train" / "train-r08-s-0000-of-0002.tfrecords"), train[:4])
    data.write_glow_records(str(tmp_path / "train" / "train-r08-s-0001-of-0002.tfrecords"), train[4:])
    data.write_glow_records(str(tmp_path / "validation" / "validation-r08-s-0000-of-0001.tfrecords"), validation)
    source = data.open_source(config_for("celebahq"), str(tmp_path))
    assert source.sizes == {"train": 7, "validation": 3}
    got = images_of(source.dataset("train", 2, training=False))
    assert sorted(g.tobytes() for g in got) == sorted(t.tobytes() for t in train)
    np.testing.assert_array_equal(images_of(source.dataset("validation", 3, training=False)), validation)
    # Sharded over two input pipelines (one file each), the shards are disjoint and cover the split.
    ctx = [tf.distribute.InputContext(2, i, 2) for i in range(2)]
    shards = [images_of(source.dataset("train", 1, training=False, input_context=c)) for c in ctx]
    assert sorted(s.tobytes() for shard in shards for s in shard) == sorted(t.tobytes() for t in train)


def test_glow_tfrecords_of_the_wrong_image_size_are_refused_naming_the_file(tmp_path):
    small = np.zeros((2, 128, 128, 3), np.uint8)
    path = str(tmp_path / "train" / "train-r07.tfrecords")
    data.write_glow_records(path, small)
    data.write_glow_records(str(tmp_path / "validation" / "v.tfrecords"), small)
    with pytest.raises(data.DataError, match=r"train-r07.tfrecords holds images of shape \(128, 128, 3\)"):
        data.open_source(config_for("celebahq"), str(tmp_path))


@pytest.mark.parametrize("how", ["truncated", "deleted"])
def test_a_glow_file_damaged_after_open_is_named_once_and_the_other_records_are_read(how, tmp_path, caplog):
    rng = np.random.default_rng(6)
    train = rng.integers(0, 256, (7, 256, 256, 3), dtype=np.uint8)
    damaged = str(tmp_path / "train" / "a.tfrecords")
    data.write_glow_records(damaged, train[:4])
    data.write_glow_records(str(tmp_path / "train" / "b.tfrecords"), train[4:])
    data.write_glow_records(str(tmp_path / "validation" / "v.tfrecords"), train[:2])
    config = config_for("celebahq")
    source = data.open_source(config, str(tmp_path))
    strict = data.open_source(config, str(tmp_path), strict=True)
    if how == "truncated":  # in the middle of the third of its four records
        with open(damaged, "r+b") as f:
            f.truncate(os.path.getsize(damaged) * 5 // 8)
    else:
        os.remove(damaged)
    kept = train[:2] if how == "truncated" else train[:0]
    with caplog.at_level(logging.WARNING):
        got = finishes(lambda: images_of(source.dataset("train", 1, training=False)))
        batches = finishes(lambda: [b.shape[0] for _ in range(2)
                                    for b in source.dataset("train", 2, training=True, cache=False)])
    assert sorted(g.tobytes() for g in got) == sorted(t.tobytes() for t in [*kept, *train[4:]])
    assert set(batches) == {2} and len(batches) == 2 * (len(got) // 2)
    named = warnings_naming(caplog, damaged)
    assert len(named) == 1, named
    assert ("2 of its 4 records readable" if how == "truncated" else "No such file or directory") in named[0]
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        finishes(lambda: images_of(strict.dataset("train", 1, training=False)))
    assert data.read_error_text(e.value).startswith(f"celebahq: {damaged} ")
    if how == "truncated":  # found when the folder is opened again
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert data.open_source(config, str(tmp_path)).sizes == {"train": 5, "validation": 2}
        assert re.search(re.escape(damaged) + r": truncated record .*\(after record 2\)", caplog.text)
        with pytest.raises(data.DataError, match=re.escape(damaged)):
            data.open_source(config, str(tmp_path), strict=True)


# -------------------------------------------------------------------------------------------- folders
def make_folder(root, with_corrupt=True):
    rng = np.random.default_rng(2)
    made = {}
    made["a.png"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    made["b.jpg"] = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    made["nested/deeper/c.png"] = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
    made["nested/gray.png"] = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    made["d.webp"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for i in range(5):
        made[f"more/{i}.png"] = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for name, array in made.items():
        fmt = {"png": "png", "jpg": "jpeg", "webp": "webp"}[name.rsplit(".", 1)[1]]
        write_image(os.path.join(root, name), array, fmt)
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    if with_corrupt:
        with open(os.path.join(root, "nested", "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return made


def test_image_folder_reads_every_format_skips_and_reports_the_corrupt_file(tmp_path, caplog):
    root = str(tmp_path / "images")
    made = make_folder(root)
    config = config_for("folder", image_size=16)
    with caplog.at_level(logging.WARNING):
        source = data.open_source(config, root)
    assert source.unreadable.keys() == {os.path.join("nested", "broken.png")}
    assert "broken.png" in caplog.text and "1 unreadable" in caplog.text
    assert sum(source.sizes.values()) == len(made)
    images = np.concatenate([images_of(source.dataset(s, 1, training=False)) for s in source.sizes])
    assert images.shape == (len(made), 16, 16, 3) and images.dtype == np.uint8
    # The 16x16 PNG comes back bit-exactly; the grayscale image is converted to three equal channels.
    as_bytes = {i.tobytes() for i in images}
    assert made["a.png"].tobytes() in as_bytes
    assert np.repeat(made["nested/gray.png"], 3, axis=-1).tobytes() in as_bytes
    assert made["d.webp"].tobytes() in as_bytes  # written lossless
    # The scan is remembered in the manifest: a second open does not decode again.
    calls = []
    original = data.check_images
    data.check_images = lambda *a: calls.append(a) or original(*a)
    try:
        again = data.open_source(config, root)
    finally:
        data.check_images = original
    assert not calls and again.unreadable == source.unreadable


def test_strict_data_stops_at_the_corrupt_file(tmp_path):
    root = str(tmp_path / "images")
    make_folder(root)
    with pytest.raises(data.DataError, match=r"broken\.png"):
        data.open_source(config_for("folder", image_size=16), root, strict=True)


LINK_FAULTS = {
    # fault: ({link: target}, the paths skipped, the reason given for them)
    "dangling symlink": ({"gone.png": "nowhere.png"}, ["gone.png"], "dangling symlink to nowhere.png"),
    "file symlink loop": ({"loop1.png": "loop2.png", "loop2.png": "loop1.png"}, ["loop1.png", "loop2.png"],
                          "symlink loop"),
    "folder symlink loop": ({os.path.join("nested", "loop"): ".."}, [os.path.join("nested", "loop")],
                            "symlink loop: links to the enclosing folder {root}"),
}


@pytest.mark.parametrize("fault", LINK_FAULTS)
def test_broken_symlinks_are_skipped_and_named_and_stop_strict_runs(fault, tmp_path, caplog):
    root = str(tmp_path / "images")
    made = make_folder(root, with_corrupt=False)
    links, skipped, reason = LINK_FAULTS[fault]
    reason = reason.format(root=root)
    for link, target in links.items():
        os.symlink(target, os.path.join(root, link))
    config = config_for("folder", image_size=16)
    with caplog.at_level(logging.WARNING):
        source = finishes(lambda: data.open_source(config, root))
    assert source.unreadable == {path: reason for path in skipped}
    assert all(f"{path}: {reason}" in caplog.text for path in skipped)
    # Every image once: none is listed again through the loop.
    images = np.concatenate([images_of(source.dataset(s, 1, training=False)) for s in source.sizes])
    assert sum(source.sizes.values()) == len(images) == len(made)
    assert {i.tobytes() for i in images} >= {made["a.png"].tobytes(), made["more/0.png"].tobytes()}
    with pytest.raises(data.DataError) as e:
        finishes(lambda: data.open_source(config, root, strict=True))
    assert all(f"{path}: {reason}" in str(e.value) for path in skipped)


def test_a_pipe_named_like_an_image_is_skipped_and_never_read(tmp_path):
    root = str(tmp_path / "images")
    made = make_folder(root, with_corrupt=False)
    os.mkfifo(os.path.join(root, "pipe.png"))  # reading it would block forever
    source = finishes(lambda: data.open_source(config_for("folder", image_size=16), root))
    assert source.unreadable == {"pipe.png": "not a regular file"}
    assert sum(source.sizes.values()) == len(made)


def test_symlinked_folders_are_followed_and_each_folder_is_listed_once(tmp_path):
    root, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    rng = np.random.default_rng(7)
    for folder, n in ((root / "own", 2), (elsewhere, 3)):
        for i in range(n):
            write_image(str(folder / f"{i}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    os.symlink(elsewhere, root / "a_link")
    os.symlink(elsewhere, root / "b_link")
    os.symlink(root / "own", root / "a_own_link")  # sorts before the real folder, which keeps its own path
    files, skipped = finishes(lambda: data.list_images(str(root)))
    assert files == [os.path.join("a_link", f"{i}.png") for i in range(3)] + [os.path.join("own", f"{i}.png")
                                                                               for i in range(2)]
    assert skipped == {"b_link": "the same folder as a_link, listed already",
                       "a_own_link": "the same folder as own, listed already"}


def damage(path, how):
    """Damage the image at `path` in place: `how` is garbage (same size and mtime, so the manifest's signature
    still matches), truncated, deleted, dangling symlink, or another image (a valid PNG of other pixels)."""
    st = os.stat(path)
    if how == "garbage":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(8).integers(0, 256, st.st_size, dtype=np.uint8).tobytes())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(st.st_size // 2)
    elif how == "another image":
        write_image(path, np.full((16, 16, 3), 7, np.uint8))
    else:
        os.remove(path)
        if how == "dangling symlink":
            os.symlink("nowhere.png", path)


READ_TIME_FAULTS = {
    "garbage": "changed since the folder check and no longer decodes: ",
    "truncated": "changed since the folder check and no longer decodes: ",
    "deleted": "gone since the folder check: No such file or directory",
    "dangling symlink": "gone since the folder check: dangling symlink to nowhere.png",
}


@pytest.mark.parametrize("how", READ_TIME_FAULTS)
def test_an_image_damaged_after_open_is_skipped_and_named_once_while_read(how, tmp_path, caplog):
    root = str(tmp_path / "images")
    made = make_folder(root, with_corrupt=False)
    source = data.open_source(config_for("folder", image_size=16), root)
    bad = os.path.join("more", "3.png")
    damage(os.path.join(root, bad), how)
    with caplog.at_level(logging.WARNING):
        evaluation = {s: finishes(lambda s=s: images_of(source.dataset(s, 1, training=False)))
                      for s in source.sizes}
        batches = finishes(lambda: [b.shape[0] for _ in range(2)
                                    for b in source.dataset("train", 2, training=True, cache=False)])
        trained = finishes(lambda: len(images_of(source.dataset("train", 1, training=True, cache=False))))
    # Evaluation keeps every other image, unchanged; training skips the same one and its batches stay full.
    images = np.concatenate(list(evaluation.values()))
    assert len(images) == len(made) - 1
    readable = {made[name].tobytes() for name in ("a.png", "d.webp", *(f"more/{i}.png" for i in (0, 1, 2, 4)))}
    assert readable <= {i.tobytes() for i in images}
    assert trained == len(evaluation["train"]) == source.sizes["train"] - 1  # more/3.png is a training image
    assert set(batches) == {2} and len(batches) == 2 * (trained // 2)
    named = warnings_naming(caplog, os.path.join(root, bad))
    assert len(named) == 1, named
    assert READ_TIME_FAULTS[how] in named[0]
    assert source.unreadable[bad].startswith(READ_TIME_FAULTS[how])


def test_an_image_replaced_by_another_valid_image_after_open_is_read(tmp_path, caplog):
    root = str(tmp_path / "images")
    made = make_folder(root, with_corrupt=False)
    source = data.open_source(config_for("folder", image_size=16), root)
    damage(os.path.join(root, "more", "3.png"), "another image")
    with caplog.at_level(logging.WARNING):
        images = np.concatenate([images_of(source.dataset(s, 1, training=False)) for s in source.sizes])
    assert len(images) == len(made) and not caplog.records
    assert np.full((16, 16, 3), 7, np.uint8).tobytes() in {i.tobytes() for i in images}


def test_strict_data_stops_while_reading_at_an_image_damaged_after_open(tmp_path):
    root = str(tmp_path / "images")
    make_folder(root, with_corrupt=False)
    source = data.open_source(config_for("folder", image_size=16), root, strict=True)
    bad = os.path.join(root, "more", "3.png")
    damage(bad, "garbage")
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        finishes(lambda: [images_of(source.dataset(s, 1, training=False)) for s in source.sizes])
    assert data.read_error_text(e.value).startswith(
        f"folder: unreadable image {bad}: changed since the folder check and no longer decodes: ")


def test_folder_images_are_centre_cropped_and_resized():
    image = np.zeros((30, 50, 3), np.uint8)
    image[:, 10:40] = 255  # the centred 30x30 square is white, the side bands black
    out = data.center_crop_resize(tf.constant(image), 15).numpy()
    assert out.shape == (15, 15, 3) and out.min() == 255


def test_folder_split_is_seeded_reproducible_and_disjoint(tmp_path):
    root = str(tmp_path / "images")
    rng = np.random.default_rng(3)
    for i in range(40):
        write_image(os.path.join(root, f"{i:03d}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    config = config_for("folder", image_size=8, seed=5)
    first = data._folder_splits(root, data.list_images(root)[0], seed=5, validation_fraction=0.1)
    os.remove(os.path.join(root, data.MANIFEST))
    second = data._folder_splits(root, data.list_images(root)[0], seed=5, validation_fraction=0.1)
    other = data._folder_splits(root, data.list_images(root)[0], seed=6, validation_fraction=0.1)
    assert first == second
    assert first["validation"] != other["validation"]
    assert len(first["validation"]) == 4 and len(first["train"]) == 36
    assert not set(first["train"]) & set(first["validation"])
    assert set(first["train"]) | set(first["validation"]) == set(data.list_images(root)[0])
    source = data.open_source(config, root)
    assert source.sizes == {"train": 36, "validation": 4}


def test_ffhq_split_is_63000_to_7000_at_full_size():
    files = [f"{i:05d}.png" for i in range(70000)]
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        split = data._folder_splits(root, files, seed=1, validation_fraction=0.1)
        assert os.path.exists(os.path.join(root, data.MANIFEST))  # saved beside the data
        assert data._folder_splits(root, files, seed=1, validation_fraction=0.1) == split
    assert len(split["train"]) == 63000 and len(split["validation"]) == 7000


def test_train_and_validation_subfolders_are_used_as_the_split(tmp_path):
    root = str(tmp_path / "images")
    rng = np.random.default_rng(4)
    for split, n in (("train", 6), ("validation", 2)):
        for i in range(n):
            write_image(os.path.join(root, split, f"{i}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    source = data.open_source(config_for("folder", image_size=8), root)
    assert source.sizes == {"train": 6, "validation": 2}


def test_ffhq_images_are_resized_to_256(tmp_path):
    root = str(tmp_path / "ffhq")
    rng = np.random.default_rng(5)
    for i in range(10):
        write_image(os.path.join(root, "images1024x1024", f"{i:05d}.png"),
                    rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
    source = data.open_source(config_for("ffhq"), root)
    assert source.sizes == {"train": 9, "validation": 1}
    batch = next(iter(source.dataset("train", 2, training=True))).numpy()
    assert batch.shape == (2, 256, 256, 3)


@pytest.mark.parametrize("dataset", ["folder", "ffhq"])
def test_missing_and_empty_data_dirs_fail_naming_the_path(dataset, tmp_path):
    config = config_for(dataset, image_size=16) if dataset == "folder" else config_for(dataset)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(data.DataError, match=f"{missing} does not exist"):
        data.open_source(config, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(data.DataError, match=f"no images in {empty}"):
        data.open_source(config, str(empty))
    with pytest.raises(data.DataError, match="--data_dir is required"):
        data.open_source(config, "")


def test_a_split_smaller_than_one_global_batch_is_an_error(tmp_path):
    root = str(tmp_path / "images")
    make_folder(root, with_corrupt=False)
    source = data.open_source(config_for("folder", image_size=16), root)
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        source.dataset("validation", 8, training=True)
    with pytest.raises(data.DataError, match="no split 'test'"):
        source.dataset("test", 1, training=False)


# ------------------------------------------------------------------------------- digits and determinism
def test_digits_are_real_binarised_16x16_images():
    source = data.open_source(load_flagfile("digits"))
    assert source.sizes == {"train": 1497, "validation": 300}
    batch = next(iter(source.dataset("train", 32, training=True))).numpy()
    assert batch.shape == (32, 16, 16, 1) and batch.dtype == np.uint8
    assert set(np.unique(batch)) == {0, 255}
    # Real handwriting: the centre of the frame is inked more often than its corners.
    ink = images_of(source.dataset("validation", 100, training=False)).mean(axis=0)[..., 0]
    assert ink[6:10, 6:10].mean() > 2 * ink[[0, 0, -1, -1], [0, -1, 0, -1]].mean()


def test_digits_read_from_scikit_learns_file_are_load_digits_images(monkeypatch):
    from sklearn.datasets import load_digits
    expected = load_digits().images
    np.testing.assert_array_equal(data.digits_images(), expected)
    # Without the file where it is expected, load_digits gives them.
    monkeypatch.setattr(data.os.path, "isfile", lambda path: False)
    np.testing.assert_array_equal(data.digits_images(), expected)


def test_grey_digits_are_the_same_digits_in_grey_levels_for_a_mixture_of_logistics():
    grey_config = load_flagfile("digits_grey")
    assert grey_config.decoder == "logistic_mixture" and grey_config.image_shape == (16, 16, 1)
    grey = data.open_source(grey_config)
    assert grey.sizes == {"train": 1497, "validation": 300} and not grey.binarize
    images = images_of(grey.dataset("validation", 100, training=False))
    assert images.shape == (300, 16, 16, 1) and len(np.unique(images)) > 100
    # The validation split holds the same digits as the binarised dataset's: its grey levels before the draw.
    raw = np.stack([x.numpy() for x in data.open_source(load_flagfile("digits")).read("validation")])
    np.testing.assert_array_equal(images, raw)


def test_digits_at_8x8_are_the_original_digits_in_the_same_split():
    from sklearn.datasets import load_digits
    native = data.open_source(config_for("digits_grey", image_size=8))
    assert native.image_shape == (8, 8, 1) and native.sizes == {"train": 1497, "validation": 300}
    images = np.stack([x.numpy() for x in native.read("validation")])[..., 0].astype(np.int64)
    # Each is one of scikit-learn's images, its 0..16 levels scaled to 0..255 and rounded.
    originals = np.round(load_digits().images * (255.0 / 16.0)).astype(np.int64)
    index = {o.tobytes(): i for i, o in enumerate(originals)}
    found = [index.get(x.tobytes()) for x in images]
    assert None not in found and len(set(found)) == 300
    # The 16x16 dataset's validation split holds the same digits, upscaled.
    upscaled = np.stack([x.numpy() for x in data.open_source(config_for("digits_grey")).read("validation")])
    pooled = upscaled[..., 0].reshape(300, 8, 2, 8, 2).mean(axis=(2, 4)).reshape(300, 64)
    distance = ((pooled[:, None, :] - images.reshape(1, 300, 64)) ** 2).sum(axis=-1)
    np.testing.assert_array_equal(distance.argmin(axis=1), np.arange(300))


def test_training_pipeline_is_deterministic_under_a_seed_when_asked():
    source = data.open_source(load_flagfile("digits"))
    a = images_of(source.dataset("train", 64, training=True, deterministic=True, seed=11).take(3))
    b = images_of(source.dataset("train", 64, training=True, deterministic=True, seed=11).take(3))
    c = images_of(source.dataset("train", 64, training=True, deterministic=True, seed=12).take(3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pipelines_run_without_tf_data_autotuning_whose_thread_stalls_every_epoch_end():
    """A pipeline is made per epoch and per validation; freeing one waited seconds for the autotuning thread."""
    source = data.open_source(load_flagfile("digits"))
    for split, training in (("train", True), ("validation", False)):
        assert source.dataset(split, 64, training=training).options().autotune.enabled is False, split


def test_training_batches_are_full_and_evaluation_keeps_every_image():
    source = data.open_source(load_flagfile("digits"))
    train = [b.shape[0] for b in source.dataset("train", 64, training=True)]
    validation = [b.shape[0] for b in source.dataset("validation", 64, training=False)]
    assert set(train) == {64} and len(train) == 1497 // 64
    assert sum(validation) == 300 and validation[-1] == 300 % 64


# ------------------------------------------------------------------------------------------- command line
def run_data_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "nvae_tf.data", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_inspect_prints_the_splits_and_writes_a_grid(tmp_path):
    out = str(tmp_path / "batch.png")
    result = run_data_cli("--flagfile=configs/digits.flags", "--inspect", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train 1,497, validation 300" in result.stdout
    assert "shape [32, 16, 16, 1], dtype uint8, values 0..255" in result.stdout
    grid = tf.io.decode_png(tf.io.read_file(out)).numpy()
    assert grid.shape[0] > 16 * 4 and grid.shape[1] > 16 * 4
    assert set(np.unique(grid)) <= {0, 255}


def test_inspect_of_a_missing_folder_fails_naming_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    result = run_data_cli("--flagfile=configs/folder64.flags", f"--data_dir={missing}", "--inspect")
    assert result.returncode == 2
    assert f"data_dir {missing} does not exist" in result.stderr


def test_inspect_skips_and_names_an_image_that_changed_since_the_manifest_and_strict_data_stops_there(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(9)
    for split, n in (("train", 8), ("validation", 2)):
        for i in range(n):
            write_image(str(root / split / f"{i}.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    data.open_source(config_for("folder", image_size=16), str(root))  # the manifest: every image decodes
    bad = str(root / "train" / "3.png")
    damage(bad, "garbage")  # same size and mtime: the manifest still matches the folder
    args = ("--flagfile=configs/folder64.flags", f"--data_dir={root}", "--image_size=16", "--batch_size=4",
            "--inspect")
    result = run_data_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train 8, validation 2" in result.stdout and "shape [4, 16, 16, 3]" in result.stdout
    assert result.stderr.count(bad) == 1
    assert re.search(re.escape(bad) + ": changed since the folder check and no longer decodes: ", result.stderr)
    strict = run_data_cli(*args, "--strict_data")
    assert strict.returncode == 2
    assert strict.stderr.strip().splitlines()[-1].startswith(
        f"error: folder: unreadable image {bad}: changed since the folder check and no longer decodes: ")
    assert "Traceback" not in strict.stderr


def test_uncached_training_data_is_shuffled_at_the_file_level(tmp_path, monkeypatch):
    """Without the in-memory cache the file list is shuffled before decoding. With the buffer after decoding
    reduced to one image, any shuffling seen must come from the file level."""
    monkeypatch.setattr(data, "UNCACHED_SHUFFLE_IMAGES", 1)
    root = str(tmp_path / "images")
    for i in range(60):
        write_image(os.path.join(root, f"{i:03d}.png"), np.full((8, 8, 3), i, np.uint8))
    source = data.open_source(config_for("folder", image_size=8, seed=7), root)
    in_order = images_of(source.dataset("train", 1, training=False, cache=False))[:, 0, 0, 0]
    assert np.array_equal(in_order, np.sort(in_order))
    orders = [images_of(source.dataset("train", 6, training=True, cache=False, deterministic=True, seed=s))[:, 0, 0, 0]
              for s in (1, 2)]
    for order in orders:
        assert sorted(order.tolist()) == sorted(in_order.tolist())  # a permutation of every image
        assert not np.array_equal(order, in_order)
    assert not np.array_equal(orders[0], orders[1])
