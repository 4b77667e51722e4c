"""The on-disk image cache: every image of a folder is decoded once, and every later stage
(finetune, qat, export, parity, evaluate, benchmark, each multi-worker worker) reads the decoded
pixels from here instead of decoding again. No TensorFlow here.

One cache entry per (folder listing, image size): `<root>/images/<key>/` holds

- `images.u8`: the decoded images, uint8 rows of size x size x 3, in listing order (a file that
  could not be decoded keeps an all-zero row and is marked bad in the index);
- `index.json`, written last: the key, the shape, each file's decode result (source mode or the
  reason it failed), each file's byte size and sha256 (hashed from the very bytes that were
  decoded: a run records its split by them, data/record.py), a CRC-32 of every row, and the size
  and mtime of images.u8.

The key is a sha256 of the listing (every path with its byte size and mtime), the image size and
the decoder (edgeft's decode rule with its version, `device.DECODER_VERSION`, and Pillow's
version): an unchanged folder reuses its entry, a changed one gets a new entry (the old one is
removed, with a message). A file replaced with one of the same size and its mtime put back
(`cp other.bmp a.bmp && touch -r ref a.bmp`) keeps the key; each machine therefore also keeps its
own record of every listed file's inode and st_ctime_ns (which no user call can set back) beside
the entry, `<root>/images/machines/<machine>/<entry>.json`, and rebuilds an entry whose files
no longer match it. Not in the key, so machines sharing one cache directory still build each
entry once (docs/reliability.md, "The image cache: what it trusts"). An entry is built in a
temporary directory and renamed into place, so a killed scan leaves nothing that looks complete;
an entry whose index, size or mtime does not match, or whose sampled rows fail their CRC, is
rebuilt with a message, and every row read is checked against its CRC (a corrupt row stops the
command and the entry is removed): a cache is never trusted blindly.

The root is $EDGEFT_CACHE, else $XDG_CACHE_HOME/edgeft, else ~/.cache/edgeft.
"""
from __future__ import annotations

import logging
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edgeft.core.config import available_memory  # noqa: F401 - one definition, used here and by train/
from edgeft.core.errors import UserError
from edgeft.core.progress import Progress
from edgeft.device import DECODER_VERSION, decode_image

log = logging.getLogger(__name__)

CACHE_FORMAT = 2   # 2: each file's sha256 and byte size in the index
DECODER = (f"edgeft.device.load_image v{DECODER_VERSION}: PIL, EXIF orientation applied, RGB, bilinear "
           "resize to size x size")
IMAGES, INDEX = "images.u8", "index.json"
_SAMPLE_ROWS = 64           # rows whose CRC is checked when an entry is opened
_DISK_MARGIN = 256 * 2**20  # free space left on the cache's disk after a build
_DECODE_FACTOR = 8          # bytes in flight per decoding thread, in decoded rows (source, RGB copy, resize)
_HASH_IN_MEMORY = 64 * 2**20   # files up to this size are read into memory once (hash + decode)
MACHINES = "machines"       # per-machine records of the files' inode and ctime (see the docstring)


class CacheError(UserError):
    """A cache row failed its check while a command was reading it."""


_RERUN_DEFAULT = "run the command again to decode the folder anew"
_RERUN = [_RERUN_DEFAULT]


def rerun_hint() -> str:
    """What to run after a corrupt row stopped the command: the same command, unless a stage
    that has made a run directory said otherwise (`set_rerun_hint`: a half-made finetune run is
    refused by the same command and needs --resume)."""
    return _RERUN[0]


def set_rerun_hint(text: str | None) -> None:
    """The advice a corrupt row's message gives from now on (None: the default again)."""
    _RERUN[0] = text or _RERUN_DEFAULT


_RESOLVED: dict[str, str] = {}   # a relative root as given -> the absolute path it named when first read


def cache_root() -> Path:
    """$EDGEFT_CACHE, else $XDG_CACHE_HOME/edgeft, else ~/.cache/edgeft; UserError (one line) when it
    names something that is not a directory (a file: no amount of free space would help).

    A relative root is resolved once, against the working directory of its first use (the CLI
    does it at start, `edgeft.cli.app.main`): a later chdir does not move the cache, and paths
    recorded in runs (a demo run's folder) are absolute."""
    root = os.environ.get("EDGEFT_CACHE") or str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                                  / "edgeft")
    root = Path(_RESOLVED.setdefault(root, os.path.abspath(root)) if not os.path.isabs(root) else root)
    if root.exists() and not root.is_dir():
        raise UserError(f"the image cache {root} is not a directory (EDGEFT_CACHE or XDG_CACHE_HOME names a file): "
                        f"set EDGEFT_CACHE to a directory")
    return root


def images_dir() -> Path:
    return cache_root() / "images"


