"""Two-stage fine-tuning: stage 1 trains a new head on a frozen backbone, stage 2 unfreezes the
top of the backbone at a much smaller learning rate.

Stage 1 without augmentation runs the backbone once over the data and trains the head on the
cached features (the frozen backbone would compute the same features every epoch). Stage 2 saves
a checkpoint and `state.json` after every epoch, so `--resume` continues a killed run from its last
finished epoch.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import rundir
from ._keras import keras, tf
from .config import EdgeftConfig, build_config, from_yaml_file, to_yaml
from .data import Splits, load_splits, make_dataset
from .distribute import Scope, make_scope
from .errors import UserError
from .model import (as_float32, build_model, feature_extractor, freeze_backbone, head_model, resolve_image_size,
                    select_unfreeze, set_seed, unfreeze_top)
from .report import HISTORY_COLUMNS, evaluate_arrays, evaluate_test, write_reports

STATE = "state.json"


@dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict
    model: keras.Model


# ---------------------------------------------------------------- history and per-epoch state
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

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        n = epoch + 1
        row = {"stage": self.stage, "epoch": n, "lr": _current_lr(self.model.optimizer),
               "seconds": round(time.time() - self.t0, 3)}
        row.update({k: float(v) for k, v in logs.items() if k in HISTORY_COLUMNS})
        if self.manager is not None:
            self.manager.save(checkpoint_number=n)
            self._track_best(n, row.get("val_loss"))
        rows = [r for r in rundir.read_csv(self.run / "history.csv")
                if not (r["stage"] == self.stage and int(r["epoch"]) >= n)]
        rundir.write_csv(self.run / "history.csv", rows + [row], HISTORY_COLUMNS)
        if self.manager is not None:
            self.state[f"{self.stage}_epochs_done"] = n
            rundir.write_json(self.run / STATE, self.state)
            if self.patience and self.state["wait"] >= self.patience:
                self.model.stop_training = True

    def _track_best(self, n: int, val_loss):
        best = self.state.get("best_val_loss")
        if val_loss is not None and (best is None or val_loss < best):
            path = self.run / "checkpoints" / f"best-{n}"
            save_weights(self.model, path)
            old = self.state.get("best_weights")
            self.state.update(best_val_loss=float(val_loss), best_epoch=n, best_weights=path.name, wait=0)
            if old and old != path.name:
                shutil.rmtree(self.run / "checkpoints" / old, ignore_errors=True)
        else:
            self.state["wait"] = self.state.get("wait", 0) + 1


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


def _current_lr(opt) -> float:
    lr = opt.learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        lr = lr(opt.iterations)
    return float(keras.backend.get_value(lr))


# ---------------------------------------------------------------- stage 1
def train_head(model, splits: Splits, cfg: EdgeftConfig, run: Path, scope: Scope) -> None:
    """Stage 1: backbone frozen. Cached features unless augmenting (then the full model trains)."""
    t = cfg.train
    freeze_backbone(model)
    callbacks = [EpochLog(run, "head"), keras.callbacks.TensorBoard(str(run / "logs" / "head"))]
    batch = cfg.data.batch_size * scope.replicas
    if cfg.data.augment or not scope.can_cache_features:
        if not cfg.data.augment:
            print(f"stage 1: {scope.name} cannot cache features here; training the full frozen model")
        with scope.strategy.scope():
            model.compile(keras.optimizers.Adam(t.lr_head), "sparse_categorical_crossentropy",
                          ["accuracy"], jit_compile=t.xla or None)
        model.fit(scope.distribute(make_dataset(splits.train.x, splits.train.y, batch, True,
                                                cfg.data.augment, t.seed)),
                  validation_data=scope.distribute(make_dataset(splits.val.x, splits.val.y, batch)),
                  epochs=t.head_epochs, callbacks=callbacks, verbose=2)
        return
    with scope.strategy.scope():
        extractor, head = feature_extractor(model), head_model(model)
        head.compile(keras.optimizers.Adam(t.lr_head), "sparse_categorical_crossentropy", ["accuracy"],
                     jit_compile=t.xla or None)
    t0 = time.time()
    f_train = extractor.predict(make_dataset(splits.train.x, splits.train.y, batch), verbose=0)
    f_val = extractor.predict(make_dataset(splits.val.x, splits.val.y, batch), verbose=0)
    print(f"stage 1: backbone features cached once ({len(f_train) + len(f_val)} images, "
          f"{time.time() - t0:.1f}s)")
    head.fit(f_train, splits.train.y, batch_size=batch, epochs=t.head_epochs, shuffle=True,
             validation_data=(f_val, splits.val.y), callbacks=callbacks, verbose=2)


# ---------------------------------------------------------------- stage 2
def _stage2_optimizer(cfg: EdgeftConfig, steps_per_epoch: int):
    t = cfg.train
    lr = t.lr_finetune
    if t.schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(t.lr_finetune, max(1, t.finetune_epochs * steps_per_epoch))
    return keras.optimizers.Adam(lr)


def train_finetune(model, splits: Splits, cfg: EdgeftConfig, run: Path, scope: Scope,
                   state: dict, resume_from: Path | None = None) -> list[str]:
    """Stage 2: top of the backbone trainable (never BatchNorm), checkpoint every epoch.

    Writes go to `run` (a worker's own directory); a resumed run restores from `resume_from`
    (the chief's run directory, which every worker must be able to read).
    """
    t = cfg.train
    trained = unfreeze_top(model, t.unfreeze)
    batch = cfg.data.batch_size * scope.replicas
    steps = math.ceil(len(splits.train.y) / batch)
    with scope.strategy.scope():
        opt = _stage2_optimizer(cfg, steps)
        model.compile(opt, "sparse_categorical_crossentropy", ["accuracy"], jit_compile=t.xla or None)
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    # every worker saves (saving runs collectives under MultiWorkerMirroredStrategy)
    manager = tf.train.CheckpointManager(ckpt, str(run / "checkpoints" / "finetune"), max_to_keep=3,
                                         checkpoint_name="ckpt")
    done = int(state.get("finetune_epochs_done", 0))
    if done:
        ckpt.restore(str((resume_from or run) / "checkpoints" / "finetune" / f"ckpt-{done}")).expect_partial()
        print(f"stage 2: resumed after epoch {done} of {t.finetune_epochs}")
    if done < t.finetune_epochs and not state.get("stopped_early"):
        callbacks = [EpochLog(run, "finetune", manager, t.patience, state),
                     keras.callbacks.TensorBoard(str(run / "logs" / "finetune"))]
        if t.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=max(1, t.patience // 2)))
        model.fit(scope.distribute(make_dataset(splits.train.x, splits.train.y, batch, True,
                                                cfg.data.augment, t.seed + done)),
                  validation_data=scope.distribute(make_dataset(splits.val.x, splits.val.y, batch)),
                  initial_epoch=done, epochs=t.finetune_epochs, callbacks=callbacks, verbose=2)
        state.update(callbacks[0].state)
        if model.stop_training:
            state["stopped_early"] = True
            rundir.write_json(run / STATE, state)
    best = state.get("best_weights")
    if best:
        best_dir = run / "checkpoints" / best
        load_weights(model, best_dir if best_dir.exists() else (resume_from or run) / "checkpoints" / best)
        print(f"stage 2: restored best weights (epoch {state['best_epoch']}, val_loss {state['best_val_loss']:.4f})")
    return trained


# ---------------------------------------------------------------- the whole job
def resolve_config(cfg: EdgeftConfig) -> EdgeftConfig:
    """Fills in what defaults depend on (image size from the backbone)."""
    size = resolve_image_size(cfg.model, cfg.data.image_size)
    return replace(cfg, data=replace(cfg.data, image_size=size))


def finetune(config: EdgeftConfig | dict | None = None, *, out: str | Path | None = None,
             overwrite: bool = False, resume: bool = False, **overrides) -> FinetuneResult:
    """Fine-tunes a backbone on an image folder; the Python API of `edgeft finetune`.

    `config` is an EdgeftConfig or a dict of flat/nested keys; keyword overrides win.
    """
    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN")
        run = rundir.prepare_run_dir(out, overwrite=False, resume=True)
        cfg = from_yaml_file(run / "config.yaml")
    else:
        from .demo_run import demo_defaults

        # A ready EdgeftConfig is taken as it is; with keys, the demo fills in what was not given.
        explicit = set(config or {}) if isinstance(config, dict) else None
        base = config if isinstance(config, EdgeftConfig) else build_config(config or {})
        cfg = build_config(overrides, base)
        if explicit is not None:
            cfg = demo_defaults(cfg, explicit | set(overrides))
        cfg = resolve_config(cfg)
        run = None
    return _run(cfg, out, overwrite, resume, run)


def _run(cfg: EdgeftConfig, out, overwrite: bool, resume: bool, run: Path | None) -> FinetuneResult:
    """The job. Every worker runs the same steps (collectives must match); only the chief's
    files land in the run directory, the others write to a temporary one deleted at the end."""
    from .demo_run import compare_with_random_features, data_folder

    folder = data_folder(cfg)
    scope = make_scope(cfg.train)
    fresh = run is None
    if fresh:
        run = Path(out or Path("runs") / f"{Path(folder).name}_{cfg.model.backbone}")
        if scope.is_chief:
            rundir.check_run_dir(run, overwrite, resume=False)
    print(f"strategy: {scope.name}, {scope.replicas} replicas, global batch "
          f"{cfg.data.batch_size * scope.replicas} ({cfg.data.batch_size} per replica)"
          + ("" if scope.is_chief else "; not the chief: writing to a temporary directory"))
    set_seed(cfg.train.seed)
    splits = load_splits(folder, cfg.data.image_size, cfg.data.val_split, cfg.train.seed,
                         cfg.data.strict, cfg.data.val_dir, cfg.data.test_split, cfg.data.test_dir)
    _print_data(splits)
    with scope.strategy.scope():
        model = build_model(cfg.model, cfg.data.image_size, len(splits.classes))
    if cfg.train.finetune_epochs > 0:
        select_unfreeze(model, cfg.train.unfreeze)   # a bad --unfreeze fails now, not after stage 1
    # Only now, with data and model known good, is the run directory made (an old one replaced):
    # bad input leaves nothing behind and loses nothing.
    if fresh and scope.is_chief:
        rundir.prepare_run_dir(run, overwrite, resume=False)
    wdir = run if scope.is_chief else Path(scope.scratch("run"))
    state = rundir.read_json(run / STATE, {}) if resume else {}
    if not resume:
        rundir.write_text(wdir / "config.yaml", to_yaml(cfg))
        rundir.write_text(wdir / "labels.txt", "\n".join(splits.classes) + "\n")
        rundir.write_json(wdir / "data_report.json", splits.report)
        if splits.report["skipped"]:
            rundir.write_text(wdir / "skipped_files.txt",
                              "".join(f"{s['path']}\t{s['reason']}\n" for s in splits.report["skipped"]))
    metrics = rundir.read_json(run / "metrics.json", {}) if resume else {}

    if state.get("head_done") and (run / "checkpoints" / "head").exists():
        load_weights(model, run / "checkpoints" / "head")
        print("stage 1: already done, head weights loaded")
    else:
        t0 = time.time()
        train_head(model, splits, cfg, wdir, scope)
        metrics["head"] = evaluate_arrays(model, splits.val, splits.classes) | {"seconds": round(time.time() - t0, 2)}
        _say("stage 1", metrics["head"])
        save_weights(model, wdir / "checkpoints" / "head")
        state = {"head_done": True}
        rundir.write_json(wdir / STATE, state)
        rundir.write_json(wdir / "metrics.json", metrics)

    if cfg.train.finetune_epochs > 0:
        t0 = time.time()
        trained_layers = train_finetune(model, splits, cfg, wdir, scope, state, resume_from=run)
        metrics["finetune"] = evaluate_arrays(model, splits.val, splits.classes) | {
            "seconds": round(time.time() - t0, 2), "trained_layers": trained_layers,
            "best_epoch": state.get("best_epoch")}
        _say("stage 2", metrics["finetune"])

    with rundir.atomic_path(wdir / "model.keras", suffix=".keras") as tmp:
        as_float32(model).save(str(tmp))   # float32 layers even after --mixed-precision: see as_float32
    # The test split, evaluated once on the final model: nothing above (fit, early stopping, best
    # epoch) saw it, and nothing after (calibration, QAT choice, parity gate) uses it.
    metrics.pop("test", None)
    test = evaluate_test(model, splits, stage="finetune" if cfg.train.finetune_epochs > 0 else "head")
    if test:
        metrics["test"] = test
        _say_test(test)
    rundir.write_json(wdir / "metrics.json", metrics)
    if cfg.qat.qat_epochs > 0:
        from .qat import run_qat
        metrics["qat"] = run_qat(wdir, cfg, splits=splits, scope=scope)
    compare = compare_with_random_features(cfg, splits, scope, metrics)
    if compare:
        metrics["demo"] = compare
    rundir.write_json(wdir / "metrics.json", metrics)
    if scope.is_chief:
        write_reports(run, model, splits, metrics)
        print(f"run directory: {run}")
        print(f"next: edgeft export {run}    (TFLite + ONNX, checked against this model by the parity gate)")
    scope.cleanup()
    return FinetuneResult(run, metrics, model)


def _print_data(splits: Splits) -> None:
    r = splits.report
    test = (f" / {r['n_test']} test" + (f" (from {r['test_folder']})" if r.get("test_folder") else "")
            if r.get("n_test") else " (no test split)")
    print(f"data: {len(splits.classes)} classes, {r['n_train']} train / {r['n_val']} val{test} images "
          f"at {r['image_size']}px" + (f", {len(r['skipped'])} file(s) skipped (see data_report.json)"
                                      if r["skipped"] else ""))


def _say(stage: str, m: dict) -> None:
    print(f"{stage}: val_accuracy {m['val_accuracy']:.4f}  val_loss {m['val_loss']:.4f}")


def _say_test(t: dict) -> None:
    lo, hi = t["interval_95"]
    print(f"test: accuracy {t['accuracy']:.4f} (95 % interval {lo:.4f}-{hi:.4f}) on {t['n']} images "
          f"nothing was tuned on")
