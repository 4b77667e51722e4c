"""Export a run to TFLite and ONNX, then prove every file agrees with Keras (parity gate).

Each format is a row of FORMATS (file name, runtime, parity tier); `export` loops over the rows
the user asked for, each built by the builder registered under its name (edgeft.export.builders).
Everything is built and gated in a staging directory beside export/; only then does the staged
export replace export/, files that failed the gate moved to export/failed/ with their parity rows,
and a manifest.json naming every shipped file by its sha256. A killed or failed export leaves the
previous export/ as it was.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeft._keras import keras
from edgeft.core import rundir
from edgeft.core.config import EdgeftConfig, build_config
from edgeft.core.errors import OperationFailed, ParityError, UserError, os_error_text, os_remedy, write_failure
from edgeft.core.formats import EXPORT_DIR, FORMATS, TFLM_DIR, select_formats  # noqa: F401 - FORMATS re-exported
from edgeft.core.progress import recording, step
from edgeft.core.tiers import TIERS
from edgeft.pipeline.summary import SUMMARY, export_summary, report_headline_accuracy, say_paths, say_rows
from edgeft.pipeline import recovery
from edgeft.pipeline.staging import (_STAGING, FAILED_DIR, _sha_or_none, open_staging,  # noqa: F401 - re-exported
                                     check_export_dir, publish, set_aside_failed, set_aside_stale, temp_copy_room)
from edgeft.data.datasets import ParityInputs
from edgeft.export.builders import BUILDERS, with_metadata
from edgeft.quantize.int8_choice import Int8Candidate, build_candidates, choose
from edgeft.quantize.int8_report import REPORT_INPUTS, sources
from edgeft.quantize.int8_report import REPORT_NAME as INT8_REPORT
from edgeft.run import Run, as_run

log = logging.getLogger(__name__)


TIMINGS_JSON = "timings.json"


@dataclass
class ExportContext:
    """What every exporter may need, computed once."""
    run: Path
    cfg: EdgeftConfig
    model: keras.Model                   # float Keras model
    qat_model: keras.Model | None        # quantization-aware model, when QAT was run and is wanted
    rep_images: np.ndarray               # float32 0-255, representative data for int8
    labels: list[str]
    inputs: ParityInputs                 # what the gate (and the int8 choice) compares on
    cache: dict = field(default_factory=dict)
    made_from: dict = field(default_factory=dict)   # formats.json: how each file was made (builders add to it)
    floors: dict = field(default_factory=dict)      # file name -> a floor measured already on its model
    train_split: object = None           # ImageSet: more calibration images for int8 recovery (pipeline/recovery.py)

    def int8_candidates(self) -> list[Int8Candidate]:
        """PTQ (and QAT) int8 TFLite files, each run by LiteRT on the parity inputs (built once)."""
        if "int8" not in self.cache:
            self.cache["int8"] = build_candidates(self.model, self.qat_model, self.rep_images, self.inputs,
                                                  self.cfg.export.int8_io, self.cfg.export.int8_granularity,
                                                  self.cfg.parity, self.cfg.train.seed, self.keras_probs("float"),
                                                  self.keras_probs("qat"))
        return self.cache["int8"]

    def keras_probs(self, which: str) -> np.ndarray | None:
        """The float (or QAT) Keras model's outputs on the parity inputs, once per export (the int8
        choice and the gate both compare with them)."""
        from edgeft.quantize.int8_choice import keras_probs

        model = self.model if which == "float" else self.qat_model
        if model is not None and f"keras_{which}" not in self.cache:
            with step("export", f"Keras {which} on {len(self.inputs.x)} parity inputs", key=f"keras {which} outputs"):
                self.cache[f"keras_{which}"] = keras_probs(model, self.inputs.x)
        return self.cache.get(f"keras_{which}")

    def int8_tflite(self, fmt) -> bytes:
        """The int8 TFLite file: the better of PTQ and QAT (see int8_choice), chosen once, with its
        metadata; records what it was made from and the floor the choice measured on it (the gate
        reuses that floor instead of running the reference kernels again: same model, metadata aside)."""
        if "tflite_int8" not in self.cache:
            cands = self.int8_candidates()
            wanted = self.cfg.export.int8_source
            chosen = next(c for c in cands if c.source == wanted) if wanted in ("qat", "ptq") else choose(cands)
            self.cache["int8_chosen"] = chosen
            self.cache["tflite_int8"] = with_metadata(chosen.data, self)
            self.made_from["int8_choice"] = int8_choice_record(self)
        chosen = self.cache["int8_chosen"]
        self.made_from[fmt.name] = chosen.source
        if chosen.judgement.floor is not None:
            from edgeft.core.tiers import Floor

            self.floors[fmt.filename] = chosen.floor if chosen.floor is not None else Floor(**chosen.judgement.floor)
        return self.cache["tflite_int8"]


def export(run: Run | str | Path, tflite: list[str] | None = None, onnx: list[str] | None = None,
           cfg: EdgeftConfig | None = None, tflm: bool = False) -> dict:
    """Writes the chosen formats to RUN/export/ and runs the parity gate on them.

    Returns the parity report; raises ParityError (after writing parity.json / parity.md) when
    any file disagrees with Keras beyond its tier. Holds the run's lock (edgeft.core.lock): a second
    export (or any command writing the run) is refused while this one works.
    """
    from edgeft.core.lock import run_lock

    handle = as_run(run, cfg)
    formats = select_formats(tflite, onnx, tflm)
    rundir.check_writable(handle.path, "export: the run directory")   # refused before any work
    check_export_dir(handle.path)   # export/ a symbolic link: refused, never dropped
    # one step around it all: work between the named steps (staging, reading images) is not silent either
    with run_lock(handle.path, "export"), recording() as timings, \
            step("export", f"exporting {handle.path.name}", key="export (wall)"):
        start = time.monotonic()
        try:
            return _export(handle, formats)
        finally:   # export/timings.json: each step's wall seconds (tools/bench_export.py reads it)
            if (handle.path / EXPORT_DIR).is_dir():
                rundir.write_json(handle.path / EXPORT_DIR / TIMINGS_JSON,
                                  {"total_s": round(time.monotonic() - start, 2), "steps": timings.as_dict()})


def _export(handle: Run, formats) -> dict:
    from edgeft.data.datasets import gate_inputs, representative_images
    from edgeft.quantize.qat import load_qat_model, qat_granularity, qat_supported

    run, cfg = handle.path, handle.cfg
    model = handle.model   # first: a broken run fails before any data work
    source, granularity = cfg.export.int8_source, cfg.export.int8_granularity
    has_qat = qat_granularity(run)
    if source == "qat" and has_qat is None:
        raise UserError(f"--int8-source qat: {run} has no QAT model; run `edgeft qat {run}` first")
    if source == "qat" and has_qat != granularity:
        raise UserError(f"--int8-source qat: the QAT model of {run} was trained {has_qat}, not {granularity}; "
                        f"run `edgeft qat {run} --int8-granularity {granularity}`")
    splits = handle.splits
    handle.check_classes()   # labels against the model's outputs: before any conversion
    want_int8 = any(BUILDERS[f.name].uses_int8_choice for f in formats)
    qat_model = None
    if want_int8 and source != "ptq" and has_qat == granularity:
        qat_model = load_qat_model(handle)
    elif want_int8 and source == "auto":
        ok, note = qat_supported(cfg, model)
        why = (note if not ok else "the run has no QAT model" if has_qat is None
               else f"its QAT model is {has_qat}, not {granularity}")
        log.info(f"export: int8 by post-training quantization ({why})")
    inputs = gate_inputs(splits.val, cfg)
    ctx = ExportContext(run, cfg, model, qat_model, representative_images(splits.train, cfg.export.rep_samples,
                                                                          cfg.train.seed),
                        splits.classes, inputs, train_split=splits.train)
    out = run / EXPORT_DIR
    try:
        stage = open_staging(run)   # everything is written and gated here; export/ changes only at the end
    except OSError as e:
        shutil.rmtree(run / f"{_STAGING}{os.getpid()}", ignore_errors=True)
        raise write_failure(e, run / f"{_STAGING}{os.getpid()}", "export failed: cannot stage the export in") from None
    try:
        return _build_gate_publish(handle, ctx, formats, qat_model, inputs, stage)
    except OperationFailed as e:   # a full disk, a file system turned read-only...
        raise OperationFailed(f"export failed, {out}/ left as it was: {e}") from None
    finally:   # published, or failed: no staging directory stays behind (it can be large)
        shutil.rmtree(stage, ignore_errors=True)


def _build_gate_publish(handle: Run, ctx: ExportContext, formats, qat_model, inputs, stage: Path) -> dict:
    from edgeft.verify.parity import check_parity

    run, cfg, splits = handle.path, handle.cfg, handle.splits
    rebuilt = {f.filename for f in formats}
    stale = set_aside_stale(run, stage, rebuilt, tflm_rebuilt=any(f.family == "tflm" for f in formats))
    rundir.write_text(stage / rundir.LABELS, "\n".join(splits.classes) + "\n")
    if any(TIERS[f.tier].floor for f in formats):   # an earlier report describes files rebuilt now
        for suffix in (".md", ".json", ".png"):
            (stage / f"{INT8_REPORT}{suffix}").unlink(missing_ok=True)
    ctx.made_from = rundir.read_json(stage / rundir.FORMATS_JSON, {})   # an earlier export's kept files
    ctx.made_from.pop(recovery.KEY, None)
    recovery.drop_earlier_mixed(stage, formats, ctx)
    from edgeft.verify.prefetch import GatePrefetch

    # the gate's run of each file and its test-split accuracy start as the file is written (beside the next builds)
    prefetch = GatePrefetch(inputs.x, splits)
    matrix = None
    if cfg.parity.client_inputs:   # its cells start as each file is written, beside the next builds
        from edgeft.verify.clients import MatrixRun

        matrix = MatrixRun(inputs.x, ctx.keras_probs("float"), splits.classes, limit=cfg.parity.client_inputs,
                           provided=("litert", "onnxruntime"))   # the gate's own runs fill those cells
    try:
        _build_all(ctx, formats, stage, matrix, prefetch)
        failure = None
        try:
            report = check_parity(handle, formats=formats, qat_model=qat_model, inputs=inputs, out=stage,
                                  keras_outputs={"float": ctx.keras_probs("float"), "qat": ctx.keras_probs("qat")},
                                  floors=dict(ctx.floors), matrix=matrix, prefetch=prefetch)
        except ParityError as e:
            failure = e
            report = rundir.read_json(stage / rundir.PARITY_JSON)
        if failure is not None:   # --int8-recover: a failed int8 file recovered, judged by the gate (pipeline/recovery.py)
            report, mixed, replaced = recovery.recover_failed(ctx, formats, stage, report)
            formats = formats + mixed
            still = recovery.still_failing(report)
            failure = ParityError("; ".join(f"{r['format']} ({r['file']}): {', '.join(r['failures'])}" for r in still),
                                  short="; ".join(f"{r['format']} {r['file']} ({', '.join(r.get('failure_codes') or []) or 'failed'})"
                                                  for r in still)) if still else None
            if replaced:   # the prefetched test accuracy is the failed file's: measured again
                prefetch = recovery.Forgetting(prefetch, replaced)
        return _publish(handle, ctx, formats, stage, report, inputs, stale, failure, prefetch)
    except BaseException:
        if matrix is not None:
            matrix.cancel()
        prefetch.cancel()
        raise
    finally:
        prefetch.close()


def _build_all(ctx: ExportContext, formats, stage: Path, matrix, prefetch=None) -> None:
    """Every format's file written to `stage` (and what its builder writes after it); each file goes to
    the running client matrix and the gate's runs (`prefetch`) as soon as it is written."""
    built: set[str] = set()
    for fmt in formats:
        builder = BUILDERS[fmt.name]
        try:
            with step("export", f"building {fmt.filename}", key=f"build {fmt.name}"):
                data = builder.make(ctx, fmt)
        except (UserError, OperationFailed):
            raise
        except OSError as e:   # a converter's own temporary files hit a full or read-only disk
            raise OperationFailed(f"{fmt.name} export failed: {os_error_text(e)}: {os_remedy(e)}") from None
        except Exception as e:  # converter failures name the format and keep the message short
            raise UserError(f"{fmt.name} export failed: {(str(e).strip().splitlines() or [type(e).__name__])[-1][:300]}") from None
        rundir.write_bytes(stage / fmt.filename, data)
        rundir.write_json(stage / rundir.FORMATS_JSON, ctx.made_from)   # parity reads how each int8 file was made
        if matrix is not None:
            matrix.add(stage / fmt.filename)
        if prefetch is not None:   # the int8 choice ran its file by LiteRT on the parity inputs already
            chosen = ctx.cache.get("int8_chosen") if builder.uses_int8_choice and fmt.runtime == "litert" else None
            prefetch.add(fmt, stage / fmt.filename, None if chosen is None else chosen.probs)
        if fmt.filename not in built:   # two rows may ship one file (int8 TFLite, TFLite Micro)
            log.debug(f"export: built {fmt.filename} ({len(data) / 1e6:.2f} MB)")
        built.add(fmt.filename)
        if builder.after_write is not None:
            builder.after_write(ctx, fmt, stage / fmt.filename)


