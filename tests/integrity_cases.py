"""The refusal cases of the integrity issue, run in-process through the CLI's `main(argv)`.

`python tests/integrity_cases.py ROOT` builds each case under ROOT/<case>, takes a snapshot of
that tree (every path, and every file's bytes), calls `edgeft.cli.app.main(argv)` in this very
process, and prints one JSON object: per case the exit code, seconds, stderr, whether TensorFlow
had been imported by then, and whether the tree is unchanged. tests/test_integrity.py runs it in
a fresh interpreter (no other test has imported TensorFlow there) and judges every case.

Every argv is one that a build without the refusal would carry out (tiny training flags, weights
that need no download), so a case can only pass because edgeft refused it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# a finetune that would run to the end on a build without the refusal (no download, tiny)
TINY = ["--weights", "none", "--backbone", "mobilenet_v2", "--alpha", "0.35", "--image-size", "32",
        "--head-epochs", "1", "--finetune-epochs", "0", "--recipe", "seed", "--batch-size", "16"]
SEARCH = ["--weights", "none", "--backbones", "mobilenet_v2", "--alphas", "0.35", "--sizes", "32"]


def snapshot(root: Path, mtimes: bool = False) -> dict:
    """Every entry under `root`: links by target, files by sha256 (and mtime with `mtimes`), folders."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + (f"@{p.stat().st_mtime_ns}" if mtimes else "")
            else:
                out[rel] = "dir"
    return out


def digits(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    from conftest import write_digit_folder

    return write_digit_folder(root, per_class=per_class, seed=seed)


def fake_run(path: Path, data: Path, extra: dict | None = None) -> Path:
    """A finished run as finetune leaves it, without training (no TensorFlow): marker, config, labels,
    data report, split record; model.keras is a stand-in (only its existence is read before TF)."""
    from edgeft.core import rundir
    from edgeft.core.config import build_config, to_yaml
    from edgeft.data.datasets import load_splits
    try:
        from edgeft.data.record import split_record
    except ImportError:   # an edgeft from before split.json (to show the cases fail there)
        split_record = None

    cfg = build_config({"folder": str(data), "image_size": 32, "backbone": "mobilenet_v2", "alpha": 0.35,
                        "weights": "none", "test_split": 0.2, **(extra or {})})
    d = cfg.data
    with contextlib.redirect_stdout(io.StringIO()):
        splits = load_splits(str(data), 32, d.val_split, cfg.train.seed, False, d.val_dir, d.test_split, d.test_dir)
    rundir.prepare_run_dir(path, False, False)
    rundir.write_text(path / rundir.CONFIG, to_yaml(cfg))
    rundir.write_text(path / rundir.LABELS, "\n".join(splits.classes) + "\n")
    rundir.write_json(path / rundir.DATA_REPORT, splits.report)
    if split_record is not None:
        rundir.write_json(path / rundir.SPLIT, split_record(splits, str(data), d.val_dir, d.test_dir, path))
    rundir.write_json(path / rundir.METRICS, {})
    rundir.write_bytes(path / rundir.MODEL, b"stand-in")
    return path


def fake_search(path: Path) -> Path:
    from edgeft.core import rundir

    path.mkdir(parents=True)
    try:
        from edgeft.core import owned
    except ImportError:   # an edgeft from before the marker
        owned = None
    if owned is not None:
        owned.mark(path, "search")
    rundir.write_json(path / "search.json", {"format": "edgeft-search", "version": 1, "state": "searching",
                                             "limits": {"size_kb": 100.0}, "folder": str((path.parent / "data").resolve()),
                                             "candidates": []})
    (path / "phase1").mkdir()
    if owned is not None:
        owned.own(path / "phase1")
    (path / ".edgeft.lock").write_text("")   # as every search that ran has
    rundir.write_json(path / "phase1" / "c.json", {"size_kb": 12})
    return path


def split_file(run: Path, data: Path, name: str) -> str:
    """A file of the run's `name` split (any image of the folder for a run without split.json)."""
    if (run / "split.json").is_file():
        return json.loads((run / "split.json").read_text())["files"][name][0][1]
    return str(sorted(data.rglob("*.png"))[0].relative_to(data))


class Holder:
    """Another process holding DIR's edgeft lock (as a running command does)."""

    def __init__(self, d: Path):
        code = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
                "print('held', flush=True)\ntime.sleep(120)\n")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(d / ".edgeft.lock")], stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def case_overwrite_foreign_folder(c: Path):
    """issue case 1: a folder holding a config.yaml of the user's, src/ and README.md."""
    digits(c / "data")
    (c / "proj" / "src").mkdir(parents=True)
    (c / "proj" / "config.yaml").write_text("database:\n  host: x\n")
    (c / "proj" / "src" / "main.py").write_text("print(1)\n")
    (c / "proj" / "README.md").write_text("notes\n")
    return ["finetune", "data", "--out", "proj", "--overwrite", *TINY], "not an edgeft run directory"


