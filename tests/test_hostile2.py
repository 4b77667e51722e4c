"""Hostile input, round 2 (issue 28): silent wrong results that are now refused or decoded right. The
refusals of typed values are property cases in tests/integrity_cases.py (exit 2, no TensorFlow, tree
unchanged); these are the cases that decode or compute."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin


def _png16(arr: np.ndarray, sbit: int | None = None) -> io.BytesIO:
    buf = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    if sbit:
        info.add(b"sBIT", bytes([sbit]))
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG", pnginfo=info)
    buf.seek(0)
    return buf


@pytest.mark.faults
def test_16_bit_images_are_scaled_by_their_bit_depth_not_per_image():
    """expected: two 16-bit PNGs that differ in one pixel decode every other pixel the same (decoder version
    2 scaled each by its own maximum: mean 124.0 against 0.47)."""
    from edgeft.device import DECODER_VERSION, decode_image

    a = np.full((16, 16), 31000)
    b = a.copy()
    a[0, 0], b[0, 0] = 65535, 200
    pa, mode = decode_image(_png16(a), 16)
    pb, _ = decode_image(_png16(b), 16)
    assert mode.startswith("I")
    assert np.array_equal(pa[1:], pb[1:]) and int(pa[5, 5, 0]) == round(31000 / 65535 * 255)
    assert abs(float(pa.mean()) - float(pb.mean())) < 1.0
    small = np.full((16, 16), 200)   # a dark 16-bit image stays dark (version 2 stretched it to 0-255)
    assert decode_image(_png16(small), 16)[0].max() <= 1
    assert DECODER_VERSION >= 3


def test_png_sbit_is_honoured():
    """12 significant bits: the samples shift right to 12 bits, then 0-4095 -> 0-255."""
    from edgeft.device import decode_image

    px, _ = decode_image(_png16(np.full((4, 4), 2048 << 4), sbit=12), 4)
    assert int(px[0, 0, 0]) == round(2048 / 4095 * 255)
    full, _ = decode_image(_png16(np.full((4, 4), 4095 << 4), sbit=12), 4)
    assert int(full[0, 0, 0]) == 255


def test_a_decoder_version_bump_rebuilds_the_cache():
    """The cache key holds the decoder's version: pixels of version 2 are never served as version 3's."""
    from edgeft.data import cache
    from edgeft.device import DECODER_VERSION

    assert f"v{DECODER_VERSION}" in cache.DECODER


def test_verify_says_when_golden_vectors_come_from_the_older_decoder(tmp_path, monkeypatch):
    """expected: a 16-bit golden input decoded by decoder version 2 (scaled by its own maximum) fails verify
    with the old decoder named and `edgeft export` as the remedy, not as a device decoding problem."""
    import json

    from edgeft import device

    golden = tmp_path / "golden"
    (golden / "inputs").mkdir(parents=True)
    arr = np.full((32, 32), 150)
    arr[0, 0] = 240
    (golden / "inputs" / "000.png").write_bytes(_png16(arr).getvalue())
    old = np.clip(arr / 255.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)   # version 2: max 240 <= 255, /255
    old_rgb = np.repeat(old[..., None], 3, axis=-1)
    (golden / device.GOLDEN_FILE).write_text(json.dumps({
        "format": device.GOLDEN_FORMAT, "version": device.GOLDEN_VERSION, "decoder_version": 2,
        "image_size": [32, 32], "labels": ["a", "b"],
        "inputs": [{"file": "inputs/000.png", "label": "a", "source": "a/x",
                    "pixels_sha256": device.pixels_sha256(old_rgb)}],
        "files": {"m.tflite": {"tier": "float", "max_abs_diff": 1e-4, "top1_must_match": False,
                               "outputs": [[0.5, 0.5]]}}}))
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")

    class Fake:
        input_hw, num_classes, runtime, runtime_version = (32, 32), 2, "fake", "0"

        def predict(self, batch):
            return np.full((len(batch), 2), 0.5, np.float32)

    monkeypatch.setattr(device, "open_runner", lambda *a, **k: Fake())
    result = device.verify(model, golden)
    assert not result["passed"]
    assert any("decoder version 2" in f and "edgeft export" in f for f in result["failures"]), result["failures"]


@pytest.mark.faults
def test_a_file_name_that_is_not_utf8_is_read(tmp_path):
    """expected: an image whose file name is not valid UTF-8 is decoded and cached like any other
    (the cache key encoded the path strictly: UnicodeEncodeError traceback)."""
    import contextlib
    import os

    from conftest import write_digit_folder
    from edgeft.data.datasets import scan_folder

    data = write_digit_folder(tmp_path / "data", per_class=4)
    os.rename(data / "five" / "000.png", os.fsdecode(bytes(data / "five") + b"/caf\xe9.png"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        s = scan_folder(str(data), 16)
    assert len(s.y) == 12 and any("caf" in p for p in s.paths)


@pytest.mark.faults
def test_too_few_images_for_a_test_split_says_so(tmp_path, capsys, caplog):
    """expected: a folder whose classes have 2 images each has no test split, and edgeft says why (too few
    images, how many a class needs), not "run made before edgeft had a test split, or --test-split 0"."""
    from conftest import write_digit_folder
    from edgeft.data.datasets import load_splits

    data = write_digit_folder(tmp_path / "data", per_class=2)
    with caplog.at_level("WARNING", logger="edgeft"):
        splits = load_splits(str(data), 16, 0.2, 0, test_split=0.1)
    err = capsys.readouterr().err + caplog.text   # the library logs to the edgeft logger (issue 29)
    assert splits.test is None
    assert "no test split" in err and "fewer than the 3 images a test split needs" in err, err
    assert "run made before" not in err
    from edgeft.train.report import NO_TEST_SPLIT, no_test_split_line

    line = no_test_split_line(splits.report, 0.1)
    assert "fewer than the 3 images" in line and "largest 2" in line and "run made before" not in line
    assert no_test_split_line(splits.report, 0.0) == NO_TEST_SPLIT   # --test-split 0 (and runs made before it)


@pytest.mark.faults
def test_a_fifo_given_as_an_image_is_named_for_what_it_is(tmp_path):
    """expected: a FIFO (or a device file) given as an image is refused as what it is (it said "image not
    found" of a path that exists), and reading it never blocks."""
    import os

    from edgeft.device import DeviceError, image_files

    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    with pytest.raises(DeviceError, match=r"is a FIFO \(named pipe\), not an image file"):
        image_files([str(fifo)])
    with pytest.raises(DeviceError, match="is a character device"):
        image_files(["/dev/null"])
    with pytest.raises(DeviceError, match="not found"):
        image_files([str(tmp_path / "missing.png")])


@pytest.mark.faults
def test_the_next_and_resume_hints_give_back_an_odd_run_directory(tmp_path, monkeypatch, capsys):
    """expected: a run directory named with a space and quotes, printed in `next: edgeft export RUN` and in the
    `--resume --out RUN` hint, comes back whole when the line is split as a shell splits it (it was printed
    bare: `edgeft export my run's "best"` is three words and an open quote). The orchestrator and finish()
    run for real; training and the reports are stand-ins (the hints are what is tested)."""
    import shlex
    from types import SimpleNamespace

    from edgeft.core.config import build_config
    from edgeft.pipeline import orchestrator
    from edgeft.train import stages

    run = tmp_path / "my run's \"best\""
    run.mkdir()
    trained = SimpleNamespace(run=run, wdir=run, cfg=build_config({"qat_epochs": 0}), splits=None, metrics={},
                              model=None, scope=SimpleNamespace(is_chief=True, cleanup=lambda: None),
                              release=lambda: None)
    hints = []
    monkeypatch.setattr(orchestrator, "train", lambda *a, **k: trained)
    monkeypatch.setattr(orchestrator, "set_rerun_hint", hints.append)
    monkeypatch.setattr(stages, "compare_with_random_features", lambda *a: None)
    monkeypatch.setattr(stages, "write_reports", lambda *a: None)
    orchestrator.finetune({}, out=run)
    nxt = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("next: edgeft export "))
    assert shlex.split(nxt.split("    ")[0])[3:] == [str(run)], nxt
    resume = next(h for h in hints if h)
    assert shlex.split(resume.split(": ", 1)[1]) == ["edgeft", "finetune", "--resume", "--out", str(run)], resume


