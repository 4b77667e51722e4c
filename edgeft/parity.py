"""The parity gate: every exported file, run by its real runtime, against the Keras model.

Two kinds of check. Exact for float formats: max |prob difference| within an absolute tolerance.
Statistical for quantized formats: top-1 agreement with the reference model and the accuracy drop
against the float Keras model. Every file is compared with the float Keras model (the trained
model users ship); int8 TFLite made from a QAT model is held to the tighter QAT accuracy-drop
bound. (Measured on the demo: TFLite int8 agrees with the float model more closely than with the
QAT Keras model's fake-quant simulation, so the QAT model is reported, not used as reference.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import rundir
from .config import EdgeftConfig, ParityConfig, from_yaml_file
from .errors import ParityError, UserError
from .runtime import KerasRunner, open_runner


@dataclass
class ParityRow:
    format: str
    file: str
    size_bytes: int
    tier: str
    made_from: str      # int8: qat or ptq
    n: int
    max_abs_diff: float
    agreement: float
    accuracy: float
    accuracy_drop: float
    passed: bool
    failures: list[str]


def exact_failures(probs, ref, atol: float) -> list[str]:
    diff = float(np.max(np.abs(probs - ref)))
    return [] if diff <= atol else [f"max |Δprob| {diff:.2e} > {atol:.0e}"]


def agreement(probs, ref) -> float:
    return float(np.mean(probs.argmax(-1) == ref.argmax(-1)))


def statistical_failures(probs, ref, y, float_acc: float, min_agreement: float, max_drop: float) -> list[str]:
    out = []
    agree = agreement(probs, ref)
    if agree < min_agreement:
        out.append(f"top-1 agreement {agree:.1%} < {min_agreement:.0%}")
    drop = float_acc - float(np.mean(probs.argmax(-1) == y))
    if drop > max_drop + 1e-9:
        out.append(f"accuracy drop {drop * 100:.1f} points > {max_drop * 100:.1f}")
    return out


def tier_failures(tier: str, probs, ref, y, float_acc: float, p: ParityConfig, from_qat: bool) -> list[str]:
    if tier == "float":
        return exact_failures(probs, ref, p.float_atol)
    if tier == "fp16":
        return exact_failures(probs, ref, p.fp16_atol) + \
            statistical_failures(probs, ref, y, float_acc, p.fp16_agreement, 1.0)
    return statistical_failures(probs, ref, y, float_acc, p.int8_agreement,
                                p.int8_qat_max_drop if from_qat else p.int8_max_drop)


def remedy(row: ParityRow) -> str:
    """What a user can do about a failing row (printed under the table and kept in parity.md)."""
    if row.tier == "float":
        return (f"{row.file}: a float file must match Keras to rounding error; this is a converter bug, "
                "not a tolerance question (report it with export/parity.json)")
    if row.tier == "fp16":
        return (f"{row.file}: ship fp16 or int8 instead, or relax the tier (--fp16-atol, --fp16-agreement) "
                "if top-1 agreement is what you need")
    if row.made_from == "qat":
        return (f"{row.file}: the int8 file from the QAT model missed the QAT tier; `edgeft export RUN "
                "--int8-source ptq` ships post-training quantization instead (or train QAT longer)")
    return (f"{row.file}: more calibration images (--rep-samples), quantization-aware training "
            "(`edgeft qat RUN`), or a looser tier (--int8-agreement, --int8-max-drop)")


def check_parity(run: str | Path, cfg: EdgeftConfig | None = None, formats=None, splits=None,
                 model=None, qat_model=None) -> dict:
    """Runs every exported file on the val split; writes parity.json / parity.md.

    Raises ParityError naming each failing format (after the report is written).
    """
    from .data import run_splits
    from .export import EXPORT_DIR, FORMATS
    from .model import load_model
    from .qat import load_qat_model

    run = Path(run)
    out = run / EXPORT_DIR
    cfg = cfg or from_yaml_file(run / "config.yaml")
    formats = [f for f in (formats or FORMATS) if (out / f.filename).is_file()]
    if not formats:
        raise UserError(f"no exported files in {out}: run `edgeft export {run}` first")
    if splits is None:
        splits = run_splits(cfg)
    model = model if model is not None else load_model(run / "model.keras")
    made_from = rundir.read_json(out / "formats.json", {})
    if qat_model is None and "qat" in made_from.values():
        qat_model = load_qat_model(run)
    x, y = splits.val.x.astype(np.float32), splits.val.y
    ref = KerasRunner(run / "model.keras", model=model).predict(x)
    float_acc = float(np.mean(ref.argmax(-1) == y))
    qat_ref = KerasRunner(run / "model.keras", model=qat_model).predict(x) if qat_model is not None else None
    rows = []
    for fmt in formats:
        path = out / fmt.filename
        probs = open_runner(path).predict(x)
        from_qat = made_from.get(fmt.name) == "qat"
        fails = tier_failures(fmt.tier, probs, ref, y, float_acc, cfg.parity, from_qat)
        rows.append(ParityRow(fmt.name, path.name, path.stat().st_size, fmt.tier,
                              "qat" if from_qat else ("ptq" if fmt.tier == "int8" else "-"), len(y),
                              float(np.max(np.abs(probs - ref))), agreement(probs, ref),
                              float(np.mean(probs.argmax(-1) == y)),
                              float_acc - float(np.mean(probs.argmax(-1) == y)), not fails, fails))
    report = {"run": str(run), "n_images": int(len(y)), "keras_float_accuracy": float_acc,
              "keras_qat_accuracy": float(np.mean(qat_ref.argmax(-1) == y)) if qat_ref is not None else None,
              "thresholds": asdict(cfg.parity), "rows": [asdict(r) for r in rows],
              "passed": all(r.passed for r in rows),
              "remedies": [remedy(r) for r in rows if not r.passed]}
    rundir.write_json(out / "parity.json", report)
    rundir.write_text(out / "parity.md", parity_markdown(report))
    print(parity_markdown(report))
    failed = [r for r in rows if not r.passed]
    if failed:
        raise ParityError("; ".join(f"{r.format} ({r.file}): {', '.join(r.failures)}" for r in failed))
    print(f"parity: all {len(rows)} file(s) agree with Keras on {len(y)} held-out images")
    return report


def parity_markdown(report: dict) -> str:
    lines = [f"# Parity on {report['n_images']} held-out images", "",
             f"Keras float accuracy {report['keras_float_accuracy']:.4f}"
             + (f", Keras QAT accuracy {report['keras_qat_accuracy']:.4f}" if report["keras_qat_accuracy"] is not None else ""),
             "", "| format | file | size (MB) | tier | int8 from | max Δprob | top-1 agreement | accuracy | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        result = "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
        lines.append(f"| {r['format']} | {r['file']} | {r['size_bytes'] / 1e6:.3f} | {r['tier']} | {r['made_from']} | "
                     f"{r['max_abs_diff']:.2e} | {r['agreement']:.1%} | {r['accuracy']:.4f} | {result} |")
    if report.get("remedies"):
        lines += ["", "What to do:", ""] + [f"- {text}" for text in report["remedies"]]
    return "\n".join(lines) + "\n"
