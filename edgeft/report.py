"""Metrics and the human-readable part of a run: curves, confusion matrix, report.md."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import rundir

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
            "n": int(len(y)), "per_class_accuracy": per_class, "confusion_matrix": cm.tolist()}


def evaluate_arrays(model, images, classes: list[str], batch_size: int = 64) -> dict:
    probs = model.predict(images.x.astype(np.float32), batch_size=batch_size, verbose=0)
    return classification_metrics(np.asarray(probs, dtype=np.float64), images.y, classes)


def plot_confusion(cm, classes: list[str], path: Path, title: str = "Confusion matrix") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * n + 2), max(3.5, 0.5 * n + 1.5)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        step = 0
        for stage in ("head", "finetune", "qat"):
            srows = [r for r in rows if r["stage"] == stage]
            if not srows:
                continue
            xs = np.arange(step + 1, step + len(srows) + 1)
            for key, style in ((metric, "-"), ("val_" + metric, "--")):
                ys = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in srows]
                ax.plot(xs, ys, style, label=f"{stage} {key}")
            step += len(srows)
        ax.set_xlabel("epoch (all stages)")
        ax.set_title(metric)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with rundir.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def write_reports(run: Path, model, splits, metrics: dict) -> None:
    """curves.png, confusion_matrix.png and report.md from what the run recorded."""
    rows = rundir.read_csv(run / "history.csv")
    if rows:
        plot_curves(rows, run / "curves.png")
    trained = [m for m in (metrics.get(s) for s in ("head", "finetune", "qat")) if m and "val_accuracy" in m]
    final = trained[-1] if trained else None
    if final and "confusion_matrix" in final:
        plot_confusion(final["confusion_matrix"], splits.classes, run / "confusion_matrix.png")
    lines = [f"# edgeft run: {run.name}", "",
             f"- data: {splits.report['n_train']} train / {splits.report['n_val']} val images, "
             f"{len(splits.classes)} classes, {len(splits.report['skipped'])} skipped",
             f"- model: {model.name}, {model.count_params():,} parameters", "",
             "| stage | val accuracy | val loss | seconds |", "|---|---|---|---|"]
    for stage in ("head", "finetune", "qat"):
        m = metrics.get(stage)
        if m and "skipped" in m:
            lines.append(f"| {stage} | skipped: {m['skipped']} | | |")
        elif m:
            lines.append(f"| {stage} | {m['val_accuracy']:.4f} | {m['val_loss']:.4f} | {m.get('seconds', '')} |")
    if "demo" in metrics:
        d = metrics["demo"]
        lines += ["", "## Transfer check (offline demo)", "",
                  f"Same head on frozen features: pretrained backbone {d['pretrained_val_accuracy']:.4f} "
                  f"vs random backbone {d['random_val_accuracy']:.4f}."]
    if final:
        lines += ["", "## Per-class accuracy (final stage)", "", "| class | accuracy |", "|---|---|"]
        lines += [f"| {c} | {a:.4f} |" if a is not None else f"| {c} | - |"
                  for c, a in final["per_class_accuracy"].items()]
    lines += ["", "![curves](curves.png)", "", "![confusion matrix](confusion_matrix.png)", ""]
    rundir.write_text(run / "report.md", "\n".join(lines))