@pytest.mark.faults
def test_the_device_file_validates_without_assert():
    """expected: the device file has no assert statement, so `python -O edgeft_device.py verify` refuses a
    malformed golden file as plain `python` does (an assert validated it: gone under -O)."""
    import ast
    from pathlib import Path

    import edgeft.device

    tree = ast.parse(Path(edgeft.device.__file__).read_text())
    asserts = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert asserts == [], f"assert statements at lines {asserts} of edgeft/device.py"


@pytest.mark.faults
def test_stage1_features_past_the_free_disk_are_refused_before_the_file(tmp_path):
    """expected: stage 1's feature rows too large for the disk (images x --augment-views x features x 4 bytes)
    are refused with the estimate quoted before the scratch file is reserved (a sparse file was reserved, with
    no free-space check, and filled the disk half way through stage 1)."""
    from edgeft.core.errors import UserError
    from edgeft.train.stage1 import Features

    with pytest.raises(UserError, match=r"stage 1's features \(1,000,000,000 rows of 1,280 float32.*needs 4768\.4 GiB"):
        Features(10**9, (1280,), tmp_path / "features.f32")
    assert not (tmp_path / "features.f32").exists()


@pytest.mark.faults
def test_the_device_script_bounds_its_runs():
    """expected: `edgeft_device.py bench --runs 1000000000` is refused in one line, exit 2 (every latency is
    kept: a billion runs would fill the memory before the report)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "tools" / "edgeft_device.py"
    r = subprocess.run([sys.executable, str(script), "bench", "model.tflite", "--random", "--runs", "1000000000"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "must be from 1 to 100,000" in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
        r.stderr
