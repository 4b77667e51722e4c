"""What `edgeft finetune` does with no folder: the offline demo and its transfer check."""
from __future__ import annotations

import tempfile
from dataclasses import fields, replace
from pathlib import Path

from .config import EdgeftConfig, section_classes
from .errors import UserError


def demo_settings() -> dict:
    """The demo's settings, used wherever the user left a key at its default."""
    from . import demo

    return {"backbone": demo.DEMO_BACKBONE, "alpha": demo.DEMO_ALPHA, "image_size": demo.DEMO_IMAGE_SIZE,
            "weights": str(demo.DEMO_WEIGHTS), "lr_head": 1e-3, "head_epochs": 15,
            "finetune_epochs": 8, "lr_finetune": 1e-3, "unfreeze": "0.5", "patience": 3,
            "parity_flip": False}   # a mirrored digit is not a digit


def is_demo(cfg: EdgeftConfig) -> bool:
    return cfg.data.folder is None


def demo_defaults(cfg: EdgeftConfig, explicit: set[str] = frozenset()) -> EdgeftConfig:
    """The demo's settings for every key the user did not set (no folder given)."""
    if not is_demo(cfg):
        return cfg
    explicit = {k.replace("-", "_") for k in explicit}
    settings = demo_settings()
    for sec, cls in section_classes().items():
        defaults = {f.name: f.default for f in fields(cls)}
        part = getattr(cfg, sec)
        changes = {k: v for k, v in settings.items()
                   if k in defaults and k not in explicit and getattr(part, k) == defaults[k]}
        if changes:
            cfg = replace(cfg, **{sec: replace(part, **changes)})
    return cfg


def data_folder(cfg: EdgeftConfig) -> str:
    if not is_demo(cfg):
        return cfg.data.folder
    from . import demo

    require_demo_weights()
    folder = demo.build_demo_folder(demo.default_demo_dir())
    print(f"no folder given: running the offline demo on {folder} "
          f"(digits 5-9; backbone pretrained on digits 0-4: {Path(demo.DEMO_WEIGHTS).name})")
    return str(folder)


def compare_with_random_features(cfg: EdgeftConfig, splits, scope, metrics: dict) -> dict | None:
    """Demo only: the same stage-1 head on frozen *random* features, to show what pretraining buys."""
    if not is_demo(cfg) or "head" not in metrics or cfg.model.weights != demo_settings()["weights"]:
        return None
    from .training import train_head
    from .model import build_model, set_seed
    from .report import evaluate_arrays

    set_seed(cfg.train.seed)
    rnd_cfg = replace(cfg, model=replace(cfg.model, weights="none"), data=replace(cfg.data, augment=False))
    with scope.strategy.scope():
        model = build_model(rnd_cfg.model, cfg.data.image_size, len(splits.classes))
    with tempfile.TemporaryDirectory(prefix="edgeft-random-") as tmp:
        train_head(model, splits, rnd_cfg, Path(tmp), scope)
    rnd = evaluate_arrays(model, splits.val, splits.classes)["val_accuracy"]
    pre = metrics["head"]["val_accuracy"]
    print(f"transfer check (same head, frozen features, {cfg.train.head_epochs} epochs): "
          f"pretrained backbone {pre:.4f} vs random backbone {rnd:.4f}  "
          + ("-> pretraining helps" if pre > rnd + 0.05 else "-> WARNING: pretrained features are not clearly better"))
    return {"pretrained_val_accuracy": pre, "random_val_accuracy": rnd, "head_epochs": cfg.train.head_epochs}


def require_demo_weights() -> None:
    from . import demo

    if not Path(demo.DEMO_WEIGHTS).is_file():
        raise UserError(f"the demo backbone {demo.DEMO_WEIGHTS} is missing; run tools/pretrain_demo_backbone.py")
