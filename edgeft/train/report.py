"""Metrics and the human-readable part of a run: report.md, and the pictures (train/pictures.py)."""
from __future__ import annotations

import logging

from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.core.markdown import md_cell
from edgeft.data.datasets import OLD_OR_ZERO, no_test_reason
from edgeft.train.pictures import (
    STAGE_LABELS,
    plot_confusion,
    plot_curves,
    restored_epoch,
    split_title,
    write_mistakes,
)

HISTORY_COLUMNS = ["stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def classification_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, loss, per-class accuracy and confusion matrix from predicted probabilities."""
    y = np.asarray(y)
    pred = probs.argmax(-1)
    p_true = np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0)
    cm = confusion(y, pred, len(classes))
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(classes)}
    return {"val_accuracy": float((pred == y).mean()) if len(y) else 0.0,
            "val_loss": float(-np.log(p_true).mean()) if len(y) else 0.0,
            "n": len(y), "per_class_accuracy": per_class, "confusion_matrix": cm.tolist()}


def predict_images(model, images, batch_size: int = 64) -> np.ndarray:
    """A Keras model's probabilities on an ImageSet, streamed from the image cache (tf.data)."""
    from edgeft.data.datasets import make_dataset

    return np.asarray(model.predict(make_dataset(images, batch_size), verbose=0), dtype=np.float64)


def evaluate_arrays(model, images, classes: list[str], batch_size: int = 64) -> dict:
    return classification_metrics(predict_images(model, images, batch_size), images.y, classes)


NO_TEST_SPLIT = (f"no test split ({OLD_OR_ZERO}): accuracy below is on the validation split, which chose the "
                 f"best epoch")


def no_test_split_line(report: dict, test_split: float) -> str:
    """NO_TEST_SPLIT, with the reason the run has no test images."""
    return NO_TEST_SPLIT.replace(OLD_OR_ZERO, no_test_reason(report, test_split))


