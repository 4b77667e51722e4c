"""The parity gate: every exported file, run by its real runtime, against its source model.

Inputs (edgeft.data.datasets.gate_inputs): the validation split plus deterministic copies that vary it as
a camera would (shift, brightness, contrast; mirrored only when the run trained with mirroring,
`--parity-augment` overrides), up to --parity-inputs (1,000). The copies are not independent
samples: every interval resamples source images with all their copies, and the report states
the resolution (points per image).

Tiers (edgeft.core.tiers): float files exact (max |Δprob|); quantized files on (1) the accuracy they
lose against their source model, paired, within `--max-accuracy-drop` points, and (2) top-1
agreement with the source model on the inputs where the source model is clear, against the
floor measured in the same run for int8 files (the same file under a second implementation,
edgeft.core.floor) or the fp16 / dynamic tiers. An int8 file made from a QAT model is judged against
the QAT model it converts; its agreement with the float model is reported beside it.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.core.config import EdgeftConfig
from edgeft.core.errors import ParityError, UserError
from edgeft.core.formats import EXPORT_DIR, FORMATS, TFLM_DIR
from edgeft.core.markdown import md_cell
from edgeft.core.progress import Progress, step
from edgeft.core.tiers import MIN_JUDGED, NOT_JUDGED, TIERS, Failure, Floor, agreement, bound_failures, codes, judge
from edgeft.run import Run, as_run
from edgeft.train.report import update_report_section
from edgeft.nn.runtime import open_runner
from edgeft.verify.runners import open_format_runner

log = logging.getLogger(__name__)

SHOW_FLIPS = 5   # flipped inputs listed in parity.md per kind (all of them are in parity.json)


@dataclass
class ParityRow:
    format: str
    file: str
    size_bytes: int
    tier: str
    runtime: str
    made_from: str      # int8: qat or ptq
    n: int
    n_images: int              # source images the inputs are copies of
    points_per_image: float    # the resolution of every accuracy number
    max_abs_diff: float        # against the float Keras model
    reference: str             # the source model: keras float, or keras qat
    agreement: float           # top-1 agreement with the source model, all inputs
    agreement_interval: list[float]
    agreement_with_float: float
    accuracy: float
    source_accuracy: float
    accuracy_drop: float       # against the source model (fraction; accuracy_drop_points in points)
    accuracy_drop_points: float
    accuracy_drop_interval: list[float]
    clear_margin: float
    n_clear: int
    n_left_out: int
    clear_agreement: float
    clear_agreement_interval: list[float]
    required_clear_agreement: float | None
    floor: dict | None
    worst_class: str
    worst_class_drop: float
    passed: bool
    failures: list[str]
    verdict: str = ""
    notes: list[str] = field(default_factory=list)
    real_disagreements: list[dict] = field(default_factory=list)   # clear inputs whose top-1 differs
    near_tie_flips: list[dict] = field(default_factory=list)       # near-ties whose top-1 differs
    unjudged: list[str] = field(default_factory=list)   # criteria on fewer than MIN_JUDGED inputs (tiers.py)
    accepted_unjudged: bool = False                     # shipped anyway: --accept-unjudged
    failure_codes: list[str] = field(default_factory=list)   # each failure's code (edgeft.core.tiers.Failure)


def per_class_drop(probs, ref, y, classes: list[str]) -> tuple[str, float]:
    """The class whose accuracy drops most from the source model to the file, and by how much."""
    worst, drop = "-", 0.0
    for c, name in enumerate(classes):
        m = y == c
        if m.any():
            d = float(np.mean(ref[m].argmax(-1) == c) - np.mean(probs[m].argmax(-1) == c))
            if d > drop:
                worst, drop = name, d
    return worst, drop


def describe_flips(idx, probs, ref, inputs, classes: list[str]) -> list[dict]:
    """Inputs whose top-1 class differs between the source model and the file."""
    return [{"input": int(i), "image": inputs.describe(i), "true": classes[int(inputs.y[i])],
             "reference": classes[int(ref[i].argmax())], "file": classes[int(probs[i].argmax())],
             "reference_p": round(float(ref[i].max()), 4), "file_p": round(float(probs[i].max()), 4)} for i in idx]


def remedy(row: ParityRow) -> str:
    """What a user can do about a failing row (printed under the table and kept in parity.md)."""
    if row.failures and codes(row.failures) == {"not_judged"}:
        return (f"{row.file} ({row.runtime}): judged on too few inputs ({'; '.join(row.unjudged)}; the gate needs "
                f"{MIN_JUDGED}): more validation images (--val DIR, a larger --val-split) or --parity-inputs would "
                "judge it; --accept-unjudged ships it marked NOT JUDGED")
    tier = TIERS[row.tier]
    if tier.agreement is None:
        return (f"{row.file} ({row.runtime}): a float file must match Keras to rounding error; this is a converter "
                "bug, not a tolerance question (report it with export/parity.json)")
    if not tier.floor:
        flags = ", ".join("--" + name.replace("_", "-") for name in (tier.atol, tier.agreement) if name)
        return (f"{row.file}: ship fp16 or int8 instead, or relax the tier ({flags}) "
                "if top-1 agreement is what you need")
    few = (" The validation split is too small to judge finely: more validation images (--val DIR) would."
           if row.points_per_image > 2.0 else "")
    if row.made_from == "qat":
        return (f"{row.file} ({row.runtime}): the int8 file from the QAT model missed its tier; `edgeft export RUN "
                f"--int8-source ptq` ships post-training quantization instead (or train QAT longer).{few}")
    return (f"{row.file} ({row.runtime}): more calibration images (--rep-samples), quantization-aware training "
            f"(`edgeft qat RUN`), a mixed file with its most sensitive ops in float (--int8-recover allow-mixed), "
            f"or a looser tier (--max-accuracy-drop, --floor-slack).{few}")


def predict_with_progress(runner, x: np.ndarray, label: str, chunk: int = 100) -> np.ndarray:
    with Progress(label, len(x), "inputs") as bar:
        out = []
        for i in range(0, len(x), chunk):
            out.append(np.asarray(runner.predict(x[i:i + chunk])))
            bar.update(len(out[-1]))
    return np.concatenate(out)


def _gate_row(fmt, path: Path, x, y, groups, p, seed: int, ref, qat_ref, made_from: dict, floors: dict, inputs,
              classes: list[str], litert: dict, matrix=None, prefetch=None) -> ParityRow:
    """One file run by its runtime on the parity inputs and judged on its tier. The TFLite Micro row:
    the same bytes as the int8 TFLite row, judged on LiteRT's outputs, plus TFLite Micro's outputs
    identical to LiteRT's reference kernels (the floor's second implementation) on MIN_JUDGED inputs
    (`tflm_identity`): TFLM's reference kernels at one image a second would take minutes on 1,000."""
    from edgeft.core.floor import input_contract_failures, measure_floor

    probs = prefetch.take(fmt, path) if prefetch is not None else None   # started as the file was written
    if probs is not None:
        pass
    elif fmt.runtime == "tflm" and path.name in litert:
        probs = litert[path.name]
    elif fmt.runtime == "tflm":
        probs = predict_with_progress(open_runner(path), x, f"parity: {path.name} (litert, for the tflm row)")
    else:
        probs = predict_with_progress(open_format_runner(fmt, path), x, f"parity: {path.name} ({fmt.runtime})")
    if fmt.runtime == "litert":
        litert[path.name] = probs
    if matrix is not None and fmt.runtime in ("litert", "onnxruntime"):
        # the matrix's LiteRT (default) and ONNX Runtime cells: the same runtime on the same first inputs
        matrix.provide(path.name, fmt.runtime, probs)
    from_qat = made_from.get(fmt.name) == "qat" and qat_ref is not None
    # an int8 file from QAT is judged against its source (the QAT model it converts)
    base = qat_ref if from_qat else ref
    floor, tier = None, TIERS[fmt.tier]
    if tier.floor:
        if fmt.filename not in floors:
            with step("parity", f"the floor of {path.name}", key=f"floor {fmt.name}"):
                floors[fmt.filename] = measure_floor(path, x, probs, base, groups, p.clear_margin, p.floor_inputs,
                                                     seed, slack=p.floor_slack)
        floor = floors[fmt.filename]
    j = judge(fmt.tier, probs, base, y, groups, p, floor, seed)
    exact = bound_failures(fmt.tier, probs, ref, p)
    if fmt.runtime == "tflm":
        with step("parity", f"{path.name}: TFLite Micro against LiteRT's reference kernels",
                  key="tflm identical to LiteRT reference"):
            found = matrix_tflm_identity(matrix, path) if matrix is not None else None
            exact, note = found if found is not None else tflm_identity(path, x, floor, seed)
        j.notes.append(note)
    contract = input_contract_failures(path) if tier.input_contract else []
    fails = contract + exact + j.failures
    worst, worst_drop = per_class_drop(probs, base, y, classes)
    return ParityRow(fmt.name, path.name, path.stat().st_size, fmt.tier, fmt.runtime,
                          "qat" if from_qat else ("ptq" if tier.floor else "-"), len(y), j.n_images,
                          j.points_per_image, float(np.max(np.abs(probs - ref))),
                          "keras qat" if from_qat else "keras float", j.agreement, j.agreement_interval,
                          agreement(probs, ref), j.accuracy, j.source_accuracy, j.accuracy_drop_points / 100,
                          j.accuracy_drop_points, j.accuracy_drop_interval, j.clear_margin, j.n_clear,
                          j.n_left_out, j.clear_agreement, j.clear_agreement_interval,
                          j.required_clear_agreement, j.floor, worst, worst_drop, not fails, fails,
                          j.verdict if not fails else (j.verdict if j.failures else
                                                    "breaks the input contract" if contract else
                                                    "outputs differ from Keras"),
                          j.notes, describe_flips(j.real_disagreements, probs, base, inputs, classes),
                          describe_flips(j.near_tie_flips, probs, base, inputs, classes), j.unjudged,
                          j.accepted_unjudged and not fails, [getattr(f, "code", "") for f in fails])


