"""`edgeft export --int8-recover`: an int8 file that fails the gate, recovered (issue 30 items 3-4).

Runs after the gate, on the int8 rows (TFLite, ONNX) that failed it, unless `--int8-recover off`
(today's behaviour: the file goes to export/failed/). Per failed file, candidates cheapest first,
at most 6 and 10 minutes (edgeft.quantize.recover): (a) calibration (TFLite: more images, the
converter calibrating by min / max only; ONNX: Entropy, Percentile, more images); (b) for a
per-tensor TFLite file, cross-layer equalization and bias correction (edgeft.quantize.equalize),
tried first; (c) with `allow-mixed` only, the fewest most-sensitive ops of the per-layer report
kept float, shipped as model_mixed.tflite / .onnx while the requested file stays in failed/; (d) for the
int8 TFLite file, QAT at the requested granularity when the run has data for it
(edgeft.pipeline.recovery_qat), tried only after the cheaper candidates' chosen file failed the gate,
before the mixed ones (it would ship the requested file itself).

Candidates are screened on the calibration images plus half of the parity inputs (each image with
all its copies on one side); the best is then gated by the gate's own row (edgeft.verify.parity) on
the other half only. The test split is never read. What was tried, each screening result, size and
p50 latency, and what shipped go into parity.json / parity.md, formats.json and the manifest; the
re-export of `export --check` takes the same steps with the same seeds, so the same bytes come back.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.core.formats import FORMATS, TFLM_FILE
from edgeft.core.progress import step
from edgeft.pipeline import recovery_qat as rq
from edgeft.quantize import recover as rc
from edgeft.quantize.int8_report import NAMED_REMOVED, sources

log = logging.getLogger(__name__)

RECOVERABLE = {f.recovers: f for f in FORMATS if f.recovers}   # int8 row name -> the mixed row that may replace it
KEY = "int8_recovery"   # formats.json, parity.json, manifest.json
LATENCY_RUNS, LATENCY_WARMUP = 20, 3


def drop_earlier_mixed(stage: Path, formats, ctx=None) -> None:
    """A mixed file of an earlier export goes when its int8 row is rebuilt now (recovery makes it again
    if that row fails again); so do the QAT weights of step (d), kept in memory (`ctx`) to be converted
    again if recovery reaches step (d) with the same model and settings."""
    asked = {f.name for f in formats}
    for f in RECOVERABLE.values():
        if f.recovers in asked:
            (stage / f.filename).unlink(missing_ok=True)
    if "tflite_int8" in asked and ctx is not None:
        rq.take_earlier(stage, ctx)


def recover_failed(ctx, formats, stage: Path, report: dict) -> tuple[dict, list, list[str]]:
    """Recovers each failed int8 file in `stage`; returns (the report, rewritten when anything was
    tried; the mixed formats now in `stage`; the files replaced by a recovered one)."""
    mode = ctx.cfg.export.int8_recover
    failed = [r for r in report["rows"] if r["format"] in RECOVERABLE and not r["passed"]]
    if not failed:
        return report, [], []
    if mode == "off":
        log.info(f"export: --int8-recover off: {', '.join(r['file'] for r in failed)} not recovered")
        return report, [], []
    deadline = time.monotonic() + rc.TIME_BUDGET_S
    records, extra = [], []
    for row in failed:
        if set(row.get("failure_codes", [])) <= {"not_judged", "input_contract", ""}:
            records.append({"file": row["file"], "tried": [], "shipped": None,
                            "why": "not recoverable: it failed on " + ", ".join(row.get("failure_codes", []))})
            continue
        with step("export", f"recovering {row['file']}", key=f"recover {row['format']}"):
            rec, mixed = _recover_file(ctx, formats, stage, report, row, mode, deadline)
        records.append(rec)
        extra += mixed
    ctx.made_from[KEY] = records
    rundir.write_json(stage / rundir.FORMATS_JSON, ctx.made_from)
    replaced = [r["file"] for r in records if r.get("shipped") and r["shipped"]["file"] == r["file"]]
    if not any(r.get("tried") or r.get("judgements") for r in records):   # nothing tried: the report stands
        return report, extra, replaced
    return _rewrite_report(ctx, stage, report, records), extra, replaced


class Forgetting:
    """The gate's prefetch (edgeft.verify.prefetch) without the files recovery replaced: what it
    measured on them (their test-split accuracy) is the failed file's, so they are measured again."""

    def __init__(self, prefetch, names):
        self.prefetch, self.names = prefetch, set(names)

    def test_accuracy(self, name: str):
        return (False, None) if name in self.names else self.prefetch.test_accuracy(name)

    def __getattr__(self, name):
        return getattr(self.prefetch, name)


