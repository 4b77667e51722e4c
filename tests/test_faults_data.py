"""Hostile data and absurd numbers (issue 17, data half): each test reproduces one defect.

Marked `faults` (tools/bench_faults.py runs `pytest -m faults` and prints case / expected /
observed from the first docstring line). In-process and tiny (32 px images, no training but one
toy Keras fit), so the suite keeps its budget.
"""
from __future__ import annotations

import edgeft
import json
import os
import shutil
import time
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeft import device
from edgeft.core.config import build_config, section_classes
from edgeft.core.errors import UserError
from edgeft.data import cache

pytestmark = pytest.mark.faults


def _png(path: Path, value: int, size=(32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _folder(root: Path, classes=("a", "b"), per_class=3, ext=".png") -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            p = root / name / f"{i}{ext}"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((32, 32, 3), 40 * c + 10 * i, np.uint8)).save(p)
    return root


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------------------ item 2: class names
@pytest.mark.parametrize("name", ["two\nlines", "cr\rname", "tab\tname", "sep\u2028name", " padded"])
def test_class_folder_name_that_breaks_labels_txt_is_refused_at_scan(tmp_path, own_cache, name):
    """expected: a class folder holding a newline/control char is refused at scan time with one line naming it"""
    from edgeft.data.datasets import scan_folder

    root = _folder(tmp_path / "data", classes=("fine", name))
    with pytest.raises(UserError) as e:
        scan_folder(str(root), 32)
    message = str(e.value)
    assert "\n" not in message and "\r" not in message and repr(name)[1:-1] in message
    assert not (own_cache / "images").exists() or not any((own_cache / "images").glob("*px")), "decoded before refusing"


def test_report_md_escapes_class_names(tmp_path):
    """expected: `|`, `<script>` and line breaks of class names are escaped in report.md tables"""
    from types import SimpleNamespace

    from edgeft.train.report import write_reports

    classes = ["a|b", "<script>x</script>", "plain"]
    splits = SimpleNamespace(classes=classes, report={"n_train": 3, "n_val": 3, "skipped": []})
    model = SimpleNamespace(name="m", count_params=lambda: 1)
    metrics = {"head": {"val_accuracy": 1.0, "val_loss": 0.1, "per_class_accuracy": {c: 1.0 for c in classes}}}
    write_reports(tmp_path, model, splits, metrics)
    text = (tmp_path / "report.md").read_text()
    assert "<script>" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "1.0000" in line
            and "head" not in line]
    assert len(rows) == 3
    for row in rows:   # an escaped `\|` is not a column: two cells each
        assert len(row.replace("\\|", "").strip("|").split("|")) == 2, row


def test_parity_md_escapes_class_names_and_paths():
    """expected: class names and image paths with `|`, `<script>` or line breaks stay inside their parity.md cells"""
    from dataclasses import asdict

    from edgeft.core.config import ParityConfig
    from edgeft.verify.parity import ParityRow, parity_markdown

    flip = {"input": 0, "image": "data/a|b/<x>.png", "true": "a|b", "reference": "a|b", "file": "<script>",
            "reference_p": 0.9, "file_p": 0.8}
    row = ParityRow("tflite_int8", "model_int8.tflite", 1000, "int8", "litert", "ptq", 1, 1, 100.0, 0.1,
                    "keras float", 0.9, [0.8, 0.95], 0.9, 0.9, 1.0, 0.1, 10.0, [0.0, 20.0], 0.25, 1, 0, 0.0,
                    [0.0, 0.0], 0.98, None, "a|b", 0.1, False, ["class 'a|b' <dropped>"], "verdict <b>", [],
                    [flip], [flip])
    report = {"n_inputs": 1, "n_validation_images": 1, "n_augmented": 0, "thresholds": asdict(ParityConfig()),
              "keras_float_accuracy": 1.0, "keras_qat_accuracy": None, "rows": [asdict(row)]}
    text = parity_markdown(report)
    assert "<script>" not in text and "<dropped>" not in text and "<x>" not in text and "<b>" not in text
    for line in text.splitlines():
        if line.startswith("| tflite_int8") or line.startswith("| model_int8.tflite"):
            cells = line.replace("\\|", "").strip("|").split("|")
            assert len(cells) == (13 if line.startswith("| tflite") else 6), line


