"""A run's split, recorded file by file, and read back by every later command.

`finetune` writes RUN/split.json: for each training, validation and test file its folder (the data
folder, or the --val / --test folder), its path relative to that folder, its byte size and its
sha256 (taken from the very bytes the image cache decoded, see edgeft.data.cache). qat, export,
parity, evaluate, benchmark and `finetune --resume` rebuild the splits from that record instead of
splitting the folder again:

- a file added to the folder since is not used (counted in one line);
- a recorded file that is missing, or whose bytes changed, is refused (UserError naming it): the
  gate would otherwise judge a "validation" image the model trained on;
- paths are relative to each root, and each root is recorded both absolute and relative to the run,
  so a run moved with its data, or a data folder moved and named with --data, still matches.

A run made before edgeft recorded its split has no split.json: it is split again as before, and
says so once. No TensorFlow here.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from edgeft.core.errors import UserError
from edgeft.data.datasets import ImageSet, Splits, _splits, check_disjoint, check_extra_folders, scan_folder

log = logging.getLogger(__name__)

VERSION = 1
SETS = ("train", "val", "test")
_said_unrecorded: set[str] = set()


def _rel(path: str, root: str) -> str:
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def split_record(splits: Splits, folder: str, val_dir: str | None, test_dir: str | None, run: Path) -> dict:
    """The record of `splits` (see the module docstring): JSON-ready."""
    roots = {"data": folder, "val": val_dir, "test": test_dir}
    files = {}
    for name in SETS:
        s = getattr(splits, name)
        if s is None:
            files[name] = []
            continue
        root_key = name if roots.get(name) else "data"
        files[name] = [[root_key, _rel(p, roots[root_key]), n, h]
                       for p, n, h in zip(s.paths, s.nbytes or [None] * len(s), s.sha256 or [None] * len(s))]
    return {"version": VERSION, "classes": list(splits.classes),
            "roots": {k: os.path.abspath(v) for k, v in roots.items() if v},
            "roots_from_run": {k: os.path.relpath(os.path.abspath(v), os.path.abspath(run)) for k, v in roots.items() if v},
            "counts": {k: len(v) for k, v in files.items()}, "files": files,
            "duplicates": splits.report.get("duplicates")}


def resolve_root(record: dict, key: str, given: str | None, run: Path) -> str | None:
    """The folder `key` ("data", "val", "test") now: the one the command was given when it exists
    (the data folder: the run's config, found by edgeft.run.Run.folder: absolute, relative to the
    run, then --data DIR), else the recorded absolute path, else the recorded path relative to the
    run (a run moved together with its data)."""
    tried = [given] if given else []
    tried += [record.get("roots", {}).get(key)]
    rel = record.get("roots_from_run", {}).get(key)
    if rel:
        tried.append(os.path.normpath(os.path.join(os.path.abspath(run), rel)))
    for t in tried:
        if t and os.path.isdir(t):
            return t
    return given or record.get("roots", {}).get(key)


def splits_from_record(record: dict, run: Path, folder: str, size: int, strict: bool,
                       val_dir: str | None, test_dir: str | None) -> Splits:
    """The run's splits rebuilt from its record: the same files, in the same order, checked by size
    and sha256; UserError naming the first recorded file that is missing or changed."""
    if record.get("version") != VERSION:
        raise UserError(f"{run / 'split.json'} has version {record.get('version')!r}, this edgeft reads {VERSION}")
    classes = record["classes"]
    roots = {"data": resolve_root(record, "data", folder, run)}
    if val_dir or record.get("roots", {}).get("val"):
        roots["val"] = resolve_root(record, "val", val_dir, run)
    if test_dir or record.get("roots", {}).get("test"):
        roots["test"] = resolve_root(record, "test", test_dir, run)
    check_extra_folders(roots["data"], roots.get("val"), roots.get("test"))
    scanned = {k: scan_folder(v, size, strict, classes=classes, ignore_extra=True) for k, v in roots.items()}
    where = {k: {_rel(p, roots[k]): i for i, p in enumerate(s.paths)} for k, s in scanned.items()}
    used = {k: set() for k in scanned}
    sets: dict[str, ImageSet | None] = {}
    for name in SETS:
        rows = record["files"].get(name) or []
        if not rows:
            sets[name] = None
            continue
        picks: dict[str, list[int]] = {}
        for key, rel, nbytes, sha in rows:
            if key not in scanned:
                raise UserError(f"{run / 'split.json'} names a {key} folder this run was not given")
            i = where[key].get(rel)
            if i is None:
                raise UserError(f"{os.path.join(roots[key], rel)} of the run's {name} split is missing (or no longer "
                                f"decodes): the run was trained on its recorded split (split.json); put the file "
                                f"back, or train a new run on the folder as it is now")
            s = scanned[key]
            if (sha is not None and s.sha256[i] != sha) or (nbytes is not None and s.nbytes[i] != nbytes):
                raise UserError(f"{s.paths[i]} of the run's {name} split changed since the run was trained (its "
                                f"bytes differ from the sha256 in split.json): put the original back, or train a "
                                f"new run on the folder as it is now")
            picks.setdefault(key, []).append(i)
            used[key].add(i)
        if len(picks) != 1:
            raise UserError(f"{run / 'split.json'}: the {name} split spans several folders")
        key, idx = next(iter(picks.items()))
        sets[name] = scanned[key].subset(np.asarray(idx, np.int64))
    new = sum(len(s.paths) - len(used[k]) for k, s in scanned.items())
    if new:
        log.info(f"data: {new} image(s) added to the folder since the run was trained are not used (the run keeps "
                 f"its recorded split, split.json)")
    if sets["val"] is None or sets["train"] is None:
        raise UserError(f"{run / 'split.json'} records no training or validation files")
    check_disjoint({"training": sets["train"], "validation": sets["val"], "test": sets["test"]})
    extra = [scanned[k] for k in ("val", "test") if k in scanned]
    return _splits(roots["data"], size, roots.get("val"), roots.get("test"), scanned["data"], sets["train"],
                   sets["val"], sets["test"], extra)


def say_unrecorded(run: Path) -> None:
    """Once per run and process: a run made before split.json is split again from its folder."""
    key = os.path.abspath(run)
    if key not in _said_unrecorded:
        _said_unrecorded.add(key)
        log.warning(f"data: {run} was made before edgeft recorded each run's split (no split.json): its folder is "
                    f"split again as it is now, as before")