def listing_key(files: list[tuple[str, int]], size: int, stats: list[os.stat_result] | None = None) -> str:
    """sha256 of what the decoded pixels depend on: every file (path, bytes, mtime, label), the
    image size and the decoder. `stats`: the files' os.stat results, when already taken."""
    from PIL import __version__ as pil_version

    h = hashlib.sha256(json.dumps([CACHE_FORMAT, DECODER, pil_version, int(size)]).encode())
    for (path, label), st in zip(files, stats if stats is not None else (os.stat(p) for p, _ in files)):
        # surrogateescape: a file name that is not valid UTF-8 (bytes from another system) hashes as its bytes
        h.update(f"\n{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def machine_id() -> str:
    """This machine, for its own records in a cache directory other machines may share:
    /etc/machine-id (else nothing) with the host name (containers of one image share the id)."""
    try:
        mid = Path("/etc/machine-id").read_text().strip()
    except OSError:
        mid = ""
    return hashlib.sha256(f"{mid}\0{socket.gethostname()}".encode()).hexdigest()[:16]


def _record_path(entry: Path) -> Path:
    return entry.parent / MACHINES / machine_id() / f"{entry.name}.json"


def _identities(stats: list[os.stat_result]) -> list[list[int]]:
    return [[int(st.st_ino), int(st.st_ctime_ns)] for st in stats]


def _write_record(entry: Path, index: dict, stats: list[os.stat_result]) -> None:
    """This machine's record of the files an entry was built from (or first trusted with)."""
    path = _record_path(entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"key": index.get("key"), "built": index.get("images_mtime_ns"),
                       "files": _identities(stats)}, f)
        os.replace(tmp, path)
    except OSError:   # a read-only shared cache: the entry is still used, only unrecorded here
        pass


def replaced_files(entry: Path, index: dict, files: list[tuple[str, int]],
                   stats: list[os.stat_result]) -> list[str] | None:
    """Files of the listing whose inode or ctime differ from this machine's record of the entry:
    replaced or rewritten since (whatever their size and mtime say). None when this machine has
    no record of this build of the entry (built elsewhere, or rebuilt since: it is recorded now,
    see `_write_record`)."""
    try:
        record = json.loads(_record_path(entry).read_text())
        if record.get("key") != index.get("key") or record.get("built") != index.get("images_mtime_ns"):
            return None
        known = record["files"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if len(known) != len(files):
        return [p for p, _ in files]
    return [p for (p, _), now, then in zip(files, _identities(stats), known) if list(then) != now]


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
                                 f"removed: {rerun_hint()}")
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

    def __init__(self, store: ImageStore, modes: list[str | None], reasons: list[str | None], built: bool,
                 sha256: list[str | None] | None = None, sizes: list[int | None] | None = None):
        self.store, self.modes, self.reasons, self.built = store, modes, reasons, built
        self.sha256, self.sizes = sha256, sizes


def _check_entry(path: Path, key: str, n: int, size: int) -> tuple[dict | None, str]:
    """(index, "") for a usable entry, else (None, why it is not)."""
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, ValueError):
        return None, "no complete index"
    if index.get("format") != CACHE_FORMAT or index.get("key") != key:
        return None, "index of another listing"
    if index.get("n") != n or index.get("size") != size or len(index.get("crc", [])) != n \
            or len(index.get("sha256", [])) != n:
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
    name = hashlib.sha256(f"{os.path.realpath(folder)}\0{size}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return images_dir() / "folders" / f"{name}.json"


def size_text(n: int) -> str:
    """Bytes for a message: GiB from one GiB up, else MB (KB below one MB), never "0.0 GiB"."""
    if n >= 2**30:
        return f"{n / 2**30:.1f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MB"
    return f"{max(n, 0) / 2**10:.1f} KB"


def check_disk_space(need: int, where: Path, folder) -> None:
    """Refuses before decoding what the cache's disk cannot hold (the RAM the old in-memory cache
    needed is no longer the limit: the decoded images live on disk). A margin of 256 MiB stays
    free so the build does not fill the disk for everything else."""
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if need + _DISK_MARGIN > free:
        raise UserError(f"decoding {folder} needs {size_text(need)} in the image cache {where}, plus "
                        f"{size_text(_DISK_MARGIN)} kept free as a margin, but only {size_text(free)} is free "
                        f"there: set EDGEFT_CACHE to a larger disk, free some space, or use a smaller --image-size")


def check_scratch_space(need: int, where: Path, what: str, remedy: str) -> None:
    """Refuses before a scratch file of `need` bytes is reserved in `where` when the disk there
    cannot hold it and the 256 MiB margin (a sparse file would fail half way through instead)."""
    free = shutil.disk_usage(where).free
    if need + _DISK_MARGIN > free:
        raise UserError(f"{what} needs {size_text(need)} in {where}, plus {size_text(_DISK_MARGIN)} kept free as a "
                        f"margin, but only {size_text(free)} is free there: {remedy}")


def check_decode_memory(size: int, workers: int, folder) -> None:
    """Refuses before decoding when the decoding threads' images would not fit in free RAM."""
    need = _DECODE_FACTOR * workers * size * size * 3
    free = available_memory()
    if free is not None and need > free:
        raise UserError(f"decoding {folder} at {size} px with {workers} threads needs about {size_text(need)} of "
                        f"memory, but only {size_text(free)} is free: use a smaller --image-size")


def _build(tmp: Path, files: list[tuple[str, int]], size: int, workers: int, label: str) -> dict:
    """Decodes every file into tmp/images.u8 (rows written in place by the decoding threads: the
    process holds a few images at a time, not the folder) and returns the index."""
    n, row_bytes = len(files), size * size * 3
    crc: list[int] = [0] * n
    modes: list[str | None] = [None] * n
    reasons: list[str | None] = [None] * n
    hashes: list[str | None] = [None] * n
    sizes: list[int | None] = [None] * n
    fd = os.open(tmp / IMAGES, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, n * row_bytes)   # bad files keep their all-zero row
        zero = zlib.crc32(bytes(row_bytes))

        def one(i: int) -> None:
            path = files[i][0]
            try:
                with open(path, "rb") as f:   # read once: hashed, then decoded from the same bytes
                    data = f.read(_HASH_IN_MEMORY + 1)
                    if len(data) > _HASH_IN_MEMORY:   # a huge file: hashed as a stream, decoded from disk
                        h = hashlib.sha256(data)
                        for chunk in iter(lambda: f.read(1 << 22), b""):
                            h.update(chunk)
                        source, hashes[i], sizes[i] = path, h.hexdigest(), f.tell()
                    else:
                        source, hashes[i], sizes[i] = io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data)
                pixels, modes[i] = decode_image(source, size)   # one decode: pixels and the file's mode
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
            "sha256": hashes, "bytes": sizes,
            "images_mtime_ns": os.stat(tmp / IMAGES).st_mtime_ns}


