"""The pre-flight scan, the split and the tf.data pipeline."""
import json

import numpy as np
import pytest
from PIL import Image

from edgeft.core.errors import UserError
from edgeft.data.cache import check_disk_space
from edgeft.data.datasets import load_splits, make_dataset, scan_folder, stratified_split
from edgeft.data.images import load_image


def _img(path, mode="RGB", size=(20, 14), value=120):
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    img = Image.fromarray(arr)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("P")
    elif mode == "I;16":
        img = Image.fromarray(np.full((size[1], size[0]), 60000, np.uint16))
    img.save(path)


@pytest.fixture
def messy(tmp_path):
    a, b = tmp_path / "cat", tmp_path / "dog"
    a.mkdir()
    b.mkdir()
    _img(a / "ok.jpg")
    _img(a / "UPPER.PNG")
    _img(a / "grey.png", "L")
    _img(a / "alpha.png", "RGBA")
    _img(b / "pal.gif", "P")
    _img(b / "deep.png", "I;16")
    _img(b / "ok.BMP")
    _img(b / "x.jpeg")
    (a / "empty.jpg").write_bytes(b"")
    (a / "text.png").write_text("this is not a png")
    good = a / "trunc_src.jpg"
    _img(good, size=(64, 64))
    (a / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    good.unlink()
    (b / "readme.txt").write_text("notes")
    return tmp_path


def test_scan_skips_broken_files_and_converts_modes(messy):
    s = scan_folder(str(messy), 16)
    assert s.classes == ["cat", "dog"]
    assert s.x.shape == (8, 16, 16, 3) and s.x.dtype == np.uint8
    reasons = {p.split("/")[-1]: r for p, r in s.skipped}
    assert set(reasons) == {"empty.jpg", "text.png", "truncated.jpg", "readme.txt"}
    assert "not an image" in reasons["readme.txt"]
    assert all("cannot decode" in reasons[k] for k in ("empty.jpg", "text.png", "truncated.jpg"))
    assert {"L", "RGBA", "P", "I;16"} <= set(s.converted)
    # 16-bit greyscale is scaled down (60000/65535*255 = 233), not clipped to 255
    deep = s.x[[i for i, p in enumerate(s.paths) if p.endswith("deep.png")][0]]
    assert 225 <= deep.mean() <= 240
    # rows stay aligned with their paths after the skipped files' gaps are closed
    for row, path in zip(s.x, s.paths):
        assert np.array_equal(row, load_image(path, 16)), path


def test_a_cache_the_disk_cannot_hold_is_refused_before_decoding(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100 * 2**30, 90 * 2**30, 10 * 2**30))
    check_disk_space(1000 * 224 * 224 * 3, tmp_path, "imgs")        # 0.14 GiB of 10: fine
    with pytest.raises(UserError, match="needs 140.2 GiB in the image cache.*only 10.0 GiB.*EDGEFT_CACHE"):
        check_disk_space(1_000_000 * 224 * 224 * 3, tmp_path, "imgs")


def test_strict_makes_a_bad_file_an_error(messy):
    with pytest.raises(UserError, match="--strict"):
        scan_folder(str(messy), 16, strict=True)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: (p / "only").mkdir(parents=True), "at least 2 class"),
    (lambda p: [(p / c).mkdir(parents=True) for c in ("a", "b")], "no images"),
])
def test_bad_folders_are_user_errors(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(UserError, match=message):
        scan_folder(str(root), 16)


def test_stratified_split_is_seeded_and_keeps_every_class(tmp_path):
    for c, n, v0 in (("a", 10, 0), ("b", 5, 5)):   # no two files alike (copies are grouped)
        (tmp_path / c).mkdir()
        for i in range(n):
            _img(tmp_path / c / f"{i}.png", value=i * 10 + v0)
    s = scan_folder(str(tmp_path), 8)
    t1, v1, e1 = stratified_split(s, 0.2, seed=3)
    t2, v2, _ = stratified_split(s, 0.2, seed=3)
    assert np.array_equal(v1, v2) and np.array_equal(t1, t2) and len(e1) == 0   # no test split by default
    assert set(t1).isdisjoint(v1) and len(t1) + len(v1) == 15
    assert np.bincount(s.y[v1]).tolist() == [2, 1]
    _, v3, _ = stratified_split(s, 0.2, seed=4)
    assert not np.array_equal(v1, v3)


def test_load_splits_report_and_val_dir(messy, tmp_path):
    splits = load_splits(str(messy), 16, 0.25, seed=0)
    r = splits.report
    assert r["n_train"] + r["n_val"] == 8 and r["n_val"] >= 2
    assert splits.test is None and r["n_test"] == 0 and r["test_per_class"] == {}
    assert len(r["skipped"]) == 4
    json.dumps(r)  # must be serialisable for data_report.json
    with pytest.raises(UserError, match="not in the training data"):
        other = tmp_path / "val"
        (other / "horse").mkdir(parents=True)
        _img(other / "horse" / "h.png")
        load_splits(str(messy), 16, 0.2, 0, val_dir=str(other))


def test_dataset_yields_float_pixels_in_0_255(messy):
    s = scan_folder(str(messy), 16)
    x, y = next(iter(make_dataset(s, 4, shuffle=True, augment=True, seed=1)))
    assert x.dtype.name == "float32" and tuple(x.shape) == (4, 16, 16, 3)
    assert float(x.numpy().min()) >= 0.0 and float(x.numpy().max()) <= 255.0
    assert y.shape == (4,)