def _publish(handle: Run, ctx: ExportContext, formats, stage: Path, report: dict, inputs, stale, failure,
             prefetch=None) -> dict:
    """int8 reports, failed files set aside, golden vectors, test accuracy, the manifest; export/ replaced."""
    run, cfg, splits = handle.path, handle.cfg, handle.splits
    out = run / EXPORT_DIR
    write_int8_reports(ctx, report, stage)
    failed = set_aside_failed(stage, report)
    shipped_tiers = {f.filename: f.tier for f in FORMATS if f.family != "tflm" and (stage / f.filename).is_file()}
    # --- golden vectors for `python edgeft_device.py verify MODEL export/golden/` (edgeft/export/golden.py)
    from edgeft.export.golden import GOLDEN_DIR, write_golden

    with step("export", "golden vectors", key="golden vectors"):
        golden = write_golden(stage, splits.val.paths, cfg.data.image_size, shipped_tiers) if shipped_tiers else None
    if golden is None:   # nothing ships: no golden vectors of files that are not there
        shutil.rmtree(stage / GOLDEN_DIR, ignore_errors=True)
    # ---
    with step("export", "test-split accuracy", key="test accuracy"):   # the headline accuracy of each file
        heads = report_headline_accuracy(run, splits, stage, cfg.data.test_split, prefetch, ctx.model) or {}
    write_export_manifest(run, stage, report, ctx.made_from, ctx, inputs)
    summary = export_summary(run, stage, report, heads, failed, failure)   # export/summary.json
    publish(run, stage)
    say_rows("export", summary["files"], f" in {out}/")
    say_paths(run, f"{EXPORT_DIR}/{rundir.PARITY_MD}", rundir.REPORT)
    log.debug(f"{SUMMARY}: {run / EXPORT_DIR / SUMMARY} (for scripts: docs/records.md)")
    log.debug(f"export: {out}/ now holds {len(shipped_tiers)} gated file(s) and manifest.json"
             + (f"; golden vectors in {out / golden.name}/ (python edgeft_device.py verify MODEL {out / golden.name})"
             if golden else ""))
    if stale:
        log.info(f"export: set aside to {out / FAILED_DIR}/ (not rebuilt, and not made from this run's current "
                 f"model): {', '.join(f'{n} ({why})' for n, why in sorted(stale.items()))}")
    if failure is not None:
        tflm_note = ""
        if any(f.family == "tflm" and f.filename in failed for f in formats):
            tflm_note = (f"; --tflm: no passing int8 TFLite file, so no {TFLM_DIR}/ sources ship "
                         f"(they were moved to {out / FAILED_DIR}/ with it)")
        message = (f"{failure}; moved to {out / FAILED_DIR}/: {', '.join(sorted(failed))}"
                   + ("; nothing passed the gate" if not shipped_tiers else "") + tflm_note)
        log.debug(f"export: {message}")   # the console's line is the short one; why: parity.md
        short = getattr(failure, "short", None) or str(failure)
        raise ParityError(message, short=f"{short}; moved to {EXPORT_DIR}/{FAILED_DIR}/ (why: its parity.md)"
                          + ("; nothing passed the gate" if not shipped_tiers else ""))
    return report


