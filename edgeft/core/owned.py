"""What edgeft made in a run or search directory, and so what `--overwrite` may remove.

A directory edgeft makes (a run or a search) gets a marker file, `.edgeft-owned`: its first line
names the kind ("edgeft run v1", "edgeft search v1"), every later line one top-level entry that
edgeft wrote there, appended (O_APPEND, one short line: no read-modify-write race between
processes) before or as the entry is made (`own`). `--overwrite` replaces a directory only when it
carries the marker of the right kind and every entry in it is listed (or is one of edgeft's own
transient names: its lock, the marker, temporary files of its atomic writes); anything else is a
foreign entry, and the refusal names the first one. A directory the user named by a file name we
also use (`config.yaml`) is never taken for a run.

Some places are never replaced whatever they hold (`protected`): the data folders and every
folder that contains one, the image cache (and what contains it), the working directory and its
ancestors, $HOME and /.

Runs and searches made before the marker existed are recognised by their own files (config.yaml,
labels.txt and data_report.json; search.json of format edgeft-search) and only when every entry
is one of the names edgeft writes there (`LEGACY_*`). Imports no TensorFlow.
"""
from __future__ import annotations

import fnmatch
import os
import tempfile
from pathlib import Path

from edgeft.core.errors import UserError

MARKER = ".edgeft-owned"
LOCK = ".edgeft.lock"
KINDS = ("run", "search")
_HEADER = "edgeft {kind} v1"
_MAX_DEPTH = 3   # own(): how far above a written file the marker is looked for (RUN/export/failed/x)

# Names edgeft wrote at the top of a run or search before the marker existed.
LEGACY_RUN = ("config.yaml", "model.keras", "labels.txt", "metrics.json", "data_report.json",
              "skipped_files.txt", "history.csv", "state.json", "report.md", "checkpoints", "logs",
              "model_qat.weights.h5", "model_qat.json", "export", "curves.png", "confusion_matrix.png",
              "benchmark.json", "benchmark.md", "split.json", "evaluation.json")
LEGACY_SEARCH = ("search.json", "search.journal", "phase1", "phase3", "runs", "logs", "plan.md", "results.json",
                 "results.csv", "pareto.png", "report.md", "best", "bench.json")
# edgeft's transient names: its lock, the marker, atomic-write temporaries (.NAME.XXXX), staging
# directories of an export, a directory set aside while it is replaced
_TRANSIENT = (LOCK, MARKER, f"{MARKER}.*", f".{MARKER}.*", ".edgeft-write-test-*", ".export-staging-*", ".export-old-*", ".*.old-*",
              "search.journal.lock*")   # Optuna's journal lock (a symlink, renamed while released)


def header(path: Path) -> str | None:
    """The kind ("run", "search") of the directory `path`, from its marker; None without one."""
    try:
        with open(Path(path) / MARKER, encoding="utf-8", errors="replace") as f:
            first = f.readline().strip()
    except OSError:
        return None
    for kind in KINDS:
        if first == _HEADER.format(kind=kind):
            return kind
    return None


def entries(path: Path) -> set[str]:
    """The names the marker lists (empty without one)."""
    try:
        lines = (Path(path) / MARKER).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return set()
    return {line for line in lines[1:] if line}


def mark(path: Path, kind: str) -> None:
    """Gives the (new, empty or just replaced) directory `path` its marker of `kind`."""
    if kind not in KINDS:
        raise ValueError(kind)
    if header(path) == kind:
        return
    # written atomically (temporary file + rename), like every file; not through rundir, which
    # imports this module
    fd, tmp = tempfile.mkstemp(prefix=f".{MARKER}.", dir=path)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(_HEADER.format(kind=kind) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, Path(path) / MARKER)


def _owner(path: Path) -> tuple[Path, str] | None:
    """(the marked directory `path` lies in, the top-level entry below it), looking up at most
    _MAX_DEPTH levels."""
    p = Path(os.path.abspath(path))
    child = p
    for d in list(p.parents)[:_MAX_DEPTH]:
        if (d / MARKER).is_file():
            return d, child.name
        child = d
    return None


