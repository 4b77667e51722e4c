#!/usr/bin/env python3
"""Benchmark a .tflite image classifier on a device without TensorFlow.

Self-contained on purpose: copy this one file to the device (e.g. a
Raspberry Pi) next to the model. Needs only ai-edge-litert, numpy and pillow.

    pip install ai-edge-litert numpy pillow
    python bench_tflite.py model_int8.tflite --data folder/ --threads 1 2 4 --json out.json
    python bench_tflite.py model.tflite --random --runs 50 --warmup 5

Model contract (fixed by the edgeft project): one NHWC input taking RGB
pixels 0-255 at the model's image size, one output with class probabilities
of shape (1, num_classes). int8/uint8 inputs are quantized with the scale and
zero point stored in the file; int8/uint8 outputs are dequantized.

Latency is the time of one set_tensor + invoke + get_tensor with batch 1; the
input is already converted to the model's dtype, so image decoding and
quantization are not timed. Slow outliers (scheduler hiccups) are dropped
before the statistics: samples above median + 5 * 1.4826 * MAD, i.e. more
than about five standard deviations above the median, are removed and
counted in `outliers_removed`.

Exit status: 0 on success, 2 on bad input (one-line message on stderr).
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT = "tflite"
SUFFIX = ".tflite"
RUNTIME = "ai-edge-litert"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif"}
# Latency runs cycle through this many prepared inputs, so that memory stays
# flat however large the data folder is.
LATENCY_POOL = 16
OUTLIER_MADS = 5.0
# Scales the MAD to a standard deviation for normally distributed samples.
MAD_TO_STD = 1.4826
LATENCY_RULE = (
    f"samples above median + {OUTLIER_MADS:g} * {MAD_TO_STD} * MAD removed")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors as a single line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --------------------------------------------------------------- arguments

def int_at_least(minimum):
    """argparse type: an integer >= minimum, with a one-line message otherwise."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def parse_args(argv):
    parser = OneLineParser(
        description=f"Benchmark latency, memory and accuracy of a {SUFFIX} "
                    "image classifier (no TensorFlow needed).",
        epilog="Exit status 2 on bad input. Latency outlier rule: "
               + LATENCY_RULE + ".")
    parser.add_argument(
        "model", help=f"path to the {SUFFIX} model file")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--data", metavar="FOLDER",
        help="image folder with one sub-folder per class; reports top-1 "
             "accuracy. Class ids come from labels.txt beside the model "
             "(one label per line), else from the labels.txt inside the "
             "file (edgeft exports carry one), else from the sorted "
             "sub-folder names. "
             "Images: jpg/jpeg/png/bmp/gif; unreadable ones are skipped")
    source.add_argument(
        "--random", action="store_true",
        help="time on random pixels (uniform 0-255), no accuracy "
             "(the default when --data is not given)")
    parser.add_argument(
        "--threads", type=positive_int, nargs="+", default=[1], metavar="N",
        help="thread counts to benchmark, one result each (default: 1); "
             "accuracy uses the first")
    parser.add_argument(
        "--runs", type=positive_int, default=100,
        help="timed runs per thread count (default: 100)")
    parser.add_argument(
        "--warmup", type=non_negative_int, default=10,
        help="untimed runs before timing, per thread count (default: 10)")
    parser.add_argument(
        "--limit", type=positive_int, default=None, metavar="N",
        help="use at most N images from --data, taken round-robin across "
             "classes (default: all)")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0,
        help="seed for --random inputs (default: 0)")
    parser.add_argument(
        "--json", metavar="PATH",
        help="also write the results as JSON to PATH (written atomically)")
    return parser.parse_args(argv)


def validated_paths(args):
    """Fail fast, before any slow work, on paths that cannot work."""
    model = Path(args.model)
    if not model.is_file():
        raise UsageError(f"model file not found: {model}")
    if model.suffix.lower() != SUFFIX:
        raise UsageError(f"expected a {SUFFIX} file, got: {model}")
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"data folder not found: {args.data}")
    if args.json is not None:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise UsageError(f"folder for --json does not exist: {parent}")


# ------------------------------------------------------------------ labels

def label_lines(text):
    """One label per line; a trailing newline must not create an extra, empty class."""
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    return labels


