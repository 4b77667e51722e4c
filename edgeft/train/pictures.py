"""A run's pictures: the confusion matrix (counts and row-normalised, titled with its split and n),
the training curves (stage boundaries and the restored epoch marked) and a gallery of the images
the model gets wrong (mistakes.png, with mistakes.json listing exactly those images).

Each picture is built by a `*_figure` function that returns the matplotlib figure (tests read the
data behind it there), then saved atomically by `save_fig`. Imports no TensorFlow: predictions
are handed in.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from edgeft.core import rundir

MISTAKES_PNG, MISTAKES_JSON = "mistakes.png", "mistakes.json"
GALLERY_LIMIT = 24
STAGE_LABELS = {"head": "stage 1", "finetune": "stage 2", "qat": "QAT"}
BOUNDARY_GID, RESTORED_GID = "stage-boundary", "restored-epoch"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_fig(fig, path: Path, dpi: int = 100) -> None:
    """The figure as a PNG at `path` (temporary file + rename), every label inside the image."""
    with rundir.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    _plt().close(fig)


# ---------------------------------------------------------------- confusion matrix
def split_title(what: str, split: str, n: int) -> str:
    """'stage 2 model: test split, n = 30' (split "val (tuned on)" for a run without test images)."""
    return f"{what}: {split} split, n = {n}"


def row_normalised(cm) -> np.ndarray:
    """Each row (a true class) divided by its count: the share of that class given each prediction
    (a class with no images stays 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def confusion_figure(cm, classes: list[str], title: str):
    """Two panels: the counts, and the row-normalised matrix (recall on the diagonal)."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    cm = np.asarray(cm)
    n = len(classes)
    side = max(3.6, 0.45 * n + 1.8)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 0.6, side + 0.8))
    values = n <= 30   # cell numbers only where they can be read
    for ax, m, fmt, sub in ((axes[0], cm, "d", "counts"),
                            (axes[1], row_normalised(cm), ".2f", "row-normalised (each true class sums to 1)")):
        ConfusionMatrixDisplay(m, display_labels=list(classes)).plot(
            ax=ax, cmap="Blues", values_format=fmt, colorbar=False, include_values=values, xticks_rotation=45)
        ax.set_title(sub, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if values:
            for t in ax.texts:
                t.set_fontsize(7 if n > 10 else 8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion(cm, classes: list[str], path: Path, title: str = "Confusion matrix") -> None:
    save_fig(confusion_figure(cm, classes, title), path)


# ---------------------------------------------------------------- curves
def stage_marks(rows: list[dict], restored: dict | None = None) -> dict:
    """Where curves.png draws its marks on the all-stages epoch axis (x = epochs of the earlier stages
    + the epoch): `boundaries` [(x, "stage 1 | stage 2"), ...] half an epoch after each stage's last
    epoch, `restored` (x, label) for the epoch whose weights the stage ended with (restored = {"stage":
    "finetune", "epoch": 3, "why": ...}), `offsets` {stage: epochs before it}."""
    offsets, stages, step = {}, [], 0
    for stage in STAGE_LABELS:
        epochs = [int(r["epoch"]) for r in rows if r["stage"] == stage]
        if epochs:
            offsets[stage], step = step, step + max(epochs)
            stages.append(stage)
    bounds = [(offsets[b] + 0.5, f"{STAGE_LABELS[a]} | {STAGE_LABELS[b]}") for a, b in itertools.pairwise(stages)]
    mark = None
    if restored and restored.get("stage") in offsets and restored.get("epoch"):
        x = offsets[restored["stage"]] + int(restored["epoch"])
        mark = (x, f"restored: {STAGE_LABELS[restored['stage']]} epoch {int(restored['epoch'])}"
                   + (f" ({restored['why']})" if restored.get("why") else ""))
    return {"boundaries": bounds, "restored": mark, "offsets": offsets}


def restored_epoch(metrics: dict, rows: list[dict]) -> dict | None:
    """The epoch whose weights stage 2 ended with: its best epoch (lowest val_loss, restored), or
    stage 1's last when stage 2's result was worse and stage 1's weights were kept."""
    ft = metrics.get("finetune") or {}
    if ft.get("kept_stage1"):
        head = [int(r["epoch"]) for r in rows if r["stage"] == "head"]
        return {"stage": "head", "epoch": max(head), "why": "stage 2 ended worse: stage 1 kept"} if head else None
    if ft.get("best_epoch"):
        return {"stage": "finetune", "epoch": int(ft["best_epoch"]), "why": "lowest val_loss"}
    return None


def curves_figure(rows: list[dict], restored: dict | None = None):
    """Loss and accuracy (training solid, validation dashed) on one epoch axis for all stages, each
    stage named over its span, dotted lines at the boundaries, the restored epoch in red."""
    plt = _plt()
    marks = stage_marks(rows, restored)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        val_at = {}
        for k, (stage, off) in enumerate(marks["offsets"].items()):
            srows = sorted((r for r in rows if r["stage"] == stage), key=lambda r: int(r["epoch"]))
            xs = [off + int(r["epoch"]) for r in srows]
            for key, style, color in ((metric, "-", "tab:blue"), ("val_" + metric, "--", "tab:orange")):
                ys = [float(r[key]) if r.get(key) not in (None, "") else np.nan for r in srows]
                ax.plot(xs, ys, style, color=color, marker=".", label=key if k == 0 else None)
                if key.startswith("val_"):
                    val_at.update(zip(xs, ys))
            ax.text((xs[0] + xs[-1]) / 2, 1.01, STAGE_LABELS[stage], transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.3")
        for x, _ in marks["boundaries"]:
            ax.axvline(x, color="0.35", ls=":", lw=1.2, gid=BOUNDARY_GID)
        if marks["restored"]:
            x, label = marks["restored"]
            ax.axvline(x, color="tab:red", ls="-", lw=1, alpha=0.6, gid=RESTORED_GID, label=label)
            if not np.isnan(val_at.get(x, np.nan)):
                ax.plot([x], [val_at[x]], "*", color="tab:red", ms=11)
        ax.set_xlabel("epoch (all stages)")
        ax.set_title(metric, pad=14)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], path: Path, restored: dict | None = None) -> None:
    save_fig(curves_figure(rows, restored), path)