INT8_REPORTED = ("tflite_int8", "tflm_int8", "onnx_int8")   # the formats the per-layer int8 report explains


def write_int8_reports(ctx: ExportContext, report: dict, stage: Path) -> None:
    """export/int8_report.md (.json, .png) for each int8 file that failed the gate, or every int8 file
    with --int8-report (edgeft.quantize.int8_report). A diagnostic: when it cannot be made, one line
    says why and the export goes on."""
    from edgeft.quantize.int8_report import keras_kernels, tflite_layers, write_int8_report

    files, unjudged = {}, set()
    for row in report["rows"]:
        if row.get("kept"):   # a partial export's kept file: gated (and reported on) by an earlier export
            continue
        # a file failed only as "not judged" (too few clear inputs) has no measured error to explain
        only_unjudged = set(row.get("failure_codes") or ["?"]) == {"not_judged"}
        if row["format"] in INT8_REPORTED and not row["passed"] and only_unjudged and not ctx.cfg.export.int8_report:
            unjudged.add(row["file"])
        elif row["format"] in INT8_REPORTED and (not row["passed"] or ctx.cfg.export.int8_report):
            files.setdefault(row["file"], row)
    if unjudged - set(files):
        log.info(f"export: no int8 report for {', '.join(sorted(unjudged - set(files)))}: not judged (too few clear "
                 "inputs), so there is no measured error to explain (--int8-report makes one anyway)")
    if not files:
        return
    order = np.argsort(ctx.inputs.copy, kind="stable")[:REPORT_INPUTS]   # the validation images first
    val, val_probs = ctx.inputs.x[order], ctx.keras_probs("float")[order]
    ex, reports = ctx.cfg.export, []
    for name, row in sorted(files.items()):
        try:
            known = getattr(ctx, "cache", {}).get(("int8_layers", row["format"] if row["format"] != "tflm_int8" else "tflite_int8"))
            if known is not None:   # made already by recovery (--int8-recover allow-mixed)
                r = dict(known)
            elif name.endswith(".onnx"):
                from edgeft.export.builders import onnx_float
                from edgeft.quantize.onnx_report import onnx_layers

                r = onnx_layers(onnx_float(ctx), ctx.rep_images, val, val_probs, kernels=keras_kernels(ctx.model))
            else:
                r = tflite_layers(ctx.model, ctx.rep_images, val, ex.int8_io, ex.int8_granularity, val_probs)
                if row.get("made_from") == "qat":
                    r["note"] = ("This file was converted from the QAT model; the ops above are those of post-training "
                                 "quantization of the float model, calibrated as it would be.")
        except Exception as e:   # noqa: BLE001 - a report that cannot be made must not stop the export
            log.info(f"export: no int8 report for {name}: {(str(e).strip().splitlines() or [type(e).__name__])[-1][:200]}")
            continue
        reports.append(r | {"file": name, "runtime": row.get("runtime", "-"), "passed": row["passed"]})
        log.debug(f"export: int8 report for {name}: most of its output error comes from "
                  + (", ".join(t["layer"] for t in sources(r["top"])) or "no op in particular"))
    if reports:
        path = write_int8_report(stage, reports)
        top = "; ".join(f"{r['file']}: {', '.join(t['layer'] for t in sources(r['top'])[:2]) or 'no op in particular'}"
                        for r in reports)
        log.info(f"export: int8 error by layer in {EXPORT_DIR}/{path.name}: most from {top}"[:100])