def test_md_cell_escapes_pipes_html_and_line_breaks():
    """expected: md_cell makes any text one safe Markdown table cell"""
    from edgeft.core.markdown import md_cell

    assert md_cell("a|b") == "a\\|b"
    assert md_cell("<b>&") == "&lt;b&gt;&amp;"
    assert md_cell("x\ny\r\nz") == "x<br>y<br>z"


# ------------------------------------------------------------ item 3: EXIF orientation
def _rotated_jpeg(path: Path, orientation: int = 6) -> Path:
    """A 48x32 JPEG, stored sideways with an EXIF orientation tag (what a phone writes)."""
    x = np.zeros((32, 48, 3), np.uint8)
    x[:, :16] = (250, 10, 10)          # a red band on the left of the stored image
    x[:, 16:] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None]
    img = Image.fromarray(x)
    exif = Image.Exif()
    exif[0x0112] = orientation   # EXIF Orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied_by_the_decoder(tmp_path):
    """expected: an Orientation=6 JPEG decodes as PIL.ImageOps.exif_transpose shows it"""
    from PIL import ImageOps

    path = _rotated_jpeg(tmp_path / "phone.jpg")
    with Image.open(path) as img:
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB").resize((24, 40), Image.BILINEAR))
    got = device.load_image(path, (40, 24))
    assert got.shape == upright.shape
    assert np.abs(got.astype(int) - upright).max() == 0


def test_image_cache_holds_upright_pixels_and_knows_its_decoder(tmp_path, own_cache):
    """expected: the cache row of an EXIF-rotated photo equals the upright decode; the decoder version is in the key"""
    from edgeft.data.images import list_folder

    root = _folder(tmp_path / "data", per_class=1)
    _rotated_jpeg(root / "a" / "phone.jpg")
    listing = list_folder(root)
    entry = cache.open_or_build(root, listing.files, 32, workers=1)
    row = [p for p, _ in listing.files].index(str(root / "a" / "phone.jpg"))
    np.testing.assert_array_equal(entry.store.read([row])[0], device.load_image(root / "a" / "phone.jpg", 32))
    assert f"v{device.DECODER_VERSION}" in cache.DECODER and "EXIF" in cache.DECODER


def _fake_runner(hw=(32, 32), classes=2, probs=None):
    class Fake:
        input_hw, num_classes, runtime, runtime_version = hw, classes, "fake", "0"

        def predict(self, batch):
            p = np.full((len(batch), classes), 1.0 / classes, np.float32) if probs is None else probs
            return np.asarray(p, np.float32).reshape(len(batch), classes)
    return Fake()