def matrix_tflm_identity(matrix, path: Path) -> tuple[list[Failure], str] | None:
    """The TFLite Micro check from the client matrix's own cells, when it has them: its TFLite Micro
    cell and its LiteRT reference-kernel cell on the same file and the same first inputs (at least
    MIN_JUDGED), so TFLite Micro runs once per export, not twice. None: run `tflm_identity`."""
    tflm, ref = matrix.cell(path.name, "tflm"), matrix.cell(path.name, "litert_ref")
    if tflm is None or ref is None or tflm[1] is None or ref[1] is None:
        return None   # a cell that failed: the gate runs it itself and says why
    out, ref_out = tflm[1].probs, ref[1].probs[:len(tflm[1].probs)]
    if len(out) < MIN_JUDGED or out.shape != ref_out.shape:
        return None
    return _tflm_verdict(out, ref_out, " (the client matrix's cells)")


def _tflm_verdict(tflm: np.ndarray, ref_out: np.ndarray, where: str = "") -> tuple[list[Failure], str]:
    """TFLite Micro's outputs against the reference kernels' on the same inputs: (failures, note)."""
    differ = int(np.sum(np.any(tflm != ref_out, axis=-1)))
    note = (f"judged on LiteRT's outputs (the same bytes); TensorFlow Lite Micro gives outputs identical to LiteRT's "
            f"reference kernels on {len(tflm) - differ} of {len(tflm)} inputs{where}")
    if differ:
        return [Failure("tflm_differs", f"TensorFlow Lite Micro's outputs differ from LiteRT's reference kernels on "
                        f"{differ} of {len(tflm)} inputs (max |Δprob| {float(np.max(np.abs(tflm - ref_out))):.2e})")], note
    return [], note


