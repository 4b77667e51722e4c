"""Parity tiers: when an exported file counts as the model it was made from.

Float files: exact (max |Δprob| within atol), as keras-hub's numerics tests do. Quantized files
are judged on the two questions a user has, each with an interval over **source images** (the
parity inputs are copies of a few dozen to a few hundred images, not independent samples):

1. *Is it as good as my model on my data?* Accuracy of the file against its source model on the
   same inputs, paired: the drop (points) must not exceed `max_accuracy_drop`.
2. *Is it the model I trained?* Top-1 agreement with the source model on the inputs where the
   source model's top-1 is **clear** (its top-1 probability minus its second >= `clear_margin`,
   a fixed threshold on the source model alone, never on the file under test). On a near-tie one
   int8 rounding step changes the class, so near-ties are listed, not counted. For int8 files the
   threshold is set from the **floor** measured in the same run: the same file run by a second
   correct implementation (LiteRT's reference kernels, ONNX Runtime without graph fusions) agrees
   with itself on so many of the clear inputs; the file must agree with its source model within
   `floor_slack` points of that floor. fp16 and dynamic files keep fixed agreement tiers their
   kernels meet (on the clear inputs), plus their probability bound.

**No vacuous pass.** A criterion judged on fewer than MIN_JUDGED inputs (the accuracy drop or
a probability bound on fewer parity inputs, the agreement on fewer clear inputs, an int8 file's
floor on fewer clear inputs of its own) is *not judged*: the file does not pass (its failures say
"not judged: ...") unless `accept_unjudged` (`--accept-unjudged`), which lets it ship marked so.

Numpy only: used by the gate, by the int8 choice and by `edgeft qat`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from edgeft.core.config import ParityConfig
from edgeft.core.stats import group_bootstrap, paired_difference, points_per_image

MIN_JUDGED = 30   # inputs a criterion needs to be judged at all (docs/export.md; the quick tier's gate has 120 / 55)
NOT_JUDGED = "not judged: "   # how a failure that is only "too few inputs" starts
FLOOR = "floor"   # a tier's agreement measured against the floor of the same run, not a fixed value


@dataclass(frozen=True)
class Tier:
    """How one kind of file is judged: read by `judge`, by the gate's probability bound against
    Keras (edgeft.verify.parity) and by the golden vectors' bound on a device (edgeft.export.golden).
    Thresholds a user may change are ParityConfig fields, named here (None: no such criterion)."""
    name: str
    atol: str | None            # ParityConfig field: max |Δprob| against the float Keras model
    agreement: str | None       # ParityConfig field: min top-1 agreement on clear inputs; FLOOR: the floor - slack
    accuracy_drop: bool         # judged on its paired accuracy drop (--max-accuracy-drop)
    input_contract: bool        # an integer input must be raw pixels (edgeft.core.floor.CONTRACT)
    golden_atol: float          # max |Δprob| of the same file on another machine (golden vectors)
    golden_top1: bool           # ... and the top-1 class must be the same there

    @property
    def floor(self) -> bool:
        """Its agreement threshold is set by a floor measured on the file (a second implementation)."""
        return self.agreement == FLOOR


# Golden bounds measured on the 32 px test model, 72 images, one x86 CPU: LiteRT's XNNPACK against its
# builtin kernels differ by up to 9e-7 (float, fp16), 0.054 (dynamic) and 0.082 (int8); ONNX Runtime
# with and without graph fusions by 1e-6 (float) and 0.004 (int8). fp16 keeps the parity gate's bound
# for devices that compute in float16.
TIERS: dict[str, Tier] = {t.name: t for t in (
    Tier("float", atol="float_atol", agreement=None, accuracy_drop=False, input_contract=False,
         golden_atol=1e-4, golden_top1=False),
    Tier("fp16", atol="fp16_atol", agreement="fp16_agreement", accuracy_drop=False, input_contract=False,
         golden_atol=2e-2, golden_top1=True),
    Tier("dynamic", atol="dynamic_atol", agreement="dynamic_agreement", accuracy_drop=True, input_contract=False,
         golden_atol=0.15, golden_top1=True),
    Tier("int8", atol=None, agreement=FLOOR, accuracy_drop=True, input_contract=True,
         golden_atol=0.15, golden_top1=True),
    # 16x8 (int16 activations, int8 weights, float32 I/O): judged like int8 (its floor: the same file
    # under LiteRT's reference kernels); no integer input, so no raw-pixel contract to check
    Tier("int16x8", atol=None, agreement=FLOOR, accuracy_drop=True, input_contract=False,
         golden_atol=0.05, golden_top1=True),
)}


class Failure(str):
    """One reason a file fails the gate: its text (what parity.md, parity.json and the console show,
    so it is a str) and a `code` that code decides on (never the text): accuracy_drop, agreement,
    not_judged, max_diff, input_contract, tflm_differs."""
    code: str

    def __new__(cls, code: str, text: str) -> "Failure":
        obj = super().__new__(cls, text)
        obj.code = code
        return obj

    def __reduce__(self):   # copies (dataclasses.asdict) keep the code
        return (Failure, (self.code, str(self)))


def codes(failures) -> set[str]:
    """The codes of a list of failures (a plain string, from an older report, has none)."""
    return {getattr(f, "code", None) for f in failures} - {None}


def exact_failures(probs, ref, atol: float) -> list[Failure]:
    diff = float(np.max(np.abs(probs - ref)))
    return [] if diff <= atol else [Failure("max_diff", f"max |Δprob| {diff:.2e} > {atol:.0e}")]


def bound_failures(tier: str, probs, ref, p: ParityConfig) -> list[Failure]:
    """The tier's max |Δprob| against the float Keras model, where it has one."""
    field_name = TIERS[tier].atol
    return [] if field_name is None else exact_failures(probs, ref, getattr(p, field_name))


