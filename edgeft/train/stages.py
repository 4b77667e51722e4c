"""Two-stage fine-tuning: stage 1 trains a new head on a frozen backbone, stage 2 unfreezes the
top of the backbone at a much smaller learning rate.

Stage 1 (train/stage1.py) runs the backbone once per cached view and trains the head on the
features (the frozen backbone would compute the same features every epoch). Stage 2 saves
a checkpoint and `state.json` after every epoch, so `--resume` continues a killed run from its last
finished epoch.
"""
from __future__ import annotations

import logging
import shlex

import math
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from edgeft._keras import keras, tf
from edgeft.core import byob, logs, rundir
from edgeft.core.config import EdgeftConfig, build_config, to_yaml
from edgeft.core.errors import UserError
from edgeft.core.lock import run_lock
from edgeft.core.progress import stage
from edgeft.data.cache import set_rerun_hint
from edgeft.data.datasets import Splits, load_splits
from edgeft.data.demo_run import data_folder, demo_defaults, demo_settings, is_demo
from edgeft.layers import training_loss
from edgeft.nn.model import as_float32, build_model, resolve_image_size, select_unfreeze, set_seed, unfreeze_top
from edgeft.core import owned
from edgeft.data.cache import cache_root
from edgeft.data.record import say_unrecorded, split_record
from edgeft.run import Run, load_run_splits
from edgeft.train.callbacks import STATE, EpochLog, load_weights, save_weights
from edgeft.train.distribute import Scope, make_scope
from edgeft.train.recipe import backbone_macs, class_weight_dict, lr_schedule, resolve_for_data
from edgeft.train.report import evaluate_arrays, evaluate_test, write_reports
from edgeft.train.stage1 import train_head

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    run_dir: Path
    metrics: dict
    model: keras.Model



@dataclass
class Trained:
    """A run just trained, not yet finished: what QAT and `finish` take from training."""
    run: Path                  # the run directory
    wdir: Path                 # where this worker writes (the run directory on the chief)
    cfg: EdgeftConfig
    splits: Splits
    folder: str
    scope: Scope
    metrics: dict
    model: keras.Model
    locks: object = None       # an ExitStack holding the run directory's lock, when training took it

    def handle(self) -> Run:
        """The Run of the run just trained, its splits and data folder in hand."""
        return Run(self.wdir, self.cfg, splits=self.splits, folder=self.folder)

    def release(self) -> None:
        """Lets go of the run directory's lock (the orchestrator, once QAT and the reports are done)."""
        if self.locks is not None:
            self.locks.close()


