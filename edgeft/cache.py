"""The on-disk image cache: every image of a folder is decoded once, and every later stage
(finetune, qat, export, parity, evaluate, benchmark, each multi-worker worker) reads the decoded
pixels from here instead of decoding again. No TensorFlow here.

One cache entry per (folder listing, image size): `<root>/images/<key>/` holds

- `images.u8`: the decoded images, uint8 rows of size x size x 3, in listing order (a file that
  could not be decoded keeps an all-zero row and is marked bad in the index);
- `index.json`, written last: the key, the shape, each file's decode result (source mode or the
  reason it failed), a CRC-32 of every row, and the size and mtime of images.u8.

The key is a sha256 of the listing (every path with its byte size and mtime), the image size and
the decoder (edgeft's resize rule and Pillow's version): an unchanged folder reuses its entry, a
changed one gets a new entry (the old one is removed, with a message). An entry is built in a
temporary directory and renamed into place, so a killed scan leaves nothing that looks complete;
an entry whose index, size or mtime does not match, or whose sampled rows fail their CRC, is
rebuilt with a message, and every row read is checked against its CRC (a corrupt row stops the
command and the entry is removed): a cache is never trusted blindly.

The root is $EDGEFT_CACHE, else $XDG_CACHE_HOME/edgeft, else ~/.cache/edgeft.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .errors import UserError
from .device import decode_image
from .progress import Progress

CACHE_FORMAT = 1
DECODER = "edgeft.device.load_image: PIL RGB, bilinear resize to size x size"
IMAGES, INDEX = "images.u8", "index.json"
_SAMPLE_ROWS = 64           # rows whose CRC is checked when an entry is opened
_DISK_MARGIN = 256 * 2**20  # free space left on the cache's disk after a build


class CacheError(UserError):
    """A cache row failed its check while a command was reading it."""


def cache_root() -> Path:
    root = os.environ.get("EDGEFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgeft"
    return Path(root)


def images_dir() -> Path:
    return cache_root() / "images"


def listing_key(files: list[tuple[str, int]], size: int) -> str:
    """sha256 of what the decoded pixels depend on: every file (path, bytes, mtime, label), the
    image size and the decoder."""
    from PIL import __version__ as pil_version

    h = hashlib.sha256(json.dumps([CACHE_FORMAT, DECODER, pil_version, int(size)]).encode())
    for path, label in files:
        st = os.stat(path)
        h.update(f"\n{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}".encode())
    return h.hexdigest()


class ImageStore:
    """Rows of one cache entry, read with pread (the OS page cache holds what is hot; nothing is
    mapped into the process, so reading a 7 GB entry does not grow the process's memory)."""

    def __init__(self, path: Path, n: int, size: int, crc: list[int] | None = None):
        self.path, self.n, self.size = Path(path), int(n), int(size)
        self.shape = (self.size, self.size, 3)
        self.row_bytes = self.size * self.size * 3
        self.crc = np.asarray(crc, np.uint32) if crc is not None else None
        self._fd: int | None = None

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path / IMAGES, os.O_RDONLY)
        return self._fd

    def read(self, rows) -> np.ndarray:
        """uint8 [len(rows), size, size, 3], in the order asked; each row checked against its CRC."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows),) + self.shape, np.uint8)
        fd = self._file()
        for k, r in enumerate(rows):
            if not 0 <= r < self.n:
                raise IndexError(f"row {r} of an image cache with {self.n} rows")
            got = os.preadv(fd, [memoryview(out[k]).cast("B")], int(r) * self.row_bytes)
            if got != self.row_bytes or (self.crc is not None and zlib.crc32(out[k]) != self.crc[r]):
                self.invalidate()
                raise CacheError(f"image cache {self.path} is corrupt (row {r} fails its check); it was "
                                 f"removed: run the command again to decode the folder anew")
        return out

    def invalidate(self) -> None:
        """Removes the entry's index, so the next open rebuilds it."""
        try:
            (self.path / INDEX).unlink()
        except OSError:
            pass

    def __getstate__(self):   # a copy in another process opens its own file
        return {k: v for k, v in self.__dict__.items() if k != "_fd"} | {"_fd": None}

    def __del__(self):
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


class ArrayStore:
    """Rows already in memory (tests, small derived sets) behind the same `read`."""

    def __init__(self, x: np.ndarray):
        self.x = np.asarray(x, np.uint8)
        self.n, self.shape = len(self.x), self.x.shape[1:]

    def read(self, rows) -> np.ndarray:
        return self.x[np.asarray(rows, np.int64).reshape(-1)]


class RowFile:
    """Fixed-shape float32 rows in a scratch file (stage-1 features too large for memory): written
    once in order, read a batch at a time, removed by `close`."""

    def __init__(self, path: Path, n: int, shape: tuple, dtype=np.float32):
        self.path, self.n, self.shape, self.dtype = Path(path), int(n), tuple(shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.n * self.row_bytes)

    def write(self, start: int, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype)
        os.pwrite(self._fd, memoryview(rows).cast("B"), start * self.row_bytes)

    def read(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64).reshape(-1)
        out = np.empty((len(rows),) + self.shape, self.dtype)
        for k, r in enumerate(rows):
            os.preadv(self._fd, [memoryview(out[k]).cast("B")], int(r) * self.row_bytes)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.path.unlink(missing_ok=True)


class CacheEntry:
    """An opened (or freshly built) entry: the store and each listed file's decode result."""

    def __init__(self, store: ImageStore, modes: list[str | None], reasons: list[str | None], built: bool):
        self.store, self.modes, self.reasons, self.built = store, modes, reasons, built


