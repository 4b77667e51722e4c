"""What export, qat and parity say: a few console rows, and a summary JSON for scripts.

One headline accuracy per file: the test split's (held out before training, nothing chosen on it),
by the file's own runtime, labelled with its split and n; a run without a test split (`--test-split
0`) quotes the validation split's, labelled "val (tuned on)". Everything else (the parity tables,
the int8 choice, each file built) goes to the run's logs/edgeft.log and parity.md / report.md.

The summary JSON (docs/records.md): `{"schema": "edgeft.export-summary/1", "command", "run",
"exit_code", "passed", "accuracy": {split, label, n}, "files": [{format, file, path, bytes, sha256,
accuracy: {split, label, n, value, interval}, verdict, failure_codes}], "reports": {...}}`, written
atomically: RUN/export/summary.json (export), RUN/export/parity_summary.json (parity),
RUN/qat_summary.json (qat).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.core.errors import ParityError
from edgeft.core.formats import EXPORT_DIR, FORMATS
from edgeft.core.stats import wilson_interval

log = logging.getLogger(__name__)

SUMMARY = "summary.json"                 # RUN/export/summary.json
PARITY_SUMMARY = "parity_summary.json"   # RUN/export/parity_summary.json
QAT_SUMMARY = "qat_summary.json"         # RUN/qat_summary.json
TEST_ACCURACY = "test_accuracy.json"     # RUN/export/: each shipped file's test metrics (tools read it)
REPORT_SECTION = "Test accuracy of the exported files"
WIDTH = 100   # console columns


def schema(command: str) -> str:
    return f"edgeft.{command}-summary/1"


# ---------------------------------------------------------------- the headline accuracy
def headline_split(splits) -> tuple[str, str, object] | None:
    """(split, label, images) the headline accuracy is measured on: the test split when the run has
    one, else the validation split, labelled as tuned on."""
    if splits.test is not None and len(splits.test.y):
        return "test", "test", splits.test
    if splits.val is not None and len(splits.val.y):
        return "val", "val (tuned on)", splits.val
    return None


def headline(metrics: dict | None, split: str, label: str) -> dict | None:
    """{split, label, n, value, interval} from holdout metrics (accuracy, n, correct, interval_95) or
    from validation metrics (val_accuracy, n): the 95 % Wilson interval over the images."""
    if not metrics:
        return None
    value = metrics.get("accuracy", metrics.get("val_accuracy"))
    n = int(metrics.get("n") or 0)
    if value is None or not n:
        return None
    correct = int(metrics.get("correct", round(value * n)))
    lo, hi = metrics.get("interval_95") or wilson_interval(correct, n)
    return {"split": split, "label": label, "n": n, "value": float(value),
            "interval": [float(min(lo, value)), float(max(hi, value))]}


def fmt_accuracy(h: dict | None) -> str:
    """'0.833 [0.436, 0.970]' (the split and n are in the header), '-' when not measured."""
    if not h:
        return "-"
    lo, hi = h["interval"]
    return f"{h['value']:.3f} [{lo:.3f}, {hi:.3f}]"


def fmt_labelled(h: dict | None) -> str:
    """'0.833 [95 % 0.436-0.970], test n=6' for one-line mentions (report.md, benchmark)."""
    if not h:
        return "-"
    lo, hi = h["interval"]
    return f"{h['value']:.4f} [95 % {lo:.4f}-{hi:.4f}], {h['label']} n={h['n']}"


def report_headline_accuracy(run: Path, splits, out: Path, test_split: float = 0.0, prefetch=None,
                             model=None) -> dict:
    """Every model file in `out` (and out/failed/) and the Keras model, each run by its own runtime
    on the headline split: {file name: headline}. The shipped files' test metrics also go to
    export/test_accuracy.json (as before), and a table labelled with split and n to report.md.
    `prefetch`: the test metrics computed as each file was written (edgeft.verify.prefetch), taken
    instead of run again; `model`: the run's Keras model already in memory."""
    from edgeft.pipeline.staging import FAILED_DIR
    from edgeft.train.report import update_report_section
    from edgeft.verify.evaluate import test_accuracy_of_file

    where = headline_split(splits)
    if where is None:
        return {}
    split, label, images = where
    files = [("keras", rundir.MODEL, run / rundir.MODEL)]
    seen = set()
    for f in FORMATS:
        for place in (out / f.filename, out / FAILED_DIR / f.filename):
            if f.family != "tflm" and f.filename not in seen and place.is_file():
                seen.add(f.filename)
                files.append((f.name, f.filename, place))
    def measured(name: str, path: Path):
        if name == rundir.MODEL and model is not None:
            from edgeft.quantize.int8_choice import keras_probs
            from edgeft.train.report import holdout_metrics

            probs = np.concatenate([keras_probs(model, x.astype(np.float32)) for _, x in images.batches(64)])
            return holdout_metrics(probs, images.y, splits.classes) | {"model": str(run / rundir.MODEL)}
        known, found = prefetch.test_accuracy(name) if prefetch is not None and split == "test" else (False, None)
        return found if known else test_accuracy_of_file(path, splits, split=split)

    metrics = {name: measured(name, path) for _, name, path in files}
    shipped = {fmt: metrics[name] for fmt, name, path in files if path.parent != out / FAILED_DIR}
    if split == "test":
        rundir.write_json(out / TEST_ACCURACY, shipped)
        intro = (f"{len(images.y)} test images, held out before training: nothing was tuned, chosen or gated "
                 "on them.")
    else:
        from edgeft.data.datasets import no_test_reason

        intro = (f"No test split ({no_test_reason(splits.report, test_split)}): the accuracy below is on the "
                 f"{len(images.y)} validation images, which chose the best epoch and calibrated the gate "
                 "(labelled \"val (tuned on)\").")
    heads = {name: headline(m, split, label) for name, m in metrics.items()}
    lines = [intro, "", f"| file | accuracy, {label} n={len(images.y)} [95 % interval] |", "|---|---|"]
    lines += [f"| {fmt} | {fmt_accuracy(heads[name])} |" for fmt, name, path in files
              if path.parent != out / FAILED_DIR]
    update_report_section(run, REPORT_SECTION, "\n".join(lines))
    log.debug(f"export: accuracy on {label} n={len(images.y)} (by each file's runtime): "
              + "; ".join(f"{name} {fmt_accuracy(h)}" for name, h in heads.items()))
    return heads


