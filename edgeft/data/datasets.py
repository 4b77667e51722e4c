"""Image folder -> decoded image cache on disk -> stratified split -> streaming tf.data pipelines.

The pre-flight scan decodes every file exactly once (in threads) into the on-disk image cache
(edgeft.data.cache): broken files are found before any training starts, and every later stage and
command reads the decoded pixels from there, a batch at a time, instead of decoding again or
holding the folder in memory.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from edgeft.core.errors import UserError
from edgeft.data.cache import ArrayStore, open_or_build
from edgeft.data.images import list_folder

log = logging.getLogger(__name__)


@dataclass
class ImageSet:
    """Images of one folder (or a split of it): rows of an image store (the on-disk cache, see
    edgeft.data.cache) with their labels. Pixels are read on demand, a batch at a time; nothing here
    holds the whole folder in memory."""
    classes: list[str]
    store: object                 # edgeft.data.cache.ImageStore or ArrayStore: read(rows) -> uint8 NHWC
    rows: np.ndarray              # this set's rows of the store
    y: np.ndarray                 # int32 labels
    paths: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)   # source PIL mode -> count
    sha256: list[str] | None = None   # of each file's bytes (None: images made in memory)
    nbytes: list[int] | None = None   # each file's size in bytes

    @classmethod
    def from_arrays(cls, classes: list[str], x: np.ndarray, y: np.ndarray, paths: list[str] | None = None) -> "ImageSet":
        return cls(list(classes), ArrayStore(x), np.arange(len(y)), np.asarray(y, np.int32),
                   list(paths) if paths is not None else [f"#{i}" for i in range(len(y))])

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.store.shape)

    def read(self, idx) -> np.ndarray:
        """uint8 images idx (positions in this set), in that order."""
        return self.store.read(self.rows[np.asarray(idx, np.int64).reshape(-1)])

    @property
    def x(self) -> np.ndarray:
        """Every image of the set as one uint8 array: for small sets (tests, a few hundred images)
        only; stages stream with `batches` or `data.make_dataset`."""
        return self.read(np.arange(len(self.y)))

    def batches(self, batch_size: int = 64):
        """(positions, uint8 images) a batch at a time, in order."""
        for i in range(0, len(self.y), batch_size):
            idx = np.arange(i, min(i + batch_size, len(self.y)))
            yield idx, self.read(idx)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        idx = np.asarray(idx, np.int64)
        pick = (lambda v: None if v is None else [v[i] for i in idx])
        return ImageSet(self.classes, self.store, self.rows[idx], self.y[idx], [self.paths[i] for i in idx],
                        sha256=pick(self.sha256), nbytes=pick(self.nbytes))

    def counts(self) -> dict[str, int]:
        n = np.bincount(self.y, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, n)}


def scan_folder(folder: str, size: int, strict: bool = False, classes: list[str] | None = None,
                workers: int = 8, ignore_extra: bool = False) -> ImageSet:
    """Every image of `folder`, decoded once into the on-disk image cache (or read from it when
    the folder is unchanged); unreadable files are skipped (or, with strict, refused)."""
    listing = list_folder(folder, classes, ignore_extra)
    entry = open_or_build(folder, listing.files, size, workers)
    if not entry.built:
        # a read, not work: in the log (the console of a command that decodes nothing stays short)
        log.debug(f"data: {len(listing.files)} images of {folder}, {size} px, from the image cache")
        log.debug(f"data: image cache {entry.store.path} (decoded once, checked)")
    skipped = list(listing.skipped)
    keep, ys, paths, modes, hashes, sizes = [], [], [], Counter(), [], []
    for i, ((path, label), mode, reason) in enumerate(zip(listing.files, entry.modes, entry.reasons)):
        if reason is not None:
            skipped.append((path, f"cannot decode: {reason}"))
            continue
        keep.append(i)
        ys.append(label)
        paths.append(path)
        hashes.append(entry.sha256[i])
        sizes.append(entry.sizes[i])
        if mode != "RGB":
            modes[mode] += 1
    if strict and skipped:
        raise UserError(f"{len(skipped)} unusable file(s) in {folder} (--strict), first: "
                        f"{skipped[0][0]}: {skipped[0][1]}")
    y = np.asarray(ys, dtype=np.int32)
    present = np.bincount(y, minlength=len(listing.classes))
    empty = [c for c, n in zip(listing.classes, present) if n == 0]
    if empty and classes is None:
        raise UserError(f"class(es) with no readable images in {folder}: {', '.join(empty)}")
    return ImageSet(listing.classes, entry.store, np.asarray(keep, np.int64), y, paths, skipped, dict(modes),
                    sha256=hashes, nbytes=sizes)


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


def duplicate_groups(images: ImageSet) -> np.ndarray:
    """For every image, the position of the first image with the same bytes (its own position when
    it has no copy, or when the set has no hashes)."""
    first = np.arange(len(images.y), dtype=np.int64)
    if images.sha256 is None:
        return first
    seen: dict[str, int] = {}
    for i, h in enumerate(images.sha256):
        if h is not None:
            first[i] = seen.setdefault(h, i)
    return first


def stratified_split(images: ImageSet, val_split: float, seed: int,
                     test_split: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, val and test indices (sorted), stratified per class and seeded.

    The test split is taken first: `test_split` of every class (at least one image when the class
    has 3 or more), drawn by its own generator. The validation split is then drawn exactly as
    without a test split, from what is left: `val_split` of every class (at least one image when
    the class has 2 or more left). So `test_split=0` gives the split edgeft made before it had a
    test split, image for image.

    Byte-identical files (same sha256) are one group and go to one side together: the draw is over
    each group's first image (counted in its class), and its copies follow it. A folder without
    copies is split exactly as before groups existed.
    """
    groups = duplicate_groups(images)
    reps = np.flatnonzero(groups == np.arange(len(groups)))
    test_rng = np.random.default_rng([seed, 7919])   # independent of the validation draw below
    rest, test = [], []
    for label in range(len(images.classes)):
        idx = reps[images.y[reps] == label]
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

    def as_idx(v):   # the chosen groups' first images, with every copy of each
        return np.sort(np.flatnonzero(np.isin(groups, np.asarray(v, dtype=np.int64))))
    return as_idx(train), as_idx(val), as_idx(test)


