"""The device script edgeft/device.py (tools/edgeft_device.py): bench, predict and verify, run the
way a user runs it on a Raspberry Pi: the file copied alone into a folder (`cp -L`) and started by
a Python in which TensorFlow, edgeft and the other runtime cannot be imported. The models are the
exported files of the session's `exported_run`; the cheap checks call `device.main` in-process."""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeft import device

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "edgeft_device.py"
LABELS = ["five", "seven", "six"]              # the fixture model's class order
# other names for the same classes, sorted differently from the class order (a, b, c = six, seven,
# five): only a real label mapping scores well on folders named this way
RENAMED = {"five": "c", "seven": "b", "six": "a"}
ALWAYS_BLOCKED = ("tensorflow", "tf_keras", "keras", "edgeft", "onnx", "tflite_runtime", "matplotlib", "yaml",
                  "sklearn", "scipy")
OTHER_RUNTIME = {"tflite": ("onnxruntime",), "onnx": ("ai_edge_litert",)}
MARK = "BLOCKED-IMPORT"
FAST = ("--runs", "10", "--warmup", "2")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def assets(exported_run, image_folder, tmp_path_factory):
    """Copies of the exported files (with and without labels.txt beside them), data folders,
    and the export's golden folder."""
    from edgeft.export.tflite_metadata import strip_associated_files

    run, _ = exported_run
    export = run / "export"
    root = tmp_path_factory.mktemp("device_assets")
    models, bare, renamed, embedded, plain = (root / d for d in ("models", "bare", "renamed", "embedded", "plain"))
    for d in (models, bare, renamed, embedded, plain):
        d.mkdir()
    for name in ("model_float.tflite", "model_int8.tflite", "model.onnx", "model_int8.onnx"):
        shutil.copy(export / name, models)
        shutil.copy(export / name, bare)                                 # no labels.txt beside
    shutil.copy(export / "labels.txt", models)
    assert (models / "labels.txt").read_text().split() == LABELS
    shutil.copy(export / "model_int8.tflite", renamed)
    (renamed / "labels.txt").write_text("\n".join(RENAMED[c] for c in LABELS) + "\n")
    # labels inside the file only: the bare flatbuffer plus an archive naming the classes a/b/c
    data = strip_associated_files((export / "model_int8.tflite").read_bytes())
    (embedded / "model_int8.tflite").write_bytes(data)
    (plain / "model_int8.tflite").write_bytes(data)                  # no labels anywhere
    with zipfile.ZipFile(embedded / "model_int8.tflite", "a") as zf:
        zf.writestr("labels.txt", "\n".join(RENAMED[c] for c in LABELS) + "\n")
    (models / "corrupt.tflite").write_text("not a model")

    shutil.copytree(image_folder, root / "data")
    (root / "data" / "five" / "broken.png").write_text("not an image")
    (root / "data" / "five" / "notes.txt").write_text("ignored: not an image")
    for cls, new in RENAMED.items():
        shutil.copytree(image_folder / cls, root / "named" / new)
    (root / "empty" / "a").mkdir(parents=True)

    golden = export / "golden"   # the fixture's export passed its gate (a ParityError fails it), so it wrote these
    assert (golden / device.GOLDEN_FILE).is_file()
    return root, golden


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    """The device script copied alone (`cp -L`: the symlink's target, as a plain file)."""
    folder = tmp_path_factory.mktemp("device_script")
    subprocess.run(["cp", "-L", str(SCRIPT), str(folder)], check=True)
    copy = folder / SCRIPT.name
    assert copy.is_file() and not copy.is_symlink()
    return copy


@pytest.fixture(scope="module")
def envs(tmp_path_factory):
    """{runtime: environment}: every module outside numpy, pillow and that runtime fails to import,
    and says so on stderr (so a caught ImportError still shows)."""
    out = {}
    for rt, other in OTHER_RUNTIME.items():
        blocker = tmp_path_factory.mktemp(f"blocked_{rt}")
        for name in ALWAYS_BLOCKED + other:
            (blocker / name).mkdir()
            (blocker / name / "__init__.py").write_text(
                f"import sys\nsys.stderr.write('{MARK} {name}\\n')\n"
                f"raise ImportError('{name} is not on this device')\n")
        out[rt] = dict(os.environ, PYTHONPATH=str(blocker), PYTHONDONTWRITEBYTECODE="1")
    return out