def tflm_identity(path: Path, x, floor: Floor | None, seed: int) -> tuple[list[Failure], str]:
    """TFLite Micro's outputs against LiteRT's reference kernels on the first MIN_JUDGED inputs the
    floor ran (its outputs reused; computed here when the floor has none): (failures, note)."""
    from edgeft.core.floor import floor_subset, second_implementation
    from edgeft.export.tflm import TFLMRunner

    reference = getattr(floor, "reference", None)
    if reference is not None and len(reference[0]) >= min(MIN_JUDGED, len(x)):
        idx, ref_out = reference[0][:MIN_JUDGED], reference[1][:MIN_JUDGED]
    else:
        idx = floor_subset(len(x), MIN_JUDGED, seed)
        second = second_implementation(path)
        ref_out = np.stack([np.asarray(second.predict_one(x[i]), np.float32) for i in idx])
    tflm = predict_with_progress(TFLMRunner(path), x[idx], f"parity: {path.name} (tflm)", chunk=1)
    fails, note = _tflm_verdict(tflm, ref_out)
    if fails:
        return fails, note
    if len(idx) < MIN_JUDGED:
        return [Failure("not_judged", f"{NOT_JUDGED}TensorFlow Lite Micro against LiteRT's reference kernels on "
                        f"{len(idx)} inputs (fewer than {MIN_JUDGED})")], note
    return [], note