def duplicates_report(images: ImageSet) -> dict:
    """How many files are byte-identical copies of another file of the folder (kept on one side of
    the split with it), and how many such groups span two classes (the same image, two labels)."""
    groups = duplicate_groups(images)
    copies = int(np.sum(groups != np.arange(len(groups))))
    members: dict[int, set] = {}
    for i in np.flatnonzero(groups != np.arange(len(groups))):
        g = int(groups[i])
        members.setdefault(g, {int(images.y[g])}).add(int(images.y[i]))
    multi = [g for g, labels in members.items() if len(labels) > 1]
    first = next((images.paths[g] for g in multi), None)
    return {"copies": copies, "groups": len(members), "groups_across_classes": len(multi),
            "first_across_classes": first}


def check_disjoint(sets: dict[str, "ImageSet | None"]) -> None:
    """UserError unless no file's bytes are in two of the sets (train / val / test, wherever each
    came from): a copied or renamed image in validation or test is an image the model trained on."""
    named = [(k, v) for k, v in sets.items() if v is not None and v.sha256 is not None]
    for i, (a, sa) in enumerate(named):
        index = {h: p for h, p in zip(sa.sha256, sa.paths)}
        for b, sb in named[i + 1:]:
            both = [(p, index[h]) for h, p in zip(sb.sha256, sb.paths) if h in index]
            if both:
                raise UserError(f"{len(both)} {b} image(s) are byte-identical to {a} images, first: {both[0][0]} "
                                f"= {both[0][1]}: the {b} split must hold images the model did not see; remove "
                                f"the copies or choose another folder")


def unmeasured_classes(classes: list[str], train: ImageSet, val: ImageSet, test: ImageSet | None) -> list[str]:
    """A warning for each class that trains with no validation image (a class of one image: the
    split keeps it for training): its accuracy is never measured, early stopping and the parity
    gate never see it."""
    n_train, n_val = train.counts(), val.counts()
    n_test = test.counts() if test is not None else {}
    return [f"class {c!r} has no validation image{'' if n_test.get(c) else ' and no test image'} "
            f"({n_train.get(c, 0)} training image(s)): its accuracy is not measured; add images to it"
            for c in classes if n_val.get(c, 0) == 0]


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


def check_extra_folders(folder: str, val_dir: str | None, test_dir: str | None) -> None:
    """Refuses a --val or --test folder that is the training folder (or the other one): their
    images would be images the model trained or was tuned on. Needs no decoding (see
    `check_disjoint` for copies under another name)."""
    for extra, flag in ((val_dir, "--val"), (test_dir, "--test")):
        if extra and _same_folder(extra, folder):
            raise UserError(f"{flag} {extra} is the training folder: its images would be images the model "
                            f"trained on; give a folder of other images (or leave {flag} out to split off part of "
                            f"the training folder)")
    if val_dir and test_dir and _same_folder(val_dir, test_dir):
        raise UserError(f"--test {test_dir} is the --val folder: the test split must be images nothing was tuned on")