def case_overwrite_holds_the_data(c: Path):
    """issue case 1: the training images inside --out."""
    digits(c / "proj2" / "images")
    (c / "proj2" / "config.yaml").write_text("a: 1\n")
    return ["finetune", "proj2/images", "--out", "proj2", "--overwrite", *TINY], "contains the data folder"


def case_overwrite_run_with_a_user_file(c: Path):
    """an edgeft run the user has put a file into: refused, naming it."""
    data = digits(c / "data")
    run = fake_run(c / "run", data)
    (run / "notes.txt").write_text("mine\n")
    return ["finetune", "data", "--out", "run", "--overwrite", *TINY], "notes.txt"


def case_overwrite_the_working_directory(c: Path):
    data = digits(c / "data")
    fake_run(c / "run", data)
    os.chdir(c / "run")
    return ["finetune", str(data), "--out", ".", "--overwrite", *TINY], "working directory"


def case_overwrite_home(c: Path):
    data = digits(c / "data")
    run = fake_run(c / "home", data)
    os.environ["HOME"] = str(run)
    return ["finetune", "data", "--out", str(run), "--overwrite", *TINY], "home directory"


def case_overwrite_the_image_cache(c: Path):
    digits(c / "data")
    cache = Path(os.environ["EDGEFT_CACHE"])
    return ["finetune", "data", "--out", str(cache), "--overwrite", *TINY], "image cache"


def case_search_overwrite_while_running(c: Path):
    """issue case 2: --overwrite on a search another process is running."""
    digits(c / "data")
    s = fake_search(c / "s")
    HOLDERS.append(Holder(s))
    return ["search", "data", "--out", "s", "--overwrite", *SEARCH], "in use by"


def case_search_resume_with_new_limits_while_running(c: Path):
    """issue case 2: a refused --resume must not rewrite the running search's stored limits."""
    digits(c / "data")
    s = fake_search(c / "s")
    HOLDERS.append(Holder(s))
    return ["search", "data", "--out", "s", "--resume", "--max-size-kb", "5", *SEARCH], "in use by"


def case_search_overwrite_with_a_user_file(c: Path):
    digits(c / "data")
    s = fake_search(c / "s")
    (s / "keep.txt").write_text("mine\n")
    return ["search", "data", "--out", "s", "--overwrite", *SEARCH], "keep.txt"


def case_export_after_a_split_file_changed(c: Path):
    """issue case 3: a validation image rewritten after training."""
    data = digits(c / "data")
    run = fake_run(c / "run", data)
    rel = split_file(run, data, "val")
    b = (data / rel).read_bytes()
    (data / rel).write_bytes(b[:-1] + bytes([b[-1] ^ 1]))
    return ["export", "run"], "changed since the run was trained"


def case_export_after_a_split_file_went_missing(c: Path):
    data = digits(c / "data")
    run = fake_run(c / "run", data)
    rel = split_file(run, data, "train")
    (data / rel).unlink()
    return ["export", "run"], "is missing"


def case_resume_after_a_split_file_changed(c: Path):
    """issue case 3 for --resume: the split it began with, or nothing."""
    data = digits(c / "data")
    run = fake_run(c / "run", data)
    rel = split_file(run, data, "test")
    (data / rel).write_bytes((data / rel).read_bytes() + b"\0")
    return ["finetune", "--resume", "--out", "run"], "changed since the run was trained"


def case_val_is_the_training_folder(c: Path):
    """issue case 4."""
    digits(c / "data")
    return ["finetune", "data", "--val", "data", *TINY], "is the training folder"


def case_val_is_a_copy_of_the_training_folder(c: Path):
    """issue case 4: `cp -r data val; --val val`."""
    digits(c / "data")
    shutil.copytree(c / "data", c / "val")
    return ["finetune", "data", "--val", "val", *TINY], "byte-identical"


def case_test_folder_shares_one_image(c: Path):
    """one test image that is a training image under another name."""
    digits(c / "data")
    digits(c / "test", seed=5)
    shutil.copy(c / "data" / "five" / "000.png", c / "test" / "five" / "copy.png")
    return ["finetune", "data", "--test", "test", *TINY], "byte-identical"