def check_parity(run: Run | str | Path, cfg: EdgeftConfig | None = None, formats=None, qat_model=None,
                 inputs=None, out: Path | None = None, floors: dict[str, Floor] | None = None,
                 keras_outputs: dict | None = None, matrix=None, prefetch=None) -> dict:
    """Runs every exported file on the parity inputs; writes parity.json / parity.md.

    `floors`: file name -> a floor already measured on those bytes' model (the int8 choice did).
    `keras_outputs`: {"float": ..., "qat": ...} the Keras models' outputs on `inputs`, when known.
    `matrix`: a client matrix (edgeft.verify.clients.MatrixRun) already running on the first files
    (the export starts it before building them); the gate adds the rest and takes its rows.
    `prefetch`: an edgeft.verify.prefetch.GatePrefetch holding the files' runs started as they were
    written; the gate takes their outputs instead of running them again.
    Raises ParityError naming each failing format (after the report is written).
    """
    from edgeft.data.datasets import gate_inputs
    from edgeft.quantize.int8_choice import keras_probs
    from edgeft.quantize.qat import load_qat_model

    handle = as_run(run, cfg)
    run, cfg = handle.path, handle.cfg
    standalone = out is None            # `edgeft parity RUN`: the shipped export/, checked against its manifest
    out = out or run / EXPORT_DIR
    if standalone:
        from edgeft.export.manifest import require_manifest_ok

        require_manifest_ok(run, out)
    formats = [f for f in (formats or FORMATS) if (out / f.filename).is_file()
               and (f.family != "tflm" or (out / TFLM_DIR).is_dir())]   # the TFLM row only after --tflm
    if not formats:
        raise UserError(f"no exported files in {out}: run `edgeft export {run}` first")
    splits = handle.splits
    if inputs is None:
        inputs = gate_inputs(splits.val, cfg)
    model = handle.model
    made_from = rundir.read_json(out / rundir.FORMATS_JSON, {})
    if qat_model is None and any(made_from.get(f.name) == "qat" for f in formats):   # only when a file needs it
        qat_model = load_qat_model(handle)
    x, y, groups, p, seed = inputs.x, inputs.y, inputs.source, cfg.parity, cfg.train.seed
    known = keras_outputs or {}
    ref = known.get("float")
    if ref is None:
        with step("parity", f"Keras on {len(x)} inputs", key="keras float outputs"):
            ref = keras_probs(model, x)
    float_acc = float(np.mean(ref.argmax(-1) == y))
    qat_ref = known.get("qat") if qat_model is not None else None
    if qat_model is not None and qat_ref is None:
        with step("parity", f"Keras QAT on {len(x)} inputs", key="keras qat outputs"):
            qat_ref = keras_probs(qat_model, x)
    floors = dict(floors or {})
    litert: dict[str, np.ndarray] = {}   # file name -> LiteRT's outputs (the TFLM row is judged on them)
    rows = []
    # every file under every client apps ship it with (informational: it does not fail the gate); its
    # cells are child processes, so they run beside the gate: the floors and TFLite Micro use one core
    from edgeft.verify.clients import MatrixRun, client_warnings

    if matrix is None and cfg.parity.client_inputs:
        matrix = MatrixRun(x, ref, splits.classes, limit=cfg.parity.client_inputs, provided=("litert", "onnxruntime"))
    if matrix is not None:
        for f in formats:
            matrix.add(out / f.filename)

    # the matrix's cells run in its own threads (child processes) beside the gate rows; its rows are
    # taken after them, since the gate's LiteRT runs fill the matrix's LiteRT cells
    with step("parity", "the gate", key="gate and client matrix (wall)"):
        for fmt in formats:
            path = out / fmt.filename
            with step("parity", f"{path.name} ({fmt.runtime})", key=f"gate {fmt.name}"):
                rows.append(_gate_row(fmt, path, x, y, groups, p, seed, ref, qat_ref, made_from, floors, inputs,
                                      splits.classes, litert, matrix, prefetch))
        clients = []
        if matrix is not None:
            with step("parity", "client matrix", key="client matrix (wait)"):
                clients = matrix.rows()
    n_val = int(np.sum(inputs.copy == 0))
    # a partial export (`--tflite int8` after a full one): the files it keeps keep their earlier rows
    kept, kept_clients = ([], []) if standalone else earlier_rows(out, formats)
    report_rows = sorted(kept + [asdict(r) for r in rows], key=lambda r: _FORMAT_ORDER.get(r["format"], 99))
    report = {"run": str(run), "n_inputs": int(len(y)), "n_validation_images": n_val,
              "n_augmented": int(len(y) - n_val), "augment": inputs.policy,
              "augment_setting": cfg.parity.parity_augment, "keras_float_accuracy": float_acc,
              "keras_qat_accuracy": float(np.mean(qat_ref.argmax(-1) == y)) if qat_ref is not None else None,
              "int8_choice": made_from.get("int8_choice"),
              "thresholds": asdict(cfg.parity), "rows": report_rows,
              "passed": all(r.passed for r in rows),
              "remedies": [remedy(r) for r in rows if not r.passed], "clients": kept_clients + clients}
    rundir.write_json(out / rundir.PARITY_JSON, report)
    md = parity_markdown(report)
    rundir.write_text(out / rundir.PARITY_MD, md)
    update_report_section(run, "Export and parity gate", md.split("\n", 2)[2] if md.startswith("# ") else md)
    log.debug(md)   # the tables: parity.md and the run's log (the console has one row per file)
    for line in client_warnings(clients):
        log.info(f"parity: client matrix: {line}")
    failed = [r for r in rows if not r.passed]
    if failed:
        raise ParityError("; ".join(f"{r.format} ({r.file}): {', '.join(r.failures)}" for r in failed),
                          short="; ".join(f"{r.format} {r.file} ({', '.join(r.failure_codes) or 'failed'})" for r in failed))
    for r in rows:
        if r.accepted_unjudged:
            log.info(f"parity: WARNING: {r.file} ({r.runtime}) ships NOT JUDGED (--accept-unjudged): "
                     f"{'; '.join(r.unjudged)}")
    judged = [r for r in rows if not r.accepted_unjudged]
    log.info(f"parity: {'all ' if len(judged) == len(rows) else ''}{len(judged)} file(s) pass their tier against their "
             f"source model on {len(y)} inputs ({rows[0].n_images} images)"
             + (f"; {len(rows) - len(judged)} shipped NOT JUDGED" if len(judged) < len(rows) else ""))
    return report


