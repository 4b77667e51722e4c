"""The run directory: atomic writes and the rules for reusing a directory.

Every file is written to a temporary name in the same directory and renamed into place, so a
crash never leaves a half-written model, config or history.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from edgeft.core import owned
from edgeft.core.errors import UserError, os_error_text, os_remedy, write_failure
from edgeft.device import json_safe

# Every file name of a run directory, named once here (edgeft.run.Run hands out their paths).
CONFIG = "config.yaml"          # the resolved config; every edgeft run directory has one
MARKER = owned.MARKER           # edgeft's own marker (see core/owned.py): what --overwrite may remove
SPLIT = "split.json"            # the files of each split, by path, size and sha256 (data/record.py)
MODEL = "model.keras"           # the trained float model: a run is finished when it exists
LABELS = "labels.txt"
METRICS = "metrics.json"
DATA_REPORT = "data_report.json"
SKIPPED = "skipped_files.txt"
HISTORY = "history.csv"
STATE = "state.json"            # stage 2's per-epoch state, for --resume
REPORT = "report.md"
CHECKPOINTS = "checkpoints"
LOGS = "logs"
QAT_WEIGHTS = "model_qat.weights.h5"   # the QAT model, as weights rebuilt from MODEL (see quantize/qat.py)
QAT_INFO = "model_qat.json"
EXPORT_DIR = "export"
# inside export/ (beside the files, manifest.json: edgeft.device.MANIFEST)
FORMATS_JSON = "formats.json"   # how each file was made (int8 from PTQ or QAT)
PARITY_JSON, PARITY_MD = "parity.json", "parity.md"
BENCHMARK_JSON, BENCHMARK_MD = "benchmark.json", "benchmark.md"
# what a copy of a run needs to be exported again (edgeft export --check)
RUN_FILES = (CONFIG, MODEL, LABELS, DATA_REPORT, SPLIT, METRICS, QAT_WEIGHTS, QAT_INFO)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None):
    """Yields a temporary path beside `path`; renamed onto it only if the block succeeds.

    A write that fails (full disk, read-only file system) leaves no temporary file and raises
    OperationFailed naming `path` (CLI exit 1) instead of a bare OSError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix or ".tmp",
                                   dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_failure(e, path) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; give the file normal permissions
        owned.own(path)   # listed in its run's (or search's) marker: --overwrite may remove it
        os.replace(tmp, path)
    except OSError as e:
        raise write_failure(e, path) from None
    finally:
        if os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path, obj) -> None:
    """Strict JSON (`allow_nan=False`): a non-finite float (a metric that could not be computed,
    a loss that became NaN) is written as null, never as the `NaN` that JSON readers refuse."""
    write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path, default=None):
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else default


def write_csv(path, rows: list[dict], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def read_csv(path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    with p.open(newline="") as f:
        return list(csv.DictReader(f))


def check_writable(path: str | os.PathLike, what: str) -> None:
    """UserError (one line, exit 2) unless a file can be made in `path` or, when it does not exist
    yet, in its nearest existing parent: found before any work, not after it. Tries for real (a
    temporary file, removed at once): permission bits say nothing to root or on a read-only mount."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is not a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgeft-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({os_error_text(e, probe)}): {os_remedy(e)}") from None


def check_run_dir(out: str | os.PathLike, overwrite: bool, resume: bool, data: tuple = (),
                  cache=None, kind: str = "run") -> bool:
    """Raises UserError unless `out` may be used; changes nothing. True when it must be replaced.

    A non-empty directory is refused unless --resume (it must be an edgeft run) or --overwrite
    (only an edgeft directory of `kind` holding nothing edgeft did not write, in no protected
    place: `data` folders, the image `cache`, the working directory... see core/owned.py).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / CONFIG).is_file() or not owned.is_edgeft_dir(out):
            raise UserError(f"nothing to resume: {out} is not an edgeft run directory")
        check_writable(out, "--out")
        return False
    if non_empty:
        if not overwrite:
            raise UserError(f"{out} already exists and is not empty; use --overwrite to replace it "
                            f"or --resume to continue it")
        owned.check_replaceable(out, kind, data, cache)
    check_writable(out, "--out")
    return non_empty


def prepare_run_dir(out: str | os.PathLike, overwrite: bool, resume: bool, data: tuple = (),
                    cache=None, kind: str = "run") -> Path:
    """Creates `out` with edgeft's marker, or checks an existing one may be used (see check_run_dir).

    An old directory replaced by --overwrite is moved aside before removal, so a crash in between
    loses nothing; the caller holds its lock (edgeft.core.lock) while it is replaced.
    """
    out = Path(out)
    replace = check_run_dir(out, overwrite, resume, data, cache, kind)
    if resume:
        return out
    try:
        if replace:
            empty_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        owned.mark(out, kind)
    except OSError as e:
        raise UserError(f"--out {out} cannot be made ({os_error_text(e)}): {os_remedy(e)}") from None
    return out


def empty_dir(out: str | os.PathLike) -> Path:
    """The directory `out` names, replaced by an empty one: the old one is moved aside first (a crash
    in between loses nothing), then removed. When `out` is a symbolic link (the user's), the directory
    it points to is replaced and the link is left as it was, still pointing there. Returns that
    directory's real path. The caller has checked it may be replaced and holds its lock."""
    real = Path(os.path.realpath(out))
    trash = real.with_name(f".{real.name}.old-{int(time.time())}")
    os.replace(real, trash)
    real.mkdir()
    shutil.rmtree(trash)
    return real


def default_run_dir(folder: str | os.PathLike, backbone: str) -> Path:
    """runs/<folder's real name>_<backbone> in the working directory, unless that lies inside the
    data folder (`edgeft finetune .`): then beside the data folder, so a run never lands among the
    images it was trained on."""
    data = Path(os.path.realpath(folder))
    name = f"{data.name or 'data'}_{backbone}"
    base = Path("runs")
    real = Path(os.path.realpath(base))
    if real == data or data in real.parents:
        base = data.parent / "runs"
    return base / name