# ---------------------------------------------------------------- summary records
def file_entry(run: Path, path: Path, fmt: str, accuracy: dict | None, verdict: str, codes=(),
               where: str | None = None) -> dict:
    """One file of a summary: where it is (relative to the run and absolute), its bytes and sha256
    read from `path` (`where`: its final place, when `path` is still staged)."""
    from edgeft.export.manifest import sha256_file

    final = Path(where) if where else path.relative_to(run)
    return {"format": fmt, "file": path.name, "path": final.as_posix(), "abs_path": str((run / final).resolve()),
            "bytes": path.stat().st_size, "sha256": sha256_file(path), "accuracy": accuracy,
            "verdict": verdict, "failure_codes": list(codes)}


def write_summary(path: Path, command: str, run: Path, files: list[dict], exit_code: int, **extra) -> dict:
    heads = [f["accuracy"] for f in files if f.get("accuracy")]
    record = {"schema": schema(command), "command": command, "run": str(Path(run).resolve()),
              "exit_code": int(exit_code), "passed": exit_code == 0,
              "accuracy": ({k: heads[0][k] for k in ("split", "label")} | {"n": heads[0]["n"]}) if heads else None,
              "files": files, **extra}
    rundir.write_json(path, record)   # temp file + rename
    return record


def _verdict(row: dict) -> str:
    if not row["passed"]:
        return "fail"
    return "pass, not judged" if row.get("accepted_unjudged") else "pass"


def gate_entries(run: Path, rows: list[dict], folder: Path, heads: dict, failed: set[str] = frozenset(),
                 prefix: str = EXPORT_DIR) -> list[dict]:
    """One summary entry per parity row (format), its file in `folder` or folder/failed/."""
    from edgeft.pipeline.staging import FAILED_DIR

    out = []
    for r in rows:
        sub = f"{FAILED_DIR}/{r['file']}" if r["file"] in failed or not (folder / r["file"]).is_file() else r["file"]
        path = folder / sub
        if not path.is_file():
            continue
        out.append(file_entry(run, path, r["format"], heads.get(r["file"]), _verdict(r),
                              r.get("failure_codes") or [], where=f"{prefix}/{sub}"))
    return out


def headline_in_parity_md(path: Path, files: list[dict]) -> None:
    """parity.md's header names each file's headline accuracy (split and n) before the gate's
    tables, whose accuracies are on the parity inputs (validation images and their copies)."""
    heads = [f["accuracy"] for f in files if f.get("accuracy")]
    if not path.is_file() or not heads:
        return
    lines = path.read_text().split("\n")
    title = f"accuracy, {heads[0]['label']} n={heads[0]['n']} [95 %]"
    block = ["", f"Headline accuracy: each file on the {heads[0]['label']} split ({heads[0]['n']} images) by its "
             "own runtime; the accuracies in the tables below are on the parity inputs.", "",
             f"| file | format | {title} | gate |", "|---|---|---|---|"]
    block += [f"| {f['file']} | {f['format']} | {fmt_accuracy(f['accuracy'])} | {f['verdict']} |" for f in files]
    rundir.write_text(path, "\n".join(lines[:1] + block + lines[1:]))