def holdout_metrics(probs: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """Accuracy on the test split with its 95 % Wilson interval, per-class accuracy and counts."""
    from edgeft.core.stats import wilson_interval

    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    m = classification_metrics(probs, y, classes)
    correct = int((probs.argmax(-1) == y).sum()) if len(y) else 0
    lo, hi = wilson_interval(correct, len(y))
    acc = m["val_accuracy"]
    lo, hi = min(lo, acc), max(hi, acc)   # rounding: wilson_interval(n, n) gives 0.9999999999999999
    return {"accuracy": acc, "loss": m["val_loss"], "n": m["n"], "correct": correct,
            "interval_95": [lo, hi], "per_class_accuracy": m["per_class_accuracy"],
            "per_class_n": {c: int(k) for c, k in zip(classes, np.bincount(y, minlength=len(classes)))},
            "confusion_matrix": m["confusion_matrix"]}


def evaluate_test(model, splits, stage: str | None = None) -> dict | None:
    """The test metrics (`holdout_metrics`) of a Keras model on `splits.test`; None when the run has
    no test split. The only place training code touches the test images: call it on a finished
    model, never to choose anything. `stage` names the model (head, finetune, qat) for report.md."""
    if splits.test is None or len(splits.test.y) == 0:
        return None
    out = holdout_metrics(predict_images(model, splits.test), splits.test.y, splits.classes)
    return out | ({"stage": stage} if stage else {})


def fmt_test(t: dict | None) -> str:
    """'0.9500 [0.7640, 0.9911] of 20' for report.md; '-' without a test result."""
    if not t:
        return "-"
    lo, hi = t["interval_95"]
    return f"{t['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] of {t['n']}"


def _stage_tests(metrics: dict, final_stage: str | None) -> dict[str, dict]:
    """Stage -> its test result: metrics["test"] belongs to the final float stage (or the stage
    it names); a stage may also carry its own (metrics["qat"]["test"])."""
    tests = {}
    top = metrics.get("test")
    if top:
        tests[top.get("stage") or final_stage] = top
    for stage in ("head", "finetune", "qat"):
        m = metrics.get(stage)
        if isinstance(m, dict) and isinstance(m.get("test"), dict):
            tests[stage] = m["test"]
    return tests


def _backbone_file_lines(model, cfg, metrics: dict) -> list[str]:
    """A backbone file: where it came from, its sha256, how its blocks were told, QAT or PTQ."""
    from edgeft.core import byob
    from edgeft.nn.model import model_blocks

    if cfg is None or not byob.is_file_backbone(cfg.model.backbone):
        return []
    m = cfg.model
    blocks, rule = model_blocks(model)
    qat = (metrics.get("qat") or {}).get("skipped")
    lines = [f"- backbone file: {md_cell(m.backbone_file or '')} (sha256 {byob.recorded_sha(m.backbone)}; the run "
             f"needs it no more: model.keras holds every layer)"
             + (f", features from layer {md_cell(m.backbone_output)}" if m.backbone_output else "")
             + f", preprocessing {md_cell(m.preprocess or '')}",
             f"- backbone blocks (--unfreeze blocks:N / blocks:F): {len(blocks)}, split at {rule}"]
    return lines + ([f"- QAT: skipped: {md_cell(qat)}"] if qat else [])


def write_pictures(run: Path, model, splits, metrics: dict) -> None:
    """curves.png (stage boundaries, the restored epoch), confusion_matrix.png (the final stage's, on
    the test split, else validation; counts and row-normalised) and mistakes.png / mistakes.json
    (model.keras's wrong predictions on the same split) from what the run recorded."""
    rows = rundir.read_csv(run / rundir.HISTORY)
    if rows:
        plot_curves(rows, run / "curves.png", restored_epoch(metrics, rows))
    trained = [(s, metrics[s]) for s in ("head", "finetune", "qat")
               if metrics.get(s) and "val_accuracy" in metrics[s]]
    final_stage, final = trained[-1] if trained else (None, None)
    float_stage = next((s for s, _ in reversed(trained) if s != "qat"), None)
    test = _stage_tests(metrics, float_stage).get(final_stage)
    if final and "confusion_matrix" in final:
        src, split = (test, "test") if test and "confusion_matrix" in test else (final, VAL_LABEL)
        n = src.get("n", int(np.asarray(src["confusion_matrix"]).sum()))
        plot_confusion(src["confusion_matrix"], splits.classes, run / "confusion_matrix.png",
                       split_title(f"{STAGE_LABELS[final_stage]} model", split, n))
    test_set = getattr(splits, "test", None)
    images, split = ((test_set, "test") if test_set is not None and len(test_set.y)
                     else (getattr(splits, "val", None), VAL_LABEL))
    strategy = getattr(model, "distribute_strategy", None) if model is not None else None
    extended = getattr(strategy, "extended", None)   # MultiWorkerMirroredStrategy is CollectiveAllReduceStrategy
    multiworker = bool(getattr(extended, "_in_multi_worker_mode", lambda: False)()) or \
        any(k in type(strategy).__name__ for k in ("MultiWorker", "Collective"))
    if multiworker:   # a predict there is a collective op the other workers, done by now, never join
        logging.getLogger(__name__).info("report: no mistakes gallery under --strategy multiworker "
                                         "(`edgeft evaluate RUN` writes one)")
    elif model is not None and images is not None and len(images.y):
        write_mistakes(run, predict_images(model, images), images, splits.classes, split,
                       f"model.keras ({STAGE_LABELS.get(float_stage, 'trained')})")


VAL_LABEL = "val (tuned on)"   # the validation split, which chose the best epoch


def write_reports(run: Path, model, splits, metrics: dict, cfg=None) -> None:
    """The pictures (write_pictures) and report.md from what the run recorded."""
    write_pictures(run, model, splits, metrics)
    trained = [(s, metrics[s]) for s in ("head", "finetune", "qat")
               if metrics.get(s) and "val_accuracy" in metrics[s]]
    final_stage, final = trained[-1] if trained else (None, None)
    float_stage = next((s for s, _ in reversed(trained) if s != "qat"), None)
    tests = _stage_tests(metrics, float_stage)
    r = splits.report
    n_test = r.get("n_test", 0)
    lines = [f"# edgeft run: {md_cell(run.name)}", "",
             f"- data: {r['n_train']} train / {r['n_val']} val" + (f" / {n_test} test" if n_test else "")
             + f" images, {len(splits.classes)} classes, {len(r['skipped'])} skipped",
             f"- model: {model.name}, {model.count_params():,} parameters"]
    lines += _backbone_file_lines(model, cfg, metrics)
    if n_test:
        source = (f"the folder {r['test_folder']}" if r.get("test_folder")
                  else "held out of every class before the validation split")
        lines.append(f"- test split: {n_test} images, {source}; never used for training, early stopping, "
                     "the best epoch, calibration, the QAT choice or the parity gate")
    else:
        lines.append(f"- **{no_test_split_line(r, cfg.data.test_split if cfg is not None else 0.0)}**")
    dup = r.get("duplicates") or {}
    if dup.get("copies"):
        lines.append(f"- byte-identical copies: {dup['copies']} file(s) copy another ({dup['groups']} group(s)); each "
                     f"group kept on one side of the split"
                     + (f"; {dup['groups_across_classes']} group(s) under two classes, first: "
                        f"{md_cell(dup['first_across_classes'])}" if dup.get("groups_across_classes") else ""))
    lines.append("- split: recorded file by file in split.json (path, size, sha256); later commands use exactly "
                 "these files" if (run / "split.json").is_file() else "- split: not recorded (an older run)")
    lines += ["", "| stage | val accuracy | test accuracy [95 % interval] | val loss | seconds |",
              "|---|---|---|---|---|"]
    for stage in ("head", "finetune", "qat"):
        m = metrics.get(stage)
        if m and "skipped" in m:
            lines.append(f"| {stage} | skipped: {md_cell(m['skipped'])} | | | |")
        elif m:
            lines.append(f"| {stage} | {m['val_accuracy']:.4f} | {fmt_test(tests.get(stage))} | "
                         f"{m['val_loss']:.4f} | {m.get('seconds', '')} |")
    lines += _int8_choice_lines(metrics.get("qat"))
    lines += _recipe_lines(metrics.get("head") or {}, cfg)
    if "demo" in metrics:
        d = metrics["demo"]
        lines += ["", "## Transfer check (offline demo)", "",
                  f"Same head on frozen features: pretrained backbone {d['pretrained_val_accuracy']:.4f} "
                  f"vs random backbone {d['random_val_accuracy']:.4f}."]
    if final:
        test = tests.get(final_stage)
        lines += ["", "## Per-class accuracy (final stage)", ""]
        if test:
            lines += ["| class | val accuracy | test accuracy | test images |", "|---|---|---|---|"]
            lines += [f"| {md_cell(c)} | {_acc(a)} | {_acc(test['per_class_accuracy'].get(c))} | "
                      f"{test['per_class_n'].get(c, 0)} |" for c, a in final["per_class_accuracy"].items()]
        else:
            lines += ["| class | val accuracy |", "|---|---|"]
            lines += [f"| {md_cell(c)} | {_acc(a)} |" for c, a in final["per_class_accuracy"].items()]
    lines += ["", "![curves](curves.png)", "", "![confusion matrix](confusion_matrix.png)", ""]
    if (run / "mistakes.json").is_file():
        lines += ["What model.keras gets wrong (mistakes.json lists these images):", "",
                  "![mistakes](mistakes.png)", ""]
    rundir.write_text(run / rundir.REPORT, "\n".join(lines))


def _int8_choice_lines(qat: dict | None) -> list[str]:
    """Which int8 file `edgeft export` ships after QAT, and why (edgeft.quantize.int8_choice)."""
    from edgeft.core.formats import INT8_RULE as RULE

    if not isinstance(qat, dict) or "val_accuracy" not in qat:
        return []
    cmp = qat.get("int8_comparison")
    if isinstance(cmp, dict) and cmp.get("why"):
        return ["", f"int8 after QAT: `edgeft export` (--int8-source auto) ships the int8 file from "
                    f"**{str(cmp['better']).upper()}**: {md_cell(cmp['why'])} (the rule: {RULE})."]
    return ["", f"int8 after QAT: `edgeft export` (--int8-source auto) builds the int8 file both ways and ships "
                f"{RULE}; the export section of this report says which shipped and why."]


def _recipe_lines(head: dict, cfg) -> list[str]:
    """What the run trained with (its resolved config), what stage 1 chose and what each option
    scored (train.choose), from metrics.json."""
    lines = ["", "## Recipe", ""]
    if cfg is not None:
        d, t, m = cfg.data, cfg.train, cfg.model
        lines.append(f"- recipe {t.recipe}: augmentation {d.augment_policy}, {head.get('views', 1)} cached view(s) "
                     f"per image" + (" (stage 1 end to end)" if d.augment_online else "")
                     + f", label smoothing {t.label_smoothing}, head learning rate {t.lr_head}, "
                     f"{t.head_epochs} + {t.finetune_epochs} epochs, class weights {t.class_weight}, "
                     f"head {m.head} / dense {m.dense} / dropout {m.dropout} / L2 {m.l2}, stage 2 unfreezes "
                     f"{t.unfreeze} at {t.lr_finetune}")
    c = head.get("choice")
    if not c:
        return lines
    if "unmeasured" in c:
        return lines + [f"- not measured ({md_cell(c['why'])}): {md_cell(str(c['unmeasured']))}"]
    lines += ["", f"Chosen by {c['folds']}-fold cross-validation of the head on the cached features of "
              f"{c['images']} training images (folds by image; scored on the images themselves, "
              f"{c['seconds']} s); an option replaces the prior (the first row) only when a paired sign test "
              f"over the images puts it ahead (p < 0.05):", "",
              "| policy | label smoothing | head lr | CV accuracy | correct / images | p vs prior |",
              "|---|---|---|---|---|---|"]
    heads = c.get("heads") or {}
    prior = next(iter(heads.values()), {}).get("lr_head", c["lr_head"])   # the GAP table's pick (--head auto)
    for sc in c["scores"]:
        mark = " **(chosen)**" if (sc["policy"], sc["label_smoothing"], sc["lr_head"]) == (
            c["policy"], c["label_smoothing"], prior) else ""
        pv = sc.get("p_vs_prior")
        lines.append(f"| {sc['policy']}{mark} | {sc['label_smoothing']} | {sc['lr_head']} | {sc['accuracy']:.4f} | "
                     f"{sc['correct']} / {sc['n']} | {'prior' if pv is None else f'{pv:.3f}'} |")
    if heads:   # --head auto: the heads compared after the table's choice, on the same images and folds
        lines += ["", f"--head auto: each head at the chosen policy and smoothing (its best head lr), the first "
                  f"the prior; chosen: **{c['head']}**.", "",
                  "| head | head lr | CV accuracy | correct / images | p vs prior |", "|---|---|---|---|---|"]
        for i, (name, h) in enumerate(heads.items()):
            if "not_compared" in h:
                lines.append(f"| {name} | - | - | - | not compared: {md_cell(h['not_compared'])} |")
                continue
            pv = "prior" if not i else f"{h['p_vs_prior']:.3f}"
            lines.append(f"| {name} | {h['lr_head']} | {h['correct'] / max(1, h['n']):.4f} | {h['correct']} / "
                         f"{h['n']} | {pv} |")
    return lines


def _acc(a) -> str:
    return "-" if a is None else f"{a:.4f}"


def update_report_section(run: Path, title: str, markdown: str) -> None:
    """Replaces (or appends) the `## title` section of RUN/report.md, keeping the rest."""
    path = Path(run) / rundir.REPORT
    text = path.read_text() if path.is_file() else f"# edgeft run: {Path(run).name}\n"
    head = f"## {title}"
    if head in text:
        before, _, after = text.partition(head)
        rest = after.split("\n## ", 1)
        text = before + (("## " + rest[1]) if len(rest) > 1 else "")
    rundir.write_text(path, text.rstrip("\n") + f"\n\n{head}\n\n{markdown.strip()}\n")