_FORMAT_ORDER = {f.name: i for i, f in enumerate(FORMATS)}
KEPT_NOTE = ("gated by an earlier export and kept (not rebuilt by this one; its row is that export's, on that "
             "export's inputs)")


def earlier_rows(out: Path, formats) -> tuple[list[dict], list[dict]]:
    """(parity rows, client-matrix rows) of the files a partial export keeps: the previous
    parity.json's passing rows of formats not rebuilt now whose file still ships in `out` (the
    staged export: a file not shown to come from the current model was set aside already), each
    marked `kept` with a note."""
    try:
        old = rundir.read_json(out / rundir.PARITY_JSON, None)
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        return [], []
    rebuilt, rebuilt_files = {f.name for f in formats}, {f.filename for f in formats}
    tflm = {f.name for f in FORMATS if f.family == "tflm"}
    rows = [r | {"kept": True, "notes": [*r.get("notes", []), KEPT_NOTE] if KEPT_NOTE not in r.get("notes", [])
                 else r.get("notes", [])}
            for r in old.get("rows") or [] if isinstance(r, dict) and r.get("passed") and r.get("format") not in rebuilt
            and r.get("file") not in rebuilt_files and (out / str(r.get("file"))).is_file()
            and (r.get("format") not in tflm or (out / TFLM_DIR).is_dir())]
    files = {r["file"] for r in rows}
    clients = [c for c in old.get("clients") or [] if isinstance(c, dict) and c.get("file") in files]
    return rows, clients


