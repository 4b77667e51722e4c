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


SPLITS = ("test", "val", "all")   # `edgeft evaluate RUN --split`: all = test and validation, each on its own


def evaluate(model_path: str | Path, folder: str | Path | None = None, out: str | Path | None = None,
             batch_size: int = 32, threads: int | None = None, split: str | None = None,
             include_trained: bool = False, data: str | None = None) -> dict:
    """Accuracy, per-class accuracy and confusion matrix of a model file on a class folder, or (no
    folder) on the recorded split of the run it belongs to (`model_path` a run directory: its
    model.keras): `split` test (the default when the run has one), val (labelled "val (tuned on)")
    or all (each of them). On a folder, the images the run trained on (split.json's sha256) are
    counted and left out unless `include_trained`."""
    from edgeft.core.lock import enclosing_run, run_lock

    run = enclosing_run(model_path)
    if Path(model_path).is_dir():
        if run is None or not (Path(model_path) / rundir.MODEL).is_file():
            raise UserError(f"{model_path} is a folder but not a finished edgeft run (no config.yaml / model.keras)")
        model_path = Path(model_path) / rundir.MODEL
    if folder is None and run is None:
        raise UserError(f"{model_path} is not in an edgeft run: give an image FOLDER to evaluate it on")
    if split is not None and split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    out = Path(out) if out else Path(model_path).with_name(f"eval_{Path(model_path).stem}")
    rundir.check_writable(out, "evaluate --out")   # before the work, not after it
    holder = enclosing_run(out)   # writing inside a run directory: hold its lock (edgeft.core.lock)
    args = (model_path, folder, out, batch_size, threads, run, split, include_trained, data)
    if holder is not None:
        with run_lock(holder, "evaluate"):
            return _evaluate(*args)
    return _evaluate(*args)


def _evaluate(model_path, folder, out: Path, batch_size: int, threads: int | None, run: Path | None,
              split: str | None, include_trained: bool, data: str | None = None) -> dict:
    runner = open_runner(model_path, threads)
    labels = read_labels(model_path)
    h, w = runner.input_hw
    if h != w:
        raise UserError(f"{model_path} takes {h}x{w} images; edgeft evaluates square inputs only")
    if folder is None:
        sets = run_split_sets(run, split, labels, data)
    else:
        # decoded once into the image cache (a second evaluation of the same folder decodes nothing)
        # and streamed a batch at a time: memory does not grow with the folder
        images = scan_folder(str(folder), h, classes=labels)
        if len(images) == 0:
            raise UserError(f"no readable images in {folder}")
        images, trained = leave_out_trained(images, run, include_trained)
        sets = [(f"folder {folder}", images, trained)]
    scored = [_score(runner, model_path, images, labels or images.classes, where, batch_size)
              for where, images, _ in sets]
    results = [r | trained for (r, _), (_, _, trained) in zip(scored, sets)]
    result = results[0] | ({"splits": results} if len(results) > 1 else {})
    rundir.write_json(out / "evaluation.json", result)
    name, images = Path(model_path).name, sets[0][1]
    where = f"folder {Path(folder).name}/" if folder is not None else result["split"]
    plot_confusion(result["confusion_matrix"], result["labels"], out / "confusion_matrix.png",
                   title=f"{name}: {where}, n = {result['n']}, accuracy {result['accuracy']:.3f}")
    write_mistakes(out, scored[0][1], images, result["labels"], where, name)   # mistakes.png / mistakes.json
    result["out"] = str(out)
    return result


