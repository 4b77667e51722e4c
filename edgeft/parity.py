"""The parity gate: every exported file, run by its real runtime, against the Keras model.

The inputs are the validation split plus deterministic augmented copies (flip, shift,
brightness) up to --parity-inputs (1,000 by default): one image of an 80-image split is 1.25
points, too coarse to tell a broken file from noise. Agreement is reported with its Wilson 95 %
interval and the number of inputs.

Tiers: exact (max |Δprob|) for float files; float16 adds top-1 agreement; dynamic-range
quantizes activations at run time per tensor, so its probability bound is looser and its top-1
agreement is what matters; int8 files are judged statistically (top-1 agreement with Keras and
the accuracy drop). Every file is compared with the float Keras model (the trained model users
ship); an int8 file made from a QAT model also reports its agreement with the QAT simulation.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import rundir
from .config import EdgeftConfig
from .errors import ParityError, UserError
from .markdown import md_cell
from .formats import EXPORT_DIR, FORMATS, TFLM_DIR, open_format_runner
from .progress import Progress
from .report import update_report_section
from .run import Run, as_run
from .stats import wilson_interval
from .tiers import agreement, tier_failures

SHOW_FLIPS = 5   # flipped inputs listed in parity.md (all of them are in parity.json)


@dataclass
class ParityRow:
    format: str
    file: str
    size_bytes: int
    tier: str
    runtime: str
    made_from: str      # int8: qat or ptq
    n: int
    max_abs_diff: float        # against the float Keras model
    reference: str             # what top-1 agreement is measured against: keras float, or keras qat
    agreement: float
    agreement_interval: list[float]
    agreement_with_float: float
    accuracy: float
    accuracy_drop: float       # against the float Keras model
    worst_class: str
    worst_class_drop: float
    passed: bool
    failures: list[str]
    flips: list[dict] = field(default_factory=list)


def per_class_drop(probs, ref, y, classes: list[str]) -> tuple[str, float]:
    """The class whose accuracy drops most from Keras to the file, and by how much."""
    worst, drop = "-", 0.0
    for c, name in enumerate(classes):
        m = y == c
        if m.any():
            d = float(np.mean(ref[m].argmax(-1) == c) - np.mean(probs[m].argmax(-1) == c))
            if d > drop:
                worst, drop = name, d
    return worst, drop


def flipped(probs, ref, inputs, classes: list[str]) -> list[dict]:
    """Every input whose top-1 class differs between the reference model and the file."""
    idx = np.flatnonzero(probs.argmax(-1) != ref.argmax(-1))
    return [{"input": int(i), "image": inputs.describe(i), "true": classes[int(inputs.y[i])],
             "reference": classes[int(ref[i].argmax())], "file": classes[int(probs[i].argmax())],
             "reference_p": round(float(ref[i].max()), 4), "file_p": round(float(probs[i].max()), 4)} for i in idx]


def remedy(row: ParityRow) -> str:
    """What a user can do about a failing row (printed under the table and kept in parity.md)."""
    if row.tier == "float":
        return (f"{row.file} ({row.runtime}): a float file must match Keras to rounding error; this is a converter "
                "bug, not a tolerance question (report it with export/parity.json)")
    if row.tier in ("fp16", "dynamic"):
        flag = "fp16" if row.tier == "fp16" else "dynamic"
        return (f"{row.file}: ship fp16 or int8 instead, or relax the tier (--{flag}-atol, --{flag}-agreement) "
                "if top-1 agreement is what you need")
    if row.made_from == "qat":
        return (f"{row.file} ({row.runtime}): the int8 file from the QAT model missed its tier; `edgeft export RUN "
                "--int8-source ptq` ships post-training quantization instead (or train QAT longer)")
    return (f"{row.file} ({row.runtime}): more calibration images (--rep-samples), quantization-aware training "
            "(`edgeft qat RUN`), or a looser tier (--int8-agreement, --int8-max-drop)")


def predict_with_progress(runner, x: np.ndarray, label: str, chunk: int = 100) -> np.ndarray:
    with Progress(label, len(x), "inputs") as bar:
        out = []
        for i in range(0, len(x), chunk):
            out.append(np.asarray(runner.predict(x[i:i + chunk])))
            bar.update(len(out[-1]))
    return np.concatenate(out)


def check_parity(run: Run | str | Path, cfg: EdgeftConfig | None = None, formats=None, qat_model=None,
                 inputs=None, out: Path | None = None) -> dict:
    """Runs every exported file on the parity inputs; writes parity.json / parity.md.

    Raises ParityError naming each failing format (after the report is written).
    """
    from .data import parity_inputs
    from .int8_choice import keras_probs
    from .qat import load_qat_model

    handle = as_run(run, cfg)
    run, cfg = handle.path, handle.cfg
    standalone = out is None            # `edgeft parity RUN`: the shipped export/, checked against its manifest
    out = out or run / EXPORT_DIR
    if standalone:
        from .manifest import require_manifest_ok

        require_manifest_ok(run, out)
    formats = [f for f in (formats or FORMATS) if (out / f.filename).is_file()
               and (f.family != "tflm" or (out / TFLM_DIR).is_dir())]   # the TFLM row only after --tflm
    if not formats:
        raise UserError(f"no exported files in {out}: run `edgeft export {run}` first")
    splits = handle.splits
    if inputs is None:
        inputs = parity_inputs(splits.val, cfg.parity.parity_inputs, cfg.train.seed, cfg.parity.parity_flip)
    model = handle.model
    made_from = rundir.read_json(out / rundir.FORMATS_JSON, {})
    if qat_model is None and any(made_from.get(f.name) == "qat" for f in formats):   # only when a file needs it
        qat_model = load_qat_model(handle)
    x, y = inputs.x, inputs.y
    ref = keras_probs(model, x)
    float_acc = float(np.mean(ref.argmax(-1) == y))
    qat_ref = keras_probs(qat_model, x) if qat_model is not None else None
    rows = []
    for fmt in formats:
        path = out / fmt.filename
        probs = predict_with_progress(open_format_runner(fmt, path), x, f"parity: {path.name} ({fmt.runtime})")
        from_qat = made_from.get(fmt.name) == "qat" and qat_ref is not None
        # an int8 file from QAT is checked against its source (the QAT model it converts) for
        # agreement, and against the float model for the accuracy it costs
        base = qat_ref if from_qat else ref
        fails = tier_failures(fmt.tier, probs, base, y, float_acc, cfg.parity, from_qat)
        agree = agreement(probs, base)
        worst, worst_drop = per_class_drop(probs, ref, y, splits.classes)
        acc = float(np.mean(probs.argmax(-1) == y))
        rows.append(ParityRow(fmt.name, path.name, path.stat().st_size, fmt.tier, fmt.runtime,
                              "qat" if from_qat else ("ptq" if fmt.tier == "int8" else "-"), len(y),
                              float(np.max(np.abs(probs - ref))), "keras qat" if from_qat else "keras float", agree,
                              list(wilson_interval(round(agree * len(y)), len(y))), agreement(probs, ref),
                              acc, float_acc - acc, worst, worst_drop,
                              not fails, fails, flipped(probs, base, inputs, splits.classes)))
    # every file under every client apps ship it with (informational: it does not fail the gate)
    from .clients import client_matrix, client_warnings

    clients = (client_matrix(out, x, ref, splits.classes, limit=cfg.parity.client_inputs,
                             files=[out / f.filename for f in formats]) if cfg.parity.client_inputs else [])
    n_val = int(np.sum(inputs.copy == 0))
    report = {"run": str(run), "n_inputs": int(len(y)), "n_validation_images": n_val,
              "n_augmented": int(len(y) - n_val), "keras_float_accuracy": float_acc,
              "keras_qat_accuracy": float(np.mean(qat_ref.argmax(-1) == y)) if qat_ref is not None else None,
              "int8_choice": made_from.get("int8_choice"),
              "thresholds": asdict(cfg.parity), "rows": [asdict(r) for r in rows],
              "passed": all(r.passed for r in rows),
              "remedies": [remedy(r) for r in rows if not r.passed], "clients": clients}
    rundir.write_json(out / rundir.PARITY_JSON, report)
    md = parity_markdown(report)
    rundir.write_text(out / rundir.PARITY_MD, md)
    update_report_section(run, "Export and parity gate", md.split("\n", 2)[2] if md.startswith("# ") else md)
    print(md)
    for line in client_warnings(clients):
        print(f"parity: client matrix: {line}")
    failed = [r for r in rows if not r.passed]
    if failed:
        raise ParityError("; ".join(f"{r.format} ({r.file}): {', '.join(r.failures)}" for r in failed))
    print(f"parity: all {len(rows)} file(s) agree with Keras on {len(y)} inputs")
    return report


def int8_choice_markdown(choice: dict | None) -> list[str]:
    if not choice:
        return []
    lines = ["", f"int8 TFLite ({choice['granularity']}, {choice['io']} I/O): ships **{choice['shipped']}** "
                 f"({choice['why']}).", "", "| int8 candidate | accuracy (LiteRT) | 95 % interval | "
                 "agreement with float Keras | agreement with QAT Keras |", "|---|---|---|---|---|"]
    for c in choice["candidates"]:
        lo, hi = c["accuracy_interval"]
        src = "-" if c["agreement_with_source"] is None else f"{c['agreement_with_source']:.1%}"
        lines.append(f"| {c['source']} | {c['accuracy']:.4f} | [{lo:.3f}, {hi:.3f}] | "
                     f"{c['agreement_with_float']:.1%} | {src} |")
    return lines


def parity_markdown(report: dict) -> str:
    lines = [f"# Parity on {report['n_inputs']} inputs", "",
             f"{report['n_validation_images']} validation images and {report['n_augmented']} deterministic "
             "augmented copies (" + ("flip, " if report["thresholds"].get("parity_flip", True) else "")
             + "shift, brightness). Keras float accuracy "
             f"{report['keras_float_accuracy']:.4f}"
             + (f", Keras QAT accuracy {report['keras_qat_accuracy']:.4f}" if report["keras_qat_accuracy"] is not None
                else "") + ".",
             "", "| format | file | runtime | size (MB) | tier | int8 from | max Δprob | top-1 agreement [95 % CI] "
                 "| with | accuracy | worst class drop | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        result = "pass" if r["passed"] else "FAIL: " + md_cell("; ".join(r["failures"]))
        lo, hi = r["agreement_interval"]
        worst = f"{md_cell(r['worst_class'])} {r['worst_class_drop'] * 100:.1f} pts" if r["worst_class_drop"] > 0 else "-"
        lines.append(f"| {r['format']} | {r['file']} | {r['runtime']} | {r['size_bytes'] / 1e6:.3f} | {r['tier']} | "
                     f"{r['made_from']} | {r['max_abs_diff']:.2e} | {r['agreement']:.1%} [{lo:.1%}, {hi:.1%}] | {r['reference']} | "
                     f"{r['accuracy']:.4f} | {worst} | {result} |")
    lines += int8_choice_markdown(report.get("int8_choice"))
    if report.get("clients"):
        from .clients import matrix_markdown

        lines += ["", "Client matrix: each file in the libraries apps ship it with (informational; it does not "
                      "decide the gate).", "", matrix_markdown(report["clients"]).rstrip()]
    flips = [(r["file"], r["runtime"], f) for r in report["rows"] for f in r["flips"][:SHOW_FLIPS]]
    if flips:
        lines += ["", f"Inputs whose top-1 class differs from the reference (first {SHOW_FLIPS} per file; all in "
                      "parity.json):", "", "| file | runtime | input | true | reference | file |", "|---|---|---|---|---|---|"]
        lines += [f"| {file} | {rt} | {md_cell(f['image'])} | {md_cell(f['true'])} | {md_cell(f['reference'])} "
                  f"({f['reference_p']:.2f}) | {md_cell(f['file'])} ({f['file_p']:.2f}) |" for file, rt, f in flips]
    if report.get("remedies"):
        lines += ["", "What to do:", ""] + [f"- {text}" for text in report["remedies"]]
    return "\n".join(lines) + "\n"
