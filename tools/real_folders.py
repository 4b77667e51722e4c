"""Real image folders nobody on this project made, from package registries, as TRAIN / TEST folders.

    python tools/real_folders.py fashion OUT        # Debian `dataset-fashion-mnist` (apt-get install it)
    python tools/real_folders.py emoji OUT          # npm `emoji-datasource-google` (fetched with `npm pack`)

fashion  Fashion-MNIST (Zalando, MIT licence; Debian package `dataset-fashion-mnist`, copyright
         "Expat"): 28 px grey product photos, 10 classes. TRAIN is drawn from the official training
         IDX file, TEST from the official test IDX file (two disjoint sets of photos); byte-identical
         images are dropped from both (they exist in Fashion-MNIST) and any TEST image whose pixels
         equal a TRAIN image is dropped. 50 training / 100 test images per class by default.
emoji    Noto Color Emoji as shipped in `emoji-datasource-google` (npm, MIT package; the Google/Noto
         images are Apache-2.0): 64 px drawings, one class per emoji.json `category` (Component left
         out: 9 classes). Skin-tone and gender variants of one emoji are near-copies: they form one
         group (code points less skin-tone modifiers, ZWJ, VS16 and gender signs, with man / woman /
         person as one), and a group goes wholly to TRAIN or TEST by a hash of its key (20 % TEST).
         Up to 60 training / 100 test images per class, whole groups, seeded.

Each folder is written once (OUT/<name>/train, OUT/<name>/test, OUT/<name>/folder.json with the
per-class counts, the source package and version, the licence and the split rule); run again,
it is kept. The choice of images is fixed by the rule above, before anything is measured on it.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
EMOJI_PACKAGE, EMOJI_VERSION = "emoji-datasource-google", "16.0.0"
_SKIN = {f"1F3F{c}" for c in "BCDEF"}
_DROP = _SKIN | {"200D", "FE0F", "2640", "2642"}
_PERSON = {"1F468": "P", "1F469": "P", "1F9D1": "P", "1F466": "P", "1F467": "P", "1F474": "P", "1F475": "P",
           "1F9D3": "P", "1F471": "P", "1F473": "P"}


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _pick(y: np.ndarray, keep: np.ndarray, per_class: int, rng) -> list[int]:
    out = []
    for c in range(int(y.max()) + 1):
        idx = np.flatnonzero((y == c) & keep)
        out.extend(sorted(rng.permutation(idx)[:per_class].tolist()))
    return out


def fashion(out: Path, train_per_class: int = 50, test_per_class: int = 100, seed: int = 0) -> dict:
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"{FASHION_DIR} not found: apt-get install dataset-fashion-mnist")
    xtr, ytr = _idx(FASHION_DIR / "train-images-idx3-ubyte.gz"), _idx(FASHION_DIR / "train-labels-idx1-ubyte.gz")
    xte, yte = _idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"), _idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz")

    def digests(x):
        return [hashlib.sha256(a.tobytes()).hexdigest() for a in x]

    htr, hte = digests(xtr), digests(xte)
    seen: dict[str, int] = {}
    keep_tr = np.array([seen.setdefault(h, i) == i for i, h in enumerate(htr)])
    train_set = set(htr)
    seen = {}
    keep_te = np.array([seen.setdefault(h, i) == i and h not in train_set for i, h in enumerate(hte)])
    rng = np.random.default_rng(seed)
    rows = {"train": (_pick(ytr, keep_tr, train_per_class, rng), xtr, ytr),
            "test": (_pick(yte, keep_te, test_per_class, rng), xte, yte)}
    counts = {}
    for part, (idx, x, y) in rows.items():
        for i in idx:
            _save(x[i], out / part / FASHION_CLASSES[y[i]] / f"{part}{i:05d}.png")
        counts[part] = {FASHION_CLASSES[c]: int(np.sum(y[idx] == c)) for c in range(10)}
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "dataset-fashion-mnist"], capture_output=True,
                             text=True).stdout.strip()
    return {"name": "fashion", "source": f"Debian package dataset-fashion-mnist {version}",
            "licence": "MIT (Zalando Research; Debian copyright: Expat)",
            "rule": f"train: {train_per_class}/class from the official training IDX file, test: {test_per_class}/class "
                    f"from the official test IDX file, seed {seed}; byte-identical images dropped, test images equal "
                    f"to a training image dropped", "image": "28 x 28 grey PNG", "counts": counts,
            "dropped_duplicates": {"train": int((~keep_tr).sum()), "test": int((~keep_te).sum())}}


def emoji_group(unified: str) -> str:
    """The key shared by an emoji's skin-tone and gender variants."""
    parts = [_PERSON.get(p, p) for p in unified.upper().split("-") if p not in _DROP]
    return "-".join(parts)


