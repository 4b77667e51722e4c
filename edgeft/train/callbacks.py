"""Training callbacks and weight files shared by stage 1, stage 2 and QAT: one history.csv row
per epoch, per-epoch checkpoints and early stopping, weights written atomically."""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from edgeft._keras import keras
from edgeft.core import rundir
from edgeft.core.errors import OperationFailed
from edgeft.train.report import HISTORY_COLUMNS

STATE = rundir.STATE
_epochs = logging.getLogger("edgeft.progress.epochs")   # every epoch line in the run log (DEBUG: --verbose shows it);
# the console gets them by the progress rule (edgeft.core.progress.Lines): in place on a terminal, off one a
# line only in a stage past 10 s and then at most every 30 s
STAGE_NAMES = {"head": "stage 1", "finetune": "stage 2", "qat": "qat"}


def epoch_line(stage: str, n: int, total, seconds: float, logs: dict) -> str:
    """`stage 2: epoch 3/8 - 12 s - loss 0.4123  accuracy 0.8712  val_loss ...` (Keras' own line
    is off: fit runs with verbose=0, and this line goes through edgeft's logger); under 100 columns."""
    values = "  ".join(f"{k} {float(v):.4f}" for k, v in logs.items()
                       if isinstance(v, (int, float)) or hasattr(v, "__float__"))
    return f"{STAGE_NAMES.get(stage, stage)}: epoch {n}/{total or '?'} - {seconds:.0f} s" + (f" - {values}" if values else "")


class EpochLog(keras.callbacks.Callback):
    """Appends one `history.csv` row per epoch; in stage 2 also checkpoints and tracks early stopping.

    Order matters for --resume: checkpoint, best weights, history, then state.json last, so the
    state never claims an epoch whose files are missing.
    """

    def __init__(self, run: Path, stage: str, manager=None, patience: int = 0, state: dict | None = None):
        super().__init__()
        self.run, self.stage, self.manager, self.patience = run, stage, manager, patience
        self.state = dict(state or {})
        self.t0 = time.time()
        self.lines = None

    def on_train_begin(self, logs=None):
        from edgeft.core.progress import Lines

        self.lines = Lines()

    def on_train_end(self, logs=None):
        if self.lines is not None:
            self.lines.close()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()

    def _check_loss(self, logs, where: str) -> None:
        """Stops the command (exit 1) when an epoch ends with a NaN or inf loss, before anything of
        that epoch is written: every later step would be NaN too, and a NaN model must not be saved,
        exported or reported as trained. Checked once an epoch, not every step: a per-step hook
        makes Keras copy the logs to the host after every step, which stalls a GPU's queue."""
        # val_loss too: NaN there with a finite training loss means the last update made the weights NaN
        key, loss = next(((k, (logs or {})[k]) for k in ("loss", "val_loss") if not _finite((logs or {}).get(k))),
                         (None, None))
        if key is not None:
            lr = {"head": "--lr-head", "finetune": "--lr-finetune", "qat": "--lr-qat"}.get(self.stage,
                                                                                          "the learning rate")
            again = "edgeft qat again" if self.stage == "qat" else "edgeft finetune again with --overwrite"
            what = "training loss" if key == "loss" else "validation loss"
            raise OperationFailed(f"{self.stage}: the {what} became {float(loss)} at {where}: training "
                                 f"diverged (learning rate too high, or non-finite pixels); lower {lr} and run "
                                 f"{again} ({self.run} is left unfinished)")

    def on_epoch_end(self, epoch, logs=None):
        self._check_loss(logs, f"the end of epoch {epoch + 1}")
        logs = dict(logs or {})
        n = epoch + 1
        row = {"stage": self.stage, "epoch": n, "lr": current_lr(self.model.optimizer),
               "seconds": round(time.time() - self.t0, 3)}
        line = epoch_line(self.stage, n, (self.params or {}).get("epochs"), row["seconds"], logs)
        _epochs.debug(line)
        if self.lines is not None:
            self.lines.show(line)
        row.update({k: float(v) for k, v in logs.items() if k in HISTORY_COLUMNS})
        if self.manager is not None:
            self.manager.save(checkpoint_number=n)
            self._track_best(n, row.get("val_loss"))
        rows = [r for r in rundir.read_csv(self.run / rundir.HISTORY)
                if not (r["stage"] == self.stage and int(r["epoch"]) >= n)]
        rundir.write_csv(self.run / rundir.HISTORY, rows + [row], HISTORY_COLUMNS)
        if self.manager is not None:
            self.state[f"{self.stage}_epochs_done"] = n
            rundir.write_json(self.run / STATE, self.state)
            if self.patience and self.state["wait"] >= self.patience:
                self.model.stop_training = True

    def _track_best(self, n: int, val_loss):
        best = self.state.get("best_val_loss")
        if val_loss is not None and (best is None or val_loss < best):
            path = self.run / rundir.CHECKPOINTS / f"best-{n}"
            save_weights(self.model, path)
            old = self.state.get("best_weights")
            self.state.update(best_val_loss=float(val_loss), best_epoch=n, best_weights=path.name, wait=0)
            if old and old != path.name:
                shutil.rmtree(self.run / rundir.CHECKPOINTS / old, ignore_errors=True)
        else:
            self.state["wait"] = self.state.get("wait", 0) + 1


def _finite(value) -> bool:
    """False only for a number that is NaN or inf (absent or non-numeric logs are not checked)."""
    try:
        return value is None or math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


def save_weights(model, folder: Path) -> None:
    """Weights as a TF checkpoint in `folder`, written beside it and renamed into place.

    TF checkpoints (not .h5) because they restore into distributed variables under any strategy.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_weights(str(tmp / "weights"))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_weights(model, folder: Path) -> None:
    model.load_weights(str(Path(folder) / "weights")).expect_partial()


def current_lr(opt) -> float:
    lr = opt.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(opt.iterations)
    return float(keras.backend.get_value(lr))
