"""Two-stage fine-tuning end to end on a tiny model."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from conftest import TINY, run_cli
from edgeft.cli.app import FINETUNE_SECTIONS, _config_keys
from edgeft.core import rundir
from edgeft.core.config import build_config
from edgeft.data.datasets import load_splits
from edgeft.nn.model import backbone_layers, build_model, is_batchnorm
from edgeft.train.distribute import make_scope
from edgeft.train.stages import train_finetune, train_head


def _weights(layers):
    return {layer.name: [w.copy() for w in layer.get_weights()] for layer in layers}


def _changed(before, after_layers):
    return {layer.name for layer in after_layers
            if any(not np.array_equal(a, b) for a, b in zip(before[layer.name], layer.get_weights()))}


def _setup(image_folder, demo_weights, **over):
    cfg = build_config({"folder": str(image_folder), "weights": demo_weights, **TINY, **over})
    splits = load_splits(str(image_folder), 32, 0.2, 1)
    model = build_model(cfg.model, 32, len(splits.classes))
    return cfg, splits, model


@pytest.mark.slow   # trains (the quick tier trains once, in quick_run)
def test_stage1_leaves_every_backbone_weight_unchanged(tmp_path, image_folder, demo_weights):
    # cached features; the full frozen model with augmentation; cached augmented views
    for augment in ({"augment": False}, {"augment": True}, {"augment_policy": "photo", "augment_views": 2}):
        cfg, splits, model = _setup(image_folder, demo_weights, **augment, head_epochs=2)
        before = _weights(backbone_layers(model))
        head_before = model.get_layer("predictions").get_weights()[0].copy()
        model, _, _ = train_head(model, splits, cfg, tmp_path / f"aug{len(str(augment))}", make_scope(cfg.train))
        assert _changed(before, backbone_layers(model)) == set(), augment
        assert not np.array_equal(head_before, model.get_layer("predictions").get_weights()[0])


@pytest.mark.slow   # trains (the quick tier trains once, in quick_run)
def test_stage2_trains_exactly_the_chosen_layers_never_batchnorm(tmp_path, image_folder, demo_weights):
    cfg, splits, model = _setup(image_folder, demo_weights, unfreeze="block_15", finetune_epochs=1,
                                lr_finetune=1e-3, patience=0)
    before = _weights(backbone_layers(model))
    trained = train_finetune(model, splits, cfg, tmp_path, make_scope(cfg.train), {})
    changed = _changed(before, backbone_layers(model))
    assert changed == set(trained) and changed
    assert all(name.startswith(("block_15", "block_16", "Conv_1")) for name in changed)
    # BatchNorm: neither gamma/beta nor the moving statistics moved (inference mode)
    assert not {layer.name for layer in backbone_layers(model) if is_batchnorm(layer)} & changed


def test_tiny_model_learns_and_run_dir_is_complete(trained_run, image_folder):
    run, m = trained_run.run_dir, trained_run.metrics
    assert m["head"]["val_accuracy"] >= 0.8 and m["finetune"]["val_accuracy"] >= 0.8   # chance is 0.33
    assert set(m["finetune"]["per_class_accuracy"]) == {"five", "seven", "six"}
    for name in ("config.yaml", "labels.txt", "data_report.json", "history.csv", "metrics.json", "model.keras",
                 "curves.png", "confusion_matrix.png", "report.md"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "labels.txt").read_text().split() == ["five", "seven", "six"]
    rows = rundir.read_csv(run / "history.csv")
    assert [(r["stage"], int(r["epoch"])) for r in rows] == \
        [("head", i) for i in range(1, TINY["head_epochs"] + 1)] + [("finetune", i) for i in (1, 2)]
    assert float(rows[-1]["val_accuracy"]) > 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["alpha"] == 0.35 and cfg["data"]["folder"] == str(image_folder)
    assert any((run / "logs" / "finetune").rglob("events.out.tfevents*"))
    report = rundir.read_json(run / "data_report.json")
    assert report["n_train"] + report["n_val"] + report["n_test"] == 72 and report["skipped"] == []
    assert report["test_per_class"] == {"five": 2, "seven": 2, "six": 2}   # the default 10 % test split
    assert m["test"]["n"] == 6 and m["finetune"]["n"] == report["n_val"] == 12


def test_config_yaml_reproduces_the_run(trained_run, tmp_path):
    """The resolved config.yaml, fed back with --config, gives the same metrics (seeded)."""
    r = run_cli("finetune", "--config", trained_run.run_dir / "config.yaml", "--out", tmp_path / "again")
    assert r.returncode == 0, r.stderr[-3000:]
    again = rundir.read_json(tmp_path / "again" / "metrics.json")
    assert abs(again["head"]["val_accuracy"] - trained_run.metrics["head"]["val_accuracy"]) <= 0.1


@pytest.mark.slow   # trains (the quick tier trains once, in quick_run)
def test_resume_after_sigkill(tmp_path, image_folder, demo_weights):
    out = tmp_path / "run"
    epochs = 8
    args = [sys.executable, "-m", "edgeft", "finetune", str(image_folder), "--weights", demo_weights,
            "--out", str(out), "--finetune-epochs", str(epochs)] + \
        [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()
         if k != "finetune_epochs" and k in _config_keys(FINETUNE_SECTIONS)]   # parity_flip is not a finetune flag
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        done = (rundir.read_json(out / "state.json", {}) or {}).get("finetune_epochs_done", 0) if \
            (out / "state.json").exists() else 0
        if done >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-run: {proc.returncode} {proc.stderr.read()[-2000:]}"
    assert done < epochs
    r = run_cli("finetune", "--resume", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed after epoch" in r.stdout
    rows = rundir.read_csv(out / "history.csv")
    assert [int(r["epoch"]) for r in rows if r["stage"] == "finetune"] == list(range(1, epochs + 1))
    assert [int(r["epoch"]) for r in rows if r["stage"] == "head"] == list(range(1, TINY["head_epochs"] + 1))
    assert rundir.read_json(out / "state.json")["finetune_epochs_done"] == epochs
    assert "finetune" in rundir.read_json(out / "metrics.json")
