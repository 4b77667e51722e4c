"""Recovery for an int8 file that fails the gate (issue 30 item 4), started with step (a): calibration.

Candidates come cheapest first. Each is **screened** on the calibration images plus half of the
parity inputs (half of the validation images, each with all its copies), by its top-1 agreement
with the float model there (ties: the smaller probability RMSE, then the cheaper candidate); only
the one chosen is **judged**, by the gate's own decision (edgeft.core.tiers.judge, with the floor
measured on its file) on the other half of the parity inputs, which the screening never saw. The
test split is never read. Not wired into `edgeft export` yet (`--int8-recover` is item 4).

Calibration candidates: ONNX Runtime's MinMax (what ships today), Entropy and Percentile; the
TFLite converter calibrates by min / max only, so for TFLite step (a) is the calibration set's size.
"""
from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

MAX_CANDIDATES = 6   # the bound on one recovery, with TIME_BUDGET_S
TIME_BUDGET_S = 600.0


@dataclass(frozen=True)
class Recovery:
    name: str                 # e.g. "onnx calibration Entropy"
    step: str                 # "calibration" (item 4(a)), "equalization" (4(b)), "mixed" (4(c)), "qat" (4(d))
    settings: dict = field(default_factory=dict)


def onnx_calibration_candidates() -> list[Recovery]:
    """ONNX Runtime's calibration methods, today's first (it costs nothing more: it is built)."""
    return [Recovery(f"onnx calibration {m}", "calibration", {"calibration": m})
            for m in ("MinMax", "Entropy", "Percentile")]


def tflite_calibration_candidates(rep_samples: int, available: int, cap: int = 2000) -> list[Recovery]:
    """More calibration images (the converter's only calibration is min / max): 4 and 16 times
    today's count while the training split has them (today's count itself is the file that failed)."""
    most = min(available, cap)
    sizes = [min(k * rep_samples, most) for k in (4, 16) if rep_samples < most]
    return [Recovery(f"tflite calibration {n} images", "calibration", {"rep_samples": n})
            for n in dict.fromkeys(sizes)]


HISTOGRAM_IMAGES = 48   # ONNX Runtime's histogram calibrators keep every tensor of every image in memory:
# EfficientNet-Lite0 at 224 px took 3.4 GB for 50 images (14 s), so 200 would take ~13 GB on a 23 GB machine


EIGHT_BIT_NOTE = ("8-bit weights: ONNX Runtime's uint8 x int8 kernels on x86 CPUs with AVX2 but no VNNI add "
                  "pairs of products in int16 and can saturate (why 7-bit weights are the default); this file "
                  "passed the gate on the machine that exported it: run the device script's check on the target")


def onnx_recovery_candidates(rep_samples: int, available: int, cap: int = 2000) -> list[Recovery]:
    """Full 8-bit weights where the default has 7 (reduce_range: the most error for nothing on machines
    whose kernels do not saturate, measured on EfficientNet-Lite0 at 128 px on two real folders), then
    ONNX Runtime's other calibration methods (on at most HISTOGRAM_IMAGES of today's images: they hold
    every tensor of every image), then MinMax on 4 times as many."""
    from edgeft.export.keras2onnx import DEFAULT_INT8, INT8_VARIANTS

    default = INT8_VARIANTS[DEFAULT_INT8]
    eight = next((v.name for v in INT8_VARIANTS.values() if not v.reduce_range and v.fmt == default.fmt
                  and v.activation == default.activation and v.weight == default.weight
                  and v.per_channel == default.per_channel and v.float_stem == default.float_stem
                  and v.ort_preopt == default.ort_preopt and v.extra == default.extra), None)
    out = ([Recovery("onnx 8-bit weights", "calibration", {"variant": eight, "note": EIGHT_BIT_NOTE})]
           if default.reduce_range and eight else [])
    few = min(rep_samples, HISTOGRAM_IMAGES)
    out += [Recovery(f"onnx calibration {m}" + (f" ({few} images)" if few < rep_samples else ""), "calibration",
                    {"calibration": m, "rep_samples": few}) for m in ("Entropy", "Percentile")]
    more = min(4 * rep_samples, available, cap)
    if more > rep_samples:
        out.append(Recovery(f"onnx calibration MinMax {more} images", "calibration",
                            {"calibration": "MinMax", "rep_samples": more}))
    return out


def equalization_candidates() -> list[Recovery]:
    """Cross-layer equalization (ReLU6 clip points kept where the calibration images reach them) and
    empirical bias correction,
    on today's calibration images (edgeft.quantize.equalize): for per-tensor files, tried first (it
    costs one pass over those images and one conversion, less than more calibration images)."""
    return [Recovery("equalization + bias correction", "equalization", {"equalize": "clamp", "bias_correction": True})]