class _Halves:
    """The screening inputs (calibration images + half the parity inputs) and the judging half."""

    def __init__(self, ctx):
        from edgeft.data.datasets import ParityInputs
        from edgeft.quantize.int8_choice import keras_probs

        inputs, seed = ctx.inputs, ctx.cfg.train.seed
        self.float_probs = np.asarray(ctx.keras_probs("float"), np.float64)
        scr, jdg = rc.screening_split(inputs.source, seed)
        self.x = np.concatenate([np.asarray(ctx.rep_images, np.float32), inputs.x[scr]])
        self.probs = np.concatenate([np.asarray(keras_probs(ctx.model, ctx.rep_images), np.float64),
                                     self.float_probs[scr]])
        self.judge = ParityInputs(inputs.x[jdg], np.asarray(inputs.y)[jdg], np.asarray(inputs.source)[jdg],
                                  np.asarray(inputs.copy)[jdg], inputs.paths, inputs.policy)
        self.judge_ref = self.float_probs[jdg]
        self.screen_images = len(np.unique(np.asarray(inputs.source)[scr]))


def _latency(suffix: str, pool: np.ndarray):
    """p50 invoke latency, batch 1, one thread, by the device script's rule (`device.time_runner`)."""
    def measure(data: bytes) -> float | None:
        import tempfile

        from edgeft import device

        fd, path = tempfile.mkstemp(suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            timed = device.time_runner(device.open_runner(path, 1), pool, LATENCY_RUNS, LATENCY_WARMUP)
            return float(timed["invoke_ms"]["p50"])
        except Exception as e:   # noqa: BLE001 - a latency that cannot be measured is said, not fatal
            log.info(f"recover: no latency: {(str(e).strip().splitlines() or [type(e).__name__])[-1][:200]}")
            return None
        finally:
            os.unlink(path)
    return measure


def _candidates(ctx, fmt_name: str, mode: str, halves) -> tuple[list, list, dict]:
    """(pure int8 candidates, mixed candidates, {step: why not tried})"""
    from edgeft.core.config import REP_SAMPLES_MAX

    ex, n_train = ctx.cfg.export, len(ctx.train_split.y)
    pure = (rc.tflite_calibration_candidates(len(ctx.rep_images), n_train, REP_SAMPLES_MAX) if fmt_name == "tflite_int8"
            else rc.onnx_recovery_candidates(len(ctx.rep_images), n_train, REP_SAMPLES_MAX))
    skipped = {}
    if ex.int8_granularity == "per-tensor" and fmt_name == "tflite_int8":
        pure = rc.equalization_candidates() + pure
    elif ex.int8_granularity == "per-tensor":
        skipped["equalization"] = ("not tried: the ONNX int8 file has per-channel weights whatever "
                                   "--int8-granularity says (edgeft.export.keras2onnx.DEFAULT_INT8)")
    else:
        skipped["equalization"] = "not tried: for per-tensor files only (per-channel scales equalize each channel already)"
    why_not_qat = rq.skip_reason(ctx, fmt_name)
    if why_not_qat:
        skipped["qat"] = why_not_qat
    mixed = []
    if mode == "allow-mixed":
        try:
            top = _report_top(ctx, fmt_name, halves)
        except Exception as e:   # noqa: BLE001 - without the per-layer report there is no op to keep float
            top = []
            skipped["mixed"] = f"not tried: no per-layer report ({(str(e).strip().splitlines() or [type(e).__name__])[-1][:200]})"
        key = "tensor" if fmt_name == "tflite_int8" else "node"
        named = sources(top)   # an op whose float copy removed (almost) nothing is no candidate
        if top and not named:
            skipped["mixed"] = (f"not tried: no op of the per-layer report removed {NAMED_REMOVED:.0%} of the output "
                                f"error when kept float (the error is spread)")
        mixed = rc.mixed_candidates("tflite" if fmt_name == "tflite_int8" else "onnx", named, key)
    else:
        skipped["mixed"] = "not tried: --int8-recover allow-mixed keeps the most sensitive ops in float (model_mixed.*)"
    return pure, mixed, skipped


def _report_top(ctx, fmt_name: str, halves) -> list[dict]:
    """The per-layer report's confirmed ranking (item 2), made once and kept for export's int8 report."""
    from edgeft.quantize.int8_report import REPORT_INPUTS, keras_kernels, tflite_layers

    order = np.argsort(ctx.inputs.copy, kind="stable")[:REPORT_INPUTS]
    val, val_probs = ctx.inputs.x[order], ctx.keras_probs("float")[order]
    key = ("int8_layers", fmt_name)
    if key not in ctx.cache:
        ex = ctx.cfg.export
        if fmt_name == "tflite_int8":
            ctx.cache[key] = tflite_layers(ctx.model, ctx.rep_images, val, ex.int8_io, ex.int8_granularity, val_probs)
        else:
            from edgeft.export.builders import onnx_float
            from edgeft.quantize.onnx_report import onnx_layers

            ctx.cache[key] = onnx_layers(onnx_float(ctx), ctx.rep_images, val, val_probs,
                                         kernels=keras_kernels(ctx.model))
    return ctx.cache[key]["top"]


def _builder(ctx, fmt_name: str, deadline: float | None = None):
    from edgeft.data.datasets import representative_images
    from edgeft.export.builders import onnx_float, with_metadata
    from edgeft.export.keras2onnx import labels_metadata, onnx_int8_bytes
    from edgeft.export.keras2tflite import tflite_int8, tflite_mixed

    ex, seed = ctx.cfg.export, ctx.cfg.train.seed

    def images(r):
        n = r.settings.get("rep_samples", len(ctx.rep_images))
        return ctx.rep_images if n == len(ctx.rep_images) else representative_images(ctx.train_split, n, seed, warn=False)

    def build(r) -> bytes:
        keep = r.settings.get("keep_float", [])
        if r.step == "qat":   # (d): a QAT model trained (or its kept weights), converted as the int8 choice does
            return rq.build(ctx, r, deadline if deadline is not None else time.monotonic() + rc.TIME_BUDGET_S)
        if r.step == "equalization":   # a float model of its own, converted the same way (per-tensor checked)
            from edgeft.quantize.equalize import equalized_model

            model = equalized_model(ctx.model, images(r), r.settings["equalize"], r.settings["bias_correction"])
            return with_metadata(tflite_int8(model, images(r), ex.int8_io, ex.int8_granularity), ctx)
        if fmt_name == "tflite_int8":
            data = (tflite_mixed(ctx.model, images(r), keep, ex.int8_io, ex.int8_granularity) if keep
                    else tflite_int8(ctx.model, images(r), ex.int8_io, ex.int8_granularity))
            return with_metadata(data, ctx, kept_float=r.settings.get("layers"))
        meta = labels_metadata(ctx.labels) | ({"kept_float": ",".join(r.settings["layers"])} if keep else {})
        return onnx_int8_bytes(onnx_float(ctx), images(r), meta, keep_float=tuple(keep),
                               calibration=r.settings.get("calibration", "MinMax"),
                               **({"variant": r.settings["variant"]} if "variant" in r.settings else {}))
    return build


def _predict(fmt_name: str):
    if fmt_name == "tflite_int8":
        from edgeft.quantize.int8_choice import tflite_probs

        return tflite_probs
    from edgeft.quantize.onnx_report import _probs

    return _probs


def _gate(ctx, fmt, path: Path, halves) -> dict:
    """The gate's own row for the file at `path`, on the judging half only."""
    from dataclasses import asdict

    from edgeft.verify.parity import _gate_row

    j, p = halves.judge, ctx.cfg.parity
    row = _gate_row(fmt, path, j.x, j.y, j.source, p, ctx.cfg.train.seed, halves.judge_ref, None,
                    {fmt.name: "ptq"}, {}, j, ctx.labels, {})
    return asdict(row) | {"file": fmt.filename}   # gated under a temporary name, shipped under its own


def _recover_file(ctx, formats, stage: Path, report: dict, row: dict, mode: str, deadline: float):
    fmt = next(f for f in FORMATS if f.name == row["format"])
    halves = _Halves(ctx) if "halves" not in ctx.cache else ctx.cache["halves"]
    ctx.cache["halves"] = halves
    pure, mixed, skipped = _candidates(ctx, fmt.name, mode, halves)
    qat = rq.candidates(ctx) if "qat" not in skipped else []
    build, predict, latency = _builder(ctx, fmt.name, deadline), _predict(fmt.name), _latency(Path(fmt.filename).suffix, np.asarray(ctx.rep_images[:4], np.float32))
    record = {"file": fmt.filename, "mode": mode, "screen": {"calibration_images": len(ctx.rep_images),
              "parity_images": halves.screen_images, "inputs": len(halves.x)},
              "judged": {"images": len(np.unique(halves.judge.source)), "inputs": len(halves.judge.y)},
              "not_tried": skipped, "not_made": {}, "tried": [], "judgements": [], "shipped": None}
    log.info(f"recover: {fmt.filename} failed the gate; trying {len(pure)} int8 candidate(s)"
             + (", then QAT" if qat else "") + (f" and {len(mixed)} mixed" if mixed else ""))
    log.debug(f"recover: not tried: {'; '.join(f'{k}: {v}' for k, v in skipped.items())}")   # and in parity.md
    extra = []
    for kind, cands in (("int8", pure), ("qat", qat), ("mixed", mixed)):
        left = rc.MAX_CANDIDATES - len(record["tried"])
        if not cands or left <= 0:
            if cands:
                skipped[cands[0].step] = f"not tried: {rc.MAX_CANDIDATES} candidates tried already"
            continue
        late = rq.too_late(ctx, cands[0], deadline) if kind == "qat" else None
        if late:   # an epoch that would not end before the deadline is not started
            skipped["qat"] = late
            log.info(f"recover: {cands[0].name}: {late}"[:100])
            continue
        screened = rc.screen(cands[:left], build, predict, halves.x, halves.probs, deadline, latency,
                             record["not_made"])
        record["tried"] += [s.summary() for s in screened]
        if not screened:
            continue
        chosen = rc.best(screened)
        target = fmt if kind != "mixed" else RECOVERABLE[fmt.name]
        path = stage / (f".recover-{target.filename}" if kind != "mixed" else target.filename)
        rundir.write_bytes(path, chosen.data)
        gated = (rq.judge if kind == "qat" else _gate)(ctx, target, path, halves)
        gated["recovery"] = chosen.recovery.name
        source = rq.MADE_FROM if kind == "qat" else "ptq"
        gated["made_from"] = source
        verdict = "pass" if gated["passed"] else "FAIL: " + "; ".join(gated["failures"])
        codes = ", ".join(gated.get("failure_codes") or []) or "see parity.md"
        said = (f"recover: chose {chosen.recovery.name}: " + ("passes" if gated["passed"] else f"fails ({codes})")
                + " the gate")
        where = f" on {len(halves.judge.y)} unscreened inputs"
        log.info(said + where if len(said + where) <= 100 else said)   # one console line of <= 100 columns
        log.debug(f"recover: {chosen.recovery.name}: the gate's verdict: {verdict}")
        record["judgements"].append({"name": chosen.recovery.name, "file": target.filename, "passed": gated["passed"],
                                     "verdict": verdict, "row": gated})
        if kind != "mixed":
            if gated["passed"]:
                os.replace(path, stage / fmt.filename)
                record["shipped"] = {"file": fmt.filename, "name": chosen.recovery.name,
                                     "settings": chosen.recovery.settings}
                if kind == "qat":   # the weights that made it, for `export --check`
                    rq.keep(ctx, stage)
                    record["shipped"]["weights"] = rq.WEIGHTS
                _after_replace(ctx, formats, fmt, stage, source)
                break
            path.unlink(missing_ok=True)
        else:
            ctx.cache.setdefault("recovered", {})[target.filename] = chosen.data
            ctx.made_from[target.name] = "ptq"
            extra.append(target)
            if gated["passed"]:
                record["shipped"] = {"file": target.filename, "name": chosen.recovery.name,
                                     "settings": chosen.recovery.settings,
                                     "kept_float": chosen.recovery.settings["layers"]}
    return record, extra


def _after_replace(ctx, formats, fmt, stage: Path, source: str = "ptq") -> None:
    """The recovered int8 TFLite file is also the TFLite Micro row's: its C sources are made again."""
    from edgeft.export.builders import BUILDERS

    ctx.made_from[fmt.name] = source
    for f in formats:
        if f.filename == fmt.filename and f.name != fmt.name:
            ctx.made_from[f.name] = source
            if f.filename == TFLM_FILE and BUILDERS[f.name].after_write is not None:
                BUILDERS[f.name].after_write(ctx, f, stage / f.filename)


def _rewrite_report(ctx, stage: Path, report: dict, records: list[dict]) -> dict:
    """Each recovered file's rows replaced by the gate's rows on the judging half (the TFLite Micro row
    of a recovered int8 TFLite file judged again too); a mixed file's row added; parity.json / .md again."""
    from edgeft.train.report import update_report_section
    from edgeft.verify.parity import ParityRow, parity_markdown, remedy

    rows = []
    for r in report["rows"]:
        rec = next((x for x in records if x["file"] == r["file"]), None)
        shipped = rec and rec["shipped"]
        if shipped and shipped["file"] == r["file"]:
            if rec.get("judgements") and r["format"] == rec["judgements"][-1]["row"]["format"]:
                rows.append(rec["judgements"][-1]["row"])
            else:   # the TFLite Micro row of the same bytes
                fmt = next(f for f in FORMATS if f.name == r["format"])
                g = (rq.judge if ctx.made_from.get(r["format"]) == rq.MADE_FROM else _gate)(
                    ctx, fmt, stage / r["file"], ctx.cache["halves"])
                rows.append(g | {"recovery": shipped["name"], "made_from": ctx.made_from.get(r["format"], g["made_from"])})
            continue
        if rec is not None:   # failed/parity.json keeps it with the recovery record
            r = r | {KEY: rec, "superseded_by": shipped["file"] if shipped else None}
        rows.append(r)
    for rec in records:
        for j in rec.get("judgements", []):   # a file not recoverable has none
            if j["file"] != rec["file"]:
                rows.append(j["row"])
        for j in rec.get("judgements", []):
            j.pop("row", None)
    report = report | {"rows": rows, KEY: records}
    report["passed"] = all(r["passed"] for r in rows)
    report["remedies"] = [remedy(ParityRow(**{k: v for k, v in r.items() if k in ParityRow.__dataclass_fields__}))
                          for r in rows if not r["passed"]]
    rundir.write_json(stage / rundir.PARITY_JSON, report)
    md = parity_markdown(report)
    rundir.write_text(stage / rundir.PARITY_MD, md)
    update_report_section(ctx.run, "Export and parity gate", md.split("\n", 2)[2] if md.startswith("# ") else md)
    return report


def still_failing(report: dict) -> list[dict]:
    """The failed rows that make export exit 1: a failed int8 row superseded by a mixed file that
    passed (--int8-recover allow-mixed) does not."""
    ok = {r["file"] for r in report["rows"] if r["passed"]}
    return [r for r in report["rows"] if not r["passed"] and r.get("superseded_by") not in ok]