def check_export(run: Run | str | Path, cfg: EdgeftConfig | None = None) -> dict:
    """`edgeft export RUN --check`: the same export again, in a temporary copy of the run, compared
    byte for byte with export/manifest.json. Raises ParityError naming any file whose bytes differ."""
    import tempfile

    from edgeft.export.manifest import MANIFEST, check_manifest, sha256_file

    handle = as_run(run, cfg)
    run = handle.path
    man = rundir.read_json(run / EXPORT_DIR / MANIFEST)
    if not man:
        raise UserError(f"{run / EXPORT_DIR} has no {MANIFEST}: run `edgeft export {run}` first")
    problems = check_manifest(run, run / EXPORT_DIR)
    if problems:
        raise UserError(f"{run / EXPORT_DIR}: {problems[0]}")
    # the settings the shipped files were made with (the client matrix does not change any byte)
    base = handle.cfg
    cfg = build_config({**man.get("config", {}).get("export", {}), **man.get("config", {}).get("parity", {}),
                        "client_inputs": 0}, base=base)
    names = set(man["files"])
    asked = [next(r for r in FORMATS if r.name == f.recovers) if f.recovers else f for f in FORMATS if f.filename in names]
    flags = {fam: sorted({f.flag for f in asked if f.family == fam}) for fam in ("tflite", "onnx")}
    temp_root, _ = temp_copy_room(run)   # a full TMPDIR is named as such, before any work
    try:
        with tempfile.TemporaryDirectory(prefix="edgeft-check-") as tmp:
            copy = Path(tmp) / run.name
            copy.mkdir()
            for name in rundir.RUN_FILES:
                if (run / name).is_file():
                    try:
                        shutil.copy2(run / name, copy / name)
                    except OSError as e:   # copy2's error names the source: the copy is what failed
                        raise write_failure(e, copy / name) from None
            recovery.rq.carry(run / EXPORT_DIR, copy / EXPORT_DIR)   # QAT weights a recovered file was made from
            try:   # same splits (the image cache is shared), same folder: only the directory differs
                export(Run(copy, cfg, splits=handle.splits, folder=handle.folder), tflite=flags["tflite"] or None,
                       onnx=flags["onnx"] or None, tflm=(run / EXPORT_DIR / TFLM_DIR).is_dir())
            except ParityError as e:
                log.info(f"export --check: the re-export did not pass the gate: {e}")
            rows = {name: {"shipped": entry["sha256"],
                           "again": sha256_file(copy / EXPORT_DIR / name) if (copy / EXPORT_DIR / name).is_file()
                           else None}
                    for name, entry in man["files"].items()}
    except (UserError, OperationFailed, OSError) as e:   # the copy, the converters' own files: all in TMPDIR
        why = os_error_text(e) if isinstance(e, OSError) else str(e)
        raise (UserError if isinstance(e, UserError) else OperationFailed)(
            f"export --check: the re-export in a temporary copy under {temp_root} (TMPDIR) failed, {run} is "
            f"unchanged: {why} (set TMPDIR to use another folder)") from None
    differ = sorted(name for name, r in rows.items() if r["shipped"] != r["again"])
    for name, r in sorted(rows.items()):
        log.info(f"export --check: {name}: {'identical' if name not in differ else 'DIFFERENT'}")
    if differ:
        raise ParityError(f"re-exporting gave different bytes for {', '.join(differ)} (see docs/export.md)")
    log.info(f"export --check: all {len(rows)} shipped file(s) re-export byte-identical")
    return rows


