"""Reading image folders and decoding images, without TensorFlow.

Training, evaluation, parity and the device script all decode and resize with one function,
`edgeft.device.load_image` (PIL, bilinear; re-exported here), so the pixels a deployed model
sees are the pixels it was trained on: tools/edgeft_device.py is that same file.
"""
from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.core.errors import UserError
from edgeft.device import IMAGE_EXTS, load_image, to_rgb  # noqa: F401 - the one decoder, re-exported


@dataclass
class FolderListing:
    classes: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)      # (path, class id)
    skipped: list[tuple[str, str]] = field(default_factory=list)    # (path, reason)


def check_class_name(name: str, root: Path) -> None:
    """Refuses a class folder name that labels.txt (one class per line, stripped: see
    `edgeft.device.label_lines`) cannot hold as it is: a line break or other control character
    (newline, carriage return, tab, NUL-like bytes, Unicode line separators), or spaces at either
    end. Such a name would become two labels, or another name, on the device."""
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise UserError(f"class folder {str(root / name)!r} has a control character ({bad!r}) in its name: "
                        f"labels.txt holds one class per line, so rename the folder")
    if name != name.strip():
        raise UserError(f"class folder {str(root / name)!r} starts or ends with a space: labels.txt strips "
                        f"them, so rename the folder")


def list_folder(folder: str | os.PathLike, classes: list[str] | None = None) -> FolderListing:
    """Image files of a class-per-sub-folder tree; labels are the sorted folder names.

    `classes` fixes the label ids (a validation folder must use the training ids).
    Raises UserError for a missing folder, fewer than 2 classes or an empty class.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for name in found:
        check_class_name(name, root)
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