def _golden(root: Path, inputs: list[tuple[str, str]], outputs, bound=1e-4, extra=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    golden = {"format": device.GOLDEN_FORMAT, "version": device.GOLDEN_VERSION, "image_size": [32, 32],
              "labels": ["a", "b"], "inputs": [{"file": f, "label": "a", "source": "a/x", "pixels_sha256": sha}
                                               for f, sha in inputs],
              "files": {"m.tflite": {"tier": "float", "max_abs_diff": bound, "top1_must_match": False,
                                     "outputs": outputs}}}
    golden.update(extra or {})
    (root / device.GOLDEN_FILE).write_text(json.dumps(golden))
    return root


def test_verify_says_when_an_old_golden_image_carries_an_orientation_tag(tmp_path, monkeypatch):
    """expected: verify names the EXIF orientation and the old decoder when such a golden input decodes differently now"""
    golden = tmp_path / "golden"
    src = _rotated_jpeg(golden / "inputs" / "000.jpg")
    with Image.open(src) as img:   # what decoder version 1 gave: no rotation
        old = np.asarray(img.convert("RGB").resize((32, 32), Image.BILINEAR))
    _golden(golden, [("inputs/000.jpg", device.pixels_sha256(old))], [[0.5, 0.5]])
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    monkeypatch.setattr(device, "open_runner", lambda *a, **k: _fake_runner())
    result = device.verify(model, golden)
    assert not result["passed"]
    assert any("EXIF orientation 6" in f and "decoder version 1" in f for f in result["failures"]), result["failures"]


# ------------------------------------------------------------ item 4: replaced image, restored mtime
def test_replaced_image_with_same_size_and_restored_mtime_is_decoded_again(tmp_path, own_cache, capsys):
    """expected: cp other.bmp a.bmp && touch -r: the cache decodes a.bmp again instead of serving stale pixels"""
    from edgeft.data.images import list_folder

    root = tmp_path / "data"
    for name, value in (("a/0.bmp", 10), ("a/1.bmp", 20), ("b/0.bmp", 200), ("b/1.bmp", 220)):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(p)
    listing = list_folder(root)
    cache.open_or_build(root, listing.files, 32, workers=1)
    target, other = root / "a" / "0.bmp", root / "b" / "1.bmp"
    st = os.stat(target)
    time.sleep(0.05)   # a later ctime even on a coarse file-system clock
    shutil.copyfile(other, target)                              # cp other.bmp a.bmp
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))       # touch -r ref a.bmp
    assert os.stat(target).st_size == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    again = cache.open_or_build(root, listing.files, 32, workers=1)
    row = [p for p, _ in listing.files].index(str(target))
    assert again.store.read([row])[0].max() == 220, "stale pixels served from the cache"
    assert again.built and "replaced" in capsys.readouterr().out


def test_cache_entry_is_still_built_once_across_machines(tmp_path, own_cache, monkeypatch):
    """expected: an unchanged folder reuses its entry, also from a machine that did not build it (shared cache)"""
    from edgeft.data.images import list_folder

    root = _folder(tmp_path / "data")
    listing = list_folder(root)
    assert cache.open_or_build(root, listing.files, 32, workers=1).built
    assert not cache.open_or_build(root, listing.files, 32, workers=1).built
    monkeypatch.setattr(cache, "machine_id", lambda: "another-machine")
    assert not cache.open_or_build(root, listing.files, 32, workers=1).built
    assert (own_cache / "images" / cache.MACHINES / "another-machine").is_dir()


# ------------------------------------------------------------ item 5: non-finite numbers
FLOAT_KEYS = [f.name for cls in section_classes().values() for f in fields(cls) if "float" in str(f.type)]


@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_numbers(key):
    """expected: nan / inf in any float flag or config key is refused with one line (exit 2)"""
    for value in (float("nan"), float("inf"), "-inf", "nan"):
        with pytest.raises(UserError, match="finite"):
            build_config({key: value})


def test_non_finite_flag_is_refused_by_the_cli(capsys):
    """expected: `edgeft finetune --lr-head nan` exits 2 with one line, before anything runs"""
    from edgeft.cli import app as cli

    assert cli.main(["finetune", "--lr-head", "nan", "--out", "/nonexistent/run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lr-head" in err and "finite" in err


def test_non_finite_benchmark_max_drop_is_refused(capsys):
    """expected: `edgeft benchmark --max-drop nan` (a flag outside the config) exits 2 with one line"""
    from edgeft.cli.app import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["benchmark", "run", "--max-drop", "nan"])
    assert e.value.code == 2 and "finite" in capsys.readouterr().err


def test_lr_qat_must_be_positive():
    """expected: --lr-qat 0 or negative is refused like the other learning rates"""
    for value in (0.0, -1e-4):
        with pytest.raises(UserError, match="lr-qat"):
            build_config({"lr_qat": value})


def test_write_json_is_strict_json(tmp_path):
    """expected: metrics.json and every other JSON file never hold NaN/Infinity (written as null)"""
    from edgeft.core import rundir

    rundir.write_json(tmp_path / "m.json", {"loss": float("nan"), "x": [1.0, float("inf")], "ok": 0.5})

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    data = json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse)
    assert data == {"loss": None, "x": [1.0, None], "ok": 0.5}


