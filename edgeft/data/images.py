"""Reading image folders and decoding images, without TensorFlow.

Training, evaluation, parity and the device script all decode and resize with one function,
`edgeft.device.load_image` (PIL, bilinear; re-exported here), so the pixels a deployed model
sees are the pixels it was trained on: tools/edgeft_device.py is that same file.
"""
from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.core import owned
from edgeft.core.errors import UserError
from edgeft.device import IMAGE_EXTS, load_image, to_rgb

# the device script's decoder is the package's (one decoder, everywhere)
__all__ = ["FolderListing", "list_folder", "check_class_name", "IMAGE_EXTS", "load_image", "to_rgb"]

log = logging.getLogger(__name__)


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
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:   # a name in another encoding (bytes Python could not decode)
        raise UserError(f"class folder {os.fsencode(str(root / name))!r} is not named in UTF-8: labels.txt and "
                        f"every exported file hold class names as UTF-8 text, so rename the folder") from None
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)
    if bad is not None:
        raise UserError(f"class folder {str(root / name)!r} has a control character ({bad!r}) in its name: "
                        f"labels.txt holds one class per line, so rename the folder")
    if name != name.strip():
        raise UserError(f"class folder {str(root / name)!r} starts or ends with a space: labels.txt strips "
                        f"them, so rename the folder")


def _edgeft_dirs(paths: list[Path], cache: Path | None) -> set[Path]:
    """Directories among (and above) `paths` that are edgeft's own: a run or search (its marker, or
    an older run's config.yaml + labels.txt + data_report.json) or the image cache."""
    found = set()
    for p in paths:
        if p.name == owned.MARKER or (p.name == "data_report.json" and owned.legacy_kind(p.parent) == "run"):
            found.add(p.parent)
        elif p.name == "index.json" and cache is not None and cache in p.parents:
            found.add(cache)
    return found


def list_folder(folder: str | os.PathLike, classes: list[str] | None = None,
                ignore_extra: bool = False) -> FolderListing:
    """Image files of a class-per-sub-folder tree; labels are the sorted folder names.

    `classes` fixes the label ids (a validation folder must use the training ids); a class folder
    not among them is refused, or with `ignore_extra` left out with one line (a run reading its
    recorded split back from a folder that has gained a class).
    edgeft's own folders inside the tree (a run or search directory, the image cache) are never
    read as images, and a class folder that holds nothing else is not a class: a run written into
    the data folder does not become a class of the next run.
    Raises UserError for a missing folder, fewer than 2 classes or an empty class.
    """
    from edgeft.data.cache import cache_root

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    cache = Path(os.path.realpath(cache_root()))
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class: dict[str, list[Path]] = {}
    ignored: list[str] = []
    for name in found:
        cdir = root / name
        if owned.is_edgeft_dir(cdir) or os.path.realpath(cdir) == str(cache):
            ignored.append(name)
            continue
        paths = sorted(cdir.rglob("*"))
        own_dirs = {Path(os.path.realpath(d)) for d in _edgeft_dirs(paths, cache)}
        if own_dirs:
            paths = [p for p in paths if not any(d in Path(os.path.realpath(p)).parents for d in own_dirs)]
        paths = [p for p in paths if p.is_file() and not p.name.startswith(".")]
        if own_dirs and not paths:
            ignored.append(name)
            continue
        check_class_name(name, root)
        per_class[name] = paths
    if ignored:
        log.info(f"data: {len(ignored)} folder(s) of {root} hold edgeft's own runs, searches or cache and are not "
                 f"classes: {', '.join(ignored)}")
    found = [n for n in found if n in per_class]
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise UserError(f"{root} needs at least 2 class sub-folders, found {len(classes)}")
    else:
        extra = sorted(set(found) - set(classes))
        if extra and ignore_extra:
            log.info(f"data: class folder(s) of {root} not in the run are not used: {', '.join(extra)}")
        elif extra:
            raise UserError(f"{root} has classes not in the training data: {', '.join(extra)}")
    listing = FolderListing(classes=list(classes))
    for label, name in enumerate(classes):
        for p in per_class.get(name, ()):
            if p.suffix.lower() in IMAGE_EXTS:
                listing.files.append((str(p), label))
            else:
                listing.skipped.append((str(p), f"not an image file ({p.suffix or 'no extension'})"))
    counts = np.bincount([lab for _, lab in listing.files], minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0 and (root / c).is_dir() and c in per_class]
    if empty:
        raise UserError(f"class folder(s) with no images in {root}: {', '.join(empty)}")
    return listing