def labels_from_file(model_path):
    """Labels from labels.txt beside the model, or None if there is none."""
    path = Path(model_path).with_name("labels.txt")
    if not path.is_file():
        return None
    return label_lines(path.read_text(encoding="utf-8"))


def labels_from_archive(model_path):
    """labels.txt from the zip archive appended to the .tflite file (edgeft's exports carry
    one, as TFLite-metadata files do), or None."""
    try:
        with zipfile.ZipFile(model_path) as zf:
            text = zf.read("labels.txt").decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError):
        return None
    return label_lines(text)


def model_labels(model_path):
    """(labels, source) known from the model side, or (None, None);
    labels.txt beside the model overrides the labels inside it."""
    labels = labels_from_file(model_path)
    if labels is not None:
        return labels, "labels.txt"
    labels = labels_from_archive(model_path)
    return (labels, "embedded labels.txt") if labels is not None else (None, None)


def class_images(data_dir):
    """{class folder name: sorted image paths}, in sorted folder order."""
    # Hidden folders (.ipynb_checkpoints, ...) are tool debris, not classes.
    folders = sorted(p for p in Path(data_dir).iterdir()
                     if p.is_dir() and not p.name.startswith("."))
    images = {f.name: sorted(p for p in f.rglob("*")
                             if p.suffix.lower() in IMAGE_EXTENSIONS
                             and p.is_file())
              for f in folders}
    if not any(images.values()):
        raise UsageError(f"no images found in class sub-folders of {data_dir}")
    return images


def interleaved(lists):
    """Round-robin merge, so that --limit keeps every class represented."""
    merged = []
    for i in range(max((len(x) for x in lists), default=0)):
        merged.extend(x[i] for x in lists if i < len(x))
    return merged


def dataset(images, labels, source, num_classes, limit):
    """(items, labels, source): items are (path, class_id) pairs."""
    if labels is None:
        labels, source = list(images), "folders"
    if len(labels) != num_classes:
        raise UsageError(
            f"{len(labels)} labels ({source}) but the model outputs "
            f"{num_classes} classes; a labels.txt beside the model sets them")
    ids = {name: i for i, name in enumerate(labels)}
    missing = [name for name in images if name not in ids]
    if missing:
        raise UsageError(
            f"data folder(s) {', '.join(missing)} not in labels ({source})")
    items = interleaved([[(p, ids[name]) for p in paths]
                         for name, paths in images.items()])
    return items[:limit], labels, source


