"""Bring your own backbone: `--backbone FILE.keras|.h5`, what needs no TensorFlow.

A backbone given as a file is named by the path on the command line; the run records it as
`file:<sha256>` (config `backbone`) with the path beside it (`backbone_file`, for information and
for `finetune --resume`). After finetune the run needs the file no more: model.keras holds every
layer and weight. `--preprocess` says what the file's weights expect from raw RGB 0-255; it becomes
the model's `Preprocess` layer (mean_std: every form here is (x - mean) / std per channel).
The checks here (syntax of --preprocess, the file's presence and extension) run before TensorFlow
is imported; nn/byob.py loads, checks and flattens the file itself.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

from edgeft.core.errors import UserError
from edgeft.core.registry import Preprocessing

FILE_PREFIX = "file:"
SUFFIXES = (".keras", ".h5")
PREPROCESS_HELP = "scale=S,offset=O (x * S + O), mean=M[,M,M],std=S[,S,S] ((x - mean) / std), or none"
_SHA = re.compile(r"^[0-9a-f]{64}$")


def is_file_backbone(name: str | None) -> bool:
    """A --backbone that names a file (a path with a dot or a slash, or a run's recorded
    `file:<sha256>`), not a registry row (whose names have neither)."""
    name = str(name or "")
    return name.startswith(FILE_PREFIX) or "." in name or "/" in name or "\\" in name


def is_recorded(name: str) -> bool:
    return str(name).startswith(FILE_PREFIX)


def recorded_sha(name: str) -> str:
    return str(name)[len(FILE_PREFIX):]


def label(name: str, file: str | None = None) -> str:
    """A short name for run directories and the model's name: file_<stem> of the file's name
    (the recorded path's for a recorded backbone), file_<sha256[:12]> when no path is recorded."""
    if is_recorded(name) and not file:
        return f"file_{recorded_sha(name)[:12]}"
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", Path(file if is_recorded(name) else name).stem).strip("_") or "backbone"
    return f"file_{stem}"


def run_name(model) -> str:
    """What a run directory's default name says of the backbone (`model`: a ModelConfig)."""
    return label(model.backbone, model.backbone_file) if is_file_backbone(model.backbone) else model.backbone


def recorded(model) -> dict:
    """The ModelConfig fields a run records for a backbone given as a path: file:<sha256> and the
    path it was read from."""
    if not is_file_backbone(model.backbone) or is_recorded(model.backbone):
        return {}
    path = Path(model.backbone)
    return {"backbone": FILE_PREFIX + sha256(path), "backbone_file": str(path.resolve())}


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _number(text: str, spec: str) -> float:
    text = text.strip()
    try:
        if "/" in text:   # scale=1/255
            a, b = text.split("/", 1)
            value = float(a) / float(b)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"--preprocess {spec!r}: {text!r} is not a number ({PREPROCESS_HELP})") from None
    if not math.isfinite(value):
        raise UserError(f"--preprocess {spec!r}: {text!r} is not a finite number")
    return value


def _three(values: list[float], key: str, spec: str) -> tuple[float, float, float]:
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise UserError(f"--preprocess {spec!r}: {key} takes 1 or 3 values (one per RGB channel), got {len(values)}")
    return tuple(values)


def parse_preprocess(spec: str | None) -> Preprocessing:
    """--preprocess as the Preprocess layer's mean_std form: scale/offset x * s + o is
    (x - (-o / s)) / (1 / s); none is mean 0, std 1. UserError (one line) for bad syntax."""
    if spec is None or not str(spec).strip():
        raise UserError(f"--backbone FILE needs --preprocess: what its weights expect from raw RGB 0-255 "
                        f"({PREPROCESS_HELP})")
    text = str(spec).strip()
    if text.lower() == "none":
        return Preprocessing("mean_std", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    keys: dict[str, list[float]] = {}
    current = None
    for token in text.split(","):
        if "=" in token:
            current, value = (s.strip().lower() for s in token.split("=", 1))
            if current not in ("scale", "offset", "mean", "std"):
                raise UserError(f"--preprocess {spec!r}: unknown key {current!r} ({PREPROCESS_HELP})")
            if current in keys:
                raise UserError(f"--preprocess {spec!r}: {current} given twice")
            keys[current] = [_number(value, spec)]
        elif current is None:
            raise UserError(f"--preprocess {spec!r}: expected key=value ({PREPROCESS_HELP})")
        else:
            keys[current].append(_number(token, spec))
    if set(keys) <= {"scale", "offset"}:
        scale = _three(keys.get("scale", [1.0]), "scale", spec)
        offset = _three(keys.get("offset", [0.0]), "offset", spec)
        if any(s == 0 for s in scale):
            raise UserError(f"--preprocess {spec!r}: scale must not be 0")
        if any(s < 0 for s in scale):
            raise UserError(f"--preprocess {spec!r}: scale must be positive")
        return Preprocessing("mean_std", mean=tuple(-o / s for o, s in zip(offset, scale)),
                             std=tuple(1.0 / s for s in scale))
    if set(keys) == {"mean", "std"}:
        std = _three(keys["std"], "std", spec)
        if any(s <= 0 for s in std):
            raise UserError(f"--preprocess {spec!r}: std must be positive")
        return Preprocessing("mean_std", mean=_three(keys["mean"], "mean", spec), std=std)
    raise UserError(f"--preprocess {spec!r}: give scale/offset or mean and std, not {'+'.join(sorted(keys))} "
                    f"({PREPROCESS_HELP})")


def check(model, image_size: int | None = None) -> None:
    """TF-free refusals for a file backbone (`model` is a ModelConfig): --preprocess syntax, the
    file's extension and presence (a path; a recorded `file:<sha256>` needs no file), --alpha,
    --weights."""
    name = str(model.backbone)
    if is_recorded(name):
        if not _SHA.match(recorded_sha(name)):
            raise UserError(f"backbone {name!r}: expected file:<sha256> (64 hex digits)")
    else:
        if not name.lower().endswith(SUFFIXES):
            raise UserError(f"--backbone {name}: a backbone file must be a Keras model saved as .keras or .h5 "
                            f"(or a registry name without a dot)")
        if not Path(name).is_file():
            raise UserError(f"--backbone file not found: {name}")
    parse_preprocess(model.preprocess)
    if model.alpha not in (None, 1.0):
        raise UserError("--alpha applies to MobileNets only, not to a backbone file")
    if model.weights not in ("imagenet", "none"):
        raise UserError(f"--weights {model.weights}: a backbone file carries its own weights (default; "
                        f"--weights none starts its layers from fresh initial weights)")
    if image_size is not None and not 32 <= image_size <= 1024:
        raise UserError(f"a backbone file takes --image-size from 32 to 1024 px, got {image_size}")


def source_file(model) -> tuple[Path, str | None]:
    """(the file to build from, the sha256 it must have or None): the path given, or for a
    recorded backbone the path recorded beside it. UserError (one line) when a recorded file is
    missing or changed (`finetune --resume`, `--config RUN/config.yaml`)."""
    name = str(model.backbone)
    if not is_recorded(name):
        return Path(name), None
    want = recorded_sha(name)
    path = Path(model.backbone_file) if model.backbone_file else None
    if path is None or not path.is_file():
        raise UserError(f"this run's backbone file ({model.backbone_file or 'no path recorded'}, sha256 {want[:12]}...) "
                        f"is needed to build the model again and is missing")
    got = sha256(path)
    if got != want:
        raise UserError(f"backbone file {path} changed since the run recorded it (sha256 {got[:12]}... now, "
                        f"{want[:12]}... recorded)")
    return path, want
