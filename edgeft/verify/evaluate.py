"""`edgeft evaluate` and `edgeft predict`: any model file, through the runtime layer.

TFLite and ONNX files run under LiteRT / ONNX Runtime without TensorFlow; images are decoded by
the same function as in training.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.core.errors import UserError
from edgeft.core.progress import Progress
from edgeft.data.datasets import scan_folder
from edgeft.device import DeviceError, labels_warning, predict_images
from edgeft.nn.runtime import label_places, open_runner, read_labels
from edgeft.train.pictures import plot_confusion, write_mistakes
from edgeft.train.report import classification_metrics, holdout_metrics

log = logging.getLogger(__name__)


def evaluate(model_path: str | Path, folder: str | Path, out: str | Path | None = None,
             batch_size: int = 32, threads: int | None = None) -> dict:
    """Accuracy, per-class accuracy and confusion matrix of a model file on a class folder."""
    from edgeft.core.lock import enclosing_run, run_lock

    out = Path(out) if out else Path(model_path).with_name(f"eval_{Path(model_path).stem}")
    rundir.check_writable(out, "evaluate --out")   # before the work, not after it
    run = enclosing_run(out)   # writing inside a run directory: hold its lock (edgeft.core.lock)
    if run is not None:
        with run_lock(run, "evaluate"):
            return _evaluate(model_path, folder, out, batch_size, threads)
    return _evaluate(model_path, folder, out, batch_size, threads)


def _evaluate(model_path, folder, out: Path, batch_size: int, threads: int | None) -> dict:
    runner = open_runner(model_path, threads)
    labels = read_labels(model_path)
    h, w = runner.input_hw
    if h != w:
        raise UserError(f"{model_path} takes {h}x{w} images; edgeft evaluates square inputs only")
    # decoded once into the image cache (a second evaluation of the same folder decodes nothing)
    # and streamed a batch at a time: memory does not grow with the folder
    images = scan_folder(str(folder), h, classes=labels)
    labels = labels or images.classes
    skipped = images.skipped
    if len(images) == 0:
        raise UserError(f"no readable images in {folder}")
    with Progress(f"evaluate: {Path(model_path).name}", len(images)) as bar:
        probs = []
        for idx, x in images.batches(batch_size):
            probs.append(runner.predict(x.astype(np.float32)))
            bar.update(len(idx))
    probs = np.concatenate(probs).astype(np.float64)
    ys = images.y
    metrics = classification_metrics(probs, np.asarray(ys), labels)
    result = {"model": str(model_path), "folder": str(folder), "accuracy": metrics["val_accuracy"],
              "loss": metrics["val_loss"], "n": metrics["n"], "per_class_accuracy": metrics["per_class_accuracy"],
              "confusion_matrix": metrics["confusion_matrix"], "labels": labels,
              "skipped": [{"path": p, "reason": r} for p, r in skipped]}
    rundir.write_json(out / "evaluation.json", result)
    name, where = Path(model_path).name, f"folder {Path(folder).name}/"
    plot_confusion(result["confusion_matrix"], labels, out / "confusion_matrix.png",
                   title=f"{name}: {where}, n = {result['n']}, accuracy {result['accuracy']:.3f}")
    write_mistakes(out, probs, images, labels, where, name)   # mistakes.png / mistakes.json
    result["out"] = str(out)
    return result


def image_paths(items: list[str]) -> list[str]:
    """Image files named directly, plus the image files under any folder named (sorted): the
    device script's own listing, its errors as one-line UserErrors."""
    from edgeft.device import image_files

    try:
        return image_files(items)
    except DeviceError as e:
        raise UserError(str(e)) from None


def predict(model_path: str | Path, images: list[str], top_k: int = 3, threads: int | None = None) -> list[dict]:
    """Top-k classes with probabilities for each image (folders: every image inside): the device
    script's `predict_images` (its decoding, batch 1, its order for tied scores), with the package's
    labels (`read_labels`) and a warning on stderr when they do not name the outputs."""
    if top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    images = image_paths(images)
    runner = open_runner(model_path, threads)
    labels = read_labels(model_path)
    warning = labels_warning(labels, runner.num_classes, model_path, places=label_places(model_path))
    if warning:
        log.warning(warning)
    try:
        return predict_images(runner, images, labels, top_k)
    except DeviceError as e:
        raise UserError(str(e)) from None


def test_accuracy_of_file(model_path: str | Path, splits, threads: int | None = None) -> dict | None:
    """Test-split metrics (`report.holdout_metrics`: accuracy, 95 % Wilson interval, per class) of
    a model file run by its own runtime (LiteRT, ONNX Runtime, Keras); None when `splits` has no
    test split. For reporting only: nothing may be chosen by it."""
    if splits.test is None or len(splits.test.y) == 0:
        return None
    runner = open_runner(model_path, threads)
    size = splits.test.shape[:2]
    if tuple(runner.input_hw) != tuple(size):
        raise UserError(f"{model_path} takes {runner.input_hw[0]}x{runner.input_hw[1]} images, the run's "
                        f"test split is {size[0]}x{size[1]}")
    labels = read_labels(model_path)
    if labels and list(labels) != list(splits.classes):
        raise UserError(f"{model_path} has labels {labels}, the run's classes are {splits.classes}")
    probs = np.concatenate([runner.predict(x.astype(np.float32)) for _, x in splits.test.batches(64)])
    return holdout_metrics(probs, splits.test.y, splits.classes) | {"model": str(model_path)}


test_accuracy_of_file.__test__ = False   # its name must not make pytest collect it where it is imported