def load_image(path, height, width):
    """RGB float32 pixels 0-255, exactly as the training pipeline loads them
    (no EXIF rotation, bilinear resize)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB").resize((width, height), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32)


# ------------------------------------------------------------------- model

def runtime_version():
    import ai_edge_litert
    return getattr(ai_edge_litert, "__version__", "unknown")


def quantization(detail):
    """{"scale", "zero_point"} for integer tensors, else None."""
    if not np.issubdtype(detail["dtype"], np.integer):
        return None
    scale, zero_point = detail["quantization"]
    return {"scale": float(scale), "zero_point": int(zero_point)}


def tensor_info(detail):
    return {"name": detail["name"],
            "shape": [int(d) for d in detail["shape"]],
            "dtype": np.dtype(detail["dtype"]).name,
            "quantization": quantization(detail)}


class Model:
    """A loaded interpreter plus the conversions the contract asks for."""

    def __init__(self, path, threads):
        from ai_edge_litert.interpreter import Interpreter
        start = time.perf_counter()
        try:
            self.interpreter = Interpreter(model_path=str(path),
                                           num_threads=threads)
            self.input, self.output = self.batch_one_details()
        except (ValueError, RuntimeError) as error:
            message = str(error).strip().splitlines()
            raise UsageError(f"cannot load {path}: "
                             f"{message[0] if message else type(error).__name__}"
                             ) from None
        self.load_ms = (time.perf_counter() - start) * 1000.0
        self.check_contract(path)

    def batch_one_details(self):
        interpreter = self.interpreter
        detail = interpreter.get_input_details()[0]
        if detail["shape"][0] != 1:
            # Dynamic batch: latency is measured for a single image.
            interpreter.resize_tensor_input(
                detail["index"], [1, *detail["shape"][1:]])
        interpreter.allocate_tensors()
        return (interpreter.get_input_details()[0],
                interpreter.get_output_details()[0])

    def check_contract(self, path):
        shape = self.input["shape"]
        if len(shape) != 4 or shape[3] != 3:
            raise UsageError(f"{path}: expected an NHWC RGB input, "
                             f"got shape {list(shape)}")
        for detail in (self.input, self.output):
            q = quantization(detail)
            if q is not None and q["scale"] == 0.0:
                raise UsageError(f"{path}: integer tensor {detail['name']} "
                                 "has no quantization scale")

    @property
    def image_size(self):
        """(height, width) the model expects."""
        return int(self.input["shape"][1]), int(self.input["shape"][2])

    @property
    def num_classes(self):
        return int(self.output["shape"][-1])

    def prepared(self, pixels):
        """Batch of one in the input dtype: q = round(x / scale + zp)."""
        dtype = self.input["dtype"]
        q = quantization(self.input)
        if q is None:
            return pixels[np.newaxis].astype(dtype)
        info = np.iinfo(dtype)
        values = np.round(pixels / q["scale"] + q["zero_point"])
        return np.clip(values, info.min, info.max)[np.newaxis].astype(dtype)

    def raw_output(self, batch):
        """The timed call: copy in, invoke, copy out."""
        self.interpreter.set_tensor(self.input["index"], batch)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"])

    def probabilities(self, batch):
        raw = self.raw_output(batch).reshape(-1)
        q = quantization(self.output)
        if q is None:
            return raw.astype(np.float32)
        return (raw.astype(np.float32) - q["zero_point"]) * q["scale"]


# ------------------------------------------------------------- measurement

def accuracy(model, items, labels):
    """(accuracy dict, latency input pool, unreadable count), streaming the
    images so memory does not grow with the folder size."""
    height, width = model.image_size
    pool, unreadable = [], 0
    counts = np.zeros((len(labels), 2), dtype=np.int64)  # [n, correct]
    for path, class_id in items:
        try:
            batch = model.prepared(load_image(path, height, width))
        except (OSError, ValueError, Image.DecompressionBombError):
            unreadable += 1
            continue
        if len(pool) < LATENCY_POOL:
            pool.append(batch)
        predicted = int(np.argmax(model.probabilities(batch)))
        counts[class_id] += (1, predicted == class_id)
    if not pool:
        raise UsageError("none of the images could be read")
    n, correct = (int(v) for v in counts.sum(axis=0))
    # Classes without images (labels.txt may list more) are left out.
    per_class = {label: {"n": int(c[0]), "correct": int(c[1]),
                         "top1": float(c[1] / c[0])}
                 for label, c in zip(labels, counts) if c[0]}
    result = {"top1": correct / n, "n": n, "correct": correct,
              "per_class": per_class}
    return result, pool, unreadable


def random_pool(model, seed):
    rng = np.random.default_rng(seed)
    height, width = model.image_size
    return [model.prepared(rng.uniform(0.0, 255.0, (height, width, 3))
                           .astype(np.float32))
            for _ in range(LATENCY_POOL)]


def latency_samples_ms(model, pool, runs, warmup):
    for i in range(warmup):
        model.raw_output(pool[i % len(pool)])
    samples = []
    for i in range(runs):
        batch = pool[i % len(pool)]
        start = time.perf_counter_ns()
        model.raw_output(batch)
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return np.asarray(samples)


def without_outliers(samples):
    median = np.median(samples)
    mad = np.median(np.abs(samples - median))
    # MAD 0 (e.g. a coarse clock) would remove every sample off the median.
    if mad == 0.0:
        return samples
    return samples[samples <= median + OUTLIER_MADS * MAD_TO_STD * mad]


def latency_stats(samples):
    kept = without_outliers(samples)
    p50, p90, p99 = np.percentile(kept, [50, 90, 99])
    stats = {"mean": kept.mean(), "p50": p50, "p90": p90, "p99": p99,
             "min": kept.min(), "max": kept.max(), "std": kept.std()}
    return {k: float(v) for k, v in stats.items()}, len(samples) - len(kept)


def thread_result(model, threads, pool, args):
    samples = latency_samples_ms(model, pool, args.runs, args.warmup)
    stats, removed = latency_stats(samples)
    return {"threads": threads, "runs": args.runs, "warmup": args.warmup,
            "load_ms": model.load_ms, "latency_ms": stats,
            "outliers_removed": removed,
            "throughput_ips": 1000.0 / stats["mean"]}


def peak_rss_mb():
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    divisor = 1024 * 1024 if sys.platform == "darwin" else 1024
    return peak / divisor


def machine_info():
    return {"machine": platform.machine(), "platform": platform.platform(),
            "cpu_count": os.cpu_count()}


# ----------------------------------------------------------------- report

def benchmark(args):
    model_path = Path(args.model)
    # Listing the folder first fails fast, before the model loads.
    images = None if args.data is None else class_images(args.data)
    labels, source = model_labels(model_path)
    model = Model(model_path, args.threads[0])
    data = acc = None
    if args.data is not None:
        items, labels, source = dataset(images, labels, source,
                                        model.num_classes, args.limit)
        acc, pool, unreadable = accuracy(model, items, labels)
        data = {"path": args.data, "images": len(items),
                "unreadable": unreadable}
    else:
        pool = random_pool(model, args.seed)
    size = model_path.stat().st_size
    report = {
        "model": str(model_path), "format": FORMAT, "runtime": RUNTIME,
        "runtime_version": runtime_version(), "size_bytes": size,
        "size_mb": size / (1024 * 1024), "load_ms": model.load_ms,
        "input": tensor_info(model.input), "output": tensor_info(model.output),
        "num_classes": model.num_classes, "labels": labels,
        "labels_source": source, "python": platform.python_version(),
        "machine": machine_info(), "data": data,
        "latency_rule": LATENCY_RULE, "results": [],
    }
    for i, threads in enumerate(args.threads):
        if i:
            model = None  # free the previous interpreter before the next
            model = Model(model_path, threads)
        report["results"].append(thread_result(model, threads, pool, args))
    report["peak_rss_mb"] = peak_rss_mb()
    report["accuracy"] = acc
    return report


def table(header, rows):
    """Right-aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows])
              for i in range(len(header))]
    return "\n".join("  ".join(str(cell).rjust(w)
                               for cell, w in zip(row, widths))
                     for row in [header, *rows])


