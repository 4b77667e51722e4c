"""The offline demo's data: scikit-learn's bundled 8x8 digits (no download), as RGB images.

The shipped backbone was pretrained on digits 0-4 (tools/pretrain_demo_backbone.py); the demo
task is digits 5-9, classes the backbone never saw. No TensorFlow here.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEMO_BACKBONE = "mobilenet_v2"
DEMO_ALPHA = 0.35
DEMO_IMAGE_SIZE = 32
DEMO_WEIGHTS = Path(__file__).resolve().parent.parent.parent / "models" / "demo_mobilenet_v2_a035_32_digits04.weights.h5"
PRETRAIN_DIGITS = (0, 1, 2, 3, 4)
DEMO_DIGITS = (5, 6, 7, 8, 9)
DEMO_CLASSES = ("five", "six", "seven", "eight", "nine")
_MARKER = ".edgeft_demo"
_VERSION = "digits-v1"


def digit_images(digits, size: int = DEMO_IMAGE_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 [N,size,size,3], y = the digit) for the chosen digits.

    Each 8x8 digit is upsampled smoothly and given a deterministic random ink and paper colour and
    a small shift, so the task is about shape rather than one fixed pixel pattern.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, list(digits))
    raw, y = d.images[keep], d.target[keep].astype(np.int64)
    rng = np.random.default_rng(seed)
    out = np.empty((len(raw), size, size, 3), np.uint8)
    inner = int(size * 0.8)
    for i, img in enumerate(raw):
        grey = Image.fromarray((img / 16.0 * 255).astype(np.uint8)).resize((inner, inner), Image.BICUBIC)
        canvas = np.zeros((size, size), np.float32)
        dx, dy = rng.integers(0, size - inner + 1, 2)
        canvas[dy:dy + inner, dx:dx + inner] = np.asarray(grey, np.float32) / 255.0
        ink, paper = rng.uniform(120, 255, 3), rng.uniform(0, 110, 3)
        rgb = paper + canvas[..., None] * (ink - paper) + rng.normal(0, 6, (size, size, 3))
        out[i] = np.clip(rgb, 0, 255).astype(np.uint8)
    return out, y


def default_demo_dir() -> Path:
    from edgeft.data.cache import cache_root

    return cache_root() / "demo_digits"


def _is_complete(dest: Path) -> bool:
    marker = dest / _MARKER
    return marker.is_file() and marker.read_text().strip() == _VERSION


def build_demo_folder(dest: Path, overwrite: bool = False) -> Path:
    """Writes digits 5-9 as PNGs in `dest/<five..nine>/`; an existing complete copy is reused.

    Written to a temporary sibling and renamed into place, so an interrupted build never leaves a
    half-written folder that would later be taken as complete.
    """
    dest = Path(dest)
    if _is_complete(dest) and not overwrite:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)   # mkdtemp makes it private; it is an ordinary data folder
    try:
        x, y = digit_images(DEMO_DIGITS)
        for digit, name in zip(DEMO_DIGITS, DEMO_CLASSES):
            (tmp / name).mkdir()
            for i, idx in enumerate(np.flatnonzero(y == digit)):
                Image.fromarray(x[idx]).save(tmp / name / f"{i:04d}.png")
        (tmp / _MARKER).write_text(_VERSION + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
