"""The offline demo: its data, its shipped backbone, and the transfer claim."""
import json

import numpy as np
import pytest
from PIL import Image

from edgeft.data.demo import (DEMO_CLASSES, DEMO_DIGITS, DEMO_WEIGHTS, PRETRAIN_DIGITS, build_demo_folder,
                         digit_images)


def test_digit_images_are_deterministic_rgb():
    x, y = digit_images([5, 9], size=32, seed=3)
    assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) and set(y) == {5, 9}
    x2, _ = digit_images([5, 9], size=32, seed=3)
    assert np.array_equal(x, x2)
    assert not np.array_equal(x, digit_images([5, 9], size=32, seed=4)[0])


def test_demo_task_is_disjoint_from_pretraining():
    assert not set(DEMO_DIGITS) & set(PRETRAIN_DIGITS)


def test_build_demo_folder_writes_and_reuses(tmp_path):
    dest = build_demo_folder(tmp_path / "demo")
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == sorted(DEMO_CLASSES)
    files = list((dest / "seven").glob("*.png"))
    assert len(files) > 100
    with Image.open(files[0]) as img:
        assert img.mode == "RGB" and img.size == (32, 32)
    stamp = files[0].stat().st_mtime_ns
    assert build_demo_folder(dest) == dest and files[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no temp dir left


def test_shipped_backbone_is_pretrained_and_loads_flat():
    from edgeft.core.config import ModelConfig
    from edgeft.nn.model import backbone_layers, build_model

    assert DEMO_WEIGHTS.is_file() and DEMO_WEIGHTS.stat().st_size < 5_000_000
    loaded = build_model(ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights=str(DEMO_WEIGHTS)), 32, 5)
    fresh = build_model(ModelConfig(backbone="mobilenet_v2", alpha=0.35, weights="none"), 32, 5)
    bn = [layer for layer in backbone_layers(loaded) if layer.name == "Conv_1_bn"][0]
    fresh_bn = [layer for layer in backbone_layers(fresh) if layer.name == "Conv_1_bn"][0]
    # moving statistics of a freshly built BatchNorm are exactly 0 / 1; pretrained ones are not
    assert not np.allclose(bn.moving_mean.numpy(), fresh_bn.moving_mean.numpy())
    record = json.loads(DEMO_WEIGHTS.with_name(DEMO_WEIGHTS.name.replace(".weights.h5", ".json")).read_text())
    check = record["transfer_check"]
    assert check["pretrained_val_accuracy"] > check["random_val_accuracy"] + 0.15


@pytest.mark.slow   # trains (the quick tier trains once, in quick_run)
def test_offline_demo_end_to_end(tmp_path):
    """`edgeft finetune` with no folder: runs, and pretrained features beat random ones."""
    from conftest import run_cli
    from edgeft.core import rundir

    r = run_cli("finetune", "--out", tmp_path / "demo", "--finetune-epochs", "2",
                env={"EDGEFT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "transfer check" in r.stdout and "pretraining helps" in r.stdout
    # issue 29 item 1: finetune's console (the README's first command) is short and narrow
    from test_console import check_console

    lines = check_console(r.stdout + r.stderr, "edgeft finetune (the demo)")
    assert any(line.startswith("next: edgeft export") for line in lines)
    demo = rundir.read_json(tmp_path / "demo" / "metrics.json")["demo"]
    assert demo["pretrained_val_accuracy"] > demo["random_val_accuracy"] + 0.15
