"""A PyTorch `state_dict` file (`torch.save`, legacy or zip format) read as numpy arrays, without torch.

The pickle is read by a restricted unpickler: it resolves only `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` (here: a function that records a view of a storage) and the
storage type names (`torch.FloatStorage`, ...). A pickle that names any other global is refused
with one line before anything in it runs: a `.pth` file found on the internet can otherwise run
any code when loaded (`torch.load` without `weights_only`). The tensors' bytes are then read raw
(little-endian, as every torch.save since 0.4 on the machines that write them).

No TensorFlow and no torch here.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core.errors import UserError

__all__ = ["read_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": None,   # numpy has no bfloat16: refused with a message when a tensor uses it
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclass
class _Storage:
    dtype: object
    numel: int
    data: np.ndarray | None = None


@dataclass
class _TensorView:
    storage: _Storage
    offset: int
    shape: tuple
    stride: tuple

    def array(self) -> np.ndarray:
        base = self.storage.data
        if base is None:
            raise ValueError("a tensor's storage has no data")
        if not self.shape:
            return base[self.offset].copy()
        item = base.itemsize
        end = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        if self.offset < 0 or end > base.size or any(s < 0 for s in self.stride):
            raise ValueError("a tensor reaches outside its storage")
        return np.lib.stride_tricks.as_strided(base[self.offset:], self.shape,
                                               [s * item for s in self.stride]).copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("_rebuild_tensor_v2 given something other than a storage")
    return _TensorView(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


class _Refused(Exception):
    pass


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Unpickler(pickle.Unpickler):
    """Resolves the few names a state_dict needs; every other global is refused (nothing runs)."""

    def __init__(self, f, storages: dict, load_storage):
        super().__init__(f)
        self._storages = storages
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and len(pid) >= 5):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("a storage without a storage type")
        key = str(key)
        if key not in self._storages:
            dtype = _STORAGE_DTYPES[storage_type.name]
            if dtype is None:
                raise pickle.UnpicklingError(f"{storage_type.name} tensors are not supported")
            self._storages[key] = self._load_storage(key, _Storage(dtype, int(numel)))
        return self._storages[key]


def _read_legacy(f) -> dict:
    storages: dict[str, _Storage] = {}

    def plain_load():   # the header pickles: the restricted unpickler too (they hold plain values)
        return _Unpickler(f, storages, lambda key, s: s).load()

    if plain_load() != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a torch.save file (no magic number)")
    plain_load()   # protocol version
    plain_load()   # sys info: byte order, type sizes
    result = _Unpickler(f, storages, lambda key, s: s).load()
    keys = plain_load()
    for key in keys:
        s = storages[str(key)]
        (numel,) = struct.unpack("<q", f.read(8))
        nbytes = numel * np.dtype(s.dtype).itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise pickle.UnpicklingError("the file ends inside a tensor's data")
        s.data = np.frombuffer(raw, dtype=np.dtype(s.dtype).newbyteorder("<")).astype(s.dtype)
    return result


def _read_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise pickle.UnpicklingError("a zip file without data.pkl")
        prefix = pkl[0][: -len("data.pkl")]

        def load_storage(key, s):
            raw = z.read(f"{prefix}data/{key}")
            s.data = np.frombuffer(raw, dtype=np.dtype(s.dtype).newbyteorder("<")).astype(s.dtype)[: s.numel]
            return s

        return _Unpickler(io.BytesIO(z.read(pkl[0])), {}, load_storage).load()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{parameter name: array} of a PyTorch state_dict file; one-line UserError for anything else,
    nothing in a refused pickle run."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            result = _read_zip(path)
        else:
            with open(path, "rb") as f:
                result = _read_legacy(f)
    except _Refused as e:
        raise UserError(f"refusing {path}: its pickle names {e}, which a weights file does not need "
                        "(nothing in it was run)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, struct.error, zipfile.BadZipFile,
            AttributeError, IndexError) as e:
        raise UserError(f"cannot read {path} as a PyTorch state_dict: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if isinstance(result, dict) and "state_dict" in result and isinstance(result["state_dict"], dict):
        result = result["state_dict"]
    if not isinstance(result, dict) or not all(isinstance(v, _TensorView) for v in result.values()):
        raise UserError(f"{path} is not a PyTorch state_dict (a dict of tensors)")
    try:
        return {str(k): v.array() for k, v in result.items()}
    except ValueError as e:
        raise UserError(f"cannot read {path} as a PyTorch state_dict: {e}") from None