def run_device(script, env, *args, cwd=None):
    done = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, cwd=cwd or script.parent,
                          capture_output=True, text=True, timeout=120)
    assert MARK not in done.stderr, done.stderr      # imported something a device does not have
    assert "Traceback" not in done.stderr, done.stderr
    return done


def main_of(capsys, *args):
    """device.main in-process: (exit status, stdout, stderr)."""
    try:
        rc = device.main([str(a) for a in args])
    except SystemExit as e:   # argparse errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------- no TensorFlow

def test_blocked_modules_really_fail(envs, script):
    """Negative control: without it the no-TensorFlow runs prove nothing."""
    for rt, env in envs.items():
        names = ALWAYS_BLOCKED + OTHER_RUNTIME[rt]
        code = (f"import importlib\nok = []\nfor n in {names!r}:\n    try:\n        importlib.import_module(n)\n"
                "        ok.append(n)\n    except ImportError:\n        pass\nprint(ok)\n")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                              cwd=script.parent)
        assert done.stdout.strip() == "[]" and done.stderr.count(MARK) == len(names), done.stderr


def test_symlink_and_help(envs):
    assert SCRIPT.is_symlink() and os.readlink(SCRIPT) == "../edgeft/device.py"
    done = run_device(SCRIPT, envs["tflite"], "--help", cwd=REPO)     # through the symlink, edgeft blocked
    assert done.returncode == 0
    assert all(c in done.stdout for c in ("bench", "predict", "verify"))


def test_bench_help_documents_every_flag(capsys):
    rc, out, _ = main_of(capsys, "bench", "--help")
    assert rc == 0
    for flag in ("--data", "--random", "--threads", "--runs", "--warmup", "--limit", "--seed", "--json"):
        assert flag in out


# ------------------------------------------------------------------- bench

def check_report(report, stdout, model, fmt, threads):
    assert report["model"] == str(model) and report["format"] == fmt
    assert report["runtime"] and report["runtime_version"]
    assert report["size_bytes"] == os.path.getsize(model)
    assert report["size_mb"] == pytest.approx(report["size_bytes"] / 2**20)
    assert report["load_ms"] > 0 and report["peak_rss_mb"] > 0
    assert report["input"]["shape"] == [1, 32, 32, 3] and report["num_classes"] == 3
    assert report["python"] == platform.python_version()
    assert report["machine"]["cpu_count"] == os.cpu_count()
    assert report["latency_rule"] == device.LATENCY_RULE
    assert [r["threads"] for r in report["results"]] == threads
    for result in report["results"]:
        assert (result["runs"], result["warmup"]) == (10, 2)
        for timed in ("invoke_ms", "end_to_end_ms"):   # both latencies, by their own names
            lat = result[timed]
            assert 0 <= result["outliers_removed"][timed] < result["runs"]
            assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert lat["min"] <= lat["mean"] <= lat["max"] and lat["std"] >= 0
        assert result["throughput_ips"] == pytest.approx(1000 / result["invoke_ms"]["mean"])
        assert "latency_ms" not in result
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("threads"))
    rows = [row.split()[:3] for row in lines[header + 1:header + 1 + 2 * len(threads)]]
    assert rows == [[str(t), "10", timed] for t in threads for timed in ("invoke", "end-to-end")]


def test_bench_tflite_on_a_class_folder(assets, script, envs, tmp_path):
    root, _ = assets
    model, out = root / "models" / "model_int8.tflite", tmp_path / "out.json"
    done = run_device(script, envs["tflite"], "bench", model, "--data", root / "data", "--threads", 1, 2, *FAST,
                      "--json", out)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]       # the atomic write left no temp file
    report = json.loads(out.read_text())
    check_report(report, done.stdout, model, "tflite", [1, 2])
    assert report["runtime"] == "ai-edge-litert"
    assert report["input"]["dtype"] in ("int8", "uint8") and report["input"]["quantization"]["scale"] > 0
    assert (report["labels"], report["labels_source"]) == (LABELS, "labels.txt")
    acc = report["accuracy"]
    assert acc["n"] == 72 and report["data"]["unreadable"] == 1 and report["data"]["images"] == 73
    assert acc["top1"] == pytest.approx(acc["correct"] / acc["n"]) and acc["top1"] >= 0.8
    assert list(acc["per_class"]) == LABELS and sum(c["n"] for c in acc["per_class"].values()) == 72