def int8_choice_markdown(choice: dict | None) -> list[str]:
    if not choice:
        return []
    lines = ["", f"int8 TFLite ({choice['granularity']}, {choice['io']} I/O): ships **{choice['shipped']}** "
                 f"({choice['why']}).", "", "| int8 candidate | accuracy (LiteRT) | 95 % interval | drop vs its source "
                 "(points) | agreement with float Keras | agreement with QAT Keras | passes |", "|---|---|---|---|---|---|---|"]
    for c in choice["candidates"]:
        lo, hi = c["accuracy_interval"]
        src = "-" if c["agreement_with_source"] is None else f"{c['agreement_with_source']:.1%}"
        drop = c.get("accuracy_drop_points")
        drop = "-" if drop is None else f"{drop:.1f}"
        lines.append(f"| {c['source']} | {c['accuracy']:.4f} | [{lo:.3f}, {hi:.3f}] | {drop} | "
                     f"{c['agreement_with_float']:.1%} | {src} | {'yes' if c['passes_tier'] else 'no'} |")
    gain = choice.get("qat_gain_points")
    if gain:
        lo, hi = gain["interval"]
        lines += ["", f"QAT int8 minus PTQ int8, paired on the same inputs: {gain['gain']:+.1f} points "
                      f"[95 % {lo:+.1f}, {hi:+.1f}] (over source images)."]
    return lines


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{v:.1%}"


def _ci(iv) -> str:
    return "" if not iv or iv[0] is None or iv[0] != iv[0] else f" [{iv[0]:.1%}, {iv[1]:.1%}]"