def quantization_text(q):
    return "" if q is None else (
        f" (scale {q['scale']:.6g}, zero_point {q['zero_point']})")


def summary(report):
    tensor = report["input"]
    rss = report["peak_rss_mb"]
    lines = [
        f"model     {report['model']}  ({report['size_mb']:.3f} MB, "
        f"{report['runtime']} {report['runtime_version']})",
        f"input     {tensor['shape']} {tensor['dtype']}"
        + quantization_text(tensor["quantization"]),
        f"load      {report['load_ms']:.1f} ms",
        f"peak RSS  {'n/a' if rss is None else f'{rss:.1f} MB'}",
        f"machine   {report['machine']['platform']}, "
        f"{report['machine']['cpu_count']} CPUs, "
        f"Python {report['python']}",
    ]
    acc = report["accuracy"]
    if acc is not None:
        lines.append(
            f"accuracy  top-1 {acc['top1']:.2%} ({acc['correct']}/{acc['n']}), "
            f"labels from {report['labels_source']}, "
            f"{report['data']['unreadable']} unreadable image(s) skipped")
        lines.append("")
        lines.append(table(
            ["class", "n", "correct", "top1"],
            [[label, c["n"], c["correct"], f"{c['top1']:.2%}"]
             for label, c in acc["per_class"].items()]))
    lines.append("")
    lines.append(table(
        ["threads", "runs", "mean_ms", "p50_ms", "p90_ms", "p99_ms",
         "min_ms", "max_ms", "std_ms", "outliers", "img/s"],
        [[r["threads"], r["runs"]]
         + [f"{r['latency_ms'][k]:.3f}" for k in
            ("mean", "p50", "p90", "p99", "min", "max", "std")]
         + [r["outliers_removed"], f"{r['throughput_ips']:.1f}"]
         for r in report["results"]]))
    return "\n".join(lines)


def write_json_atomic(path, report):
    """Readers never see a half-written file: write a temp file in the same
    folder (same filesystem) and rename it over the target."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent,
                               prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        validated_paths(args)
        report = benchmark(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(report))
    if args.json is not None:
        write_json_atomic(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
