"""Read a PyTorch checkpoint (`torch.save`, zip format) into NumPy without PyTorch and without running pickled code.

A zip-format checkpoint holds `<name>/data.pkl`, a pickle of the saved object in which every tensor is a call
of `torch._utils._rebuild_tensor_v2` on a storage, and the storages' bytes in `<name>/data/<key>`. The pickle
is read by an unpickler that resolves only the globals in `ALLOWED_GLOBALS` (the tensor rebuild, typed storages
and two plain containers) and refuses any other one by name, so a file cannot make it import or call anything
else. Tensors come back as NumPy arrays (views into a shared storage honour the storage offset, size and
stride); everything else as plain Python values.
"""

import argparse
import collections
import pickle
import zipfile
import zlib

import numpy as np


class CheckpointReadError(Exception):
    """A file that is not a readable PyTorch checkpoint, or one that asks for a global it may not use."""


# Storage classes by name, with the NumPy dtype of their elements.
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": None,
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}


class StorageType:
    """What the unpickler returns for `torch.<X>Storage`: only its element dtype is used."""

    def __init__(self, name):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                   metadata=None):
    """`torch._utils._rebuild_tensor_v2` for a NumPy storage: the (possibly strided) view, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size + stride):
        raise CheckpointReadError(f"a tensor has an invalid layout (size {size}, stride {stride})")
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=storage.dtype)
    last = storage_offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= storage.size:
        raise CheckpointReadError(f"a tensor of size {list(size)} at offset {storage_offset} reaches element "
                                  f"{last} of a storage of {storage.size}: the file is damaged")
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                           strides=tuple(st * item for st in stride), writeable=False)
    return np.array(view)


ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    **{("torch", name): StorageType(name) for name, dtype in STORAGE_DTYPES.items() if dtype},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS` and reads persistent storages through `load_storage`."""

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointReadError(
                f"the checkpoint's pickle asks for the global {module}.{name}, which is not allowed (allowed: "
                f"{', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_GLOBALS))}); it was not loaded") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], StorageType)):
            raise CheckpointReadError(f"the checkpoint's pickle holds an unknown persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def load(path):
    """The object saved in the PyTorch checkpoint at `path`, tensors as NumPy arrays.

    Raises `CheckpointReadError` (one line, naming the file) for a file that is missing, not a zip-format
    checkpoint, truncated or damaged, or whose pickle references a global outside `ALLOWED_GLOBALS`.
    """
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise CheckpointReadError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointReadError(f"{path} is a directory, not a checkpoint file") from None
    except zipfile.BadZipFile:
        raise CheckpointReadError(_not_a_zip(path)) from None
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot read it ({e.strerror or e})") from None
    with archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointReadError(f"{path} is a zip file but not a PyTorch checkpoint: it holds "
                                      f"{len(pickles)} data.pkl entries, expected one")
        prefix = pickles[0][:-len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in archive.namelist():
            big_endian = archive.read(prefix + "byteorder").strip() == b"big"
        storages = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                try:
                    raw = archive.read(f"{prefix}data/{key}")
                except KeyError:
                    raise CheckpointReadError(f"storage {key} is missing from the archive") from None
                array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder(">" if big_endian else "<"))
                if array.size < numel:
                    raise CheckpointReadError(f"storage {key} holds {array.size} elements, its tensor says "
                                              f"{numel}: the file is damaged")
                storages[key] = array[:numel].astype(dtype, copy=False)
            return storages[key]

        try:
            with archive.open(pickles[0]) as f:
                return RestrictedUnpickler(f, load_storage).load()
        except CheckpointReadError as e:
            raise CheckpointReadError(f"{path}: {e}") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, ValueError, TypeError,
                IndexError, AttributeError, KeyError, OSError) as e:
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise CheckpointReadError(f"{path} is damaged or truncated ({reason})") from None


def _not_a_zip(path):
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if head == b"\x80\x02":
        return (f"{path} is a PyTorch checkpoint in the legacy (pre-1.6) format; re-save it in the zip format "
                f"(`torch.save(torch.load(path), path)` with a PyTorch of 1.6 or later) or convert a zip-format "
                f"copy")
    return f"{path} is not a PyTorch zip-format checkpoint (or it is truncated)"
