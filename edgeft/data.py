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


def _split_off(idx: np.ndarray, fraction: float, rng: np.random.Generator,
               keep: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held out) of `idx` (one class, shuffled by `rng`): `fraction` of it held out, at least
    one image when the class has more than `keep`, never leaving fewer than `keep`."""
    idx = idx.copy()
    rng.shuffle(idx)
    n = int(round(len(idx) * fraction))
    if fraction > 0 and len(idx) > keep:
        n = min(max(n, 1), len(idx) - keep)
    elif len(idx) <= keep:
        n = 0
    return idx[n:], idx[:n]


def stratified_split(images: ImageSet, val_split: float, seed: int,
                     test_split: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, val and test indices (sorted), stratified per class and seeded.

    The test split is taken first: `test_split` of every class (at least one image when the class
    has 3 or more), drawn by its own generator. The validation split is then drawn exactly as
    without a test split, from what is left: `val_split` of every class (at least one image when
    the class has 2 or more left). So `test_split=0` gives the split edgeft made before it had a
    test split, image for image.
    """
    test_rng = np.random.default_rng([seed, 7919])   # independent of the validation draw below
    rest, test = [], []
    for label in range(len(images.classes)):
        idx = np.flatnonzero(images.y == label)
        if test_split > 0:
            idx, held = _split_off(idx, test_split, test_rng, keep=2)
            test.extend(held)
        rest.append(np.sort(idx))
    rng = np.random.default_rng(seed)
    train, val = [], []
    for idx in rest:
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_split))
        if val_split > 0 and len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])

    def as_idx(v):
        return np.sort(np.asarray(v, dtype=np.int64))
    return as_idx(train), as_idx(val), as_idx(test)


@dataclass
class Splits:
    """The three splits of a run. Training sees `train` (fitting) and `val` (early stopping, best
    epoch, the parity gate); `test` (None when the run has none) is only ever evaluated."""
    classes: list[str]
    train: ImageSet
    val: ImageSet
    report: dict
    test: ImageSet | None = None


def _same_folder(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def load_splits(folder: str, size: int, val_split: float, seed: int, strict: bool = False,
                val_dir: str | None = None, test_split: float = 0.0, test_dir: str | None = None) -> Splits:
    """Scan the folder (and --val / --test folders) and split; the report goes to data_report.json.

    With `test_dir` its images are the test split (`test_split` is not used); otherwise
    `test_split` of every class of `folder` is held out first (see `stratified_split`).
    """
    for other, name in ((folder, "training folder"), (val_dir, "--val folder")):
        if test_dir and other and _same_folder(test_dir, other):
            raise UserError(f"--test {test_dir} is the {name}: the test split must be images nothing was tuned on")
    full = scan_folder(folder, size, strict)
    extra = []
    t_idx, v_idx, s_idx = stratified_split(full, 0.0 if val_dir else val_split, seed,
                                           0.0 if test_dir else test_split)
    if val_dir:
        train = full if len(s_idx) == 0 else full.subset(t_idx)   # val_split 0: t_idx is all but test
        val = scan_folder(val_dir, size, strict, classes=full.classes)
        extra.append(val)
    else:
        train, val = full.subset(t_idx), full.subset(v_idx)
    if test_dir:
        test = scan_folder(test_dir, size, strict, classes=full.classes)
        extra.append(test)
        if len(test.y) == 0:
            raise UserError(f"no readable images in the --test folder {test_dir}")
    else:
        test = full.subset(s_idx) if len(s_idx) else None
    if len(val.y) == 0:
        raise UserError("the validation split is empty: use more images, a larger --val-split or --val DIR")
    skipped = full.skipped + [s for e in extra for s in e.skipped]
    converted = Counter(full.converted)
    for e in extra:
        converted.update(e.converted)
    report = {
        "folder": str(folder), "val_folder": val_dir, "test_folder": test_dir, "image_size": size,
        "classes": full.classes,
        "train_per_class": train.counts(), "val_per_class": val.counts(),
        "test_per_class": test.counts() if test is not None else {},
        "n_train": int(len(train.y)), "n_val": int(len(val.y)), "n_test": int(len(test.y)) if test is not None else 0,
        "converted_to_rgb": dict(converted),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    return Splits(full.classes, train, val, report, test)


def run_splits(cfg) -> Splits:
    """The split a run was trained on, rebuilt from its config (same folder, size and seed).

    Read the config with `config.from_yaml_file`: a run made before edgeft had a test split then
    has `test_split` 0 and gets back exactly its old train/val split.
    """
    from .demo_run import data_folder

    if not cfg.data.image_size:
        raise UserError("the run's config.yaml has no image_size: not a finished edgeft run")
    return load_splits(data_folder(cfg), cfg.data.image_size, cfg.data.val_split, cfg.train.seed,
                       cfg.data.strict, cfg.data.val_dir, cfg.data.test_split, cfg.data.test_dir)


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
