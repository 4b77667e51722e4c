"""Paths a run records, each both absolute and relative to the run, and how they are read back.

A run's config.yaml holds every path key (the data folder, --val / --test, a --weights file, the
backbone file of bring-your-own) as an absolute path, and beside the sections a `paths_from_run`
mapping with the same paths relative to the run directory. Reading a run tries the absolute path,
then the relative one (a run moved together with its data), then what the command was given
(`--data DIR`); split.json records its roots the same way (edgeft.data.record). So a run opened
from another working directory, or moved with its data, finds its files. A config.yaml written
before this record (paths as typed) still reads as before. No TensorFlow here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

FROM_RUN = "paths_from_run"   # the top-level key of config.yaml (not a config key: --config ignores it)
# (section, key) of every config field that may hold a path
PATH_KEYS = (("data", "folder"), ("data", "val_dir"), ("data", "test_dir"), ("model", "weights"),
             ("model", "backbone"), ("model", "backbone_file"))


def is_path(key: str, value: Any) -> bool:
    """Whether `value` of config key `key` names a file or folder (not imagenet / none, not a
    registry backbone or a recorded file:<sha256>)."""
    if not isinstance(value, str) or not value:
        return False
    if key == "weights":
        return value not in ("imagenet", "none")
    if key == "backbone":
        from edgeft.core import byob

        return byob.is_file_backbone(value) and not byob.is_recorded(value)
    return True


def relative_to(path: str | os.PathLike, run: str | os.PathLike) -> str:
    """`path` relative to the run directory `run` (POSIX separators)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(run))).as_posix()


def record(sections: dict[str, dict], run: str | os.PathLike) -> dict:
    """A config's sections (config.to_dict) with every path absolute, and FROM_RUN added: the same
    paths relative to `run`."""
    out = {sec: dict(values) for sec, values in sections.items()}
    rel = {}
    for sec, key in PATH_KEYS:
        value = out.get(sec, {}).get(key)
        if is_path(key, value):
            out[sec][key] = os.path.abspath(value)
            rel[key] = relative_to(value, run)
    if rel:
        out[FROM_RUN] = rel
    return out


def resolve(values: dict[str, Any], from_run: dict | None, run: str | os.PathLike) -> dict[str, Any]:
    """Flat config values read from a run's config.yaml with each recorded path as it is found now:
    the absolute path when it exists, else the path relative to the run (`from_run`) when that
    exists, else the value as stored (messages then name it)."""
    if not isinstance(from_run, dict):
        return values
    out = dict(values)
    for _, key in PATH_KEYS:
        stored, rel = out.get(key), from_run.get(key)
        if not is_path(key, stored) or not isinstance(rel, str):
            continue
        found = first_existing([stored if os.path.isabs(stored) else None, os.path.join(os.path.abspath(run), rel)])
        if found is not None:
            out[key] = found
    return out


def first_existing(candidates) -> str | None:
    """The first candidate path that exists (file or folder), normalised; None when none does."""
    for c in candidates:
        if c and os.path.exists(c):
            return os.path.normpath(c)
    return None