def case_export_opset_tf2onnx_cannot_write(c: Path):
    """issue 28: `--opset 1` converted, tf2onnx printing its tracebacks before edgeft's line; refused now
    from tf2onnx's own table of opsets, before TensorFlow loads."""
    data = digits(c / "data")
    fake_run(c / "run", data)
    return ["export", "run", "--onnx", "float", "--opset", "1"], "--opset must be from 9 to"


def case_export_opset_past_tf2onnx(c: Path):
    data = digits(c / "data")
    fake_run(c / "run", data)
    return ["export", "run", "--onnx", "float", "--opset", "99"], "--opset must be from 9 to"


# ---------------------------------------------------------------- hostile input, round 2 (issue 28)
def _config(c: Path, text: str | bytes) -> str:
    digits(c / "data")
    path = c / "run.yaml"
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


def case_config_billion_laughs(c: Path):
    """a 414-byte YAML whose aliases expand past 3 GiB: refused for its anchors, nothing expanded."""
    lol = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcde", "bcdef"):
        lol += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    return ["finetune", "data", "--config", _config(c, lol), *TINY], "anchors or aliases"


def case_config_binary(c: Path):
    return ["finetune", "data", "--config", _config(c, bytes(range(256)) * 8), *TINY], "not UTF-8 text"


def case_config_nested_100000_deep(c: Path):
    return ["finetune", "data", "--config", _config(c, "a: " + "[" * 100000 + "]" * 100000 + "\n"), *TINY], \
        "nests deeper"


def case_config_is_a_directory(c: Path):
    digits(c / "data")
    return ["finetune", "data", "--config", "data", *TINY], "is a directory"


def case_config_value_quoted_whole(c: Path):
    """a 100,000-character value: the error quotes at most 200 characters of it."""
    return ["finetune", "data", "--config", _config(c, "lr_head: " + "9" * 50 + "x" * 100000 + "\n"), *TINY], \
        "is not a valid float"


def case_seed_negative(c: Path):
    digits(c / "data")
    return ["finetune", "data", *TINY, "--seed", "-1"], "--seed must be from 0 to 4294967295"


def case_seed_past_32_bits(c: Path):
    digits(c / "data")
    return ["finetune", "data", *TINY, "--seed", str(2**32)], "--seed must be from 0 to 4294967295"


def case_parity_inputs_unbounded(c: Path):
    """--parity-inputs 100000000 allocated 1.12 TiB."""
    fake_run(c / "run", digits(c / "data"))
    return ["export", "run", "--parity-inputs", "100000000"], "--parity-inputs must be at most"


def case_parity_inputs_past_free_memory(c: Path):
    """--parity-inputs 1000000 allocated 12 GB: refused with the estimate, when it is more than is free."""
    fake_run(c / "run", digits(c / "data"), {"image_size": 512})
    return ["export", "run", "--parity-inputs", "100000"], "GiB of memory"


def case_augment_views_unbounded(c: Path):
    digits(c / "data")
    return ["finetune", "data", *TINY, "--augment-views", "100000"], "--augment-views must be at most"


def case_search_storage_unknown_url(c: Path):
    digits(c / "data")
    return ["search", "data", "--out", "s", "--storage", "garbage://x", *SEARCH], "not a database URL"


def case_search_storage_is_a_text_file(c: Path):
    digits(c / "data")
    (c / "notes.txt").write_text("my notes\n")
    return ["search", "data", "--out", "s", "--storage", "notes.txt", *SEARCH], "not an Optuna journal"


def case_search_workers_unbounded(c: Path):
    digits(c / "data")
    return ["search", "data", "--out", "s", "--workers", "48", *SEARCH], "--workers must be at most"


def case_search_json_edited_by_hand(c: Path):
    digits(c / "data")
    s = fake_search(c / "s")
    (s / "search.json").write_text("{not json")
    return ["search", "data", "--out", "s", "--resume", *SEARCH], "is not valid JSON"


def case_search_json_unknown_limit(c: Path):
    digits(c / "data")
    s = fake_search(c / "s")
    (s / "search.json").write_text('{"format": "edgeft-search", "state": "searching", "limits": {"size_kbb": 3}}')
    return ["search", "data", "--out", "s", "--resume", *SEARCH], "unknown limits key"