def write_export_manifest(run: Path, stage: Path, report: dict, made_from: dict, ctx: ExportContext, inputs) -> None:
    from edgeft.export.manifest import build_manifest, fingerprint, write_manifest

    rows_by_file: dict[str, list] = {}
    for row in report["rows"]:
        if row["passed"] and not row.get("kept") and (stage / row["file"]).is_file():
            rows_by_file.setdefault(row["file"], []).append(row)
    for f in FORMATS:   # files kept from an earlier export keep their earlier manifest entry's rows
        if f.family != "tflm" and (stage / f.filename).is_file() and f.filename not in rows_by_file:
            old = (rundir.read_json(stage / "manifest.json", {}) or {}).get("files", {}).get(f.filename)
            if old:
                rows_by_file[f.filename] = [p | {"made_from": old.get("int8_source") or "-"} for p in old["parity"]]
    extra = {"calibration": {"images": int(len(ctx.rep_images)), "sha256": fingerprint(ctx.rep_images),
                             "seed": ctx.cfg.train.seed},
             "parity_inputs": {"n": int(len(inputs.y)), "seed": ctx.cfg.train.seed, "augment": inputs.policy},
             "granularity": ctx.cfg.export.int8_granularity, "int8_io": ctx.cfg.export.int8_io,
             # a later partial export keeps a QAT-made int8 file only while these weights are the same
             "qat_weights_sha256": _sha_or_none(run / rundir.QAT_WEIGHTS),
             # what `edgeft export --check` re-exports with
             "config": {"export": asdict(ctx.cfg.export), "parity": asdict(ctx.cfg.parity)},
             recovery.KEY: made_from.get(recovery.KEY)}
    man = build_manifest(stage, run, rows_by_file, made_from, extra)
    for rec in made_from.get(recovery.KEY) or []:   # a mixed file names the ops it keeps in float
        if rec.get("shipped") and rec["shipped"].get("kept_float") and rec["shipped"]["file"] in man["files"]:
            man["files"][rec["shipped"]["file"]]["kept_float"] = rec["shipped"]["kept_float"]
    write_manifest(stage, man)


def int8_choice_record(ctx: ExportContext) -> dict:
    """Both int8 candidates' LiteRT results and which one shipped (formats.json, parity.md, report.md)."""
    chosen = ctx.cache["int8_chosen"]
    cands = ctx.int8_candidates()
    from edgeft.quantize.int8_choice import RULE, qat_gain, why_shipped

    if ctx.cfg.export.int8_source != "auto":
        why = f"--int8-source {ctx.cfg.export.int8_source}"
    elif len(cands) == 1:
        why = "only post-training quantization (no QAT model)"
    else:
        why = f"{why_shipped(cands, chosen)}; the rule: {RULE}"

    gain = qat_gain(cands, ctx.inputs.source)
    record = {"shipped": chosen.source, "why": why, "granularity": ctx.cfg.export.int8_granularity,
              "io": ctx.cfg.export.int8_io, "candidates": [c.summary() for c in cands],
              "qat_gain_points": None if gain is None else {"gain": gain[0], "interval": [gain[1], gain[2]]}}
    log.debug("export: int8 candidates by LiteRT on the parity inputs: "
             + "; ".join(f"{c.source} accuracy {c.accuracy:.4f}" for c in cands) + f" -> ships {chosen.source} ({why})")
    return record
