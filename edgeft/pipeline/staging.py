"""The staging directory an export is built and gated in, and how it replaces export/.

Everything is written to RUN/.export-staging-PID/ (a copy of what export/ ships now, so a partial
export keeps the files it does not rebuild); files that fail the gate, or that are kept but not
shown to come from the current model, go to failed/; then two renames publish it. A killed
export leaves export/ as it was (`open_staging` cleans up, or restores an export/ lost between the
two renames).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgeft.core import owned, rundir
from edgeft.core.errors import UserError
from edgeft.core.formats import EXPORT_DIR, FORMATS, TFLM_DIR, TFLM_FILE

FAILED_DIR = "failed"
_STAGING = ".export-staging-"
_OLD = ".export-old-"


def open_staging(run: Path) -> Path:
    """A fresh staging directory holding a copy of what export/ ships now (a partial export keeps
    the files it does not rebuild). Leftovers of a killed export are removed first; an export/
    lost between the two renames of `publish` is restored from its old copy."""
    out = run / EXPORT_DIR
    olds = sorted(run.glob(_OLD + "*"))
    if not out.exists() and olds:
        os.replace(olds[-1], out)
        olds = olds[:-1]
    for leftover in list(run.glob(_STAGING + "*")) + olds:
        _remove(leftover)
    stage = run / f"{_STAGING}{os.getpid()}"
    owned.own(out)   # export/ is edgeft's: --overwrite may remove it
    if out.is_dir():
        shutil.copytree(out, stage, ignore=shutil.ignore_patterns(FAILED_DIR, ".*"))
    else:
        stage.mkdir()
    return stage


def check_export_dir(run: Path) -> None:
    """UserError (one line, before any work) when RUN/export is a symbolic link: every export
    replaces export/ whole (two renames), which would drop the user's link and leave the files
    where it points behind as they were."""
    out = run / EXPORT_DIR
    if out.is_symlink():
        raise UserError(f"{out} is a symbolic link (to {os.readlink(out)}): edgeft writes export/ as a directory "
                        f"of the run and replaces it whole, which would drop the link; remove the link (the "
                        f"files it points to stay) and export again, or copy what you need from export/ "
                        f"after each export")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) if path.is_dir() else 0


def temp_copy_room(run: Path) -> tuple[str, int]:
    """(the temporary folder, bytes it needs) for `export --check`'s copy of the run: its files, the
    re-export staged beside them and published (twice export/). UserError (one line, before any work)
    when that folder (TMPDIR) has less free space: it is named, never the run's own disk."""
    import tempfile

    from edgeft.core.errors import UserError

    tmp = tempfile.gettempdir()
    need = sum(_size(run / name) for name in rundir.RUN_FILES) + 2 * _size(run / EXPORT_DIR)
    try:
        free = shutil.disk_usage(tmp).free
    except OSError:
        return tmp, need
    if free < need:
        raise UserError(f"export --check re-exports in a copy of the run under the temporary folder {tmp} (TMPDIR), "
                        f"which needs about {need / 1e6:.1f} MB and has {free / 1e6:.1f} MB free: free space there, "
                        f"or set TMPDIR to a folder with room")
    return tmp, need


def _remove(path: Path) -> None:
    """A leftover of an export: a directory removed whole, a link or file unlinked (rmtree refuses
    links and, told to ignore errors, would leave them behind)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _sha_or_none(path: Path) -> str | None:
    from edgeft.export.manifest import sha256_file

    return sha256_file(path) if path.is_file() else None


def set_aside_stale(run: Path, stage: Path, rebuilt: set[str], tflm_rebuilt: bool = False) -> dict[str, str]:
    """A partial export (`--onnx float` after a full one) keeps the shipped files it does not
    rebuild only when export/manifest.json shows they were made from the run's current
    model.keras (and, for an int8 file made by QAT, its current QAT weights) and are unchanged
    since. Any other kept file goes to failed/ with the reason (failed/stale.json): it must not
    ship under a fresh manifest. Returns {file name: reason}."""
    from edgeft.export.manifest import MANIFEST, sha256_file

    kept = [f.filename for f in FORMATS if f.family != "tflm" and f.filename not in rebuilt
            and (stage / f.filename).is_file()]
    stale = {}
    if TFLM_FILE in rebuilt and not tflm_rebuilt and (stage / TFLM_DIR).is_dir():
        stale[TFLM_DIR] = f"its sources hold the earlier {TFLM_FILE} (export with --tflm to rebuild them)"
    if not kept and not stale:
        return {}
    try:
        man = rundir.read_json(stage / MANIFEST, None)
    except (OSError, ValueError):
        man = None
    files = man.get("files") if isinstance(man, dict) and isinstance(man.get("files"), dict) else None
    model_sha = _sha_or_none(run / rundir.MODEL)
    qat_sha = _sha_or_none(run / rundir.QAT_WEIGHTS)
    for name in kept:
        entry = files.get(name) if files is not None else None
        if files is None:
            why = f"no readable {MANIFEST} says which model it was made from"
        elif not isinstance(entry, dict):
            why = f"not listed in {MANIFEST}"
        elif sha256_file(stage / name) != entry.get("sha256"):
            why = f"changed after export (sha256 differs from {MANIFEST})"
        elif man.get("model_keras_sha256") != model_sha:
            why = f"made from an earlier {rundir.MODEL}"
        elif entry.get("int8_source") == "qat" and man.get("qat_weights_sha256") != qat_sha:
            why = ("made from an earlier QAT model" if man.get("qat_weights_sha256")
                   else f"made from a QAT model that {MANIFEST} does not identify")
        else:
            continue
        stale[name] = why
    if not stale:
        return {}
    dest = stage / FAILED_DIR
    dest.mkdir(exist_ok=True)
    for name in stale:
        if (stage / name).exists():
            os.replace(stage / name, dest / name)
        if name == TFLM_FILE and (stage / TFLM_DIR).is_dir():
            os.replace(stage / TFLM_DIR, dest / TFLM_DIR)
    rundir.write_json(dest / "stale.json", {name: {"reason": why, "action": "not rebuilt by this export and "
                                                   "not shown to come from the current model: re-export it"}
                                            for name, why in stale.items()})
    return stale


def set_aside_failed(stage: Path, report: dict) -> list[str]:
    """Files with a failing parity row leave their shipping name: they go to failed/ with their rows."""
    bad = {}
    for row in report["rows"]:
        if not row["passed"]:
            bad.setdefault(row["file"], []).append(row)
    if not bad:
        return []
    dest = stage / FAILED_DIR
    dest.mkdir(exist_ok=True)
    for name in bad:
        os.replace(stage / name, dest / name)
        if name == TFLM_FILE and (stage / TFLM_DIR).is_dir():
            os.replace(stage / TFLM_DIR, dest / TFLM_DIR)
    rundir.write_json(dest / rundir.PARITY_JSON, {"rows": [r for rows in bad.values() for r in rows],
                                             "remedies": report.get("remedies", [])})
    return sorted(bad)


def publish(run: Path, stage: Path) -> None:
    """The staged export replaces export/ (two renames; open_staging repairs a crash between them)."""
    out = run / EXPORT_DIR
    old = run / f"{_OLD}{os.getpid()}"
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(stage, out)
    _remove(old)