def own(*paths: str | os.PathLike) -> None:
    """Lists each path's top-level entry in the marker of the run or search it lies in (nothing when
    it lies in none). Called before or as the entry is made: atomic writes do it themselves."""
    for path in paths:
        found = _owner(Path(path))
        if found is None:
            continue
        root, name = found
        if name in entries(root) or _transient(name):
            continue
        try:
            fd = os.open(root / MARKER, os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue   # a read-only run: nothing is written there anyway
        try:
            os.write(fd, (name.replace("\n", " ") + "\n").encode("utf-8", "surrogateescape"))
        except OSError:
            pass
        finally:
            os.close(fd)


def _transient(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in _TRANSIENT)


def _atomic_temp_of(name: str, listed: set[str]) -> bool:
    """`.NAME.XXXX`: the temporary file of an atomic write of NAME (a killed write leaves one)."""
    return name.startswith(".") and any(name.startswith(f".{n}.") for n in listed)


def legacy_kind(path: Path) -> str | None:
    """"run" or "search" for a directory made by an edgeft without the marker, by its own files."""
    path = Path(path)
    if all((path / n).is_file() for n in ("config.yaml", "labels.txt", "data_report.json")):
        return "run"
    try:
        import json

        if json.loads((path / "search.json").read_text()).get("format") == "edgeft-search":
            return "search"
    except (OSError, ValueError, AttributeError):
        pass
    return None


def foreign_entries(path: Path, kind: str) -> list[str]:
    """Entries of `path` that edgeft did not write there (sorted); [] when all are edgeft's."""
    path = Path(path)
    if header(path) == kind:
        listed = entries(path)
    else:
        listed = set(LEGACY_RUN if kind == "run" else LEGACY_SEARCH)
    foreign = []
    for name in sorted(os.listdir(path)):
        if name in listed or _transient(name) or _atomic_temp_of(name, listed):
            continue
        foreign.append(name)
    return foreign


def is_edgeft_dir(path: Path) -> bool:
    """A run or search directory (marker, or an older edgeft's own files)."""
    return header(path) is not None or legacy_kind(path) is not None


def _real(p) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(p))))


def protected(out: Path, data: list[str | os.PathLike] = (), cache: str | os.PathLike | None = None) -> str | None:
    """Why `out` may never be replaced (None when it may): it is a data folder or holds one, it
    holds the image cache or lies in it, it is the working directory or one of its ancestors,
    $HOME or /."""
    real = _real(out)
    for d in data:
        if d is None:
            continue
        dr = _real(d)
        if real == dr or real in dr.parents:
            return f"it {'is' if real == dr else 'contains'} the data folder {d}"
    if cache is not None:
        cr = _real(cache)
        if real == cr or real in cr.parents or cr in real.parents:
            return f"it {'lies in' if cr in real.parents else 'holds'} the image cache {cache}"
    cwd = _real(os.getcwd())
    if real == cwd or real in cwd.parents:
        return "it is the working directory" if real == cwd else "it contains the working directory"
    home = os.environ.get("HOME")
    if home and real == _real(home):
        return "it is your home directory"
    if real == real.parent:
        return "it is the root directory"
    return None


def check_replaceable(out: Path, kind: str, data: list = (), cache=None) -> None:
    """UserError (one line) unless the existing, non-empty `out` may be replaced by --overwrite: an
    edgeft directory of `kind` holding only what edgeft wrote, in no protected place."""
    why = protected(out, data, cache)
    if why:
        raise UserError(f"refusing to --overwrite {out}: {why}")
    marked = header(out)
    if marked is None and legacy_kind(out) is None:
        raise UserError(f"refusing to --overwrite {out}: it is not an edgeft {kind} directory (no {MARKER} "
                        f"marker){_first(out)}")
    if (marked or legacy_kind(out)) != kind:
        raise UserError(f"refusing to --overwrite {out}: it is an edgeft {marked or legacy_kind(out)} "
                        f"directory, not a {kind} directory")
    foreign = foreign_entries(out, kind)
    if foreign:
        raise UserError(f"refusing to --overwrite {out}: it holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
                        f"edgeft did not write, first: {out / foreign[0]} (move it away, or choose another --out)")


def _first(out: Path) -> str:
    try:
        names = sorted(os.listdir(out))
    except OSError:
        return ""
    return f"; it holds {out / names[0]}" if names else ""
