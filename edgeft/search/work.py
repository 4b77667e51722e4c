"""One unit of a search's work, run by whichever worker claimed it: a candidate's stage 1, its
stage 2, or its shipped file (export, parity gate, accuracy by its runtime).

Each candidate is an ordinary run directory, DIR/runs/<candidate>/: stage 1 is `edgeft
finetune` with no stage 2 epochs; stage 2 sets them in its config.yaml and continues it as
`edgeft finetune --resume` would; the shipped file is `edgeft export`. So every step a killed
worker left half done continues from the run's own checkpoints, and the run can be inspected,
resumed or exported by itself.
"""
from __future__ import annotations

import logging
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgeft.core import logs, rundir
from edgeft.core.config import from_yaml_file, to_yaml
from edgeft.core.errors import OperationFailed, ParityError, UserError
from edgeft.core.stats import wilson_interval
from edgeft.search.space import candidate_values

log = logging.getLogger(__name__)

SETTINGS = "search.json"
RUNS = "runs"
LOGS = "logs"   # one log per candidate: what its training and export printed


def settings(out: Path) -> dict:
    return json.loads((Path(out) / SETTINGS).read_text())


def run_dir(out: Path, cand_id: str) -> Path:
    return Path(out) / RUNS / cand_id


def _run_values(s: dict, cand: dict) -> dict:
    values = candidate_values(s["train_values"], cand["backbone"])
    values.update(folder=s["folder"], backbone=cand["backbone"], alpha=cand["alpha"], weights=cand["weights"],
                  image_size=cand["size"], finetune_epochs=0, qat_epochs=0)
    return values


def stage1(out: Path, s: dict, cand: dict) -> tuple[float, dict]:
    from edgeft.pipeline.orchestrator import finetune

    rdir = run_dir(out, cand["id"])
    metrics = rundir.read_json(rdir / rundir.METRICS, {})
    if (rdir / rundir.MODEL).is_file() and "head" in metrics:
        pass   # done before a kill: nothing to redo
    elif (rdir / rundir.CONFIG).is_file():
        finetune(out=rdir, resume=True)
    else:
        if rdir.exists():   # killed before finetune wrote its config: nothing of the user's, the search's own folder
            shutil.rmtree(rdir)
        finetune(_run_values(s, cand), out=rdir)
    m = rundir.read_json(rdir / rundir.METRICS, {})["head"]
    return float(m["val_accuracy"]), {"val_loss": m.get("val_loss"), "seconds": m.get("seconds"), "val_n": m.get("n")}


def stage2(out: Path, s: dict, cand: dict) -> tuple[float, dict]:
    from edgeft.pipeline.orchestrator import finetune
    from edgeft.run import Run
    from edgeft.train.recipe import finetune_epochs_for

    rdir = run_dir(out, cand["id"])
    cfg = from_yaml_file(rdir / rundir.CONFIG)
    metrics = rundir.read_json(rdir / rundir.METRICS, {})
    if not (cfg.train.finetune_epochs > 0 and "finetune" in metrics and (rdir / rundir.MODEL).is_file()):
        if cfg.train.finetune_epochs == 0:
            epochs = s["train_values"].get("finetune_epochs")
            if epochs is None:
                epochs = finetune_epochs_for(len(Run(rdir, cfg).splits.train.y), cfg.data.batch_size)
            rundir.write_text(rdir / rundir.CONFIG, to_yaml(replace(cfg, train=replace(cfg.train, finetune_epochs=epochs)), rdir))
        finetune(out=rdir, resume=True)
    m = rundir.read_json(rdir / rundir.METRICS, {})["finetune"]
    return float(m["val_accuracy"]), {"val_loss": m.get("val_loss"), "seconds": m.get("seconds"),
                                      "kept_stage1": bool(m.get("kept_stage1")), "val_n": m.get("n")}


def shipped(out: Path, s: dict, cand: dict) -> tuple[float, dict]:
    """Export and gate the target file, then its accuracy by its runtime on validation (the
    choice's) and test (reported only) images."""
    from edgeft.core.formats import FORMATS, TFLM_DIR
    from edgeft.device import check_manifest
    from edgeft.pipeline.exporter import export
    from edgeft.run import Run
    from edgeft.verify.runners import open_format_runner

    target = s["target"]
    rdir = run_dir(out, cand["id"])
    run = Run.open(rdir)
    path = rdir / rundir.EXPORT_DIR / target["filename"]
    fmt = next(f for f in FORMATS if f.family == target["family"] and f.flag == target["flag"])
    exported = path.is_file() and check_manifest(path) is None and (
        target["family"] != "tflm" or (rdir / rundir.EXPORT_DIR / TFLM_DIR).is_dir())
    if not exported:
        kw = {"tflite": [target["flag"]]} if target["family"] in ("tflite", "tflm") else {"onnx": [target["flag"]]}
        export(run, tflm=target["family"] == "tflm", **kw)
    runner = open_format_runner(fmt, path, s["threads"])
    splits = run.splits
    val = _correct(runner, splits.val)
    info = {"file": str(path.relative_to(out)), "val_correct": "".join("1" if v else "0" for v in val),
            "val_n": int(len(val)), "val_accuracy": float(np.mean(val))}
    if splits.test is not None and len(splits.test.y):
        test = _correct(runner, splits.test)
        lo, hi = wilson_interval(int(test.sum()), len(test))
        info |= {"test_accuracy": float(test.mean()), "test_n": int(len(test)), "test_low": lo, "test_high": hi}
    return info["val_accuracy"], info


def _correct(runner, images) -> np.ndarray:
    out = []
    for start in range(0, len(images.y), 32):
        idx = np.arange(start, min(start + 32, len(images.y)))
        out.append(runner.predict(images.read(idx).astype(np.float32)).argmax(-1) == images.y[idx])
    return np.concatenate(out) if out else np.zeros(0, bool)


STEPS = (stage1, stage2, shipped)


def work(out: Path, trials, claimed) -> None:
    """Runs one claimed trial and tells Optuna how it ended."""
    cand_id, rung, trial = claimed
    s = settings(out)
    cand = next(c for c in s["candidates"] if c["id"] == cand_id)
    from edgeft.search.trials import RUNGS

    path = Path(out) / LOGS / f"{cand_id}.log"
    # per candidate: in the log (and on the console with --verbose); the console keeps one line a rung
    log.debug(f"search: {cand_id}: {RUNGS[rung]} (its output: {path})")
    try:
        with trials.heartbeat(trial), logs.diverted(path):   # its training and export log there, not here
            log.info(f"==== {RUNGS[rung]} ({time.strftime('%Y-%m-%d %H:%M:%S')})")
            value, info = STEPS[rung](Path(out), s, cand)
    except ParityError as e:
        trials.fail(trial, f"its {s['target']['filename']} failed the parity gate: {str(e)[:300]}")
        log.info(f"search: {cand_id}: the parity gate refused its file; the next candidate takes its place")
        return
    except (UserError, OperationFailed) as e:
        trials.fail(trial, f"{RUNGS[rung]} failed: {str(e)[:300]}")
        log.info(f"search: {cand_id}: {RUNGS[rung]} failed: {e}")
        return
    trials.complete(trial, value, info)
    log.debug(f"search: {cand_id}: {RUNGS[rung]} validation accuracy {value:.4f}")


def worker_loop(out: Path, trials) -> int:
    """Claims and runs trials until none waits; returns how many it ran."""
    n = 0
    while True:
        claimed = trials.claim()
        if claimed is None:
            return n
        work(out, trials, claimed)
        n += 1
        from edgeft._keras import keras

        keras.backend.clear_session()