def open_or_build(folder, files: list[tuple[str, int]], size: int, workers: int = 8) -> CacheEntry:
    """The cache entry of this listing of `folder` at `size` px: opened when it is there and
    passes its checks, else decoded now (once) and kept for every later command.

    A cache that cannot take a new entry is one line, never a traceback: read-only or not ours
    (UserError, exit 2: set EDGEFT_CACHE), or a disk that fills up while decoding
    (OperationFailed, exit 1); the half-made entry is removed either way."""
    try:
        return _open_or_build(folder, files, size, workers)
    except OSError as e:
        raise _cache_failure(e, folder, size) from None


def _cache_failure(e: OSError, folder, size: int) -> Exception:
    import errno

    from edgeft.core.errors import OperationFailed, os_error_text

    where = f"the image cache {cache_root()}"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"{folder} at {size} px needs a new entry in {where}, which is not writable "
                         f"({os_error_text(e)}): set EDGEFT_CACHE to a writable directory")
    return OperationFailed(f"decoding {folder} into {where} failed ({os_error_text(e)}): free space there or "
                           f"set EDGEFT_CACHE to a larger disk, then run the command again (the half-made entry "
                           f"was removed)")


def _open_or_build(folder, files: list[tuple[str, int]], size: int, workers: int = 8) -> CacheEntry:
    stats = [os.stat(p) for p, _ in files]   # before decoding: a file changed during the build is caught next time
    key = listing_key(files, size, stats)
    root = images_dir()
    path = root / f"{key[:32]}-{size}px"
    pointer = _pointer(str(folder), size)
    n = len(files)
    index, why = _check_entry(path, key, n, size) if path.exists() else (None, "")
    if index is not None:
        replaced = replaced_files(path, index, files, stats)
        if not replaced:
            _write_pointer(pointer, path)
            if replaced is None:
                _write_record(path, index, stats)
            return CacheEntry(ImageStore(path, n, size, index["crc"]), index["modes"], index["reasons"], built=False,
                              sha256=index["sha256"], sizes=index.get("bytes"))
        why = (f"{len(replaced)} file(s) replaced since it was built, with size and mtime unchanged "
               f"(new inode or ctime), first: {replaced[0]}")
    old = _read_pointer(pointer)
    if why:
        log.info(f"image cache: {path} is not usable ({why}): decoding {folder} again")
        _remove(path)
    elif old is not None and old != path and old.exists():
        log.info(f"image cache: {folder} changed since it was cached (files added, removed or modified): "
                 f"decoding it again")
        _remove(old)
    check_disk_space(n * size * size * 3, root, folder)
    check_decode_memory(size, min(workers, max(n, 1)), folder)
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
    _write_record(path, index, stats)
    return CacheEntry(ImageStore(path, n, size, index["crc"]), index["modes"], index["reasons"], built=True,
                      sha256=index["sha256"], sizes=index.get("bytes"))


def _read_pointer(pointer: Path) -> Path | None:
    try:
        return Path(json.loads(pointer.read_text())["entry"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_pointer(pointer: Path, entry: Path) -> None:
    if _read_pointer(pointer) == entry:
        return
    try:   # only a hint for removing an outdated entry: a read-only cache still serves its entries
        pointer.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".", dir=pointer.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"entry": str(entry)}, f)
        os.replace(tmp, pointer)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
