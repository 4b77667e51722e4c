"""Reading image folders and decoding images, without TensorFlow.

Training, evaluation, parity and the device-side benchmarks all decode and resize with this one
function (PIL, bilinear), so the pixels a deployed model sees are the pixels it was trained on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})


@dataclass
class FolderListing:
    classes: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)      # (path, class id)
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (path, reason)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode; 16/32-bit greyscale is scaled down, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | os.PathLike, size: int | tuple[int, int]) -> np.ndarray:
    """Decoded image as uint8 HxWx3 RGB at `size` (square int, or (height, width)).

    Raises OSError/ValueError for files that are empty, truncated or not images.
    """
    h, w = (size, size) if isinstance(size, int) else size
    with Image.open(path) as img:
        img.load()  # decode fully now: a truncated file fails here, not later in training
        rgb = _to_rgb(img)
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)


def list_folder(folder: str | os.PathLike, classes: list[str] | None = None) -> FolderListing:
    """Image files of a class-per-sub-folder tree; labels are the sorted folder names.

    `classes` fixes the label ids (a validation folder must use the training ids).
    Raises UserError for a missing folder, fewer than 2 classes or an empty class.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise UserError(f"{root} needs at least 2 class sub-folders, found {len(classes)}")
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise UserError(f"{root} has classes not in the training data: {', '.join(extra)}")
    listing = FolderListing(classes=list(classes))
    for label, name in enumerate(classes):
        cdir = root / name
        if not cdir.is_dir():
            continue
        paths = sorted(p for p in cdir.rglob("*") if p.is_file() and not p.name.startswith("."))
        for p in paths:
            if p.suffix.lower() in IMAGE_EXTS:
                listing.files.append((str(p), label))
            else:
                listing.skipped.append((str(p), f"not an image file ({p.suffix or 'no extension'})"))
    counts = np.bincount([lab for _, lab in listing.files], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0 and (root / c).is_dir()]
    if empty:
        raise UserError(f"class folder(s) with no images in {root}: {', '.join(empty)}")
    return listing
