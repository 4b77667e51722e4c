"""`edgeft search FOLDER --out DIR`: flags into SearchOptions, one library call."""
from __future__ import annotations

import argparse
import math

from edgeft.cli.deploy import RUNS_MAX, _int_at_least, positive_int
from edgeft.cli.flags import _config_keys, add_config_flags, values_from_args

SECTIONS = ("data", "model", "train", "parity")
# the space's own flags replace these (and a search trains no QAT: the target's int8 file is PTQ)
EXCLUDED = frozenset({"image_size", "backbone", "alpha", "weights"})
EXPORT_KEYS = frozenset({"int8_granularity"})   # export's own keys a search takes (its target file's quantization)


def budget(text: str) -> float:
    """argparse type: a positive finite number within LIMIT_RANGE (a limit below anything a file can
    measure, or past anything a machine has, is a typo)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text[:40]!r}")
    low, high = LIMIT_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, got {text[:40]!r}")
    return value


LIMIT_RANGE = (0.001, 1e9)   # ms, KB or MB: 1 microsecond / 1 byte / 1 KB up to 11 days / 1 TB / 1 PB


def fraction(text: str) -> float:
    value = budget(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text!r}")
    return value


def cmd_search(args) -> int:
    from edgeft.search.runner import SearchOptions, search
    from edgeft.search.space import Limits, parse_list

    values = values_from_args(args, (_config_keys(SECTIONS) - EXCLUDED) | EXPORT_KEYS)
    values.pop("folder", None)
    limits = Limits(args.max_latency_ms, args.latency_stat, args.max_size_kb, args.max_arena_kb, args.max_ram_mb,
                    args.min_accuracy)
    o = SearchOptions(folder=args.folder, out=args.out, backbones=parse_list(args.backbones, str, "--backbones"),
                      alphas=parse_list(args.alphas, float, "--alphas"), sizes=parse_list(args.sizes, int, "--sizes"),
                      weights=args.weights, target=args.target, threads=args.threads, limits=limits, plan=args.plan,
                      latency_from=args.latency_from, resume=args.resume, overwrite=args.overwrite,
                      workers=args.workers, storage=args.storage, finalists=args.finalists, keep=args.keep,
                      runs=args.runs, train_values=values)
    search(o)
    return 0


def register_search(sub) -> None:
    from edgeft.device import TIMED_RUNS
    from edgeft.search.checks import CORES
    from edgeft.search.space import TARGETS

    p = sub.add_parser("search", help="the most accurate backbone / width / size that fits the device's limits",
                       description="Phase 1 measures every candidate's untrained target file (size, latency, memory, "
                       "TFLite Micro arena) and drops those that break a limit; phase 2 trains the rest with successive "
                       "halving on validation accuracy; phase 3 exports and gates the finalists and chooses by the "
                       "shipped file's validation accuracy (docs/search.md). Training flags apply to every candidate.")
    p.add_argument("folder", help="image folder with one sub-folder per class")
    p.add_argument("--out", required=True, help="search directory (each candidate a run directory under runs/)")
    p.add_argument("--config", help="YAML file with training keys for every candidate")
    p.add_argument("--resume", action="store_true", help="continue the search in --out (nothing finished is redone)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing search directory")
    g = p.add_argument_group("limits (a candidate that breaks one is dropped, with the measured value)")
    g.add_argument("--max-latency-ms", type=budget, help="latency of the shipped file, batch 1 (see --latency-stat)")
    g.add_argument("--latency-stat", choices=("p50", "p95"), default="p95", help="the latency the limit judges (default: p95)")
    g.add_argument("--max-size-kb", type=budget, help="file size in KB (1000 bytes)")
    g.add_argument("--max-arena-kb", type=budget, help="TensorFlow Lite Micro tensor arena in KB (measured by TFLM)")
    g.add_argument("--max-ram-mb", type=budget, help="peak RSS of the runtime process running the file, less an "
                   "empty process's (Linux boards)")
    g.add_argument("--min-accuracy", type=fraction, help="validation accuracy of the shipped file (0-1)")
    s = p.add_argument_group("space and target")
    s.add_argument("--backbones", help="comma-separated (default: mobilenet,mobilenet_v2,mobilenet_v3_small,"
                   "mobilenet_v3_large; offline with imagenet weights: the backbones whose "
                   "weights are installed, said so; vgg16, resnet50, inception_v3, efficientnet_lite1-4 when named)")
    s.add_argument("--alphas", help="comma-separated widths, e.g. 0.35,0.5 (default: every width the backbone has)")
    s.add_argument("--sizes", help="comma-separated input sizes, e.g. 96,128 (default: those Keras has ImageNet "
                   "weights for; EfficientNet-Lite: its default size, weights fit any)")
    s.add_argument("--weights", help="imagenet, none, or a folder of backbone-only weights files "
                   "named <backbone>_a<alpha>_<size>.weights.h5 (default: imagenet)")
    s.add_argument("--target", choices=sorted(TARGETS),
                   help="the file that ships and its runtime (default: tflite-int8 on LiteRT)")
    s.add_argument("--int8-granularity", choices=("per-channel", "per-tensor"), default=argparse.SUPPRESS,
                   help="weight scales of the target's int8 or 16x8 file: per-tensor for NPUs and DSPs that "
                   "require it (default: per-channel)")
    s.add_argument("--threads", type=positive_int, help=f"runtime threads when timing, at most this machine's cores "
                   f"({CORES}) (default: 1)")
    s.add_argument("--runs", type=_int_at_least(1, RUNS_MAX), help=f"timed runs per file, at most {RUNS_MAX:,} "
                   f"(default: {TIMED_RUNS})")
    d = p.add_argument_group("device timing, workers, halving")
    d.add_argument("--plan", action="store_true", help="write the untrained candidate files and the one device "
                   "command that times them all, then stop")
    d.add_argument("--latency-from", metavar="BENCH_JSON", help="latency and RAM from the device's `edgeft_device.py "
                   "bench FOLDER --json` (files matched by sha256) instead of this host's")
    d.add_argument("--workers", type=positive_int, default=1, help="processes training candidates side by side (default: 1)")
    d.add_argument("--storage", help="Optuna storage: a journal file (default: DIR/search.journal) or a database URL "
                   "shared by workers on several machines")
    d.add_argument("--finalists", type=positive_int, help="candidates exported and gated (default: 3)")
    d.add_argument("--keep", type=fraction, help="fraction of the stage-1 ranking that goes on to stage 2 "
                   "(default: 0.5, never fewer than --finalists)")
    add_config_flags(p, SECTIONS, exclude=EXCLUDED)
    p.set_defaults(func=cmd_search)


COMMANDS = [register_search]