def test_device_json_output_is_strict(tmp_path):
    """expected: edgeft_device.py --json output is strict JSON too"""
    device.write_json_atomic(tmp_path / "b.json", {"std": float("nan")})
    assert json.loads((tmp_path / "b.json").read_text()) == {"std": None}


def test_training_stops_with_one_line_when_the_loss_becomes_nan(tmp_path):
    """expected: a loss of NaN stops training (OperationFailed, exit 1) before the epoch's files are written"""
    from edgeft._keras import keras
    from edgeft.train.callbacks import EpochLog
    from edgeft.core.errors import OperationFailed

    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    x = np.full((8, 4), np.nan, np.float32)
    with pytest.raises(OperationFailed, match="NaN|nan") as e:
        model.fit(x, np.zeros(8, np.int32), epochs=3, verbose=0, callbacks=[EpochLog(tmp_path, "head")])
    assert "--lr-head" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "history.csv").exists()


def test_operation_error_exits_1_with_one_line(monkeypatch, capsys):
    """expected: the CLI maps a failed operation (diverged training) to exit 1 and one line"""
    from edgeft.cli import app as cli
    from edgeft.core.errors import OperationFailed

    def diverged(args):
        raise OperationFailed("head: the training loss became nan at the end of epoch 1")
    monkeypatch.setattr(cli, "cmd_finetune", diverged)
    assert cli.main(["finetune"]) == 1
    assert capsys.readouterr().err.strip() == "edgeft: error: head: the training loss became nan at the end of epoch 1"


# ------------------------------------------------------------ item 6: verify and NaN
def _nan_golden(tmp_path, monkeypatch, bound, outputs):
    golden = tmp_path / "golden"
    _png(golden / "inputs" / "000.png", 1)
    sha = device.pixels_sha256(device.load_image(golden / "inputs" / "000.png", (32, 32)))
    _golden(golden, [("inputs/000.png", sha)], outputs, bound=bound)
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    monkeypatch.setattr(device, "open_runner", lambda *a, **k: _fake_runner())
    return device.main(["verify", str(model), str(golden)])


def test_verify_rejects_nan_max_abs_diff(tmp_path, monkeypatch, capsys):
    """expected: golden vectors with max_abs_diff NaN are bad input (exit 2), not a PASS"""
    assert _nan_golden(tmp_path, monkeypatch, float("nan"), [[0.5, 0.5]]) == 2
    assert "max_abs_diff" in capsys.readouterr().err


def test_verify_rejects_nan_expected_outputs(tmp_path, monkeypatch, capsys):
    """expected: all-NaN expected outputs are bad input (exit 2), not a PASS"""
    assert _nan_golden(tmp_path, monkeypatch, 1e-4, [[float("nan"), float("nan")]]) == 2
    assert "non-finite" in capsys.readouterr().err