def _score(runner, model_path, images, labels, where: str, batch_size: int) -> tuple[dict, np.ndarray]:
    """(the metrics, the probabilities) of the runner on `images`."""
    from edgeft.core.stats import wilson_interval

    if len(images) == 0:
        raise UserError(f"no images left to evaluate {model_path} on ({where})")
    with Progress(f"evaluate: {Path(model_path).name}", len(images)) as bar:
        probs = []
        for idx, x in images.batches(batch_size):
            probs.append(runner.predict(x.astype(np.float32)))
            bar.update(len(idx))
    probs = np.concatenate(probs).astype(np.float64)
    ys = np.asarray(images.y)
    metrics = classification_metrics(probs, ys, labels)
    correct = int((probs.argmax(-1) == ys).sum())
    lo, hi = wilson_interval(correct, len(ys))
    acc = metrics["val_accuracy"]
    return {"model": str(model_path), "split": where, "folder": where[len("folder "):] if where.startswith("folder ")
            else None, "accuracy": acc, "interval_95": [min(lo, acc), max(hi, acc)], "correct": correct,
            "loss": metrics["val_loss"], "n": metrics["n"], "per_class_accuracy": metrics["per_class_accuracy"],
            "confusion_matrix": metrics["confusion_matrix"], "labels": labels,
            "skipped": [{"path": p, "reason": r} for p, r in images.skipped]}, probs


def run_split_sets(run: Path, split: str | None, labels, data: str | None = None) -> list[tuple[str, object, dict]]:
    """[(label, images, {})] of the run's recorded split(s): test, "val (tuned on)", or both."""
    from edgeft.run import Run

    splits = Run.open(run, data=data).splits   # data: --data DIR, the run's folder where it is now
    if labels and list(labels) != list(splits.classes):
        raise UserError(f"the model's labels {labels} are not the run's classes {splits.classes}")
    has_test = splits.test is not None and len(splits.test.y) > 0
    split = split or ("test" if has_test else "val")
    if split in ("test", "all") and not has_test:
        if split == "test":
            raise UserError(f"{run} has no test split (trained with --test-split 0, or too few images): "
                            "use --split val (the images the best epoch was chosen on)")
        split = "val"
    sets = [("test", splits.test, {})] if split in ("test", "all") else []
    sets += [("val (tuned on)", splits.val, {})] if split in ("val", "all") else []
    return sets


def leave_out_trained(images, run: Path | None, include: bool) -> tuple[object, dict]:
    """The folder's images less those the run trained on (split.json's training files, by sha256),
    and {"trained_images": k, "left_out": bool}; said in one line."""
    record = rundir.read_json(run / rundir.SPLIT) if run is not None else None
    if not record or images.sha256 is None:
        return images, {}
    trained = {row[3] for row in record.get("files", {}).get("train", []) if row[3]}
    mask = np.asarray([h in trained for h in images.sha256], bool)
    k = int(mask.sum())
    if not k:
        return images, {"trained_images": 0, "left_out": False}
    if include:
        log.warning(f"evaluate: {k} of the {len(images)} images are images the run trained on (split.json), "
                    "counted in (--include-trained): the accuracy is optimistic")
        return images, {"trained_images": k, "left_out": False}
    log.info(f"evaluate: {k} of the {len(images)} images are images the run trained on (split.json): left out "
             "(--include-trained keeps them)")
    return images.subset(np.flatnonzero(~mask)), {"trained_images": k, "left_out": True}


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


def test_accuracy_of_file(model_path: str | Path, splits, threads: int | None = None,
                          split: str = "test") -> dict | None:
    """Test-split metrics (`report.holdout_metrics`: accuracy, 95 % Wilson interval, per class) of
    a model file run by its own runtime (LiteRT, ONNX Runtime, Keras); None when `splits` has no
    test split. For reporting only: nothing may be chosen by it. `split="val"`: the same on the
    validation split (a run without a test split quotes it, labelled as tuned on)."""
    images = getattr(splits, split)
    if images is None or len(images.y) == 0:
        return None
    runner = open_runner(model_path, threads)
    size = images.shape[:2]
    if tuple(runner.input_hw) != tuple(size):
        raise UserError(f"{model_path} takes {runner.input_hw[0]}x{runner.input_hw[1]} images, the run's "
                        f"{split} split is {size[0]}x{size[1]}")
    labels = read_labels(model_path)
    if labels and list(labels) != list(splits.classes):
        raise UserError(f"{model_path} has labels {labels}, the run's classes are {splits.classes}")
    probs = np.concatenate([runner.predict(x.astype(np.float32)) for _, x in images.batches(64)])
    return holdout_metrics(probs, images.y, splits.classes) | {"model": str(model_path)}


test_accuracy_of_file.__test__ = False   # its name must not make pytest collect it where it is imported
