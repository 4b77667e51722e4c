"""Image folder -> decoded arrays -> stratified split -> tf.data pipelines.

The pre-flight scan decodes every file exactly once (in threads): broken files are found before
any training starts, and the decoded, resized pixels are kept in memory as the dataset cache.
"""
from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .errors import UserError
from .images import list_folder, load_image


@dataclass
class ImageSet:
    """Decoded images of one folder: x uint8 [N,H,W,3], y int32 [N]."""
    classes: list[str]
    x: np.ndarray
    y: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)   # source PIL mode -> count

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.classes, self.x[idx], self.y[idx], [self.paths[i] for i in idx])

    def counts(self) -> dict[str, int]:
        n = np.bincount(self.y, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n)}


def _source_mode(path: str) -> str:
    with Image.open(path) as img:
        return img.mode


def _decode_into(x: np.ndarray, i: int, path: str, size: int):
    """Decodes image i straight into row i of the cache: (source mode, None) or (None, reason)."""
    try:
        x[i] = load_image(path, size)
        return _source_mode(path), None
    except Exception as e:  # PIL raises many types for bad files; each becomes a skip reason
        reason = (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__
        return None, reason


def available_memory() -> int | None:
    """Bytes of RAM free now (Linux and macOS), or None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_cache_fits(n_images: int, size: int, folder, free: int | None = None) -> None:
    """The decoded images are the dataset cache (uint8, in RAM): refuse before decoding what
    cannot fit, instead of being killed by the OOM killer half-way through the scan."""
    need = n_images * size * size * 3
    free = available_memory() if free is None else free
    if free is not None and need > 0.8 * free:
        raise UserError(f"{n_images} images at {size} px need {need / 2**30:.1f} GiB of RAM for the decoded "
                        f"cache of {folder}, but only {free / 2**30:.1f} GiB is free: use a smaller "
                        f"--image-size or fewer images")


def scan_folder(folder: str, size: int, strict: bool = False, classes: list[str] | None = None,
                workers: int = 8) -> ImageSet:
    """Decode every image of `folder` once; skip (or, with strict, refuse) unreadable files."""
    listing = list_folder(folder, classes)
    check_cache_fits(len(listing.files), size, folder)
    # One preallocated array, filled in place by the decoding threads (no list of images to
    # stack: peak memory is the cache itself).
    x = np.empty((len(listing.files), size, size, 3), np.uint8)
    with ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(lambda i: _decode_into(x, i, listing.files[i][0], size),
                                range(len(listing.files))))
    skipped = list(listing.skipped)
    keep, ys, paths, modes = [], [], [], Counter()
    for i, ((path, label), (mode, reason)) in enumerate(zip(listing.files, decoded)):
        if reason is not None:
            skipped.append((path, f"cannot decode: {reason}"))
            continue
        keep.append(i)
        ys.append(label)
        paths.append(path)
        if mode != "RGB":
            modes[mode] += 1
    if strict and skipped:
        raise UserError(f"{len(skipped)} unusable file(s) in {folder} (--strict), first: "
                        f"{skipped[0][0]}: {skipped[0][1]}")
    if len(keep) < len(x):   # close the gaps of skipped files in place (rows only move down)
        for j, i in enumerate(keep):
            if i != j:
                x[j] = x[i]
        x = x[:len(keep)]
    y = np.asarray(ys, dtype=np.int32)
    present = np.bincount(y, minlength=len(listing.classes))
    empty = [c for c, n in zip(listing.classes, present) if n == 0]
    if empty and classes is None:
        raise UserError(f"class(es) with no readable images in {folder}: {', '.join(empty)}")
    return ImageSet(listing.classes, x, y, paths, skipped, dict(modes))


def stratified_split(images: ImageSet, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and val indices holding out `val_split` of every class (at least one image per class
    when the class has two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(len(images.classes)):
        idx = np.flatnonzero(images.y == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_split))
        if val_split > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(val, dtype=np.int64))


@dataclass
class Splits:
    classes: list[str]
    train: ImageSet
    val: ImageSet
    report: dict


def load_splits(folder: str, size: int, val_split: float, seed: int, strict: bool = False,
                val_dir: str | None = None) -> Splits:
    """Scan the folder (and --val folder) and split; the report goes to data_report.json."""
    full = scan_folder(folder, size, strict)
    if val_dir:
        train = full
        val = scan_folder(val_dir, size, strict, classes=full.classes)
    else:
        t_idx, v_idx = stratified_split(full, val_split, seed)
        train, val = full.subset(t_idx), full.subset(v_idx)
    if len(val.y) == 0:
        raise UserError("the validation split is empty: use more images, a larger --val-split or --val DIR")
    skipped = full.skipped + (val.skipped if val_dir else [])
    converted = Counter(full.converted)
    if val_dir:
        converted.update(val.converted)
    report = {
        "folder": str(folder), "val_folder": val_dir, "image_size": size, "classes": full.classes,
        "train_per_class": train.counts(), "val_per_class": val.counts(),
        "n_train": int(len(train.y)), "n_val": int(len(val.y)),
        "converted_to_rgb": dict(converted),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    return Splits(full.classes, train, val, report)


def run_splits(cfg) -> Splits:
    """The split a run was trained on, rebuilt from its config (same folder, size and seed)."""
    from .demo_run import data_folder

    if not cfg.data.image_size:
        raise UserError("the run's config.yaml has no image_size: not a finished edgeft run")
    return load_splits(data_folder(cfg), cfg.data.image_size, cfg.data.val_split, cfg.train.seed,
                       cfg.data.strict, cfg.data.val_dir)


def make_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = False,
                 augment: bool = False, seed: int = 0):
    """tf.data pipeline over decoded pixels: cache -> shuffle -> batch -> augment -> prefetch.

    Pixels stay uint8 until batched (4x less memory in the cache) and become float32 0-255,
    the model's input contract.
    """
    from ._keras import keras, tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda a, b: (tf.cast(a, tf.float32), b),
                                  num_parallel_calls=tf.data.AUTOTUNE)
    if augment:
        aug = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=seed),
                                keras.layers.RandomRotation(0.08, seed=seed),
                                keras.layers.RandomZoom(0.1, seed=seed)], name="augment")
        ds = ds.map(lambda a, b: (aug(a, training=True), b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def representative_images(train: ImageSet, n: int, seed: int) -> np.ndarray:
    """Up to `n` training images (seeded sample) as float32 0-255: int8 calibration data."""
    n = min(n, len(train.y))
    if n < 100:
        print(f"int8: only {n} representative images for calibration (100-500 recommended)")
    idx = np.random.default_rng(seed).permutation(len(train.y))[:n]
    return train.x[np.sort(idx)].astype(np.float32)


@dataclass
class ParityInputs:
    """What the parity gate compares on: validation images and deterministic augmented copies."""
    x: np.ndarray          # float32 NHWC 0-255
    y: np.ndarray          # labels (an augmented copy keeps its image's label)
    source: np.ndarray     # index into the validation split
    copy: np.ndarray       # 0: the image itself; k > 0: its k-th augmented copy
    paths: list[str]

    def describe(self, i: int) -> str:
        p = self.paths[int(self.source[i])]
        return p if self.copy[i] == 0 else f"{p} (augmented copy {int(self.copy[i])})"


def augment_copy(img: np.ndarray, rng: np.random.Generator, flip: bool = True) -> np.ndarray:
    """A plausible camera variation of `img` (uint8 HWC): horizontal flip (half the time, when
    `flip`), a shift of up to 6 % of the size (edges repeated), contrast x0.9-1.1 and brightness
    +-12 levels."""
    mirror = rng.random() < 0.5
    out = img[:, ::-1] if flip and mirror else img
    h, w = out.shape[:2]
    s = max(1, round(0.06 * min(h, w)))
    dy, dx = rng.integers(-s, s + 1, 2)
    out = np.pad(out, ((s, s), (s, s), (0, 0)), mode="edge")[s + dy:s + dy + h, s + dx:s + dx + w]
    out = out.astype(np.float32) * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12)
    return np.clip(np.round(out), 0, 255)


def parity_inputs(val: ImageSet, n: int, seed: int, flip: bool = True) -> ParityInputs:
    """The validation split, then augmented copies (round-robin over the images, seeded) until
    there are `n` inputs; a split larger than `n` is sampled down to `n` (seeded)."""
    m = len(val.y)
    rng = np.random.default_rng(seed + 7)
    if m >= n:
        src = np.sort(rng.permutation(m)[:n])
        return ParityInputs(val.x[src].astype(np.float32), val.y[src], src, np.zeros(n, np.int64), val.paths)
    src = np.arange(n) % m
    copy = np.arange(n) // m
    x = np.empty((n,) + val.x.shape[1:], np.float32)
    x[:m] = val.x
    for i in range(m, n):
        x[i] = augment_copy(val.x[src[i]], rng, flip)
    return ParityInputs(x, val.y[src], src, copy, val.paths)