def emoji(out: Path, train_per_class: int = 60, test_per_class: int = 100, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", f"{EMOJI_PACKAGE}@{EMOJI_VERSION}", "--silent"], cwd=tmp, check=True,
                       capture_output=True)
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as tar:
            meta = json.load(tar.extractfile("package/emoji.json"))
            items = []
            for e in meta:
                if e.get("category") == "Component" or not e.get("has_img_google"):
                    continue
                variants = [(e["unified"], e["image"])]
                variants += [(v["unified"], v["image"]) for v in (e.get("skin_variations") or {}).values()
                             if v.get("has_img_google")]
                for uni, image in variants:
                    items.append((e["category"], emoji_group(e["unified"]), uni, image))
            groups: dict[tuple[str, str], list] = {}
            for cat, key, uni, image in items:
                groups.setdefault((cat, key), []).append((uni, image))
            rng = np.random.default_rng(seed)
            chosen = {"train": [], "test": []}
            for cat in sorted({c for c, _ in groups}):
                keys = sorted(k for c, k in groups if c == cat)
                keys = [keys[i] for i in rng.permutation(len(keys))]
                for part, limit in (("train", train_per_class), ("test", test_per_class)):
                    n = 0
                    for k in keys:
                        if (int(hashlib.sha256(k.encode()).hexdigest(), 16) % 5 == 0) != (part == "test"):
                            continue
                        members = groups[(cat, k)]
                        if n + len(members) > limit and n > 0:
                            continue
                        chosen[part].extend((cat, m) for m in members)
                        n += len(members)
            counts = {}
            for part, rows in chosen.items():
                for cat, (uni, image) in rows:
                    dest = out / part / cat.lower().replace(" & ", "_").replace(" ", "_") / image
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(f"package/img/google/64/{image}") as src, open(dest, "wb") as f:
                        shutil.copyfileobj(src, f)
                counts[part] = {}
                for cat, _ in rows:
                    name = cat.lower().replace(" & ", "_").replace(" ", "_")
                    counts[part][name] = counts[part].get(name, 0) + 1
    return {"name": "emoji", "source": f"npm package {EMOJI_PACKAGE} {EMOJI_VERSION}",
            "licence": "images: Apache-2.0 (Noto Emoji); package: MIT",
            "rule": f"class = emoji.json category (Component left out); skin-tone and gender variants grouped; a group "
                    f"goes to test when sha256(group key) % 5 == 0; up to {train_per_class} train / {test_per_class} "
                    f"test images per class in whole groups, seed {seed}", "image": "64 x 64 RGBA PNG",
            "counts": counts}


BUILDERS = {"fashion": fashion, "emoji": emoji}


def build(name: str, out: Path) -> Path:
    """OUT/<name> with train/, test/ and folder.json (written once; kept when already complete)."""
    dest = out / name
    if (dest / "folder.json").is_file():
        return dest
    tmp = out / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    info = BUILDERS[name](tmp)
    (tmp / "folder.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument("name", choices=sorted(BUILDERS))
    ap.add_argument("out", type=Path)
    return ap


def main() -> None:
    a = build_parser().parse_args()
    dest = build(a.name, a.out)
    info = json.loads((dest / "folder.json").read_text())
    for part, c in info["counts"].items():
        print(f"{a.name} {part}: {sum(c.values())} images, " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))


if __name__ == "__main__":
    main()