# ------------------------------------------------------------ item 7: --threads
def test_device_script_bounds_threads(capsys):
    """expected: edgeft_device.py --threads above 4 x the CPUs is refused with one line (exit 2)"""
    most = 4 * (os.cpu_count() or 1)
    too_many = str(most + 1)
    for argv in (["bench", "m.tflite", "--threads", "1", too_many], ["predict", "m.tflite", "x.png", "--threads", too_many],
                 ["verify", "m.tflite", "golden", "--threads", "100000"]):
        with pytest.raises(SystemExit) as e:
            device.parse_args(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--threads" in err and str(os.cpu_count()) in err
    assert device.parse_args(["predict", "m.tflite", "x.png", "--threads", str(most)]).threads == most


def test_cli_bounds_threads(capsys):
    """expected: edgeft benchmark/predict/evaluate --threads 100000 is refused with one line (exit 2)"""
    from edgeft.cli.app import build_parser

    for argv in (["benchmark", "run", "--threads", "100000"], ["predict", "m.tflite", "x.png", "--threads", "100000"],
                 ["evaluate", "m.tflite", "data", "--threads", "100000"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_runner_refuses_absurd_threads_from_the_python_api(tmp_path):
    """expected: open_runner(threads=100000) is refused before the runtime sees it"""
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    with pytest.raises(device.DeviceError, match="--threads"):
        device.open_runner(model, 100000)


# ------------------------------------------------------------ item 8: --image-size
def test_image_size_has_an_upper_bound_per_backbone():
    """expected: --image-size 5000 is refused before anything is decoded; 32 px still works for MobileNets"""
    from edgeft.core import registry

    with pytest.raises(UserError, match="1024"):
        build_config({"image_size": 5000})
    assert build_config({"image_size": 32, "backbone": "mobilenet_v2"}).data.image_size == 32
    with pytest.raises(UserError, match="75"):
        build_config({"image_size": 32, "backbone": "inception_v3"})
    assert all(b.min_size <= b.default_size <= b.max_size for b in map(registry.get_backbone, registry.names()))


def test_refused_image_size_leaves_no_run_directory(tmp_path, own_cache):
    """expected: finetune --image-size 5000 leaves no run directory and no cache entry"""
    from edgeft import finetune

    root = _folder(tmp_path / "data")
    with pytest.raises(UserError):
        build_config({"image_size": 5000})   # on a build without the bound, stop here, before decoding 5000 px
    with pytest.raises(UserError):
        finetune({"folder": str(root), "image_size": 5000, "weights": "none"}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not (own_cache / "images").exists() or not any((own_cache / "images").glob("*px"))


def test_decoding_memory_is_checked_before_decoding(tmp_path, own_cache, monkeypatch):
    """expected: decoding that would not fit in free RAM is refused before any file is decoded"""
    from edgeft.data.images import list_folder

    root = _folder(tmp_path / "data")
    monkeypatch.setattr(cache, "available_memory", lambda: 1000)
    with pytest.raises(UserError, match="memory"):
        cache.open_or_build(root, list_folder(root).files, 32, workers=2)
    assert not any((own_cache / "images").glob("*px"))


# ------------------------------------------------------------ item 10: disk-space message
def test_disk_space_refusal_prints_mb_and_states_the_margin(tmp_path, monkeypatch):
    """expected: a 64 KB cache on a nearly full disk says KB/MB and the 256 MiB margin, not '0.0 GiB'"""
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(UserError) as e:
        cache.check_disk_space(65536, tmp_path, "folder")
    message = str(e.value)
    assert "0.0 GiB" not in message and "64.0 KB" in message and "1.0 MB" in message
    assert "256.0 MB" in message and "margin" in message


# ------------------------------------------------------------ smaller ones
def test_single_image_class_warns(tmp_path, own_cache, capsys):
    """expected: a class with one image (no validation/test image) trains with a warning naming it"""
    from edgeft.data.datasets import load_splits

    root = _folder(tmp_path / "data", classes=("many", "lonely"), per_class=6)
    for p in sorted((root / "lonely").iterdir())[1:]:
        p.unlink()
    load_splits(str(root), 32, 0.2, 0)
    err = capsys.readouterr().err
    assert "warning" in err and "'lonely'" in err and "no validation image" in err
    assert "'many'" not in err


def test_cut_off_labels_warn(tmp_path, monkeypatch, capsys):
    """expected: a model with fewer labels than outputs warns that classes fall back to ids"""
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    (tmp_path / "labels.txt").write_text("a\nb\n")
    img = _png(tmp_path / "x.png", 3)
    monkeypatch.setattr(device, "open_runner", lambda *a, **k: _fake_runner(classes=4))
    results = device.predict(model, [str(img)])
    err = capsys.readouterr().err
    assert "2 labels" in err and "4 outputs" in err
    assert {t["label"] for t in results[0]["top"]} <= {"a", "b", "2", "3"}


@pytest.mark.parametrize("values, words", [
    ({"data": [1, 2, 3]}, ("'data'", "section", "mapping", "list")),
    ({"train": "fast"}, ("'train'", "section", "mapping", "string")),
    ({"batch_size": True}, ("'batch_size'", "integer", "boolean")),
    ({"lr_head": False}, ("'lr_head'", "number", "boolean")),
    ({"backbone": ["vgg16"]}, ("'backbone'", "string", "list")),
])
def test_yaml_type_errors_name_the_key_and_type(values, words):
    """expected: `data: [1,2,3]` / `batch_size: true` are refused naming the key and the type"""
    with pytest.raises(UserError) as e:
        build_config(values)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_long_error_lines_are_cut_at_a_word():
    """expected: a long refusal (Keras' safe_mode text) is never cut mid-word"""
    text = ("Requested the deserialization of a Lambda layer with a Python `lambda` inside it. This carries a "
            "potential risk of arbitrary code execution and thus it is disallowed by default. If you trust the "
            "source of the saved model, you can pass `safe_mode=False` to the loading function in order to allow "
            "Lambda layer loading.")
    for limit in (120, 200, 250):
        cut = device.clip(text, limit)
        assert len(cut) <= limit and cut.endswith(" ...")
        assert text.startswith(cut[:-4]) and text[len(cut) - 4] in " .,;:`", cut
    assert device.clip("short", 200) == "short"


@pytest.mark.parametrize("name", ["../outside.png", "/etc/hostname", "inputs/../../outside.png"])
def test_verify_confines_golden_inputs_to_the_golden_folder(tmp_path, monkeypatch, capsys, name):
    """expected: a golden input path outside the golden folder (../, absolute) is refused (exit 2)"""
    golden = tmp_path / "golden"
    _png(tmp_path / "outside.png", 1)
    _png(golden / "inputs" / "000.png", 1)
    _golden(golden, [(name, "0" * 64)], [[0.5, 0.5]])
    model = tmp_path / "m.tflite"
    model.write_bytes(b"x")
    monkeypatch.setattr(device, "open_runner", lambda *a, **k: _fake_runner())
    assert device.main(["verify", str(model), str(golden)]) == 2
    assert "outside the golden folder" in capsys.readouterr().err


def test_predict_refuses_a_file_that_differs_from_its_manifest(tmp_path, capsys):
    """expected: edgeft predict refuses (exit 1) a model whose sha256 differs from manifest.json; --allow-unverified overrides"""
    from edgeft.cli import app as cli

    model = tmp_path / "model_float.tflite"
    model.write_bytes(b"not the exported bytes")
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {model.name: {"sha256": "0" * 64}}}))
    img = _png(tmp_path / "x.png", 2)
    assert cli.main(["predict", str(model), str(img)]) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and "--allow-unverified" in err
    # with the override it goes on to load the file (which is garbage here: exit 2, one line)
    assert cli.main(["predict", str(model), str(img), "--allow-unverified"]) == 2
    assert device.main(["predict", str(model), str(img)]) == 1
    assert "--allow-unverified" in capsys.readouterr().err
    assert device.main(["predict", str(model), str(img), "--allow-unverified"]) == 2


def test_corrupt_cache_row_names_the_command_that_works(tmp_path, own_cache):
    """expected: after a corrupt cache row in a half-made finetune run the message says --resume"""
    from edgeft.data.images import list_folder

    root = _folder(tmp_path / "data")
    entry = cache.open_or_build(root, list_folder(root).files, 32, workers=1)
    with open(entry.store.path / cache.IMAGES, "r+b") as f:
        f.seek(5)
        f.write(b"\xff\x00\xff")
    cache.set_rerun_hint("continue the run with: edgeft finetune --resume --out RUN")
    try:
        with pytest.raises(cache.CacheError, match="--resume --out RUN"):
            entry.store.read([0])
    finally:
        cache.set_rerun_hint(None)
    assert "run the command again" in cache.rerun_hint()


def test_finetune_sets_the_resume_hint_once_its_run_directory_exists(tmp_path, own_cache, monkeypatch):
    """expected: finetune's corrupt-row advice is `edgeft finetune --resume --out RUN` once RUN exists, reset after"""
    from edgeft.train import stages as training

    root = _folder(tmp_path / "data", per_class=4)
    seen = {}

    def stop(model, splits, cfg, run, scope):
        seen["hint"] = cache.rerun_hint()
        raise UserError("stop here")
    monkeypatch.setattr(training, "train_head", stop)
    with pytest.raises(UserError, match="stop here"):
        edgeft.finetune({"folder": str(root), "image_size": 32, "alpha": 0.35, "weights": "none", "dense": 0,
                           "finetune_epochs": 0, "test_split": 0.0}, out=tmp_path / "run")
    assert f"--resume --out {tmp_path / 'run'}" in seen["hint"]
    assert "--resume" not in cache.rerun_hint()


# ------------------------------------------------------------ .keras config check
def test_keras_config_check_refuses_code_references():
    """expected: a .keras config naming builtins.print, a Lambda or a stray TF op is refused before Keras loads it"""
    from edgeft.nn.keras_config import config_problem

    dense = {"module": "keras.layers", "class_name": "Dense", "config": {"name": "d", "activation": "relu"},
             "registered_name": None}
    assert config_problem({"layers": [dense]}) is None
    evil_fn = {"module": "builtins", "class_name": "function", "config": "print", "registered_name": "function"}
    assert "builtins.print" in config_problem({"layers": [{**dense, "config": {"name": "d", "activation": evil_fn}}]})
    lam = {"module": "keras.layers", "class_name": "Lambda", "config": {"name": "l", "function": "..."}}
    assert "Lambda" in config_problem({"layers": [lam]})
    op = {"module": "tf_keras.src.layers.core.tf_op_layer", "class_name": "TFOpLambda",
          "config": {"name": "t", "function": "io.write_file"}, "registered_name": "TFOpLambda"}
    assert "io.write_file" in config_problem({"layers": [op]})
    assert config_problem({"layers": [{**op, "config": {"name": "t", "function": "__operators__.add"}}]}) is None
    assert "os.system" in config_problem({"module": "os", "class_name": "system", "config": {}})


def test_hand_edited_keras_file_cannot_call_print_while_loading(tmp_path, capfd):
    """expected: load_model refuses (one line) a .keras whose config makes Keras call builtins.print, and nothing is printed"""
    from edgeft._keras import keras
    from edgeft.nn.model import load_model

    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(2, name="d")])
    good = tmp_path / "good.keras"
    model.save(good)
    with zipfile.ZipFile(good) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    config = json.loads(members["config.json"])
    layer = next(lay for lay in config["config"]["layers"] if lay["class_name"] == "Dense")
    layer["config"]["activation"] = {"module": "builtins", "class_name": "function", "config": "print",
                                     "registered_name": "function"}
    bad = tmp_path / "bad.keras"
    with zipfile.ZipFile(bad, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, json.dumps(config) if n == "config.json" else data)
    capfd.readouterr()
    with pytest.raises(UserError) as e:
        load_model(bad)
    assert "builtins.print" in str(e.value) and "\n" not in str(e.value)
    assert load_model(good) is not None
