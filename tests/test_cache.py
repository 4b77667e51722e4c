"""The on-disk image cache: decode once, reuse while the folder is unchanged, rebuild (with a
message) when it changed or the entry is damaged; never trust a row without its check."""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from edgeft.core.errors import UserError
from edgeft.data import cache
from edgeft.data.datasets import ImageSet, make_dataset, scan_folder
from edgeft.data.images import load_image


def _folder(root, per_class=5, size=(20, 14)):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def _entries(root):
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("folders", cache.MACHINES)
                  and not p.name.startswith("."))


def test_a_folder_is_decoded_once_and_read_back_from_the_cache(tmp_path, own_cache, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG, logger="edgeft")
    folder = _folder(tmp_path / "data")
    first = scan_folder(str(folder), 16)
    assert "from the image cache" not in caplog.text
    (entry,) = _entries(own_cache)
    assert (entry / "images.u8").stat().st_size == 10 * 16 * 16 * 3

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(cache, "decode_image", no_decoding)
    caplog.clear()
    again = scan_folder(str(folder), 16)
    assert "from the image cache" in caplog.text   # in the run's log (DEBUG), not on the console
    assert again.paths == first.paths and np.array_equal(again.y, first.y)
    assert np.array_equal(again.x, first.x)
    for row, path in zip(again.x, again.paths):       # the cached pixels are the decoder's pixels
        assert np.array_equal(row, load_image(path, 16))


def test_another_size_is_another_entry(tmp_path, own_cache):
    folder = _folder(tmp_path / "data")
    scan_folder(str(folder), 16)
    scan_folder(str(folder), 8)
    assert sorted(p.name.split("-")[-1] for p in _entries(own_cache)) == ["16px", "8px"]


def test_a_changed_folder_is_decoded_again_and_its_old_entry_removed(tmp_path, own_cache, capsys):
    folder = _folder(tmp_path / "data")
    scan_folder(str(folder), 16)
    (old,) = _entries(own_cache)
    arr = np.full((14, 20, 3), 7, np.uint8)
    Image.fromarray(arr).save(folder / "a" / "new.png")
    s = scan_folder(str(folder), 16)
    assert "changed since it was cached" in capsys.readouterr().out
    (new,) = _entries(own_cache)
    assert new != old and len(s.y) == 11
    assert np.array_equal(s.x[s.paths.index(str(folder / "a" / "new.png"))], load_image(folder / "a" / "new.png", 16))
    # a file rewritten with other pixels (same name) is a change too
    Image.fromarray(np.full((14, 20, 3), 200, np.uint8)).save(folder / "a" / "new.png")
    os.utime(folder / "a" / "new.png", ns=(1, 1))
    s = scan_folder(str(folder), 16)
    assert s.x[s.paths.index(str(folder / "a" / "new.png"))].mean() == pytest.approx(200, abs=1)


@pytest.mark.parametrize("damage, why", [
    ("truncate", "has .* bytes"),
    ("edit", "modified after it was written"),
    ("bitflip_same_mtime", "fails its CRC"),
    ("no_index", "no complete index"),
])
def test_a_damaged_entry_is_rebuilt_not_trusted(tmp_path, own_cache, capsys, damage, why):
    folder = _folder(tmp_path / "data")
    good = scan_folder(str(folder), 16).x
    (entry,) = _entries(own_cache)
    data = entry / "images.u8"
    st = data.stat()
    if damage == "truncate":
        with open(data, "r+b") as f:
            f.truncate(st.st_size - 10)
    elif damage in ("edit", "bitflip_same_mtime"):
        with open(data, "r+b") as f:
            f.seek(5 * 16 * 16 * 3 + 10)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
        if damage == "bitflip_same_mtime":
            os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        (entry / "index.json").unlink()
    again = scan_folder(str(folder), 16)
    out = capsys.readouterr().out
    assert "not usable" in out and re.search(why, out), out
    assert np.array_equal(again.x, good)


def test_every_row_read_is_checked(tmp_path, own_cache):
    folder = _folder(tmp_path / "data", per_class=40)   # 80 rows: more than the 64 sampled at open
    s = scan_folder(str(folder), 16)
    (entry,) = _entries(own_cache)
    index = json.loads((entry / "index.json").read_text())
    store = cache.ImageStore(entry, index["n"], 16, index["crc"])
    row = 37
    with open(entry / "images.u8", "r+b") as f:
        f.seek(row * 16 * 16 * 3)
        f.write(b"\x00\x01\x02")
    with pytest.raises(cache.CacheError, match="corrupt"):
        store.read([row])
    assert not (entry / "index.json").exists()           # so the next command decodes again
    assert len(scan_folder(str(folder), 16).y) == len(s.y)