def _bench(c: Path, files) -> str:
    """A planned search and a device bench JSON holding `files`."""
    digits(c / "data")
    s = fake_search(c / "s")
    settings = json.loads((s / "search.json").read_text())
    (s / "search.json").write_text(json.dumps({**settings, "state": "planned"}))
    (c / "bench.json").write_text(json.dumps({"format": "edgeft-bench-folder", "files": files}))
    return str(c / "bench.json")


def _entry(**change):
    e = {"file": "mobilenet_v2_a0.35_32.tflite", "sha256": "ab" * 32, "machine": {"platform": "Linux-aarch64",
         "cpu_count": 4}, "results": [{"threads": 1, "latency_ms": {"p50": 0.031, "p95": 0.038}}], "ram_mb": 1.0}
    e.update(change)
    return e


def case_latency_from_nan_p95(c: Path):
    """issue 28 item 1: a NaN / null / negative latency passed every limit (p95 nan ms ... chosen)."""
    bad = _entry(results=[{"threads": 1, "latency_ms": {"p50": 0.03, "p95": float("nan")}}])
    return ["search", "data", "--out", "s", "--latency-from", _bench(c, [bad]), "--max-latency-ms", "0.001",
            *SEARCH], "latency p95"


def case_latency_from_negative_p50(c: Path):
    bad = _entry(results=[{"threads": 1, "latency_ms": {"p50": -1, "p95": 0.04}}])
    return ["search", "data", "--out", "s", "--latency-from", _bench(c, [bad]), *SEARCH], "latency p50"


def case_latency_from_text_p95(c: Path):
    bad = _entry(results=[{"threads": 1, "latency_ms": {"p50": 0.03, "p95": "fast"}}])
    return ["search", "data", "--out", "s", "--latency-from", _bench(c, [bad]), *SEARCH], "latency p95"


def case_latency_from_without_machine(c: Path):
    bad = _entry()
    del bad["machine"]
    return ["search", "data", "--out", "s", "--latency-from", _bench(c, [bad]), *SEARCH], "machine"


def case_latency_from_empty_results(c: Path):
    return ["search", "data", "--out", "s", "--latency-from", _bench(c, []), *SEARCH], "times no file"


def case_latency_from_files_as_strings(c: Path):
    return ["search", "data", "--out", "s", "--latency-from", _bench(c, ["a"]), *SEARCH], "not an object"


def case_class_name_not_utf8(c: Path):
    """a class folder named in Latin-1 (bytes Python cannot decode as UTF-8): one line, not a traceback."""
    digits(c / "data")
    os.rename(c / "data" / "six", os.fsdecode(bytes(c / "data") + b"/s\xefx"))
    return ["finetune", "data", *TINY], "is not named in UTF-8"


def case_cache_is_a_file(c: Path):
    """EDGEFT_CACHE naming a file got a "free space" remedy and exit 1."""
    digits(c / "data")
    (c / "cache-file").write_text("not a directory\n")
    os.environ["EDGEFT_CACHE"] = str(c / "cache-file")
    return ["finetune", "data", *TINY], "is not a directory"


# ---------------------------------------------------------------- the search's typed values (issue 28, round 2)
def _stored_search(c: Path, **settings) -> Path:
    """A search of SEARCH's space over c/data, stopped after phase 1 (its stored settings, as a new
    search of SEARCH writes them), to be continued with --resume."""
    from edgeft.core import rundir

    from dataclasses import asdict

    from edgeft.search.space import TARGETS

    data = digits(c / "data")
    s = fake_search(c / "s")
    target = asdict(TARGETS["tflite-int8"])
    stored = {"format": "edgeft-search", "version": 1, "state": "searching", "folder": str(data.resolve()),
              "weights": "none", "target": target, "threads": 1, "runs": 100, "warmup": 10,
              "finalists": 3, "keep": 0.5, "storage": None, "limits": {}, "train_values": {}, "candidates": [],
              "space": {"backbones": ["mobilenet_v2"], "alphas": [0.35], "sizes": [32]}, **settings}
    rundir.write_json(s / "search.json", stored)
    return s


def case_search_lr_head_nan(c: Path):
    """`search --lr-head nan` was refused after it had written DIR/search.json (and phase 1's files)."""
    digits(c / "data")
    return ["search", "data", "--out", "s", "--lr-head", "nan", *SEARCH], "must be a finite number"


