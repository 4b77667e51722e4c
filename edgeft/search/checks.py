"""The search's refusals of typed values, made before phase 1, before TensorFlow is imported and
before anything is written (a refused search leaves no search.json behind): the training values,
--threads, --workers, --storage, a latency limit TFLite Micro cannot be timed for here, and, on
--resume, a value typed again that differs from the one the search stored.

TF-free (the layer contract checks it): every refusal costs a fraction of a second.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from edgeft.core.errors import UserError
from edgeft.device import TIMED_RUNS

__all__ = ["CORES", "DEFAULTS", "check_new", "check_resume", "check_storage", "resolved"]

CORES = max(1, os.cpu_count() or 1)
WORKERS_MAX = CORES   # each worker trains with TensorFlow: one per core at most
THREADS_MAX = CORES   # phase 1 and phase 3 time and run the files on this host with --threads threads

# a search's stored settings, with the value a new search takes when the flag is not typed
DEFAULTS = {"threads": 1, "runs": TIMED_RUNS, "target": "tflite-int8", "weights": "imagenet", "finalists": 3, "keep": 0.5}
FLAGS = {"threads": "--threads", "runs": "--runs", "target": "--target", "weights": "--weights",
         "finalists": "--finalists", "keep": "--keep", "storage": "--storage"}


def resolved(o, name: str):
    """The value of option `name` a new search stores: the typed one, else the default."""
    value = getattr(o, name)
    return DEFAULTS[name] if value is None else value


def check_new(o) -> None:
    """UserError (one line) for options no search may start or continue with, whatever it stored."""
    _check_train_values(o)
    if o.threads is not None and o.threads > THREADS_MAX:
        raise UserError(f"--threads must be from 1 to {THREADS_MAX} (this machine's cores: phase 1 and phase 3 "
                        f"time the files here), got {o.threads}")
    if o.workers > WORKERS_MAX:
        raise UserError(f"--workers must be at most {WORKERS_MAX} (one training process per core of this machine), "
                        f"got {o.workers}")
    check_storage(o.storage)


def check_latency_source(o, stored: dict | None) -> None:
    """A latency limit on a TFLite Micro target needs the device's times (this host's say nothing
    about a microcontroller): refused before phase 1, unless --plan (which asks for them) or times
    came with --latency-from now or before."""
    from edgeft.search.space import TARGETS

    target = stored["target"]["name"] if stored and isinstance(stored.get("target"), dict) else resolved(o, "target")
    latency = o.limits.latency_ms if o.limits.latency_ms is not None else \
        ((stored or {}).get("limits") or {}).get("latency_ms")
    times = o.latency_from or (stored or {}).get("latency_from")
    if target in TARGETS and not TARGETS[target].host_latency and latency is not None and not times and not o.plan:
        raise UserError("--max-latency-ms with --target tflm-int8 needs times from the device: run with --plan, "
                        "time the files there, then --latency-from bench.json (this host's timing says nothing "
                        "about a microcontroller)")


def _check_train_values(o) -> None:
    """The training values every candidate gets, validated as finetune validates them (a NaN
    learning rate is refused here, not after phase 1 with the search directory made)."""
    from edgeft.core.config import build_config
    from edgeft.search.space import FILE_KEYS

    values = {k: v for k, v in o.train_values.items() if k not in FILE_KEYS}
    build_config({**values, "folder": o.folder, "weights": "none"})


def check_resume(o, stored: dict, settings_path: Path) -> None:
    """A search continues with the settings it began with: a value typed again that differs from
    the stored one is refused, naming both (limits are the exception: typed again, they replace
    the stored ones, docs/search.md)."""
    def refuse(flag: str, typed, was, remedy: str = "") -> None:
        raise UserError(f"--resume: {flag} {_show(typed)} differs from the value the search stored, {_show(was)} "
                        f"({settings_path}); a search keeps the settings it began with: "
                        f"{remedy or f'leave {flag} out'}, or start a new search (another --out, or --overwrite)")

    if stored.get("folder") and Path(o.folder).resolve() != Path(stored["folder"]).resolve():
        refuse("the data folder", o.folder, stored["folder"], f"give {stored['folder']}")
    for name, flag in FLAGS.items():
        typed, was = getattr(o, name), stored.get(name)
        if name == "target" and isinstance(was, dict):
            was = was.get("name")
        if typed is not None and name in stored and typed != was:
            refuse(flag, typed, was)
    stored_values = stored.get("train_values") or {}
    for key, typed in sorted(o.train_values.items()):
        if typed != stored_values.get(key):
            flag = "--" + key.replace("_", "-")
            refuse(flag, typed, stored_values.get(key, "none (the default)"))
    space = stored.get("space")   # what was typed for the space (searches made before it was stored: not checked)
    if isinstance(space, dict):
        for name in ("backbones", "alphas", "sizes"):
            typed = getattr(o, name)
            if typed is not None and typed != space.get(name):
                refuse(f"--{name}", ",".join(map(str, typed)), ",".join(map(str, space.get(name) or ["(default)"])))


def _show(value) -> str:
    from edgeft.device import clip

    return clip(repr(value) if isinstance(value, str) and not value.strip() else str(value), 120)


def check_storage(spec: str | None) -> None:
    """Refuses an unusable --storage before phase 1 (UserError, one line): a database URL whose
    dialect SQLAlchemy does not know, or a file that exists and is not an Optuna journal (edgeft
    never writes into a file that is not one)."""
    if not spec:
        return
    if "://" in spec:
        try:
            from sqlalchemy.engine import make_url

            make_url(spec).get_dialect()
        except Exception as e:   # ArgumentError, NoSuchModuleError: the URL or its dialect
            raise UserError(f"--storage {spec}: not a database URL SQLAlchemy can open ({type(e).__name__}); "
                            f"use e.g. sqlite:///search.db or postgresql://host/db, or a journal file path") from None
        return
    path = Path(spec)
    if path.is_dir():
        raise UserError(f"--storage {spec} is a directory: give a journal file path (or a database URL)")
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            first = f.readline(4096)
        try:
            record = json.loads(first)
            ok = isinstance(record, dict) and "op_code" in record
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"--storage {spec} exists and is not an Optuna journal: edgeft will not write into it; "
                            f"give a new file or a journal of an earlier search")