def test_an_interrupted_build_leaves_no_entry(tmp_path, own_cache, monkeypatch):
    folder = _folder(tmp_path / "data")
    calls = {"n": 0}
    real = cache.decode_image

    def dies_half_way(path, size):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(path, size)
    monkeypatch.setattr(cache, "decode_image", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        scan_folder(str(folder), 16, workers=1)
    assert _entries(own_cache) == [] and not list(own_cache.glob(".build-*"))
    monkeypatch.setattr(cache, "decode_image", real)
    assert len(scan_folder(str(folder), 16).y) == 10


def test_no_room_on_the_cache_disk_is_one_clear_error_before_decoding(tmp_path, own_cache, monkeypatch):
    import shutil
    from collections import namedtuple

    folder = _folder(tmp_path / "data")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    monkeypatch.setattr(cache, "decode_image", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    with pytest.raises(UserError, match="image cache .* margin, but only 1.0 MB is free"):
        scan_folder(str(folder), 224)


def test_the_pipeline_streams_a_few_batches_not_the_dataset(tmp_path, own_cache):
    folder = _folder(tmp_path / "data", per_class=100)
    s = scan_folder(str(folder), 8)
    reads = []
    real = s.store.read

    def counting(rows):
        reads.append(len(rows))
        return real(rows)
    s.store.read = counting
    x, y = next(iter(make_dataset(s, 4, shuffle=True, seed=0)))
    assert tuple(x.shape) == (4, 8, 8, 3) and x.dtype.name == "float32"
    assert 0 < sum(reads) < len(s.y) / 2, reads          # a few prefetched batches, not 200 images
    # labels stay with their pixels through the shuffle
    pixels = {s.x[i].tobytes(): int(s.y[i]) for i in range(len(s.y))}
    for xb, yb in make_dataset(s, 16, shuffle=True, seed=3):
        for img, label in zip(xb.numpy().astype(np.uint8), yb.numpy()):
            assert pixels[img.tobytes()] == label


def test_stage1_features_on_disk_equal_features_in_memory(tmp_path, monkeypatch):
    from edgeft.train import stage1 as training
    from edgeft.core.config import build_config
    from edgeft.data.augment import POLICIES
    from edgeft.nn.model import build_model, feature_extractor

    cfg = build_config({"backbone": "mobilenet_v2", "alpha": 0.35, "image_size": 32, "weights": "none",
                        "head": "gap", "dense": 8})
    model = build_model(cfg.model, 32, 3)
    rng = np.random.default_rng(0)
    images = ImageSet.from_arrays(["a", "b", "c"], rng.integers(0, 256, (21, 32, 32, 3), dtype=np.uint8),
                                  rng.integers(0, 3, 21))
    extractor = feature_extractor(model)
    in_ram, _ = training.cache_features(extractor, images, 8, "features", tmp_path / "a.f32")
    monkeypatch.setattr(training, "FEATURES_IN_RAM", 0)
    on_disk, _ = training.cache_features(extractor, images, 8, "features", tmp_path / "b.f32")
    assert in_ram.in_ram and not on_disk.in_ram and (tmp_path / "b.f32").is_file()
    assert np.allclose(on_disk.rows.read(np.arange(21)), in_ram.rows, atol=1e-6)
    for (fa, ya), (fb, yb) in zip(in_ram.dataset(images.y, 5, True, 1), on_disk.dataset(images.y, 5, True, 1)):
        assert np.allclose(fa.numpy(), fb.numpy(), atol=1e-6) and np.array_equal(ya.numpy(), yb.numpy())
    on_disk.close()
    assert not (tmp_path / "b.f32").exists()
    # two views on disk: view 0 is the images themselves, view 1 an augmented (photo) copy of each
    views, flipped = training.cache_features(extractor, images, 8, "features", tmp_path / "c.f32", views=2,
                                             pol=POLICIES["photo"], seed=3)
    both = views.rows.read(np.arange(42))
    scale = np.abs(in_ram.rows).max()   # random weights: features are tiny, compare relative to them
    assert np.abs(both[:21] - in_ram.rows).max() <= 1e-5 * scale
    assert np.abs(both[21:] - in_ram.rows).max() > 1e-2 * scale
    assert not flipped[:21].any() and 0 < flipped[21:].sum() < 21
    views.close()


def test_multiworker_shards_read_disjoint_rows_of_equal_count(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
    images = ImageSet.from_arrays(["a", "b"], x, rng.integers(0, 2, 23))
    seen = {}
    for worker in (0, 1):
        rows = []
        real = images.store.read
        images.store.read = lambda r, real=real: rows.extend(int(i) for i in r) or real(r)
        epochs = []
        ds = make_dataset(images, 3, shuffle=True, seed=5, shard=(2, worker))
        for _ in range(2):
            rows.clear()
            n = sum(len(yb) for _, yb in ds)
            epochs.append((n, sorted(rows)))
        images.store.read = real
        seen[worker] = epochs
    for epoch in range(2):
        (n0, r0), (n1, r1) = seen[0][epoch], seen[1][epoch]
        assert n0 == n1 == 11 and len(r0) == len(r1) == 11       # equal shares: same number of steps
        assert set(r0).isdisjoint(r1) and len(set(r0) | set(r1)) == 22
    assert seen[0][0][1] != seen[0][1][1]                          # reshuffled between epochs


def test_building_the_cache_opens_each_image_once_and_records_its_mode(tmp_path, own_cache, monkeypatch):
    """The decoder hands back the file's PIL mode with its pixels: no second open for the mode."""
    folder = _folder(tmp_path / "data", per_class=3)
    Image.fromarray(np.zeros((14, 20), np.uint8)).save(folder / "a" / "grey.png")   # mode L: converted
    opened = []
    real_open = Image.open

    def counting_open(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", counting_open)
    s = scan_folder(str(folder), 16, workers=1)
    # one decode per file (from the bytes read once, which are hashed too: no second read)
    assert len(s.y) == 7 and len(opened) == 7
    assert s.converted == {"L": 1}
