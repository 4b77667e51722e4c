"""Hostile input, round 2 (issue 28), in the search: what phase 1 judges is the file that ships, and
the numbers a refusal or a miss prints stay readable. The search's refusals of typed values (a NaN
learning rate, --threads, a TFLite Micro latency limit, a value typed again on --resume) are
property cases in tests/integrity_cases.py."""
from __future__ import annotations

import pytest

from edgeft.search.space import TARGETS, Limits, build_space, describe_misses, misses


@pytest.mark.faults
def test_a_limit_far_below_the_measurement_prints_a_short_ratio():
    """expected: a latency 3.5e-2 ms against a limit of 1e-300 ms is said in a few characters (it printed a
    percentage 300 digits long)."""
    text = describe_misses(misses({"latency_ms": {"p95": 0.03495}}, Limits(latency_ms=1e-300), TARGETS["tflite-int8"]))
    assert len(text) < 80, text
    assert "3.49e+298x the limit" in text
    assert describe_misses([("p95 latency (ms)", 1.92, 1.5)]) == "p95 latency (ms) 1.92 > 1.5 (+28 %)"


@pytest.mark.faults
def test_a_size_no_backbone_takes_is_one_reason_per_backbone():
    """expected: --sizes 33 over the four MobileNets gives each reason once (the same sentence was repeated 14
    times, once per width)."""
    from edgeft.core.errors import UserError

    with pytest.raises(UserError) as e:
        build_space(["mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"], None, [33], "imagenet")
    text = str(e.value)
    assert text.count("Keras has no ImageNet weights for it") == 3, text
    assert "mobilenet_v3_small, mobilenet_v3_large" in text and len(text) < 400


def test_phase1_drops_for_size_only_past_the_slack():
    """A file within PHASE1_SIZE_SLACK over --max-size-kb goes on to training (phase 3 judges its shipped file)."""
    from edgeft.search.space import PHASE1_SIZE_SLACK

    m, limits = {"size_bytes": 605_000}, Limits(size_kb=600)
    assert misses(m, limits, TARGETS["tflite-int8"])                                   # phase 3: over is over
    assert not misses(m, limits, TARGETS["tflite-int8"], size_slack=PHASE1_SIZE_SLACK)  # phase 1: within 3 %
    assert misses({"size_bytes": 700_000}, limits, TARGETS["tflite-int8"], size_slack=PHASE1_SIZE_SLACK)


@pytest.mark.faults
def test_phase1_judges_the_size_of_the_file_that_ships(trained_run, image_folder, demo_weights, tmp_path):
    """expected: the untrained file phase 1 measures for a candidate is the size of the int8 file export ships
    for that candidate's trained run (the same starting weights, converter path and metadata). It was 1.3 %
    smaller here (617,896 against 626,220 bytes: fresh random weights, no metadata; 3 % larger in the issue),
    so a --max-size-kb between the two dropped, or kept, the wrong candidate."""
    from types import SimpleNamespace

    from conftest import TINY
    from edgeft.data.datasets import representative_images
    from edgeft.export.keras2tflite import tflite_int8
    from edgeft.run import Run
    from edgeft.search import runner

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "mobilenet_v2_a0.35_32.weights.h5").symlink_to(demo_weights)
    values = {k: v for k, v in TINY.items() if k not in ("backbone", "alpha", "image_size")}
    o = runner.SearchOptions(folder=str(image_folder), out=str(tmp_path / "s"), backbones=["mobilenet_v2"],
                             alphas=[0.35], sizes=[32], weights=str(weights), train_values=values)
    settings = runner._new_settings(o)
    (cand,) = settings["candidates"]
    phase1 = runner.phase1(tmp_path / "s", settings, host_timing=False)[cand["id"]]
    # the file export ships from the trained run: its PTQ int8 conversion and its metadata, in the run runs/<id>
    run = Run.open(trained_run.run_dir)
    rep = representative_images(run.splits.train, run.cfg.export.rep_samples, run.cfg.train.seed)
    import importlib

    for module, name in (("edgeft.export.builders", "with_metadata"), ("edgeft.pipeline.exporter", "_with_metadata")):
        try:   # export's own metadata function (where this tree keeps it)
            with_metadata = getattr(importlib.import_module(module), name)
            break
        except (ImportError, AttributeError):
            continue
    data = tflite_int8(run.model, rep, run.cfg.export.int8_io, run.cfg.export.int8_granularity)
    shipped = with_metadata(data, SimpleNamespace(cfg=run.cfg, labels=run.splits.classes, run=tmp_path / cand["id"]))
    assert phase1["size_bytes"] == len(shipped), (phase1["size_bytes"], len(shipped))


@pytest.mark.faults
def test_a_worker_dies_with_its_coordinator(tmp_path):
    """expected: a worker process started as the search starts its workers is gone within seconds of its
    coordinator being killed with SIGKILL (workers trained on, outliving a killed search)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import subprocess, sys, time\n"
            "try:\n    from edgeft.search.runner import _die_with_parent\n"
            "except ImportError:\n    _die_with_parent = None   # an edgeft from before (workers started without it)\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], preexec_fn=_die_with_parent)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(60)\n")
    coordinator = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = int(coordinator.stdout.readline())
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    pytest.fail("the worker outlived its killed coordinator")


def test_a_candidate_given_stage2_epochs_after_stage1_is_not_finished(tmp_path, monkeypatch):
    """The search continues a candidate's stage-1 run into stage 2 by giving its config.yaml stage-2 epochs
    and resuming it: that run is not finished (`finetune --resume` of a finished run does nothing, which left
    the search's stage 2 without its metrics: KeyError 'finetune')."""
    import contextlib
    import io

    from edgeft.core import rundir
    from edgeft.pipeline.preflight import finished_run
    from integrity_cases import digits, fake_run

    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        data = digits(tmp_path / "data", per_class=3)
        run = fake_run(tmp_path / "run", data, {"finetune_epochs": 0})
    rundir.write_text(run / rundir.REPORT, "# report\n")
    rundir.write_json(run / rundir.METRICS, {"head": {"val_accuracy": 0.5}})
    assert finished_run(run) is not None                 # stage 1 only, as its config asked: finished
    cfg = (run / rundir.CONFIG).read_text()
    assert "finetune_epochs: 0" in cfg
    rundir.write_text(run / rundir.CONFIG, cfg.replace("finetune_epochs: 0", "finetune_epochs: 2"))
    assert finished_run(run) is None                     # stage 2 asked for, not run: --resume continues it
    rundir.write_json(run / rundir.METRICS, {"head": {"val_accuracy": 0.5}, "finetune": {"val_accuracy": 0.6}})
    assert finished_run(run) is not None


@pytest.mark.parametrize("head, built", [("auto", "flatten"), ("gap", "gap")])
def test_phase1_builds_the_larger_head_when_stage1_may_choose_it(head, built, monkeypatch):
    """--head auto: stage 1 may pick Flatten, the larger file, so phase 1 judges a budget on it."""
    import numpy as np

    from edgeft.core.config import build_config
    from edgeft.nn.model import head_kind
    from edgeft.search import measure
    from edgeft.search.space import Candidate

    seen = []
    monkeypatch.setattr(measure, "file_bytes", lambda model, *a, **k: seen.append(head_kind(model)) or b"")
    cfg = build_config({"head": head, "weights": "none", "backbone": "mobilenet_v2", "alpha": 0.35})
    measure.untrained_file(Candidate("mobilenet_v2", 0.35, 64), next(iter(TARGETS.values())), ["a", "b"],
                           np.zeros((2, 64, 64, 3), np.float32), cfg)
    assert seen == [built]