def agreement(probs, ref) -> float:
    return float(np.mean(probs.argmax(-1) == ref.argmax(-1)))


def top1_margin(probs) -> np.ndarray:
    """Top-1 probability minus the second: how clear each input's class is to a model."""
    p = np.sort(np.asarray(probs, np.float64), axis=-1)
    return p[:, -1] - (p[:, -2] if p.shape[-1] > 1 else 0.0)


def clear_mask(source_probs, clear_margin: float) -> np.ndarray:
    return top1_margin(source_probs) >= clear_margin


@dataclass
class Floor:
    """The same file under a second correct implementation: how far int8 arithmetic alone moves it."""
    how: str                      # e.g. "LiteRT reference kernels"
    n: int                        # inputs both implementations ran
    agreement: float              # on all n inputs
    interval: list[float]
    n_clear: int                  # of those, inputs whose source-model top-1 is clear
    clear_agreement: float
    clear_interval: list[float]
    # the file against its source model on the same inputs: what the floor is compared with
    source_agreement: float | None = None
    source_interval: list[float] | None = None

    @classmethod
    def measure(cls, how: str, probs_a, probs_b, groups, clear, seed: int = 0, source_probs=None) -> "Floor":
        """probs_a: the file as the gate runs it; probs_b: the second implementation, same inputs."""
        same = (np.asarray(probs_a).argmax(-1) == np.asarray(probs_b).argmax(-1)).astype(np.float64)
        clear = np.asarray(clear, bool)
        ones = np.ones_like(same)
        a, alo, ahi = group_bootstrap(same, ones, groups, seed=seed)
        c, clo, chi = group_bootstrap(same * clear, clear.astype(np.float64), groups, seed=seed)
        s = slo = shi = None
        if source_probs is not None:
            src = (np.asarray(probs_a).argmax(-1) == np.asarray(source_probs).argmax(-1)).astype(np.float64)
            s, slo, shi = group_bootstrap(src, ones, groups, seed=seed)
        return cls(how, int(len(same)), a, [alo, ahi], int(clear.sum()), c, [clo, chi], s,
                   None if s is None else [slo, shi])


@dataclass
class Judgement:
    """One file against its source model, every number the gate used."""
    n: int                                  # inputs
    n_images: int                           # source images they are copies of
    points_per_image: float                 # the resolution: one image (with its copies) in points
    accuracy: float
    source_accuracy: float
    accuracy_drop_points: float             # source - file, paired
    accuracy_drop_interval: list[float]     # 95 %, over source images
    agreement: float                        # top-1 agreement with the source model, all inputs
    agreement_interval: list[float]
    clear_margin: float
    n_clear: int
    n_left_out: int                         # near-ties: source-model margin below clear_margin
    clear_agreement: float
    clear_agreement_interval: list[float]
    required_clear_agreement: float | None  # None: no agreement criterion (float tier)
    floor: dict | None
    real_disagreements: list[int] = field(default_factory=list)   # input indices, clear inputs
    near_tie_flips: list[int] = field(default_factory=list)       # input indices, near-ties
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verdict: str = ""                       # pass, or what the failure looks like
    unjudged: list[str] = field(default_factory=list)   # criteria judged on fewer than MIN_JUDGED inputs
    accepted_unjudged: bool = False         # passes only because accept_unjudged let it

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return asdict(self)


def unjudged_criteria(tier: str, n: int, n_clear: int, floor: Floor | dict | None) -> list[str]:
    """Each criterion of `tier` that rests on fewer than MIN_JUDGED inputs, and on how many."""
    out, t = [], TIERS[tier]
    if n < MIN_JUDGED:
        what = "accuracy drop" if t.accuracy_drop else "outputs against Keras"
        out.append(f"{what} on {n} inputs (fewer than {MIN_JUDGED})")
    if t.agreement is not None and n_clear < MIN_JUDGED:
        out.append(f"top-1 agreement on {n_clear} clear inputs (fewer than {MIN_JUDGED})")
    if t.floor and floor is not None:
        f_clear = floor["n_clear"] if isinstance(floor, dict) else floor.n_clear
        if f_clear < MIN_JUDGED:
            out.append(f"the floor on {f_clear} clear inputs (fewer than {MIN_JUDGED})")
    return out