OLD_OR_ZERO = "run made before edgeft had one, or --test-split 0"
TEST_SPLIT_MIN = 3   # images of a class (copies counted once) for one test image: 1 test, 1 validation, 1 training


def no_test_reason(report: dict, test_split: float) -> str:
    """Why a run's split has no test images (report: its data_report.json): --test-split 0 (also
    every run made before edgeft had a test split), or no class with TEST_SPLIT_MIN images."""
    if test_split <= 0 or report.get("test_folder"):
        return OLD_OR_ZERO
    per_class = [report.get("train_per_class", {}).get(c, 0) + report.get("val_per_class", {}).get(c, 0)
                 for c in report.get("classes", [])]
    return (f"every class has fewer than the {TEST_SPLIT_MIN} images a test split needs (1 test, 1 validation, "
            f"1 training; copies count once), the largest {max(per_class, default=0)}: add images, or give --test FOLDER")


def load_splits(folder: str, size: int, val_split: float, seed: int, strict: bool = False,
                val_dir: str | None = None, test_split: float = 0.0, test_dir: str | None = None) -> Splits:
    """Scan the folder (and --val / --test folders) and split; the report goes to data_report.json.

    With `test_dir` its images are the test split (`test_split` is not used); otherwise
    `test_split` of every class of `folder` is held out first (see `stratified_split`). The
    splits are disjoint by content: copies inside the folder stay on one side, and a --val or
    --test image byte-identical to another split's image is refused (`check_disjoint`).
    """
    check_extra_folders(folder, val_dir, test_dir)
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
    check_disjoint({"training": train, "validation": val, "test": test})
    if len(val.y) == 0:
        raise UserError("the validation split is empty: use more images, a larger --val-split or --val DIR")
    splits = _splits(folder, size, val_dir, test_dir, full, train, val, test, extra)
    if test is None and test_split > 0 and not test_dir:
        log.warning(f"no test split: {no_test_reason(splits.report, test_split)}")
    return splits


def _splits(folder, size, val_dir, test_dir, full: ImageSet, train: ImageSet, val: ImageSet,
            test: ImageSet | None, extra: list[ImageSet], recorded: bool = False) -> Splits:
    """The Splits with their report (data_report.json); warnings printed."""
    for warning in unmeasured_classes(full.classes, train, val, test):
        log.warning(warning)
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
        "duplicates": duplicates_report(full),
    }
    return Splits(full.classes, train, val, report, test)


def row_dataset(read, y: np.ndarray, shape: tuple, dtype, batch_size: int, shuffle: bool = False,
                seed: int = 0, shard: tuple[int, int] | None = None, repeat: bool = False):
    """tf.data over rows that `read(positions) -> array` fetches a batch at a time: positions are
    shuffled (not pixels), batched, then read in parallel and prefetched. Only a few batches are
    ever in memory, whatever the size of the dataset.

    `shard=(k, i)`: input pipeline i of k (a multi-worker worker) reads only its own rows: every
    worker shuffles the positions the same way (same seed), keeps the first n - n % k of them
    (equal shares, so every worker runs the same number of steps) and takes every k-th one.
    """
    from edgeft._keras import tf

    n = len(y)
    ds = tf.data.Dataset.from_tensor_slices((np.arange(n, dtype=np.int64), np.asarray(y)))
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    if shard is not None and shard[0] > 1:
        ds = ds.take(n - n % shard[0]).shard(shard[0], shard[1])
    tf_dtype = tf.as_dtype(np.dtype(dtype))

    def load(idx, label):
        rows = tf.numpy_function(read, [idx], tf_dtype, stateful=False)
        return tf.ensure_shape(rows, (None,) + tuple(shape)), label

    ds = ds.batch(batch_size)
    if repeat:   # epoch after epoch (reshuffled each time), for fit(steps_per_epoch=...)
        ds = ds.repeat()
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)


def make_dataset(images: ImageSet, batch_size: int, shuffle: bool = False, augment: str | bool | None = None,
                 seed: int = 0, shard: tuple[int, int] | None = None, repeat: bool = False):
    """tf.data pipeline streamed from the image cache: shuffle -> batch -> read -> augment -> prefetch.

    Pixels stay uint8 until read (4x less I/O) and become float32 0-255, the model's input contract.
    `augment`: a policy name of edgeft.data.augment (training only), None / "none" for none.
    """
    from edgeft._keras import tf
    from edgeft.data import augment as aug

    ds = row_dataset(images.read, images.y, images.shape, np.uint8, batch_size, shuffle, seed, shard, repeat)
    ds = ds.map(lambda a, b: (tf.cast(a, tf.float32), b), num_parallel_calls=tf.data.AUTOTUNE)
    ds = aug.online(ds, augment, seed)
    return ds.prefetch(tf.data.AUTOTUNE)