def test_bench_onnx_random_labels_from_metadata(assets, script, envs, tmp_path):
    root, _ = assets
    model, out = root / "bare" / "model_int8.onnx", tmp_path / "out.json"
    done = run_device(script, envs["onnx"], "bench", model, "--random", "--threads", 2, 1, *FAST, "--json", out)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_report(report, done.stdout, model, "onnx", [2, 1])
    assert report["runtime"] == "onnxruntime" and report["accuracy"] is None and report["data"] is None
    assert (report["labels"], report["labels_source"]) == (LABELS, "metadata")


@pytest.mark.parametrize("folder, source, good", [("renamed", "labels.txt", True),
                                                  ("embedded", "embedded labels.txt", True),
                                                  ("plain", "folders", False)])
def test_bench_labels_map_folders(assets, capsys, tmp_path, folder, source, good):
    """Folders named c/b/a sort unlike the class order; only labels from beside or inside the
    file map them right (the plain copy, labelled by sorted folder names, proves the test bites)."""
    root, _ = assets
    out = tmp_path / "o.json"
    rc, _, err = main_of(capsys, "bench", root / folder / "model_int8.tflite", "--data", root / "named",
                         "--runs", 2, "--warmup", 0, "--json", out)
    assert rc == 0, err
    report = json.loads(out.read_text())
    assert report["labels_source"] == source
    assert report["labels"] == ([RENAMED[c] for c in LABELS] if good else sorted(RENAMED.values()))
    assert (report["accuracy"]["top1"] >= 0.8) is good


def test_bench_limit_takes_classes_in_turn(assets, capsys, tmp_path):
    root, _ = assets
    out = tmp_path / "o.json"
    rc, _, _ = main_of(capsys, "bench", root / "models" / "model_float.tflite", "--data", root / "data",
                       "--limit", 6, "--runs", 2, "--warmup", 0, "--json", out)
    acc = json.loads(out.read_text())["accuracy"]
    assert rc == 0 and acc["n"] == 6 and {c["n"] for c in acc["per_class"].values()} == {2}


BAD_BENCH = [
    ["bench", "{root}/models/missing.tflite"],
    ["bench", "{root}/models/labels.txt"],
    ["bench", "{root}/models/corrupt.tflite"],
    ["bench", "{root}/models/model.onnx", "--data", "{root}/no_such_folder"],
    ["bench", "{root}/models/model_float.tflite", "--data", "{root}/empty"],
    ["bench", "{root}/models/model_float.tflite", "--threads", "0"],
    ["bench", "{root}/models/model.onnx", "--threads", "1", "two"],
    ["bench", "{root}/models/model_float.tflite", "--runs", "-3"],
    ["bench", "{root}/bare/model_float.tflite", "--data", "{root}/data", "--random"],
    ["bench", "{root}/bare/model_float.tflite", "--data", "{root}/named"],     # folders not in its labels
    ["bench", "{root}/models/model.onnx", "--json", "{root}/nowhere/o.json"],
    ["bench", "{root}/models/model_float.tflite", "--data", "{root}/named"],   # folders not in labels.txt
    ["predict", "{root}/models/model_float.tflite", "{root}/no_such.png"],
    ["predict", "{root}/models/model_float.tflite", "{root}/data/five/broken.png"],
    ["predict", "{root}/models/model_float.tflite", "{root}/data", "--top-k", "0"],
    ["frobnicate", "{root}/models/model_float.tflite"],
]


@pytest.mark.parametrize("args", BAD_BENCH, ids=lambda a: " ".join(a[:1] + a[2:]) or a[0])
def test_bad_input_exits_2_in_one_line(assets, capsys, args):
    root, _ = assets
    rc, _, err = main_of(capsys, *(a.format(root=root) for a in args))
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "error" in err, err