def judge(tier: str, probs, source_probs, y, groups, p: ParityConfig, floor: Floor | None = None,
          seed: int = 0) -> Judgement:
    """The gate's decision for one quantized (or fp16) file on its tier (TIERS). `groups`: each
    input's source image."""
    t = TIERS[tier]
    probs = np.asarray(probs, np.float64)
    source_probs = np.asarray(source_probs, np.float64)
    y = np.asarray(y)
    groups = np.asarray(groups)
    n = len(y)
    top, src_top = probs.argmax(-1), source_probs.argmax(-1)
    same = (top == src_top).astype(np.float64)
    clear = clear_mask(source_probs, p.clear_margin)
    res = points_per_image(groups)
    file_ok, src_ok = (top == y), (src_top == y)
    d, dlo, dhi = paired_difference(src_ok, file_ok, groups, seed=seed)
    a, alo, ahi = group_bootstrap(same, np.ones_like(same), groups, seed=seed)
    c, clo, chi = group_bootstrap(same * clear, clear.astype(np.float64), groups, seed=seed)
    if t.floor:
        base = floor.clear_agreement if floor is not None and floor.n_clear else 1.0
        required = base - p.floor_slack / 100.0
    else:
        required = getattr(p, t.agreement) if t.agreement else None
    j = Judgement(n, len(np.unique(groups)), res, float(file_ok.mean()), float(src_ok.mean()), d * 100,
                  [dlo * 100, dhi * 100], a, [alo, ahi], p.clear_margin, int(clear.sum()), int(n - clear.sum()),
                  c, [clo, chi], required, asdict(floor) if floor is not None else None,
                  [int(i) for i in np.flatnonzero((same == 0) & clear)],
                  [int(i) for i in np.flatnonzero((same == 0) & ~clear)])
    margin = p.max_accuracy_drop
    if t.accuracy_drop and d * 100 > margin + 1e-9:
        j.failures.append(Failure("accuracy_drop", f"accuracy drop {d * 100:.1f} points [95 % {dlo * 100:.1f}, {dhi * 100:.1f}] > "
                          f"{margin:g} (over {j.n_images} images)"))
    if required is not None and clear.any() and c < required - 1e-9:
        against = (f"the floor {floor.clear_agreement:.1%} ({floor.how}) - {p.floor_slack:g} points"
                   if t.floor and floor is not None else f"{required:.0%}")
        j.failures.append(Failure("agreement", f"top-1 agreement on clear inputs {c:.1%} [95 % {clo:.1%}, {chi:.1%}] < {required:.1%} "
                          f"({against}; {j.n_clear} clear inputs, {j.n_left_out} near-ties left out)"))
    j.unjudged = unjudged_criteria(tier, n, j.n_clear, floor)
    if j.unjudged and p.accept_unjudged:
        j.accepted_unjudged = True
        j.notes.append(f"NOT JUDGED, shipped by --accept-unjudged: {'; '.join(j.unjudged)}")
    elif j.unjudged:
        j.failures += [Failure("not_judged", NOT_JUDGED + u) for u in j.unjudged]
    if t.accuracy_drop:
        if res > margin:
            j.notes.append(f"too few images to resolve the {margin:g}-point margin: each of the {j.n_images} "
                           f"validation images carries {res:.1f} points; more validation images (--val DIR, or a "
                           f"larger --val-split) would")
        elif not j.failures and dhi * 100 > margin:
            j.notes.append(f"the accuracy-drop interval reaches {dhi * 100:.1f} points: these {j.n_images} images "
                           f"cannot rule out a drop above the {margin:g}-point margin (more images would)")
    j.verdict = describe(j)
    return j


def describe(j: Judgement) -> str:
    """pass, or whether a failure looks like near-ties or a real accuracy loss."""
    if j.passed:
        return "pass, NOT JUDGED (--accept-unjudged)" if j.accepted_unjudged else "pass"
    found = codes(j.failures)
    if found == {"not_judged"}:
        return (f"not judged: too few inputs ({'; '.join(j.unjudged)}); more validation images or --parity-inputs "
                "would judge it, --accept-unjudged ships it marked")
    if "input_contract" in found:
        return "breaks the input contract: its declared input quantization is not raw pixels"
    if "accuracy_drop" in found:
        return (f"real accuracy loss: {j.accuracy_drop_points:.1f} points below its source model "
                f"({len(j.real_disagreements)} clear inputs disagree)")
    return (f"disagrees with its source model where the model is clear ({len(j.real_disagreements)} of {j.n_clear} "
            f"clear inputs; {len(j.near_tie_flips)} near-tie flips not counted) at "
            f"{'the same' if abs(j.accuracy_drop_points) < j.points_per_image else 'a different'} accuracy: "
            "a different model, not rounding")