# ---------------------------------------------------------------- the console
def _clip(text: str, width: int = WIDTH) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def say_rows(command: str, files: list[dict], where: str = "") -> None:
    """One console row per file: format, size, headline accuracy [95 %] (split and n in the column's
    title), gate verdict."""
    heads = [f["accuracy"] for f in files if f.get("accuracy")]
    title = f"accuracy, {heads[0]['label']} n={heads[0]['n']} [95 %]" if heads else "accuracy [95 %]"
    width = max(22, len(title))
    log.info(_clip(f"{command}: {len(files)} file(s){where}"))
    log.info(f"  {'format':<16}{'size':>9}  {title:<{width}}  gate")
    for f in files:
        verdict = f["verdict"] + (f" ({', '.join(f['failure_codes'])})" if f["failure_codes"] else "")
        log.info(_clip(f"  {f['format']:<16}{f['bytes'] / 1e6:>6.2f} MB  {fmt_accuracy(f['accuracy']):<{width}}  "
                       f"{verdict}"))


def say_paths(run: Path, *names: str) -> None:
    for name in names:
        log.info(f"{Path(name).name}: {run / name}")


# ---------------------------------------------------------------- per command
def export_summary(run: Path, stage: Path, report: dict, heads: dict, failed: set[str], failure) -> dict:
    """RUN/export/summary.json, written in the staging directory and published with it."""
    files = gate_entries(run, report["rows"], stage, heads, failed)
    reported = {f["file"] for f in files}
    for f in FORMATS:   # files kept from an earlier export (not rebuilt now)
        if f.family != "tflm" and f.filename not in reported and (stage / f.filename).is_file():
            files.append(file_entry(run, stage / f.filename, f.name, heads.get(f.filename), "kept (earlier export)",
                                    where=f"{EXPORT_DIR}/{f.filename}"))
    headline_in_parity_md(stage / rundir.PARITY_MD, files)
    code = 0 if failure is None else 1
    record = write_summary(stage / SUMMARY, "export", run, files, code,
                           reports={"parity_md": f"{EXPORT_DIR}/{rundir.PARITY_MD}", "report_md": rundir.REPORT,
                                    "log": f"{rundir.LOGS}/edgeft.log"},
                           keras=heads.get(rundir.MODEL))
    return record


def parity(run, cfg=None) -> dict:
    """`edgeft parity RUN`: the gate on the shipped export/, its rows on the console and
    RUN/export/parity_summary.json; raises ParityError (exit 1) after writing them when a file fails."""
    from edgeft.run import as_run
    from edgeft.verify.parity import check_parity

    handle = as_run(run, cfg)
    out = handle.path / EXPORT_DIR
    failure = None
    try:
        report = check_parity(handle)
    except ParityError as e:
        failure, report = e, rundir.read_json(out / rundir.PARITY_JSON)
    earlier = {f["file"]: f.get("accuracy") for f in (rundir.read_json(out / SUMMARY, {}) or {}).get("files", [])}
    files = gate_entries(handle.path, report["rows"], out, earlier)
    headline_in_parity_md(out / rundir.PARITY_MD, files)
    write_summary(out / PARITY_SUMMARY, "parity", handle.path, files, 0 if failure is None else 1,
                  reports={"parity_md": f"{EXPORT_DIR}/{rundir.PARITY_MD}", "report_md": rundir.REPORT})
    say_rows("parity", files, f" in {out}/")
    say_paths(handle.path, f"{EXPORT_DIR}/{rundir.PARITY_MD}")   # parity_summary.json beside it (docs/records.md)
    if failure is not None:
        raise failure
    return report


def qat_summary(run: Path, metrics: dict) -> dict | None:
    """RUN/qat_summary.json and the console rows of `edgeft qat`: the QAT model (Keras) with its
    headline accuracy, and the int8 comparison when it ran."""
    if not metrics or metrics.get("skipped"):
        return None
    run = Path(run)
    weights = run / rundir.QAT_WEIGHTS
    if not weights.is_file():
        return None
    test = metrics.get("test")
    head = headline(test, "test", "test") if test else headline(metrics, "val", "val (tuned on)")
    files = [file_entry(run, weights, "keras_qat", head, "trained")]
    record = write_summary(run / QAT_SUMMARY, "qat", run, files, 0, int8_comparison=metrics.get("int8_comparison"))
    say_rows("qat", files)
    return record
