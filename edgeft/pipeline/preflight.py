"""Checks that need no model, run by the CLI before TensorFlow is imported and before anything is
written: a refusal costs a fraction of a second and leaves every file as it was.

- `finetune`: the data folder, --val / --test (not the training folder; no image byte-identical to
  another split's, which needs the folders decoded: the image cache, not the user's tree), --out
  (what --overwrite may replace, core/owned.py; what --resume may continue).
- `run_commands`: a finished run whose recorded split (split.json) still matches its folder.

The library makes every check again where it acts (under the run's lock); these only make the
common refusals cheap. No TensorFlow here.
"""
from __future__ import annotations

import logging
from pathlib import Path

from edgeft.core import byob, rundir
from edgeft.core.config import EdgeftConfig, build_config
from edgeft.core.errors import UserError
from edgeft.core.registry import get_backbone
from edgeft.data.cache import cache_root
from edgeft.data.datasets import check_extra_folders, load_splits
from edgeft.data.images import list_folder

log = logging.getLogger(__name__)

__all__ = ["check_finetune", "check_run", "finished_run", "say_finished"]


def finished_run(out: str | None):
    """The run in `out` (an edgeft.run.Run) when its `finetune` ran to the end: model.keras and
    report.md written (the reports come last), and, when its config asks for QAT, the QAT model or
    QAT's entry in metrics.json (QAT skipped for a model it cannot quantize). --resume has nothing
    to continue there, and must not touch a file of it. None otherwise (an unfinished run, or no
    run: then the usual checks say what is wrong)."""
    from edgeft.core import owned
    from edgeft.run import Run

    if out is None:
        return None
    path = Path(out)
    if not (path / rundir.CONFIG).is_file() or not owned.is_edgeft_dir(path):
        return None
    if not (path / rundir.MODEL).is_file() or not (path / rundir.REPORT).is_file():
        return None
    run = Run.open_unfinished(path)
    try:
        metrics = rundir.read_json(path / rundir.METRICS, {})
    except (OSError, ValueError):
        metrics = {}
    metrics = metrics if isinstance(metrics, dict) else {}
    if run.cfg.qat.qat_epochs > 0 and not (path / rundir.QAT_WEIGHTS).is_file() and "qat" not in metrics:
        return None
    # stage 2 asked for and not run: a run whose config.yaml was given stage-2 epochs after stage 1
    # (what `edgeft search` does to continue a candidate) is not finished
    if (run.cfg.train.finetune_epochs or 0) > 0 and "finetune" not in metrics:
        return None
    return run


def say_finished(run) -> None:
    import shlex

    where = shlex.quote(str(run.path))
    log.info(f"finetune --resume: {run.path} is already finished (model.keras and report.md written); nothing to "
             f"resume, no file changed. next: edgeft export {where}   (or finetune --overwrite to train it again)")


def check_finetune(values: dict | None, out: str | None, overwrite: bool, resume: bool) -> None:
    """UserError for a finetune that would be refused later (see the module docstring)."""
    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN")
        rundir.check_run_dir(out, overwrite=False, resume=True)
        from edgeft.run import Run, load_run_splits

        run = Run.open_unfinished(out)
        if (run.path / rundir.SPLIT).is_file():   # the split it began with: every file still there, unchanged
            load_run_splits(run.path, run.cfg, run.folder)
        return
    cfg: EdgeftConfig = build_config(values or {})
    folder = cfg.data.folder
    if folder is None:   # the offline demo: its folder is made later, outside the working tree
        if out is not None:
            rundir.check_run_dir(out, overwrite, False, cache=cache_root())
        return
    list_folder(folder)   # missing, fewer than 2 classes, bad class names
    d = cfg.data
    check_extra_folders(folder, d.val_dir, d.test_dir)
    for extra, flag in ((d.val_dir, "--val"), (d.test_dir, "--test")):
        if extra and not Path(extra).is_dir():
            raise UserError(f"{flag} folder not found: {extra}")
    run = Path(out) if out else rundir.default_run_dir(folder, byob.run_name(cfg.model))
    rundir.check_run_dir(run, overwrite, False, data=(folder, d.val_dir, d.test_dir), cache=cache_root())
    file_size_unknown = byob.is_file_backbone(cfg.model.backbone) and not d.image_size   # told by the file (TF)
    if (d.val_dir or d.test_dir) and not file_size_unknown:   # copies across folders: by content, before any model
        size = d.image_size or get_backbone(cfg.model.backbone).default_size   # the size training decodes at
        load_splits(folder, size, d.val_split, cfg.train.seed, d.strict, d.val_dir,
                    d.test_split, d.test_dir)


def check_run(path: str, data: str | None = None):
    """The finished run in `path` (an edgeft.run.Run, its recorded split read and checked: every
    file's size and sha256); UserError otherwise. `data`: the command's --data DIR, where the
    run's data folder is looked for when neither its recorded path nor the one relative to the
    run is there (edgeft.run.Run.folder)."""
    from edgeft.run import Run

    if data is not None and not Path(data).is_dir():
        raise UserError(f"--data {data}: not a folder")
    run = Run.open(path, data=data)
    if (run.path / rundir.SPLIT).is_file():
        run.splits   # noqa: B018 - reading it checks every recorded file's size and sha256
    return run