def case_search_resume_with_another_lr_head(c: Path):
    """--resume silently trained with the stored learning rate, not the one typed again."""
    _stored_search(c, train_values={"lr_head": 0.003})
    return ["search", "data", "--out", "s", "--resume", "--lr-head", "0.01", *SEARCH], \
        "--lr-head 0.01 differs from the value the search stored, 0.003"


def case_search_resume_with_other_threads(c: Path):
    _stored_search(c, threads=2)
    return ["search", "data", "--out", "s", "--resume", "--threads", "1", *SEARCH], \
        "--threads 1 differs from the value the search stored, 2"


def case_search_resume_with_another_data_folder(c: Path):
    _stored_search(c)
    digits(c / "other")
    return ["search", "other", "--out", "s", "--resume", *SEARCH], "the data folder other differs"


def case_search_threads_unbounded(c: Path):
    """--threads 100000 was checked only after phase 1 (TensorFlow loaded, the files written)."""
    digits(c / "data")
    return ["search", "data", "--out", "s", "--threads", "100000", *SEARCH], "--threads must be from 1 to"


def case_search_tflm_latency_without_device_times(c: Path):
    """--target tflm-int8 --max-latency-ms without --latency-from was refused only after phase 1."""
    digits(c / "data")
    return ["search", "data", "--out", "s", "--target", "tflm-int8", "--max-latency-ms", "5", *SEARCH], \
        "needs times from the device"


def case_search_latency_limit_1e_300(c: Path):
    """--max-latency-ms 1e-300 ran the search and printed a 300-digit percentage."""
    digits(c / "data")
    return ["search", "data", "--out", "s", "--max-latency-ms", "1e-300", *SEARCH], "must be from 0.001 to"


def case_search_size_fits_no_backbone(c: Path):
    """--sizes 33 over the four MobileNets said the same sentence once per width (14 times): one line."""
    digits(c / "data")
    return ["search", "data", "--out", "s", "--sizes", "33", "--backbones",
            "mobilenet,mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large"], "--sizes 33 fits none"


# ---------------------------------------------------------------- every count a user types is bounded (docs/reliability.md)
def case_batch_size_unbounded(c: Path):
    digits(c / "data")
    return ["finetune", "data", *TINY, "--batch-size", "5000"], "--batch-size must be at most 1,024"


def case_dense_unbounded(c: Path):
    digits(c / "data")
    return ["finetune", "data", *TINY, "--dense", "1000000"], "--dense must be at most 4,096"


def case_rep_samples_unbounded(c: Path):
    fake_run(c / "run", digits(c / "data"))
    return ["export", "run", "--rep-samples", "1000000"], "--rep-samples must be at most 2,000"


def case_benchmark_runs_unbounded(c: Path):
    fake_run(c / "run", digits(c / "data"))
    return ["benchmark", "run", "--runs", "1000000000"], "must be from 1 to 100,000"


def case_search_runs_unbounded(c: Path):
    digits(c / "data")
    return ["search", "data", "--out", "s", "--runs", "1000000000", *SEARCH], "must be from 1 to 100,000"


def case_search_space_too_large(c: Path):
    """504 candidates (--sizes 32,34,...,198): phase 1 alone would take about 1.4 h."""
    digits(c / "data")
    sizes = ",".join(str(s) for s in range(32, 200, 2))
    return ["search", "data", "--out", "s", "--weights", "none", "--backbones", "mobilenet_v2", "--sizes", sizes], \
        "at most 256 are searched"


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}
HOLDERS: list[Holder] = []


def main(root: Path) -> dict:
    os.environ.setdefault("EDGEFT_CACHE", str(root / "_cache"))
    from edgeft.cli.app import main as cli

    results, env, cwd = {}, dict(os.environ), os.getcwd()
    only = [n for n in os.environ.get("INTEGRITY_CASES", "").split(",") if n]
    for name, build in CASES.items():
        if only and name not in only:
            continue
        c = root / name
        c.mkdir(parents=True)
        os.chdir(c)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                argv, expect = build(c)
            before = snapshot(c)
            err = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    rc = cli(argv)
                except SystemExit as e:
                    rc = e.code
                except Exception as e:   # a traceback where a refusal belongs (recorded, judged by the test)
                    rc = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
            results[name] = {"argv": argv, "rc": rc, "seconds": round(seconds, 3), "stderr": err.getvalue(),
                             "expect": expect, "tensorflow": "tensorflow" in sys.modules,
                             "unchanged": snapshot(c) == before}
        finally:
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)   # a case may set HOME or EDGEFT_CACHE
            for h in HOLDERS:
                h.stop()
            HOLDERS.clear()
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