def parity_markdown(report: dict) -> str:
    rows = report["rows"]
    res = rows[0]["points_per_image"] if rows else float("nan")
    n_img = rows[0]["n_images"] if rows else 0
    what = {"mild": "shift, brightness, contrast", "flip": "mirroring, shift, brightness, contrast",
            "none": "no copies"}.get(report.get("augment", "mild"), report.get("augment"))
    th = report["thresholds"]
    lines = [f"# Parity on {report['n_inputs']} inputs", "",
             f"{report['n_validation_images']} validation images and {report['n_augmented']} deterministic copies "
             f"of them ({what}; --parity-augment {report.get('augment_setting', 'auto')}). The inputs are copies of "
             f"{n_img} images, not independent samples: every interval below resamples whole images with all "
             f"their copies (bootstrap, 95 %), and one image carries **{res:.1f} points**. Keras float accuracy "
             f"{report['keras_float_accuracy']:.4f}"
             + (f", Keras QAT accuracy {report['keras_qat_accuracy']:.4f}" if report["keras_qat_accuracy"] is not None
                else "") + ".", "",
             f"Quantized files pass when (1) their accuracy is at most {th['max_accuracy_drop']:g} points below their "
             f"source model's on the same inputs, and (2) their top-1 agrees with the source model on the inputs "
             f"where the source model is clear (top-1 minus second probability >= {th['clear_margin']:g}): int8 "
             f"within {th['floor_slack']:g} points of the floor (the same file under a second implementation, "
             "measured now), fp16 and dynamic at their tiers. Float files must match Keras to rounding error.", "",
             "| format | file | runtime | size (MB) | tier | source | max Δprob vs float | accuracy (source) | "
             "drop, points [95 %] | clear agreement [95 %] | required | near-ties left out | result |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = ("FAIL: " + md_cell("; ".join(r["failures"])) if not r["passed"] else
                  "pass, **NOT JUDGED** (--accept-unjudged): " + md_cell("; ".join(r["unjudged"]))
                  if r.get("accepted_unjudged") else "pass")
        dlo, dhi = r["accuracy_drop_interval"]
        drop = f"{r['accuracy_drop_points']:.1f} [{dlo:.1f}, {dhi:.1f}]"
        lines.append(f"| {r['format']} | {r['file']} | {r['runtime']} | {r['size_bytes'] / 1e6:.3f} | {r['tier']} | "
                     f"{r['reference']} | {r['max_abs_diff']:.2e} | {r['accuracy']:.4f} ({r['source_accuracy']:.4f}) | "
                     f"{drop} | {_pct(r['clear_agreement'])}{_ci(r['clear_agreement_interval'])} of {r['n_clear']} | "
                     f"{_pct(r['required_clear_agreement'])} | {r['n_left_out']} | {result} |")
    floors = [r for r in rows if r.get("floor")]
    if floors:
        lines += ["", "The floor: each int8 file against itself under a second correct implementation, and against "
                      "its source model, on the same inputs (no file agrees with its source more closely than with "
                      "itself; QAT's fidelity target is this floor).", "",
                  "| file | runtime | second implementation | inputs | agrees with itself [95 %] | with its source "
                  "[95 %] | on clear inputs: itself |", "|---|---|---|---|---|---|---|"]
        for r in floors:
            f = r["floor"]
            lines.append(f"| {r['file']} | {r['runtime']} | {f['how']} | {f['n']} | {_pct(f['agreement'])}"
                         f"{_ci(f['interval'])} | {_pct(f.get('source_agreement'))}{_ci(f.get('source_interval'))} | "
                         f"{_pct(f['clear_agreement'])}{_ci(f['clear_interval'])} of {f['n_clear']} |")
    for r in rows:
        if not r["passed"]:
            lines += ["", f"**{r['file']} ({r['runtime']}) failed**: {md_cell(r['verdict'])}."]
    notes: dict[str, list[str]] = {}   # the same note for several files is said once
    for r in rows:
        for note in r.get("notes", []):
            notes.setdefault(note, []).append(f"{r['file']} ({r['runtime']})")
    for note, files in notes.items():
        lines += ["", f"{', '.join(files)}: {note}."]
    lines += int8_choice_markdown(report.get("int8_choice"))
    from edgeft.quantize.recover import recovery_markdown

    lines += recovery_markdown(report.get("int8_recovery"))
    if report.get("clients"):
        from edgeft.verify.clients import matrix_markdown

        lines += ["", "Client matrix: each file in the libraries apps ship it with (informational; it does not "
                      "decide the gate).", "", matrix_markdown(report["clients"]).rstrip()]
    for kind, title in (("real_disagreements", "Real disagreements: clear inputs whose top-1 class differs from the "
                                               "source model"),
                        ("near_tie_flips", "Near-ties whose top-1 class flips (not counted: one rounding step "
                                           "decides them)")):
        flips = [(r["file"], r["runtime"], f) for r in rows for f in r[kind][:SHOW_FLIPS]]
        if flips:
            counts = ", ".join(f"{r['file']} ({r['runtime']}) {len(r[kind])}" for r in rows if r[kind])
            lines += ["", f"{title} ({counts}; the first {SHOW_FLIPS} per file here, all in parity.json):", "",
                      "| file | runtime | input | true | source model | file |", "|---|---|---|---|---|---|"]
            lines += [f"| {file} | {rt} | {md_cell(f['image'])} | {md_cell(f['true'])} | {md_cell(f['reference'])} "
                      f"({f['reference_p']:.2f}) | {md_cell(f['file'])} ({f['file_p']:.2f}) |" for file, rt, f in flips]
    if report.get("remedies"):
        lines += ["", "What to do:", ""] + [f"- {text}" for text in report["remedies"]]
    return "\n".join(lines) + "\n"
