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
