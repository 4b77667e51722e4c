"""What `edgeft finetune` does with no folder: the offline demo and its transfer check."""
from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path

from edgeft.core.config import EdgeftConfig, section_classes
from edgeft.core.errors import UserError

log = logging.getLogger(__name__)


def demo_settings() -> dict:
    """The demo's settings, used wherever the user left a key at its default."""
    from edgeft.data import demo

    # (the gate's copies follow the run: the demo trains without mirroring, so none are mirrored)
    return {"backbone": demo.DEMO_BACKBONE, "alpha": demo.DEMO_ALPHA, "image_size": demo.DEMO_IMAGE_SIZE,
            "weights": str(demo.DEMO_WEIGHTS), "finetune_epochs": 8, "lr_finetune": 1e-3, "unfreeze": "0.5",
            "patience": 3}


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
    from edgeft.data import demo

    require_demo_weights()
    folder = demo.build_demo_folder(demo.default_demo_dir())
    log.info("no folder given: the offline demo, digits 5-9 on a backbone pretrained on digits 0-4")
    log.info(f"demo: {folder}")
    log.debug(f"demo backbone: {demo.DEMO_WEIGHTS}")
    return str(folder)


def require_demo_weights() -> None:
    from edgeft.data import demo

    if not Path(demo.DEMO_WEIGHTS).is_file():
        raise UserError(f"the demo backbone {demo.DEMO_WEIGHTS} is missing; run tools/pretrain_demo_backbone.py")