def _check_entry(path: Path, key: str, n: int, size: int) -> tuple[dict | None, str]:
    """(index, "") for a usable entry, else (None, why it is not)."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError):
        return None, "no complete index"
    if index.get("format") != CACHE_FORMAT or index.get("key") != key:
        return None, "index of another listing"
    if index.get("n") != n or index.get("size") != size or len(index.get("crc", [])) != n:
        return None, "index does not match the listing"
    try:
        st = os.stat(path / IMAGES)
    except OSError:
        return None, f"{IMAGES} is missing"
    if st.st_size != n * size * size * 3:
        return None, f"{IMAGES} has {st.st_size} bytes, not {n * size * size * 3}"
    if st.st_mtime_ns != index.get("images_mtime_ns"):
        return None, f"{IMAGES} was modified after it was written"
    store = ImageStore(path, n, size, index["crc"])
    rng = np.random.default_rng(0)
    sample = np.unique(np.concatenate([[0, n - 1], rng.integers(0, n, min(n, _SAMPLE_ROWS))])) if n else []
    try:
        for r in sample:
            store.read([r])
    except CacheError:
        return None, f"row {r} fails its CRC check"
    return index, ""


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _pointer(folder: str, size: int) -> Path:
    name = hashlib.sha256(f"{os.path.realpath(folder)}\0{size}".encode()).hexdigest()[:32]
    return images_dir() / "folders" / f"{name}.json"


def check_disk_space(need: int, where: Path, folder) -> None:
    """Refuses before decoding what the cache's disk cannot hold (the RAM the old in-memory cache
    needed is no longer the limit: the decoded images live on disk)."""
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if need + _DISK_MARGIN > free:
        raise UserError(f"decoding {folder} needs {need / 2**30:.1f} GiB in the image cache {where}, but only "
                        f"{free / 2**30:.1f} GiB is free there: set EDGEFT_CACHE to a larger disk, or use a "
                        f"smaller --image-size")


def _build(tmp: Path, files: list[tuple[str, int]], size: int, workers: int, label: str) -> dict:
    """Decodes every file into tmp/images.u8 (rows written in place by the decoding threads: the
    process holds a few images at a time, not the folder) and returns the index."""
    n, row_bytes = len(files), size * size * 3
    crc: list[int] = [0] * n
    modes: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    fd = os.open(tmp / IMAGES, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, n * row_bytes)   # bad files keep their all-zero row
        zero = zlib.crc32(bytes(row_bytes))

        def one(i: int) -> None:
            path = files[i][0]
            try:
                pixels, modes[i] = decode_image(path, size)   # one decode: pixels and the file's mode
                img = np.ascontiguousarray(pixels, np.uint8)
            except Exception as e:  # PIL raises many types for bad files; each becomes a skip reason
                reasons[i] = (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__
                crc[i] = zero
                return
            os.pwrite(fd, memoryview(img).cast("B"), i * row_bytes)
            crc[i] = zlib.crc32(img)

        with Progress(label, n) as bar, ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(one, range(n)):
                bar.update()
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"format": CACHE_FORMAT, "n": n, "size": size, "decoder": DECODER,
            "files": [p for p, _ in files], "modes": modes, "reasons": reasons, "crc": crc,
            "images_mtime_ns": os.stat(tmp / IMAGES).st_mtime_ns}


def open_or_build(folder, files: list[tuple[str, int]], size: int, workers: int = 8) -> CacheEntry:
    """The cache entry of this listing of `folder` at `size` px: opened when it is there and
    passes its checks, else decoded now (once) and kept for every later command."""
    key = listing_key(files, size)
    root = images_dir()
    path = root / f"{key[:32]}-{size}px"
    pointer = _pointer(str(folder), size)
    n = len(files)
    index, why = _check_entry(path, key, n, size) if path.exists() else (None, "")
    if index is not None:
        _write_pointer(pointer, path)
        return CacheEntry(ImageStore(path, n, size, index["crc"]), index["modes"], index["reasons"], built=False)
    old = _read_pointer(pointer)
    if why:
        print(f"image cache: {path} is not usable ({why}): decoding {folder} again")
        _remove(path)
    elif old is not None and old != path and old.exists():
        print(f"image cache: {folder} changed since it was cached (files added, removed or modified): "
              f"decoding it again")
        _remove(old)
    check_disk_space(n * size * size * 3, root, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-", dir=root))
    try:
        index = _build(tmp, files, size, workers, f"decoding {Path(folder).name} ({size} px, once)")
        index["key"] = key
        (tmp / INDEX).write_text(json.dumps(index))
        try:
            os.replace(tmp, path)
        except OSError:   # another process (a second worker) finished the same entry first
            other, _ = _check_entry(path, key, n, size)
            if other is None:
                raise
            index = other
    finally:
        _remove(tmp)
    _write_pointer(pointer, path)
    return CacheEntry(ImageStore(path, n, size, index["crc"]), index["modes"], index["reasons"], built=True)


def _read_pointer(pointer: Path) -> Path | None:
    try:
        return Path(json.loads(pointer.read_text())["entry"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_pointer(pointer: Path, entry: Path) -> None:
    if _read_pointer(pointer) == entry:
        return
    pointer.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", dir=pointer.parent)
    with os.fdopen(fd, "w") as f:
        json.dump({"entry": str(entry)}, f)
    os.replace(tmp, pointer)