def test_outlier_rule():
    samples = np.r_[np.full(50, 1.0) + np.linspace(0, 0.1, 50), 1.05, 40.0]
    kept = device.without_outliers(samples)
    assert 40.0 not in kept and len(kept) == len(samples) - 1
    stats, removed = device.latency_stats(samples)
    assert removed == 1 and stats["max"] < 2
    assert len(device.without_outliers(np.r_[np.ones(20), 9.0])) == 21   # MAD 0: nothing can be judged


# ----------------------------------------------------------------- predict

def test_predict_names_classes_from_the_file(assets, image_folder, script, envs):
    root, _ = assets
    images = sorted((image_folder / "seven").glob("*.png"))[:4]
    done = run_device(script, envs["tflite"], "predict", root / "embedded" / "model_int8.tflite", *images,
                      "--top-k", 2)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [ln.split(": ")[0] for ln in lines] == [str(p) for p in images]
    # the labels come from the archive inside the file: seven is "b" there
    assert sum(ln.split(": ")[1].startswith("b ") for ln in lines) >= 3
    assert all(len(ln.split(": ")[1].split(", ")) == 2 for ln in lines)


def test_predict_onnx_metadata_labels_json(assets, image_folder, capsys):
    root, _ = assets
    rc, out, err = main_of(capsys, "predict", root / "bare" / "model.onnx", image_folder / "six", "--json")
    assert rc == 0, err
    results = json.loads(out)
    assert len(results) == 24 and all(len(r["top"]) == 3 for r in results)
    assert sum(r["top"][0]["label"] == "six" for r in results) >= 20
    probs = [t["probability"] for t in results[0]["top"]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-3


# ------------------------------------------------------------------ verify

def test_verify_passes_on_the_export_golden(assets, script, envs):
    root, golden = assets
    expected = json.loads((golden / device.GOLDEN_FILE).read_text())
    assert {"model_float.tflite", "model_int8.tflite", "model.onnx", "model_int8.onnx"} <= set(expected["files"])
    assert len(expected["inputs"]) == 8 and {i["label"] for i in expected["inputs"]} == set(LABELS)
    # the inputs are the data set's own files, byte for byte
    sources = {i["file"]: i["source"] for i in expected["inputs"]}
    for rel, src in sources.items():
        assert (golden / rel).read_bytes() == (root / "data" / src).read_bytes()
    for name in expected["files"]:           # every file, by the same code (in-process: fast)
        result = device.verify(golden.parent / name, golden)
        assert result["passed"] and result["same_file_as_export"], (name, result["failures"])
        assert result["worst_abs_diff"] == 0.0     # same machine, same runtime: the same numbers
    rt = {"tflite": "model_int8.tflite", "onnx": "model.onnx"}
    for kind, name in rt.items():            # and on a "device": the copied script, one runtime only
        done = run_device(script, envs[kind], "verify", golden.parent / name, golden)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "PASS: 8 golden inputs" in done.stdout


def test_export_writes_golden_after_the_gate(exported_run):
    run, report = exported_run
    golden = run / "export" / "golden" / device.GOLDEN_FILE
    assert report["passed"]   # the gate passed (conftest lets a ParityError fail the fixture): golden follows it
    expected = json.loads(golden.read_text())
    shipped = {r["file"] for r in report["rows"]}
    assert shipped <= set(expected["files"])
    assert {name: e["tier"] for name, e in expected["files"].items()} == {r["file"]: r["tier"] for r in report["rows"]}


def perturbed_float_tflite(src: Path, dst: Path) -> None:
    """The float TFLite file with its last layer's bias moved: it loads and runs, but its
    probabilities are not the exported file's."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(src))
    interp.allocate_tensors()
    data = src.read_bytes()
    for t in interp.get_tensor_details():
        if tuple(t["shape"]) == (3,) and np.dtype(t["dtype"]) == np.float32:
            try:
                bias = interp.get_tensor(t["index"])
            except ValueError:
                continue
            if data.count(bias.tobytes()) == 1:
                dst.write_bytes(data.replace(bias.tobytes(), (bias + np.float32([0.5, 0, -0.5])).tobytes()))
                return
    pytest.fail("no final bias found in the float TFLite file")


def test_verify_fails_on_another_model(assets, script, envs, tmp_path):
    _, golden = assets
    wrong = tmp_path / "model_float.tflite"
    perturbed_float_tflite(golden.parent / "model_float.tflite", wrong)
    done = run_device(script, envs["tflite"], "verify", wrong, golden, "--json", tmp_path / "v.json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout and "not byte-identical" in done.stdout
    result = json.loads((tmp_path / "v.json").read_text())
    assert not result["passed"] and result["worst_abs_diff"] > 1e-3
    assert all(r["pixels_match"] for r in result["inputs"])        # the file is wrong, not the decoding
    # a good file replayed against another file's vectors fails too (int8 against float's)
    assert not device.verify(golden.parent / "model_int8.tflite", golden, name="model_float.tflite")["passed"]


def test_verify_fails_when_decoding_differs(assets, capsys, tmp_path):
    """One golden input re-saved with one pixel changed: decoding on this 'device' no longer gives
    the pixels the model was checked with."""
    _, golden = assets
    copy = tmp_path / "golden"
    shutil.copytree(golden, copy)
    first = json.loads((copy / device.GOLDEN_FILE).read_text())["inputs"][0]["file"]
    with Image.open(copy / first) as img:
        pixels = np.array(img.convert("RGB"))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(copy / first)
    rc, out, err = main_of(capsys, "verify", golden.parent / "model_float.tflite", copy)
    assert rc == 1, out + err
    assert f"{first}: decoded pixels differ" in out and "DIFFER" in out


def test_verify_bad_input_exits_2(assets, script, envs, capsys, tmp_path):
    root, golden = assets
    model = golden.parent / "model_float.tflite"
    done = run_device(script, envs["tflite"], "verify", model, tmp_path / "no_golden")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: golden folder not found: {tmp_path / 'no_golden'}"]
    broken = tmp_path / "broken"
    shutil.copytree(golden, broken)
    cases = [(model, tmp_path, "no expected.json"),
             (root / "models" / "missing.tflite", golden, "model file not found"),
             (root / "models" / "corrupt.tflite", golden, "no outputs for corrupt.tflite")]
    for m, g, message in cases:
        rc, _, err = main_of(capsys, "verify", m, g)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    rc, _, err = main_of(capsys, "verify", model, golden, "--name", "model_huge.tflite")
    assert rc == 2 and "no outputs for model_huge.tflite" in err
    (broken / "inputs" / "000.png").unlink()
    rc, _, err = main_of(capsys, "verify", model, broken)
    assert rc == 2 and "golden input missing" in err
    (broken / device.GOLDEN_FILE).write_text("{not json")
    rc, _, err = main_of(capsys, "verify", model, broken)
    assert rc == 2 and "not valid JSON" in err


def test_write_golden_replaces_the_folder_and_picks_confident_inputs(assets, image_folder, tmp_path):
    from edgeft.core.errors import UserError
    from edgeft.export.golden import TIERS, write_golden

    _, golden = assets
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(golden.parent / "model_int8.tflite", export)
    paths = sorted(str(p) for p in image_folder.rglob("*.png"))
    (export / "golden" / "inputs").mkdir(parents=True)
    (export / "golden" / "inputs" / "stale.png").write_text("from an older export")
    out = write_golden(export, paths, 32, {"model_int8.tflite": "int8"}, n=5)
    assert sorted(p.name for p in (out / "inputs").iterdir()) == [f"00{i}.png" for i in range(5)]
    assert not [p for p in export.iterdir() if p.name.startswith(".")]
    expected = json.loads((out / device.GOLDEN_FILE).read_text())
    assert [i["label"] for i in expected["inputs"]] == ["five", "seven", "six", "five", "seven"]
    entry = expected["files"]["model_int8.tflite"]
    assert (entry["tier"], entry["max_abs_diff"], entry["top1_must_match"]) == ("int8", *TIERS["int8"])
    top2 = np.sort(np.asarray(entry["outputs"]), axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] >= 2 * TIERS["int8"][0])   # the top-1 check has room
    assert device.verify(export / "model_int8.tflite", out)["passed"]
    with pytest.raises(UserError, match="not found"):
        write_golden(export, paths, 32, {"model.onnx": "float"})
    with pytest.raises(UserError, match="unknown tier"):
        write_golden(export, paths, 32, {"model_int8.tflite": "int4"})