# ---------------------------------------------------------------- the mistakes
def mistakes(probs, y, paths: list[str], classes: list[str], limit: int = GALLERY_LIMIT) -> dict:
    """The images predicted wrong, the most confident mistakes first (ties by path), at most
    `limit`: {"n", "wrong", "images": [{"index", "path", "true", "predicted", "confidence",
    "p_true"}]}."""
    probs, y = np.asarray(probs, dtype=np.float64), np.asarray(y)
    pred = probs.argmax(-1) if len(y) else np.zeros(0, int)
    wrong = np.flatnonzero(pred != y)
    order = sorted(wrong, key=lambda i: (-probs[i, pred[i]], paths[i]))
    images = [{"index": int(i), "path": str(paths[i]), "true": classes[y[i]], "predicted": classes[pred[i]],
               "confidence": float(probs[i, pred[i]]), "p_true": float(probs[i, y[i]])} for i in order[:limit]]
    return {"n": len(y), "wrong": len(wrong), "images": images}


def _short(name: str, k: int = 14) -> str:
    return name if len(name) <= k else name[: k - 1] + "…"


def gallery_figure(pixels: np.ndarray, found: dict, title: str):
    """A grid of the images in `found["images"]` (pixels in that order), each titled with its true
    and predicted class and the prediction's confidence."""
    plt = _plt()
    k = len(found["images"])
    cols = min(6, max(1, k))
    rows = max(1, math.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.4, 2.1 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, item in zip(axes.flat, pixels, found["images"]):
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None, interpolation="nearest")
        ax.set_title(f"true {_short(item['true'])}\npred {_short(item['predicted'])} {item['confidence']:.2f}",
                     fontsize=7, color="tab:red")
    if k == 0:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=11)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_mistakes(out: Path, probs, images, classes: list[str], split: str, model: str,
                   limit: int = GALLERY_LIMIT) -> dict:
    """OUT/mistakes.png (the gallery) and OUT/mistakes.json (exactly the images it shows) for the
    predictions `probs` on the ImageSet `images`; returns what the JSON holds."""
    found = mistakes(probs, images.y, images.paths, classes, limit)
    shown = len(found["images"])
    record = {"format": "edgeft-mistakes", "model": model, "split": split, "n": found["n"], "wrong": found["wrong"],
              "shown": shown, "limit": limit, "order": "most confident mistake first", "images": found["images"]}
    pixels = images.read([i["index"] for i in found["images"]]) if shown else []
    title = (f"{model}: {found['wrong']} of {found['n']} {split} images wrong"
             + (f"; the {shown} most confident shown" if shown < found["wrong"] else ""))
    save_fig(gallery_figure(pixels, found, title), Path(out) / MISTAKES_PNG)
    rundir.write_json(Path(out) / MISTAKES_JSON, record)
    return record
