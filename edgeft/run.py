"""A run directory, opened once and carried from stage to stage.

`Run.open(path)` checks once that `path` is a finished edgeft run, parses config.yaml once, and
then hands out every file of the run by name (`run.file(rundir.METRICS)`), the data folder
(resolved once: a demo run's folder is read from data_report.json instead of building the demo
again), the splits (read from the image cache, see edgeft.data.cache) and the model, each made on
first use and kept. qat, export, parity, evaluate and benchmark take a Run; `edgeft finetune`
makes one for the run it has just trained, with its splits and model already in hand.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from edgeft.core import rundir
from edgeft.core.config import EdgeftConfig, from_yaml_file
from edgeft.core.errors import UserError
from edgeft.data.datasets import Splits, load_splits
from edgeft.data.demo_run import data_folder, is_demo
from edgeft.data.record import say_unrecorded, splits_from_record

log = logging.getLogger(__name__)

__all__ = ["Run", "as_run", "load_run_splits", "run_splits"]


class Run:
    def __init__(self, path: str | Path, cfg: EdgeftConfig, *, splits: Splits | None = None, model=None,
                 folder: str | None = None, data: str | None = None):
        self.path, self.cfg = Path(path), cfg
        self._splits, self._model, self._folder = splits, model, folder
        self.data = data   # --data DIR: where the data folder is looked for last (see `folder`)

    @classmethod
    def open(cls, path: str | Path, cfg: EdgeftConfig | None = None, data: str | None = None) -> "Run":
        """The finished run in `path` (UserError otherwise); `cfg` replaces its config.yaml (a
        command's flags on top of it); `data`: the command's --data DIR (see `folder`)."""
        path = Path(path)
        if not (path / rundir.CONFIG).is_file():
            raise UserError(f"{path} is not an edgeft run directory (no {rundir.CONFIG})")
        if not (path / rundir.MODEL).is_file():
            raise UserError(f"{path} is not a finished edgeft run (no {rundir.MODEL})")
        return cls(path, cfg or from_yaml_file(path / rundir.CONFIG), data=data)

    @classmethod
    def open_unfinished(cls, path: str | Path) -> "Run":
        """A run directory whose training may not have finished (`edgeft finetune --resume`)."""
        path = Path(path)
        if not (path / rundir.CONFIG).is_file():
            raise UserError(f"{path} is not an edgeft run directory (no {rundir.CONFIG})")
        return cls(path, from_yaml_file(path / rundir.CONFIG))

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.path / rundir.MODEL

    @property
    def export_dir(self) -> Path:
        return self.path / rundir.EXPORT_DIR

    def read_json(self, name: str, default=None):
        return rundir.read_json(self.path / name, default)

    def update_metrics(self, **sections) -> dict:
        """metrics.json with `sections` replaced (read, changed, written atomically)."""
        metrics = self.read_json(rundir.METRICS, {})
        metrics.update(sections)
        rundir.write_json(self.path / rundir.METRICS, metrics)
        return metrics

    @property
    def folder(self) -> str:
        """The training folder, resolved once: the recorded absolute path, else the recorded path
        relative to the run (a run moved with its data), else --data DIR (`data`); config.yaml and
        split.json each record both (edgeft.core.paths). A demo run (config `folder: null`) reuses
        the folder it recorded while it is there; only a missing one is built again. UserError
        naming what was tried when a run's folder is found nowhere."""
        if self._folder is None:
            self._folder = self._find_folder()
        return self._folder

    def _find_folder(self) -> str:
        from edgeft.core.paths import first_existing

        try:   # a damaged split.json is refused where the split is read (edgeft.data.record)
            split = self.read_json(rundir.SPLIT, {})
        except (OSError, ValueError):
            split = {}
        split = split if isinstance(split, dict) else {}
        rel = (split.get("roots_from_run") or {}).get("data")
        recorded = [(split.get("roots") or {}).get("data"),
                    os.path.normpath(os.path.join(os.path.abspath(self.path), rel)) if rel else None]
        typed = self.cfg.data.folder
        if is_demo(self.cfg):
            tried = [self.read_json(rundir.DATA_REPORT, {}).get("folder"), *recorded, self.data]
        else:   # an older run's folder as typed, relative to an unknown working directory: last
            tried = [typed if os.path.isabs(typed) else None, *recorded, self.data,
                     None if os.path.isabs(typed) else typed]
        found = first_existing(t for t in tried if t and os.path.isdir(t))
        if found is not None:
            if self.data and found == os.path.normpath(self.data) and found not in map(os.path.normpath,
                                                                                       filter(None, recorded)):
                log.info(f"data: the data folder {self.path} recorded is not there; reading --data {self.data}")
            return found
        if is_demo(self.cfg):
            return data_folder(self.cfg)   # the demo's folder, built again (the same images)
        shown = list(dict.fromkeys(t for t in tried if t))
        raise UserError(f"the data folder of the run {self.path} is not found (tried {', '.join(shown)}): "
                        f"give its new place with --data DIR")

    @property
    def splits(self) -> Splits:
        """The split the run was trained on: the files its split.json records (checked by size and
        sha256; files added since are not used, a missing or changed one is refused), read from the
        image cache. A run made before split.json is split again from its folder, as before (same
        folder, size and seed; one made before edgeft had a test split has `test_split` 0 in its
        config and gets back exactly its old train/val split), and says so once."""
        if self._splits is None:
            self._splits = load_run_splits(self.path, self.cfg, self.folder)
        return self._splits

    @property
    def model(self):
        """The float Keras model (model.keras), loaded once."""
        if self._model is None:
            from edgeft.nn.model import load_model

            self._model = load_model(self.model_path)
        return self._model

    def check_classes(self) -> None:
        """UserError (one line, exit 2) when the model's output count differs from the run's classes
        (its split's, which every exported file is labelled with) or from the lines of its
        labels.txt: checked before anything is converted, not found after conversion and the gate."""
        from edgeft.device import label_lines

        outputs = int(self.model.output_shape[-1])
        classes = list(self.splits.classes)
        source = rundir.SPLIT if (self.path / rundir.SPLIT).is_file() else f"the data folder {self.folder}"
        if outputs != len(classes):
            raise UserError(f"{self.model_path} has {outputs} outputs but the run has {len(classes)} classes "
                            f"(from {source}): the model is not this run's (restore its model.keras, or "
                            f"train again with --overwrite)")
        labels_file = self.path / rundir.LABELS
        if labels_file.is_file():
            labels = label_lines(labels_file.read_text(encoding="utf-8-sig", errors="replace"))
            if len(labels) != outputs:
                raise UserError(f"{labels_file} names {len(labels)} classes but {self.model_path} has {outputs} "
                                f"outputs: restore labels.txt (one class per line: {', '.join(classes)[:200]})")


def as_run(run: Run | str | Path, cfg: EdgeftConfig | None = None) -> Run:
    """A Run from a Run (kept; `cfg`, when given, replaces its config) or a path (opened)."""
    if isinstance(run, Run):
        if cfg is not None and cfg != run.cfg:
            same_data = cfg.data == run.cfg.data and cfg.train.seed == run.cfg.train.seed
            return Run(run.path, cfg, splits=run._splits if same_data else None, model=run._model,
                       folder=run._folder if same_data else None, data=run.data)
        return run
    return Run.open(run, cfg)


def load_run_splits(path: Path, cfg: EdgeftConfig, folder: str) -> Splits:
    """The splits of the run in `path` (see Run.splits)."""
    d = cfg.data
    if not d.image_size:
        raise UserError(f"{path / rundir.CONFIG} has no image_size: not a finished edgeft run")
    recorded = rundir.read_json(path / rundir.SPLIT, None) if (path / rundir.SPLIT).is_file() else None
    if recorded is not None:
        return splits_from_record(recorded, path, folder, d.image_size, d.strict, d.val_dir, d.test_dir)
    say_unrecorded(path)
    return load_splits(folder, d.image_size, d.val_split, cfg.train.seed, d.strict, d.val_dir, d.test_split,
                       d.test_dir)


def run_splits(cfg: EdgeftConfig, path: str | Path | None = None) -> Splits:
    """The splits of the run whose config is `cfg` (its directory `path`, when known, supplies a
    demo run's stored folder)."""
    if path is None:   # no run yet (the search's phase 1): the folder as it is now
        d = cfg.data
        return load_splits(data_folder(cfg), d.image_size, d.val_split, cfg.train.seed, d.strict, d.val_dir,
                           d.test_split, d.test_dir)
    return Run(path, cfg).splits