def representative_images(train: ImageSet, n: int, seed: int, warn: bool = True) -> np.ndarray:
    """Up to `n` training images (seeded sample) as float32 0-255: int8 calibration data. `warn`: say
    so when they are few (recovery's histogram calibrators take few on purpose)."""
    n = min(n, len(train.y))
    if n < 100 and warn:
        log.info(f"int8: only {n} representative images for calibration (100-500 recommended)")
    idx = np.random.default_rng(seed).permutation(len(train.y))[:n]
    return train.read(np.sort(idx)).astype(np.float32)


@dataclass
class ParityInputs:
    """What the parity gate compares on: validation images and deterministic augmented copies."""
    x: np.ndarray          # float32 NHWC 0-255
    y: np.ndarray          # labels (an augmented copy keeps its image's label)
    source: np.ndarray     # index into the validation split
    copy: np.ndarray       # 0: the image itself; k > 0: its k-th augmented copy
    paths: list[str]
    policy: str = "mild"   # how the copies were made (PARITY_AUGMENT)

    def describe(self, i: int) -> str:
        p = self.paths[int(self.source[i])]
        return p if self.copy[i] == 0 else f"{p} (augmented copy {int(self.copy[i])})"


def augment_copy(img: np.ndarray, rng: np.random.Generator, flip: bool = False) -> np.ndarray:
    """A plausible camera variation of `img` (uint8 HWC): a shift of up to 6 % of the size (edges
    repeated), contrast x0.9-1.1 and brightness +-12 levels; mirrored half the time when `flip`
    (only for runs that trained with mirroring: a mirrored digit is not a digit)."""
    mirror = rng.random() < 0.5
    out = img[:, ::-1] if flip and mirror else img
    h, w = out.shape[:2]
    s = max(1, round(0.06 * min(h, w)))
    dy, dx = rng.integers(-s, s + 1, 2)
    out = np.pad(out, ((s, s), (s, s), (0, 0)), mode="edge")[s + dy:s + dy + h, s + dx:s + dx + w]
    out = out.astype(np.float32) * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12)
    return np.clip(np.round(out), 0, 255)


PARITY_AUGMENT = ("mild", "flip", "none")


def parity_policy(cfg) -> str:
    """The gate's copies follow what the run trained on: mirrored only when its augmentation policy
    mirrors (photo, flip-rotate-zoom; a run's config.yaml holds the policy auto chose);
    `--parity-augment` overrides."""
    from edgeft.data.augment import POLICIES

    chosen = cfg.parity.parity_augment
    if chosen != "auto":
        return chosen
    p = POLICIES.get(cfg.data.augment_policy)
    return "flip" if p is not None and p.mirrors else "mild"


def gate_inputs(val: ImageSet, cfg) -> ParityInputs:
    """The parity inputs of a run: its validation split and copies made by its policy."""
    return parity_inputs(val, cfg.parity.parity_inputs, cfg.train.seed, parity_policy(cfg))


def parity_inputs(val: ImageSet, n: int, seed: int, policy: str = "mild") -> ParityInputs:
    """The validation split, then augmented copies (round-robin over the images, seeded) until
    there are `n` inputs; a split larger than `n` is sampled down to `n` (seeded). Policy "none":
    the validation images alone (no copies)."""
    if policy not in PARITY_AUGMENT:
        raise ValueError(f"unknown parity augmentation {policy!r}")
    m = len(val.y)
    rng = np.random.default_rng(seed + 7)
    if m >= n or policy == "none":
        k = min(m, n)
        src = np.sort(rng.permutation(m)[:k])
        inputs = ParityInputs(val.read(src).astype(np.float32), val.y[src], src, np.zeros(k, np.int64), val.paths)
        inputs.policy = policy
        return inputs
    src = np.arange(n) % m
    copy = np.arange(n) // m
    pixels = val.x   # m < n, and n is the gate's input count (1,000 by default): small
    x = np.empty((n,) + pixels.shape[1:], np.float32)
    x[:m] = pixels
    for i in range(m, n):
        x[i] = augment_copy(pixels[src[i]], rng, policy == "flip")
    inputs = ParityInputs(x, val.y[src], src, copy, val.paths)
    inputs.policy = policy
    return inputs
