"""Sub-commands after fine-tuning: qat, export, parity, evaluate, predict.

Each `register_*` adds one sub-parser; the work is done by the library module it calls.
"""
from __future__ import annotations

import shlex

from pathlib import Path

from edgeft.core.logs import run_log
from edgeft.core.progress import stage
from edgeft.device import int_at_least, print_predictions, thread_count


_int_at_least = int_at_least   # the device script's argparse type: one parser for both CLIs
positive_int = _int_at_least(1)
RUNS_MAX = 100_000   # timed or warm-up runs (as the device script's bench): each latency is kept
# qat calibrates (--rep-samples), follows --int8-granularity and compares int8 files on the parity inputs
QAT_SECTIONS = ("qat", "export", "parity")
non_negative_int = _int_at_least(0)


def finite_float(text: str) -> float:
    """argparse type: a finite number (float() takes "nan" and "inf")."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _open_run(args, sections):
    """The finished run RUN, its config.yaml with any tier/export flags the user typed on top."""
    from dataclasses import fields

    from edgeft.cli.flags import values_from_args
    from edgeft.core.config import build_config, section_classes
    from edgeft.pipeline.preflight import check_run
    from edgeft.run import as_run

    run = check_run(args.run, args.data)   # a recorded split that no longer matches its folder: refused before TF
    from edgeft.core.config import check_parity_memory

    keys = {f.name for s in sections for f in fields(section_classes()[s])}
    cfg = build_config(values_from_args(args, keys), base=run.cfg)
    check_parity_memory(cfg)   # the gate's inputs fit in this machine's free memory
    return as_run(run, cfg)


def cmd_qat(args) -> int:
    run = _open_run(args, QAT_SECTIONS)   # every check that needs no model, before TensorFlow loads
    from edgeft.quantize.qat import run_qat

    from edgeft.pipeline.summary import qat_summary

    with run_log(run.path):
        qat_summary(run.path, run_qat(run, epochs=args.epochs))   # RUN/qat_summary.json
    return 0


def cmd_export(args) -> int:
    run = _open_run(args, ("export", "parity"))   # every check that needs no model, before TensorFlow loads
    from edgeft.pipeline.exporter import export

    if args.check:
        from edgeft.pipeline.exporter import check_export
        from edgeft.core.lock import run_lock

        with run_lock(run.path, "export --check"), run_log(run.path):   # export/ must not change meanwhile
            check_export(run)
        return 0
    stage(f"export: {run.path}: the files, then the parity gate")   # held: a refused export writes nothing
    with run_log(run.path):
        export(run, tflite=args.tflite, onnx=args.onnx, tflm=args.tflm)
    nxt = f"next: edgeft benchmark {shlex.quote(str(args.run))}"
    why = "    (size, latency and accuracy of every file, side by side)"
    print(nxt + why if len(nxt + why) <= 100 else nxt)   # under 100 columns whatever the path
    return 0


def cmd_parity(args) -> int:
    run = _open_run(args, ("parity",))   # every check that needs no model, before TensorFlow loads
    from edgeft.core.lock import run_lock
    from edgeft.pipeline.summary import parity

    stage(f"parity: {run.path.name}: each exported file against its source model")   # the path: on the rows
    with run_lock(run.path, "parity"), run_log(run.path):   # it rewrites export/parity.* and report.md
        parity(run)   # and export/parity_summary.json
    return 0


def _warn_if_ungated(model: str, allow_unverified: bool = False) -> None:
    """predict / evaluate run any file, but say so when it is not one the parity gate let through,
    and refuse (exit 1, as the device script does) one whose sha256 differs from the manifest
    beside it, unless --allow-unverified."""
    import sys

    from edgeft.device import check_manifest
    from edgeft.core.errors import OperationFailed
    from edgeft.export.manifest import manifest_entry

    if Path(model).suffix.lower() in (".tflite", ".onnx") and Path(model).is_file():
        problem = check_manifest(model)
        if problem and not problem.startswith("warning:") and not allow_unverified:
            raise OperationFailed(f"{problem}; --allow-unverified runs it anyway")
        trusted, why = manifest_entry(model)
        if not trusted:
            print(f"edgeft: warning: {why}", file=sys.stderr)


def cmd_evaluate(args) -> int:
    from edgeft.core.errors import UserError

    if args.folder is not None and args.split is not None:   # before TensorFlow loads
        raise UserError("--split evaluates the run's recorded split: give either FOLDER or --split")
    from edgeft.verify.evaluate import evaluate

    _warn_if_ungated(args.model, args.allow_unverified)
    if args.data is not None and not Path(args.data).is_dir():   # before TensorFlow loads
        raise UserError(f"--data {args.data}: not a folder")
    r = evaluate(args.model, args.folder, out=args.out, threads=args.threads, split=args.split,
                 include_trained=args.include_trained, data=args.data)
    for one in r.get("splits", [r]):
        lo, hi = one["interval_95"]
        print(f"{Path(one['model']).name}: accuracy {one['accuracy']:.4f} [95 % {lo:.4f}-{hi:.4f}] on "
              f"{one['split']} n={one['n']}" + (f" ({len(one['skipped'])} skipped)" if one["skipped"] else ""))
    for label, acc in r["per_class_accuracy"].items():
        print(f"  {label:<20} {'-' if acc is None else f'{acc:.4f}'}")
    print(f"wrote {r['out']}/evaluation.json, confusion_matrix.png and mistakes.png / mistakes.json")
    return 0


def cmd_predict(args) -> int:
    from edgeft.verify.evaluate import predict

    _warn_if_ungated(args.model, args.allow_unverified)
    print_predictions(predict(args.model, args.images, top_k=args.top_k, threads=args.threads), args.json)
    return 0


def _add_run(p, help_text="edgeft run directory (from `edgeft finetune --out`)"):
    p.add_argument("run", help=help_text)


DATA_HELP = ("the run's image folder, where it is now: read when neither the absolute path the run recorded nor "
             "the one relative to the run exists (a run or its data moved)")


def _add_data(p):
    p.add_argument("--data", metavar="DIR", help=DATA_HELP)


def register_qat(sub):
    from edgeft.cli.flags import add_config_flags
    from edgeft.cli.parsing import Renamed

    p = sub.add_parser("qat", help="quantization-aware training of a fine-tuned run")
    _add_run(p)
    # the name finetune uses for the same thing (--qat-epochs); --epochs was qat's own until 0.1
    p.add_argument("--qat-epochs", dest="epochs", type=positive_int, default=2, help="QAT epochs (default: 2)")
    p.add_argument("--epochs", dest="epochs", type=positive_int, action=Renamed, new="--qat-epochs")
    _add_data(p)
    add_config_flags(p, QAT_SECTIONS, exclude=frozenset({"qat_epochs"}))
    p.set_defaults(func=cmd_qat)


def register_export(sub):
    from edgeft.cli.flags import add_config_flags
    from edgeft.cli.parsing import ListAction
    from edgeft.core.formats import flags_of

    p = sub.add_parser("export", help="export to TFLite / ONNX and run the parity gate",
                       description="Writes RUN/export/ and checks every file against the Keras model with "
                       "LiteRT / ONNX Runtime; exits 1 if any file fails its parity tier.")
    p.add_argument("run", nargs="?", help="edgeft run directory (from `edgeft finetune --out`)")
    p.rescues = [("run", ("tflite", "onnx"))]   # `--tflite int8 RUN`: RUN is not a kind
    p.add_argument("--tflite", action=ListAction, members=[*flags_of("tflite"), "all"], metavar="KIND[,KIND]",
                   help=f"comma-separated: {', '.join(flags_of('tflite'))} or all")
    p.add_argument("--onnx", action=ListAction, members=[*flags_of("onnx"), "all"], metavar="KIND[,KIND]",
                   help=f"comma-separated: {', '.join(flags_of('onnx'))} or all (neither flag: every format)")
    p.add_argument("--tflm", action="store_true",
                   help="also write RUN/export/tflm/ (C++ sources for TensorFlow Lite Micro) from the int8 "
                        "TFLite file, and run that file in the TFLite Micro interpreter in the parity gate")
    p.add_argument("--check", action="store_true",
                   help="export again in a temporary copy of the run and compare every shipped file's bytes "
                        "with export/manifest.json (exit 1 if any differ)")
    _add_data(p)
    add_config_flags(p, ("export", "parity"))
    p.set_defaults(func=cmd_export)


def register_parity(sub):
    from edgeft.cli.flags import add_config_flags

    p = sub.add_parser("parity", help="check the exported files of a run against its Keras model")
    _add_run(p)
    _add_data(p)
    add_config_flags(p, ("parity",))
    p.set_defaults(func=cmd_parity)


def register_evaluate(sub):
    p = sub.add_parser("evaluate", help="accuracy of a run, or of a .keras / .tflite / .onnx file, on its recorded "
                       "split or a class folder")
    p.add_argument("model", help="an edgeft run directory (its model.keras), or a model file: .keras, .tflite or .onnx")
    p.add_argument("folder", nargs="?", help="image folder, one sub-folder per class named as in the model's labels "
                   "(omit it for a model in a run: the run's recorded split)")
    p.add_argument("--split", choices=("test", "val", "all"),   # edgeft.verify.evaluate.SPLITS (no TensorFlow here)
                   help="without FOLDER: the run's test split (default when it has one), "
                   "val (the images it was tuned on), or all (each of them)")
    p.add_argument("--include-trained", action="store_true", help="with FOLDER: keep the images the run trained "
                   "on (left out by default, and counted)")
    _add_data(p)   # without FOLDER: where the run's image folder is now, when it moved
    p.add_argument("--out", help="directory for evaluation.json, confusion_matrix.png and mistakes.png / .json "
                   "(default: eval_<model> beside the model)")
    p.add_argument("--threads", type=thread_count, help="CPU threads for the runtime (default: its own choice)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="run a model whose sha256 differs from the manifest.json beside it (refused otherwise)")
    p.set_defaults(func=cmd_evaluate)


def register_predict(sub):
    p = sub.add_parser("predict", help="top-k classes for images with a .keras / .tflite / .onnx file")
    p.add_argument("model", help="model file: .keras, .tflite or .onnx")
    p.add_argument("images", nargs="+", help="image files, or folders (every jpg/jpeg/png/bmp/gif inside)")
    p.add_argument("--top-k", type=positive_int, default=3, help="classes shown per image (default: 3)")
    p.add_argument("--threads", type=thread_count, help="CPU threads for the runtime (default: its own choice)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-unverified", action="store_true",
                   help="run a model whose sha256 differs from the manifest.json beside it (refused otherwise)")
    p.set_defaults(func=cmd_predict)


def cmd_benchmark(args) -> int:
    from edgeft.pipeline.preflight import check_run

    run = check_run(args.run, args.data)   # before TensorFlow loads
    from edgeft.verify.bench import benchmark

    drop = run.cfg.parity.max_accuracy_drop if args.max_accuracy_drop is None else args.max_accuracy_drop
    stage(f"benchmark: {run.path}: size, latency and accuracy of every file")
    with run_log(run.path):
        benchmark(run, data=args.data, threads=tuple(args.threads), runs=args.runs, warmup=args.warmup,
                  limit=args.limit, max_drop=drop / 100)
    return 0


def register_benchmark(sub):
    from edgeft.cli.parsing import ListAction, Renamed
    from edgeft.device import TIMED_RUNS, WARMUP_RUNS

    p = sub.add_parser("benchmark", help="size, latency and accuracy of every exported file and the Keras model",
                       description="Writes RUN/benchmark.json and RUN/benchmark.md.")
    p.add_argument("run", nargs="?", help="edgeft run directory (from `edgeft finetune --out`)")
    p.rescues = [("run", ("threads",))]   # `--threads 1 2 RUN`: RUN is not a thread count
    p.add_argument("--data", metavar="DIR", help="class folder for accuracy (default: the run's validation split); "
                   "also where the run's image folder is looked for when it has moved (as --data of export)")
    p.add_argument("--threads", action=ListAction, item=thread_count, default=[1, 2], metavar="N[,N]",
                   help="comma-separated thread counts, each timed (default: 1,2)")
    p.add_argument("--runs", type=_int_at_least(1, RUNS_MAX), default=TIMED_RUNS,
                   help=f"timed runs per file and thread count, at most {RUNS_MAX:,} (default: {TIMED_RUNS}, as the "
                        "device script)")
    p.add_argument("--warmup-runs", dest="warmup", type=_int_at_least(0, RUNS_MAX), default=WARMUP_RUNS,
                   help=f"untimed runs first (default: {WARMUP_RUNS})")
    p.add_argument("--warmup", dest="warmup", type=_int_at_least(0, RUNS_MAX), action=Renamed, new="--warmup-runs")
    p.add_argument("--limit", type=positive_int, help="at most this many images for accuracy")
    p.add_argument("--max-accuracy-drop", type=finite_float, metavar="POINTS",
                   help="flag files whose accuracy is more than this many points below the Keras model's "
                        "(default: the run's --max-accuracy-drop, the parity gate's)")
    p.add_argument("--max-drop", dest="max_accuracy_drop", type=finite_float, action=Renamed,
                   new="--max-accuracy-drop", convert=lambda fraction: fraction * 100,
                   unit_note="in points: --max-drop 0.02 is --max-accuracy-drop 2")
    p.set_defaults(func=cmd_benchmark)


COMMANDS = [register_qat, register_export, register_parity, register_benchmark, register_evaluate, register_predict]