def mixed_candidates(family: str, top: list[dict], key: str) -> list[Recovery]:
    """The fewest most-sensitive ops kept in float (the per-layer report's confirmed ranking): the
    first one, then the first two, ... `key`: the report's name for what the tool denylists
    ("tensor" for TFLite's QuantizationDebugger, "node" for ONNX Runtime's nodes_to_exclude)."""
    return [Recovery(f"{family} mixed: {', '.join(t['layer'] for t in top[:k])} kept float", "mixed",
                     {"keep_float": [t[key] for t in top[:k]], "layers": [t["layer"] for t in top[:k]]})
            for k in range(1, len(top) + 1)]


def screening_split(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(screen, judge) masks over the parity inputs: half of the source images each, every copy
    of an image on the same side (a copy judged after its image was screened would leak)."""
    groups = np.asarray(groups)
    images = np.random.default_rng(seed).permutation(np.unique(groups))
    screen = np.isin(groups, images[:len(images) // 2])
    return screen, ~screen


@dataclass
class Screened:
    recovery: Recovery
    data: bytes
    agreement: float          # top-1 agreement with the float model on the screening inputs
    prob_rmse: float
    n: int
    p50_ms: float | None = None   # invoke latency, batch 1, one thread (the device script's timing rule)

    def summary(self) -> dict:
        return {"name": self.recovery.name, "step": self.recovery.step, "settings": self.recovery.settings,
                "screen_agreement": self.agreement, "screen_prob_rmse": self.prob_rmse, "screen_n": self.n,
                "size_bytes": len(self.data), "p50_ms": self.p50_ms}


def screen(cands: list[Recovery], build: Callable[[Recovery], bytes], predict: Callable[[bytes, np.ndarray], np.ndarray],
           x: np.ndarray, float_probs: np.ndarray, deadline: float | None = None,
           latency: Callable[[bytes], float | None] | None = None, not_made: dict | None = None) -> list[Screened]:
    """Each candidate built and run on the screening inputs; one console line each. Past `deadline`
    (time.monotonic()) the rest are not built: one line says so. `not_made`: gets {name: why} of each
    candidate that could not be built or run."""
    import time

    out = []
    for i, c in enumerate(cands[:MAX_CANDIDATES]):
        if deadline is not None and time.monotonic() > deadline and out:
            log.info(f"recover: out of time, not tried: {', '.join(r.name for r in cands[i:MAX_CANDIDATES])}")
            break
        try:
            data = build(c)
            probs = np.asarray(predict(data, x), np.float64)
        except (MemoryError, Exception) as e:   # noqa: BLE001 - one candidate that cannot be made is a line, not the end
            why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
            log.info(f"recover: {c.name}: not made: {why}"[:100])
            log.debug(f"recover: {c.name}: not made: {why}")
            if not_made is not None:
                not_made[c.name] = why
            continue
        s = Screened(c, data, float(np.mean(probs.argmax(-1) == float_probs.argmax(-1))),
                     float(np.sqrt(np.mean((probs - float_probs) ** 2))), int(len(x)))
        s.p50_ms = latency(data) if latency is not None else None
        log.info(f"recover: {c.name}: agrees {s.agreement:.1%} of {s.n}, {len(data) / 1e6:.2f} MB"
                 + (f", p50 {s.p50_ms:.2f} ms" if s.p50_ms is not None else ""))
        log.debug(f"recover: {c.name}: top-1 agreement with float {s.agreement:.2%} on {s.n} screening inputs, "
                  f"probability RMSE {s.prob_rmse:.4f}")
        out.append(s)
    return out


def best(screened: list[Screened]) -> Screened:
    """Highest agreement; then the smaller RMSE; then the cheaper (earlier) candidate."""
    return min(enumerate(screened), key=lambda t: (-t[1].agreement, t[1].prob_rmse, t[0]))[1]


def recover(cands: list[Recovery], build, predict, suffix: str, calibration_x: np.ndarray,
            calibration_probs: np.ndarray, inputs, float_probs: np.ndarray, parity, seed: int = 0) -> dict:
    """Screens `cands`, judges the chosen one on the inputs the screening did not use. Returns the
    record (what was tried, each screening result, the chosen one, its gate verdict) and, under
    "data", the chosen file's bytes."""
    from edgeft.core.floor import measure_floor
    from edgeft.core.tiers import judge

    float_probs = np.asarray(float_probs, np.float64)
    scr, jdg = screening_split(inputs.source, seed)
    x_screen = np.concatenate([np.asarray(calibration_x, np.float32), inputs.x[scr]])
    p_screen = np.concatenate([np.asarray(calibration_probs, np.float64), float_probs[scr]])
    screened = screen(cands, build, predict, x_screen, p_screen)
    chosen = best(screened)
    x, ref, y, groups = inputs.x[jdg], float_probs[jdg], np.asarray(inputs.y)[jdg], np.asarray(inputs.source)[jdg]
    probs = np.asarray(predict(chosen.data, x), np.float64)
    fd, path = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(chosen.data)
        floor = measure_floor(path, x, probs, ref, groups, parity.clear_margin, parity.floor_inputs, seed,
                              label=f"recover: the floor of {chosen.recovery.name}", slack=parity.floor_slack)
    finally:
        os.unlink(path)
    j = judge("int8", probs, ref, y, groups, parity, floor, seed)
    log.info(f"recover: chose {chosen.recovery.name}: " + ("passes" if j.passed else "fails")
             + f" the gate on {len(y)} unscreened inputs")
    log.debug(f"recover: {chosen.recovery.name}: the gate's verdict: {j.verdict}")
    return {"tried": [s.summary() for s in screened], "chosen": chosen.recovery.name,
            "screen_images": int(len(np.unique(np.asarray(inputs.source)[scr]))) if scr.any() else 0,
            "calibration_images": int(len(calibration_x)), "judged_images": int(len(np.unique(groups))),
            "judged_inputs": int(len(y)), "passed": j.passed, "verdict": j.verdict, "failures": list(j.failures),
            "data": chosen.data}


def onnx_recovery(float_onnx: bytes, rep_images: np.ndarray, inputs, float_probs: np.ndarray, calibration_probs,
                  parity, seed: int = 0, metadata: dict | None = None, variant: str | None = None) -> dict:
    """Step (a) for the ONNX int8 file: its calibration methods, screened and judged as above."""
    from edgeft.export.keras2onnx import DEFAULT_INT8, onnx_int8_bytes
    from edgeft.quantize.onnx_report import _probs

    def build(r: Recovery) -> bytes:
        return onnx_int8_bytes(float_onnx, rep_images, metadata or {}, variant or DEFAULT_INT8,
                               calibration=r.settings["calibration"])

    return recover(onnx_calibration_candidates(), build, _probs, ".onnx", rep_images, calibration_probs, inputs,
                   float_probs, parity, seed)


def qat_markdown(s: dict) -> str:
    """What step (d)'s training did, for parity.md (edgeft.pipeline.recovery_qat)."""
    how = s.get("weights") or (f"trained {s.get('epochs_run')} of {s.get('epochs')} epoch(s) in {s.get('train_s')} s "
                               f"(estimated {s.get('estimated_epoch_s')} s an epoch), lr {s.get('lr')}, "
                               f"ranges frozen for the last {s.get('freeze_epochs')}")
    return (how + ("; cut short: the recovery's 10 minutes were nearly spent" if s.get("cut_short") else "")
            + f"; weights sha256 {str(s.get('weights_sha256'))[:12]}...")


def recovery_markdown(records: list[dict] | None) -> list[str]:
    """parity.md's account of int8 recovery (edgeft.pipeline.recovery): each candidate tried, its
    screening result, size and latency, each gate judgement, what was not tried and why, what shipped."""
    if not records:
        return []
    lines = []
    for rec in records:
        if not rec.get("tried"):
            lines += ["", f"int8 recovery of {rec['file']}: {rec.get('why', 'nothing tried')}."]
            continue
        s, j = rec["screen"], rec["judged"]
        lines += ["", (f"int8 recovery of {rec['file']} (--int8-recover {rec['mode']}): candidates screened on "
                       f"{s['calibration_images']} calibration images and {s['parity_images']} of the parity images "
                       f"({s['inputs']} inputs, agreement with float Keras); the chosen one judged by the gate on the "
                       f"other {j['images']} images ({j['inputs']} inputs) only. The test split is never read."), "",
                  "| candidate | step | screening agreement | probability RMSE | size (MB) | p50 (ms) |",
                  "|---|---|---|---|---|---|"]
        for t in rec["tried"]:
            p50 = "-" if t.get("p50_ms") is None else f"{t['p50_ms']:.2f}"
            lines.append(f"| {t['name']} | {t['step']} | {t['screen_agreement']:.1%} | {t['screen_prob_rmse']:.4f} | "
                         f"{t['size_bytes'] / 1e6:.3f} | {p50} |")
        lines.append("")
        lines += [f"- {t['name']}: {t['settings']['note']}" for t in rec["tried"] if (t.get("settings") or {}).get("note")]
        lines += [f"- {t['name']}: {qat_markdown(t['settings'])}" for t in rec["tried"] if t["step"] == "qat"]
        lines += [f"- judged: {g['name']} as {g['file']}: {g['verdict']}" for g in rec.get("judgements", [])]
        lines += [f"- {what}: {why}" for what, why in rec.get("not_tried", {}).items()]
        lines += [f"- {name}: not made: {why}" for name, why in rec.get("not_made", {}).items()]
        shipped = rec.get("shipped")
        lines.append(f"- shipped: {shipped['file']} ({shipped['name']})" if shipped else
                     f"- shipped: nothing; {rec['file']} stays in failed/")
    return lines