# ---------------------------------------------------------------- stage 2
def _stage2_optimizer(cfg: EdgeftConfig, steps_per_epoch: int):
    t = cfg.train
    if t.schedule == "plateau":   # ReduceLROnPlateau sets the rate itself
        return keras.optimizers.Adam(t.lr_finetune)
    return keras.optimizers.Adam(lr_schedule(t.lr_finetune, t.finetune_epochs * steps_per_epoch, t.warmup,
                                             "cosine" if t.schedule == "cosine" else "constant"))


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
        # several steps per call into TensorFlow for fit only: compiled again below without them,
        # since compile's steps_per_execution applies to every evaluate and predict as well
        compiled = dict(optimizer=opt, loss=training_loss(t.label_smoothing), metrics=["accuracy"],
                        jit_compile=t.xla or None)
        model.compile(**compiled, steps_per_execution=t.steps_per_execution)
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
    # every worker saves (saving runs collectives under MultiWorkerMirroredStrategy)
    manager = tf.train.CheckpointManager(ckpt, str(run / rundir.CHECKPOINTS / "finetune"), max_to_keep=3,
                                         checkpoint_name="ckpt")
    done = int(state.get("finetune_epochs_done", 0))
    if done:
        ckpt.restore(str((resume_from or run) / rundir.CHECKPOINTS / "finetune" / f"ckpt-{done}")).expect_partial()
        log.info(f"stage 2: resumed after epoch {done} of {t.finetune_epochs}")
    if done < t.finetune_epochs and not state.get("stopped_early"):
        callbacks = [EpochLog(run, "finetune", manager, t.patience, state),
                     keras.callbacks.TensorBoard(str(run / rundir.LOGS / "finetune"))]
        if t.schedule == "plateau":
            callbacks.append(keras.callbacks.ReduceLROnPlateau(factor=0.2, patience=max(1, t.patience // 2)))
        model.fit(scope.dataset(splits.train, cfg.data.batch_size, True, cfg.data.augment_policy, t.seed + done),
                  validation_data=scope.dataset(splits.val, cfg.data.batch_size),
                  steps_per_epoch=scope.steps(splits.train, cfg.data.batch_size),
                  validation_steps=scope.steps(splits.val, cfg.data.batch_size),
                  initial_epoch=done, epochs=t.finetune_epochs, callbacks=callbacks, verbose=0,
                  class_weight=class_weight_dict(cfg, splits.train.y, len(splits.classes)))
        state.update(callbacks[0].state)
        if model.stop_training:
            state["stopped_early"] = True
            rundir.write_json(run / STATE, state)
    with scope.strategy.scope():   # one step per call for what follows (same optimizer: its state is kept)
        # the optimizer as fit left it: under mixed precision compile wrapped it in a LossScaleOptimizer,
        # which must not be wrapped again
        model.compile(**{**compiled, "optimizer": model.optimizer})
    best = state.get("best_weights")
    if best:
        best_dir = run / rundir.CHECKPOINTS / best
        load_weights(model, best_dir if best_dir.exists() else (resume_from or run) / rundir.CHECKPOINTS / best)
        smooth = cfg.train.label_smoothing
        # fit's val_loss is the training loss (label smoothing included) on the weights of that epoch;
        # the line after this one is the plain cross-entropy of the model as it is saved
        log.info(f"stage 2: kept epoch {state['best_epoch']}'s weights (best val_loss in fit "
                 f"{state['best_val_loss']:.4f}" + (f", label smoothing {smooth:g}" if smooth else "") + ")")
    return trained


# ---------------------------------------------------------------- the whole job
def resolve_config(cfg: EdgeftConfig) -> EdgeftConfig:
    """Fills in what defaults depend on (image size from the backbone). A backbone file is checked
    (every refusal before training) and recorded as file:<sha256> beside its path."""
    size = resolve_image_size(cfg.model, cfg.data.image_size)
    return replace(cfg, data=replace(cfg.data, image_size=size), model=replace(cfg.model, **byob.recorded(cfg.model)))


def train(config: EdgeftConfig | dict | None = None, *, out: str | Path | None = None,
          overwrite: bool = False, resume: bool = False, **overrides) -> "Trained":
    """Stages 1 and 2 on an image folder: the model saved and evaluated, the reports not yet
    written (`finish`, after QAT when asked). edgeft.finetune (edgeft.pipeline.orchestrator)
    runs train -> qat -> finish.

    `config` is an EdgeftConfig or a dict of flat/nested keys; keyword overrides win.
    """
    try:
        return _finetune(config, out=out, overwrite=overwrite, resume=resume, **overrides)
    finally:
        set_rerun_hint(None)


def _finetune(config, *, out, overwrite: bool, resume: bool, **overrides) -> "Trained":
    if resume:
        if out is None:
            raise UserError("--resume needs --out RUN")
        run = rundir.prepare_run_dir(out, overwrite=False, resume=True)
        return _run(Run.open_unfinished(run).cfg, out, overwrite, resume, run)
    # A ready EdgeftConfig is taken as it is; with keys, the demo fills in what was not given.
    explicit = set(config or {}) if isinstance(config, dict) else None
    base = config if isinstance(config, EdgeftConfig) else build_config(config or {})
    cfg = build_config(overrides, base)
    if explicit is not None:
        cfg = demo_defaults(cfg, explicit | set(overrides))
    return _run(resolve_config(cfg), out, overwrite, resume, None)


def _run(cfg: EdgeftConfig, out, overwrite: bool, resume: bool, run: Path | None) -> "Trained":
    locks = ExitStack()   # the run directory's lock (edgeft.core.lock): held until Trained.release()
    try:
        return _train(cfg, out, overwrite, resume, run, locks)
    except BaseException:
        locks.close()
        raise


def protected_for(folder: str, cfg: EdgeftConfig) -> dict:
    """What --overwrite must never remove for this run: its data folders and the image cache."""
    return {"data": (folder, cfg.data.val_dir, cfg.data.test_dir), "cache": cache_root()}


def check_out_dir(run: Path, overwrite: bool, folder: str, cfg: EdgeftConfig) -> None:
    """Refuses (UserError) an --out that may not be used, before anything is written (core/owned.py)."""
    rundir.check_run_dir(run, overwrite, False, **protected_for(folder, cfg))


def _train(cfg: EdgeftConfig, out, overwrite: bool, resume: bool, run: Path | None, locks: ExitStack) -> "Trained":
    """The job. Every worker runs the same steps (collectives must match); only the chief's
    files land in the run directory, the others write to a temporary one deleted at the end."""
    folder = Run(run, cfg).folder if run is not None else data_folder(cfg)   # a resumed demo: its stored folder
    scope = make_scope(cfg.train)
    fresh = run is None
    if not fresh and scope.is_chief:
        locks.enter_context(run_lock(run, "finetune --resume"))
    if fresh:
        run = Path(out) if out else rundir.default_run_dir(folder, byob.run_name(cfg.model))
        if scope.is_chief:
            check_out_dir(run, overwrite, folder, cfg)
            if owned.is_edgeft_dir(run):   # --overwrite: nobody may be using the run it replaces
                locks.enter_context(run_lock(run, "finetune --overwrite", create=False))   # refused at once
    log.info(f"strategy: {scope.name}, {scope.replicas} replicas, global batch "
             f"{cfg.data.batch_size * scope.replicas} ({cfg.data.batch_size} per replica)"
             + ("" if scope.is_chief else "; not the chief: writing to a temporary directory"))
    set_seed(cfg.train.seed)
    if not fresh and (run / rundir.SPLIT).is_file():   # --resume: the split the run began with
        splits = load_run_splits(run, cfg, folder)
    else:
        if not fresh:
            say_unrecorded(run)
        splits = load_splits(folder, cfg.data.image_size, cfg.data.val_split, cfg.train.seed,
                             cfg.data.strict, cfg.data.val_dir, cfg.data.test_split, cfg.data.test_dir)
    _print_data(splits)
    with scope.strategy.scope():
        model = build_model(cfg.model, cfg.data.image_size, len(splits.classes))
    if fresh:   # the views by the folder's size and the backbone's cost per image
        cfg = resolve_for_data(cfg, len(splits.train), splits.train.y, len(splits.classes), backbone_macs(model))
    if cfg.train.finetune_epochs > 0:
        select_unfreeze(model, cfg.train.unfreeze)   # a bad --unfreeze fails now, not after stage 1
    # Only now, with data and model known good, is the run directory made (an old one replaced):
    # bad input leaves nothing behind and loses nothing.
    if fresh and scope.is_chief:
        if owned.is_edgeft_dir(run):   # held while the old run is replaced
            locks.enter_context(run_lock(run, "finetune --overwrite"))
        rundir.prepare_run_dir(run, overwrite, False, **protected_for(folder, cfg))
        locks.enter_context(run_lock(run, "finetune"))   # the new directory's own lock file
        owned.own(run / rundir.CHECKPOINTS, run / rundir.LOGS)   # made by TensorFlow, listed as edgeft's
    if scope.is_chief:
        locks.enter_context(logs.run_log(run))   # RUN/logs/edgeft.log, what was logged before it first
    # from here a corrupt cache row leaves a half-made run, which only --resume continues
    set_rerun_hint(f"continue the run with: edgeft finetune --resume --out {shlex.quote(str(run))}")
    wdir = run if scope.is_chief else Path(scope.scratch("run"))
    state = rundir.read_json(run / STATE, {}) if resume else {}
    if not resume:
        rundir.write_text(wdir / rundir.CONFIG, to_yaml(cfg, run))
        rundir.write_text(wdir / rundir.LABELS, "\n".join(splits.classes) + "\n")
        rundir.write_json(wdir / rundir.DATA_REPORT, splits.report)
        rundir.write_json(wdir / rundir.SPLIT, split_record(splits, folder, cfg.data.val_dir, cfg.data.test_dir, run))
        if splits.report["skipped"]:
            rundir.write_text(wdir / rundir.SKIPPED,
                              "".join(f"{s['path']}\t{s['reason']}\n" for s in splits.report["skipped"]))
    metrics = rundir.read_json(run / rundir.METRICS, {}) if resume else {}

    if state.get("head_done") and (run / rundir.CHECKPOINTS / "head").exists():
        load_weights(model, run / rundir.CHECKPOINTS / "head")
        log.info("stage 1: already done, head weights loaded")
    else:
        t0 = time.time()
        stage(f"stage 1: a new head on the frozen {cfg.model.backbone} backbone, "
              f"{cfg.train.head_epochs or 'auto'} epochs")
        log.debug("stage 1: the backbone's features are cached; settings left at auto are chosen by cross-validation")
        model, cfg, head_info = train_head(model, splits, cfg, wdir, scope)
        rundir.write_text(wdir / rundir.CONFIG, to_yaml(cfg, run))   # what stage 1 chose, for every later step
        metrics["head"] = evaluate_arrays(model, splits.val, splits.classes) | {"seconds": round(time.time() - t0, 2),
                                                                                **head_info}
        _say("stage 1", metrics["head"])
        save_weights(model, wdir / rundir.CHECKPOINTS / "head")
        state = {"head_done": True}
        rundir.write_json(wdir / STATE, state)
        rundir.write_json(wdir / rundir.METRICS, metrics)

    if cfg.train.finetune_epochs > 0:
        t0 = time.time()
        stage(f"stage 2: fine-tuning the top of the backbone (--unfreeze {cfg.train.unfreeze}), "
              f"{cfg.train.finetune_epochs} epochs, lr {cfg.train.lr_finetune:g}")
        trained_layers = train_finetune(model, splits, cfg, wdir, scope, state, resume_from=run)
        metrics["finetune"] = evaluate_arrays(model, splits.val, splits.classes) | {
            "seconds": round(time.time() - t0, 2), "trained_layers": trained_layers,
            "best_epoch": state.get("best_epoch")}
        _say("stage 2", metrics["finetune"])
        head_m = metrics.get("head") or {}
        if cfg.train.keep_stage1_if_better and "val_loss" in head_m and \
                metrics["finetune"]["val_loss"] > head_m["val_loss"]:
            # stage 2 ended worse on validation than it started: the stage-1 weights are the model
            head_ckpt = wdir / rundir.CHECKPOINTS / "head"
            load_weights(model, head_ckpt if head_ckpt.exists() else run / rundir.CHECKPOINTS / "head")
            kept = evaluate_arrays(model, splits.val, splits.classes)
            metrics["finetune"] |= {"stage2_val_loss": metrics["finetune"]["val_loss"], "kept_stage1": True,
                                    **{k: kept[k] for k in ("val_accuracy", "val_loss", "per_class_accuracy",
                                                            "confusion_matrix")}}
            log.info(f"stage 2: validation loss {metrics['finetune']['stage2_val_loss']:.4f} is worse than stage 1's "
                     f"{head_m['val_loss']:.4f}: stage 1's weights kept (--no-keep-stage1-if-better keeps stage 2's)")

    with rundir.atomic_path(wdir / rundir.MODEL, suffix=".keras") as tmp:
        as_float32(model).save(str(tmp))   # float32 layers even after --mixed-precision: see as_float32
    # The test split, evaluated once on the final model: nothing above (fit, early stopping, best
    # epoch) saw it, and nothing after (calibration, QAT choice, parity gate) uses it.
    metrics.pop("test", None)
    test = evaluate_test(model, splits, stage="finetune" if cfg.train.finetune_epochs > 0 else "head")
    if test:
        metrics["test"] = test
        _say_test(test)
    rundir.write_json(wdir / rundir.METRICS, metrics)
    return Trained(run, wdir, cfg, splits, folder, scope, metrics, model, locks)


def finish(t: "Trained") -> FinetuneResult:
    """After training (and QAT, when the pipeline ran it): the demo's transfer check,
    metrics.json, report.md, the scope's scratch files."""
    run, wdir, cfg, splits, scope, metrics, model = t.run, t.wdir, t.cfg, t.splits, t.scope, t.metrics, t.model
    compare = compare_with_random_features(cfg, splits, scope, metrics)
    if compare:
        metrics["demo"] = compare
    rundir.write_json(wdir / rundir.METRICS, metrics)
    if scope.is_chief:
        write_reports(run, model, splits, metrics, cfg)
        log.info(f"run directory: {run}")
        nxt, why = f"next: edgeft export {shlex.quote(str(run))}", "    (TFLite + ONNX, checked by the parity gate)"
        log.info(nxt + why if len(nxt + why) <= 100 else nxt)   # under 100 columns whatever the path
    scope.cleanup()
    return FinetuneResult(run, metrics, model)


def compare_with_random_features(cfg: EdgeftConfig, splits: Splits, scope: Scope, metrics: dict) -> dict | None:
    """Demo only: the same stage-1 head on frozen *random* features, to show what pretraining buys."""
    if not is_demo(cfg) or "head" not in metrics or cfg.model.weights != demo_settings()["weights"]:
        return None
    stage(f"transfer check (demo): the same head on frozen random features, {cfg.train.head_epochs} epochs")
    set_seed(cfg.train.seed)
    rnd_cfg = replace(cfg, model=replace(cfg.model, weights="none"),
                      data=replace(cfg.data, augment_policy="none", augment_views=1, augment_online=False))
    with scope.strategy.scope():
        model = build_model(rnd_cfg.model, cfg.data.image_size, len(splits.classes))
    with tempfile.TemporaryDirectory(prefix="edgeft-random-") as tmp:
        model, _, _ = train_head(model, splits, rnd_cfg, Path(tmp), scope)
    rnd = evaluate_arrays(model, splits.val, splits.classes)["val_accuracy"]
    pre = metrics["head"]["val_accuracy"]
    verdict = "-> pretraining helps" if pre > rnd + 0.05 else "-> not clearly better (warning)"
    log.info(f"transfer check: val accuracy {pre:.4f} pretrained vs {rnd:.4f} random backbone {verdict}")
    return {"pretrained_val_accuracy": pre, "random_val_accuracy": rnd, "head_epochs": cfg.train.head_epochs}


def _print_data(splits: Splits) -> None:
    r = splits.report
    test = (f" / {r['n_test']} test" + (f" (from {r['test_folder']})" if r.get("test_folder") else "")
            if r.get("n_test") else " (no test split)")
    log.info(f"data: {len(splits.classes)} classes, {r['n_train']} train / {r['n_val']} val{test} images "
             f"at {r['image_size']}px" + (f", {len(r['skipped'])} file(s) skipped (see data_report.json)"
                                      if r["skipped"] else ""))


def _say(stage: str, m: dict) -> None:
    log.info(f"{stage}: val_accuracy {m['val_accuracy']:.4f}  val_loss {m['val_loss']:.4f} "
             "(cross-entropy, final weights)")


def _say_test(t: dict) -> None:
    lo, hi = t["interval_95"]
    log.info(f"test: accuracy {t['accuracy']:.4f} (95 % interval {lo:.4f}-{hi:.4f}) on {t['n']} images "
             f"nothing was tuned on")
