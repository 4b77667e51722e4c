"""One frozen config object, composed of one dataclass per concern.

Every field is also a CLI flag (`--lr-head` for `lr_head`) and a key of `--config run.yaml`
(flat `lr_head: 1e-4`, or nested under its section `train: {lr_head: 1e-4}`). The resolved config
is written into each run directory as `config.yaml`, which `--config` reads back unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from edgeft.core.errors import UserError


AUGMENT_POLICIES = ("auto", "photo", "upright", "none", "flip-rotate-zoom")
RECIPES_NAMES = ("default", "seed")
QUOTE_LIMIT = 200                 # characters of a user's value an error message quotes
CONFIG_MAX_BYTES = 1 << 20        # a config file is a few hundred bytes; more is not a config
CONFIG_MAX_DEPTH = 8              # sections hold keys: two levels; a little room for lists
SEED_MAX = 2**32 - 1              # numpy's and TensorFlow's seeds are 32-bit
# The seed's recipe, exactly: what `--recipe seed` sets for every key not given beside it.
SEED_RECIPE = {"head": "flatten", "dense": 256, "dropout": 0.5, "l2": 0.0, "lr_head": 1e-4, "head_epochs": 10,
               "head_schedule": "constant", "finetune_epochs": 10, "lr_finetune": 1e-5, "unfreeze": "0.3",
               "schedule": "cosine", "warmup": 0.0, "label_smoothing": 0.0, "class_weight": "none",
               "augment_policy": "none", "augment_views": 1, "augment_online": False, "patience": 3,
               "keep_stage1_if_better": False}
# What a run made before the recipe did, for the keys its config.yaml lacks (from_yaml_file): no
# augmentation unless its `augment` key says so (mapped below), no smoothing, no class weights.
BEFORE_RECIPE = {"recipe": "seed", "l2": 0.0, "head_schedule": "constant", "warmup": 0.0, "label_smoothing": 0.0,
                 "class_weight": "none", "augment_views": 1, "augment_online": False, "augment_policy": "none",
                 "keep_stage1_if_better": False}


HEAD_CHOICES = ("gap", "flatten", "auto")   # auto: chosen in stage 1 (edgeft.train.stage1), GAP the prior


def opt(default, help: str, **kw):
    """A config field with its CLI help text (kept next to the field so they cannot drift)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class DataConfig:
    folder: str | None = opt(None, "image folder, one sub-folder per class (none: the offline demo)",
                             positional=True)
    val_dir: str | None = opt(None, "separate validation folder (same class sub-folders)", flag="--val")
    val_split: float = opt(0.2, "fraction of each class held out for validation (stratified, seeded; taken "
                                "from what the test split leaves)")
    test_split: float = opt(0.1, "fraction of each class held out as a test split that nothing is tuned on "
                                 "(stratified, seeded, taken before the validation split; 0: none)")
    test_dir: str | None = opt(None, "separate test folder (same class sub-folders); replaces --test-split",
                               flag="--test")
    image_size: int | None = opt(None, "square input size in pixels (default: the backbone's)")
    batch_size: int = opt(32, "batch size per replica")
    augment_policy: str = opt("auto", "training augmentation: photo (random resized crop, horizontal flip, "
                                      "brightness / contrast), upright (photo without flips: digits, text, signs), "
                                      "none, flip-rotate-zoom (the old --augment: Keras layers, end to end); auto: "
                                      "photo, upright or none, whichever scores best in cross-validation of the head",
                              choices=AUGMENT_POLICIES)
    augment_views: int | None = opt(None, "augmented views of every training image whose backbone features stage 1 "
                                          "caches (the first is the image itself); auto: by the folder's size "
                                          "(docs/training.md)", auto=True)
    augment_online: bool = opt(False, "stage 1 runs the backbone on fresh augmentations every epoch (end to end) "
                                      "instead of caching the features of a few views (slower; docs/training.md)")
    strict: bool = opt(False, "treat any unreadable image as an error instead of skipping it")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = opt("mobilenet_v2", "backbone from the registry (see models/README.md), or FILE.keras / FILE.h5: "
                                        "your own image model (docs/training.md; recorded as file:<sha256>)")
    backbone_output: str | None = opt(None, "--backbone FILE: the layer whose output is the features (a full "
                                            "classifier's last feature layer; default: the model's output)")
    preprocess: str | None = opt(None, "--backbone FILE: what its weights expect from raw RGB 0-255: "
                                       "scale=S,offset=O, mean=M,std=S (1 or 3 values each) or none")
    backbone_file: str | None = opt(None, "where the backbone file was read from (recorded by finetune; "
                                          "finetune --resume reads it again, checked by sha256)")
    alpha: float | None = opt(None, "width multiplier for MobileNets (default 1.0)")
    weights: str = opt("imagenet", "backbone weights: imagenet, none, or PATH to a backbone-only weights file "
                                   "(efficientnet_lite*: also a PyTorch .pth state_dict, or .h5 / .keras by layer name)")
    head: str = opt("auto", "pooling before the classifier: gap, flatten, or auto (GAP unless Flatten is better "
                            "by a paired test in stage 1's cross-validation, docs/training.md)",
                    choices=HEAD_CHOICES)
    dense: int = opt(0, "units of a hidden Dense relu layer in the head (0: none)")
    dropout: float = opt(0.2, "dropout before the output layer")
    l2: float = opt(1e-4, "L2 weight decay on the head's Dense kernels (0: none)")


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = opt("default", "a set of defaults for every key not given: default (docs/training.md) or seed "
                                 "(Flatten -> Dense 256 -> Dropout 0.5, Adam 1e-4, no augmentation, 10 + 10 epochs)",
                      choices=RECIPES_NAMES)
    head_epochs: int | None = opt(None, "stage 1 epochs (backbone frozen, new head trained); auto: by the number "
                                        "of training rows (docs/training.md)", auto=True)
    lr_head: float | None = opt(None, "stage 1 learning rate (Adam); auto: chosen by cross-validation of the head "
                                      "on the cached features", auto=True)
    label_smoothing: float | None = opt(None, "label smoothing in [0, 1) for every training stage; auto: 0 or 0.1 "
                                              "by cross-validation of the head", auto=True)
    class_weight: str = opt("auto", "class weights in training: balanced (n / (classes x n_class)), none; auto: "
                                    "balanced when the largest class has more than 3x the images of the smallest",
                            choices=("auto", "balanced", "none"))
    warmup: float = opt(0.1, "fraction of each stage's steps with a linear learning-rate warm-up (stage 1 and 2)")
    head_schedule: str = opt("cosine", "stage 1 learning-rate schedule", choices=("cosine", "constant"))
    finetune_epochs: int | None = opt(None, "stage 2 epochs (top of the backbone unfrozen); 0 skips stage 2; auto: "
                                            "by the number of training images (docs/training.md)", auto=True)
    lr_finetune: float = opt(1e-4, "stage 2 learning rate (Adam; measured: docs/training.md)")
    keep_stage1_if_better: bool = opt(True, "after stage 2, keep stage 1's weights when stage 2 ended with a worse "
                                            "validation loss than stage 1 (the best stage-2 epoch is restored first)")
    unfreeze: str = opt("blocks:0.3", "stage 2 layers to train: whole top blocks covering a fraction of the "
                                      "backbone's layers (blocks:0.3) or a number of them (blocks:2), a count of top "
                                      "layers (20), a fraction (0.3) or a layer/block name (block5_conv1, block_13)")
    schedule: str = opt("cosine", "stage 2 learning-rate schedule", choices=("cosine", "plateau", "constant"))
    patience: int = opt(3, "stage 2 early stopping patience in epochs (0: off); best weights restored")
    seed: int = opt(42, "random seed (split, init, shuffling)")
    mixed_precision: bool = opt(False, "float16 compute on GPU (softmax stays float32)")
    xla: bool = opt(False, "compile training steps with XLA")
    steps_per_execution: int = opt(16, "training steps per call into TensorFlow in stage 2 and QAT (fewer "
                                       "Python round trips; 1 gives Keras' default)")
    strategy: str = opt("auto", "tf.distribute strategy", choices=("auto", "default", "mirrored", "multiworker"))


@dataclass(frozen=True)
class QATConfig:
    qat_epochs: int = opt(0, "quantization-aware training epochs after stage 2 (0: none)")
    lr_qat: float = opt(1e-4, "QAT learning rate (measured: docs/quantization.md)")
    qat_freeze_epochs: int = opt(1, "last QAT epochs with activation ranges frozen (BatchNorm is always frozen)")
    qat_compare: bool = opt(True, "after QAT, build the PTQ and QAT int8 files and print their accuracy by LiteRT "
                                  "side by side")


@dataclass(frozen=True)
class ExportConfig:
    rep_samples: int = opt(200, "representative images for int8 calibration (from the training split)")
    opset: int = opt(17, "ONNX opset")
    int8_source: str = opt("auto", "int8 TFLite from the QAT model (qat) or by post-training quantization (ptq); "
                                   "auto: both when the run has a QAT model; QAT's ships only when it passes the gate and is "
                                   "clearly more accurate than PTQ's (paired 95 % interval above 0), else PTQ's",
                        choices=("auto", "qat", "ptq"))
    int8_granularity: str = opt("per-channel", "int8 weight scales: per-channel (TFLite's default) or per-tensor "
                                               "(accelerators and DSPs that need it); QAT follows it",
                                choices=("per-channel", "per-tensor"))
    int8_io: str = opt("uint8", "input/output type of the int8 TFLite file: uint8 (camera frames; MediaPipe, "
                                "Android) or int8", choices=("uint8", "int8"))
    int8_report: bool = opt(False, "write export/int8_report.md (+ .json, .png): each quantized op's error against "
                                   "the float model and the few ops most of the output error comes from, for every "
                                   "int8 file (a file that fails the gate always gets one)")
    int8_recover: str = opt("auto", "an int8 file (TFLite, ONNX) that fails the gate: auto tries other calibrations "
                                    "(and, per-tensor, equalization), judged by the gate on inputs the screening did not "
                                    "use; allow-mixed also ships model_mixed.* with the fewest most-sensitive ops kept "
                                    "float (export then passes); off: no recovery (docs/quantization.md)",
                            choices=("auto", "off", "allow-mixed"))


@dataclass(frozen=True)
class ParityConfig:
    float_atol: float = opt(1e-4, "max |prob difference| for float formats")
    fp16_atol: float = opt(2e-2, "max |prob difference| for float16 formats")
    fp16_agreement: float = opt(0.99, "min top-1 agreement for float16 formats")
    dynamic_atol: float = opt(0.25, "max |prob difference| for dynamic-range formats (activations are quantized "
                                    "at run time, per tensor)")
    dynamic_agreement: float = opt(0.98, "min top-1 agreement for dynamic-range formats")
    max_accuracy_drop: float = opt(3.0, "quantized files (int8, dynamic): the most accuracy, in points, a file may "
                                         "lose against its source model on the parity inputs, paired (measured: "
                                         "docs/export.md)")
    clear_margin: float = opt(0.25, "an input counts for top-1 agreement only where the source model's top-1 "
                                    "probability exceeds its second by this much (near-ties are listed, not counted)")
    floor_slack: float = opt(1.0, "int8 files: the most top-1 agreement (points, on clear inputs) a file may lose "
                                  "below its floor, the same file run by a second implementation in the same run")
    floor_inputs: int = opt(300, "parity inputs the second implementation (LiteRT reference kernels, ONNX Runtime "
                                 "without fusions) runs to measure the floor (spread over the images; slow kernels)")
    parity_inputs: int = opt(1000, "inputs the gate compares: the validation split plus deterministic augmented "
                                   "copies up to this many; a larger split is sampled down")
    parity_augment: str = opt("auto", "how the gate's copies vary the validation images: mild (shift, brightness, "
                                      "contrast), flip (mild + mirroring), none (the images alone); auto: flip only "
                                      "when the run trained with mirroring, else mild",
                              choices=("auto", "mild", "flip", "none"))
    accept_unjudged: bool = opt(False, "ship a file whose gate criteria rest on fewer inputs than the gate needs to "
                                       "judge them (docs/export.md), marked NOT JUDGED in parity.md, the manifest and "
                                       "the console (default: such a file fails the gate)")
    client_inputs: int = opt(200, "inputs (the first parity inputs) each client of the client matrix runs: LiteRT "
                                  "default and reference kernels, MediaPipe, TFLite Micro, ONNX Runtime, OpenCV (TFLite "
                                  "Micro, and the reference kernels on a float file, run the first 30, checked "
                                  "against LiteRT's); 0 skips the matrix")


@dataclass(frozen=True)
class EdgeftConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    parity: ParityConfig = field(default_factory=ParityConfig)


def section_classes() -> dict[str, type]:
    return {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "qat": QATConfig,
            "export": ExportConfig, "parity": ParityConfig}


def key_sections() -> dict[str, str]:
    """Flat key -> section name (field names are unique across sections)."""
    return {f.name: sec for sec, cls in section_classes().items() for f in fields(cls)}


def _quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) for an error message, at most `limit` characters (a 4 MB value is not one line)."""
    text = repr(value) if not isinstance(value, (dict, list)) or len(str(value)) < 4 * limit else \
        f"<{type(value).__name__} of {len(value)} items>"
    return text if len(text) <= limit else text[:limit - 5] + " ...'"


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _coerce(cls, name: str, value: Any) -> Any:
    """`value` (from YAML or a flag) as the field's type. YAML's own types are kept apart: a
    boolean is not a number (`batch_size: true` is refused, not read as 1), a list or mapping is
    nothing but a section, and a float must be finite."""
    f = next(f for f in fields(cls) if f.name == name)
    typ = str(f.type)
    want = typ.replace(" | None", "")
    if f.metadata.get("auto") and (value is None or (isinstance(value, str) and value.strip().lower() == "auto")):
        return None
    if value is None:
        if "None" in typ:
            return None
        raise UserError(f"config key {name!r} cannot be empty")
    if isinstance(value, (list, tuple, dict)) or ("bool" not in typ and isinstance(value, bool)):
        raise UserError(f"config key {name!r} needs {_a(want)}, got {_type_name(value)} ({_quoted(value)})")
    try:
        if "bool" in typ:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            if value not in (0, 1):
                raise ValueError
            return bool(value)
        if "int" in typ and "float" not in typ:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if "float" in typ:
            value = float(value)
            if not math.isfinite(value):
                raise UserError(f"config key {name!r} (--{name.replace('_', '-')}) must be a finite number, "
                                f"got {value}")
            return value
        value = str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"config key {name!r}: {_quoted(value)} is not a valid {want}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"config key {name!r}: {_quoted(value)} is not one of {', '.join(choices)}")
    return value


def _a(typ: str) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(typ, typ)


def build_config(values: dict[str, Any] | None = None, base: EdgeftConfig | None = None) -> EdgeftConfig:
    """A config from flat or nested keys on top of `base` (defaults when None), validated."""
    cfg = base or EdgeftConfig()
    flat = upgrade_keys(_flatten(values or {}))
    if flat.get("recipe") == "seed":   # the recipe's values for every key not given beside it
        flat = {**SEED_RECIPE, **flat}
    where = key_sections()
    unknown = sorted(k for k in flat if k not in where)
    if unknown:
        raise UserError(f"unknown config key(s): {', '.join(unknown)}")
    per_section: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        sec = where[key]
        per_section.setdefault(sec, {})[key] = _coerce(section_classes()[sec], key, value)
    for sec, changes in per_section.items():
        cfg = replace(cfg, **{sec: replace(getattr(cfg, sec), **changes)})
    validate(cfg)
    return cfg


# Keys of configs written by earlier versions (every run's config.yaml, every export manifest),
# mapped to today's keys when read: old runs and exports keep working.
def _old_parity_flip(v):
    # the old default (True) mirrored copies of every run; today the gate mirrors only runs that
    # trained with mirroring ("auto"); False was "never mirror"
    return {"parity_augment": "auto" if _coerce_bool(v) else "mild"}


def _old_augment(v):
    # the old --augment: Keras' RandomFlip / RandomRotation / RandomZoom, stage 1 end to end
    if not isinstance(v, bool) and str(v).lower() not in ("true", "false", "yes", "no", "1", "0"):
        raise UserError(f"config key 'augment': {_quoted(v)} is not a valid bool (true or false)")
    on = _coerce_bool(v)
    return {"augment_policy": "flip-rotate-zoom" if on else "none", "augment_online": on}


RENAMED_KEYS = {
    "augment": _old_augment,
    "parity_flip": _old_parity_flip,
    # a fraction of 1 then, points now
    "int8_max_drop": lambda v: {"max_accuracy_drop": round(float(v) * 100, 6)},
    # one margin for every quantized file now, against its own source model
    "int8_qat_max_drop": lambda v: {},
    # replaced by agreement on clear inputs against the floor measured in the same run
    "int8_agreement": lambda v: {},
}


def _coerce_bool(v) -> bool:
    return v.lower() in ("true", "yes", "1") if isinstance(v, str) else bool(v)


def upgrade_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """Old keys mapped to today's (a today's key given beside its old name wins)."""
    out = {k: v for k, v in flat.items() if k not in RENAMED_KEYS}
    for key, value in flat.items():
        if key in RENAMED_KEYS:
            for new, new_value in RENAMED_KEYS[key](value).items():
                out.setdefault(new, new_value)
    return out


def _flatten(values: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key == "paths_from_run":   # a run's record of its paths (edgeft.core.paths), not a config key
            continue
        if key in section_classes():
            if not isinstance(value, dict):
                raise UserError(f"config key {key!r} is a section: it needs a mapping of its keys (e.g. "
                                f"{key}: {{{fields(section_classes()[key])[-1].name}: ...}}), got "
                                f"{_type_name(value)} ({_quoted(value)})")
            flat.update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


PARITY_INPUTS_MAX = 100_000      # the gate's intervals are already narrower than 0.5 point at 10,000
AUGMENT_VIEWS_MAX = 32           # stage 1 runs the backbone once per view: 32 views, 32 feature passes
BATCH_SIZE_MAX = 1024            # the input batch alone: 1024 x 224 x 224 x 3 float32 = 0.6 GB (12 GB at 1024 px)
DENSE_MAX = 4096                 # head units: VGG16's 25,088 flattened features x 4096 = 103 M weights (1.6 GB with Adam)
REP_SAMPLES_MAX = 2_000          # calibration images held as float32 (100-500 recommended; 10x the default)


def _check_bounded_counts(cfg: EdgeftConfig) -> None:
    """Counts the user types that size memory or disk: refused past a fixed bound (and, where the
    gate runs, past what this machine's free memory holds: `check_parity_memory`), before any work
    (docs/reliability.md)."""
    pc, d = cfg.parity, cfg.data
    if pc.parity_inputs > PARITY_INPUTS_MAX:
        raise UserError(f"--parity-inputs must be at most {PARITY_INPUTS_MAX:,}, got {pc.parity_inputs:,}")
    if d.augment_views is not None and d.augment_views > AUGMENT_VIEWS_MAX:
        raise UserError(f"--augment-views must be at most {AUGMENT_VIEWS_MAX} (stage 1 runs the backbone once per "
                        f"view), got {d.augment_views}")
    for flag, value, bound, why in (
            ("--batch-size", d.batch_size, BATCH_SIZE_MAX, "the input batch alone is batch x size x size x 3 float32"),
            ("--dense", cfg.model.dense, DENSE_MAX, "the head's weights grow with features x units"),
            ("--rep-samples", cfg.export.rep_samples, REP_SAMPLES_MAX, "100-500 calibrate int8; they are held as "
                                                                        "float32")):
        if value > bound:
            raise UserError(f"{flag} must be at most {bound:,} ({why}), got {value:,}")


def check_parity_memory(cfg: EdgeftConfig) -> None:
    """Refuses (before any work) parity inputs that this machine's free memory cannot hold: the gate
    keeps them as one float32 array (data.datasets.parity_inputs). Called by the commands that run
    the gate (export, parity, qat), not by finetune: a run may be trained here and exported elsewhere."""
    from edgeft.core.registry import get_backbone

    pc, d = cfg.parity, cfg.data
    size = d.image_size or get_backbone(cfg.model.backbone).default_size
    images = pc.parity_inputs + cfg.export.rep_samples   # the gate's inputs and the int8 calibration images
    need = images * size * size * 3 * 4
    free = available_memory()
    if free is not None and need > free:
        raise UserError(f"--parity-inputs {pc.parity_inputs:,} and --rep-samples {cfg.export.rep_samples:,} at "
                        f"{size} px need about {need / 2**30:.1f} GiB of memory (images x {size} x {size} x 3 "
                        f"float32), but {free / 2**30:.1f} GiB is free: use fewer --parity-inputs")


def available_memory() -> int | None:
    """Bytes of RAM free now (Linux and macOS), or None where the OS does not say."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def validate(cfg: EdgeftConfig) -> None:
    d, m, t = cfg.data, cfg.model, cfg.train
    # every float of every section finite (NaN slips through any `x <= 0` check: NaN <= 0 is False)
    for sec in section_classes():
        for f in fields(section_classes()[sec]):
            v = getattr(getattr(cfg, sec), f.name)
            if "float" in str(f.type) and v is not None and not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise UserError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")
    if not 0.0 <= d.val_split < 1.0:
        raise UserError(f"--val-split must be in [0, 1), got {d.val_split}")
    if not 0.0 <= d.test_split < 1.0:
        raise UserError(f"--test-split must be in [0, 1), got {d.test_split}")
    if not d.test_dir and not d.val_dir and d.test_split + d.val_split >= 1.0:
        raise UserError(f"--test-split + --val-split must be below 1 (nothing left to train on), "
                        f"got {d.test_split} + {d.val_split}")
    from edgeft.core import byob
    from edgeft.core.registry import check_image_size, check_weights, get_backbone

    if byob.is_file_backbone(m.backbone):   # syntax, extension, presence: before TF loads
        byob.check(m, d.image_size)
    else:
        if m.backbone_output or m.preprocess:
            raise UserError(f"--backbone-output and --preprocess apply to --backbone FILE.keras / FILE.h5, "
                            f"not to the registry's {m.backbone} (its preprocessing is its own)")
        check_weights(get_backbone(m.backbone), m.weights)   # e.g. lite3 ImageNet, a .pth for VGG16: before TF loads
        if d.image_size is not None:
            check_image_size(get_backbone(m.backbone), d.image_size)
    if d.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if t.steps_per_execution < 1:
        raise UserError("--steps-per-execution must be at least 1")
    if d.augment_views is not None and d.augment_views < 1:
        raise UserError(f"--augment-views must be 1 or more (1: the images alone), got {d.augment_views}")
    if t.label_smoothing is not None and not 0.0 <= t.label_smoothing < 1.0:
        raise UserError(f"--label-smoothing must be in [0, 1), got {t.label_smoothing}")
    if not 0.0 <= t.warmup < 1.0:
        raise UserError(f"--warmup is a fraction of each stage's steps: in [0, 1), got {t.warmup}")
    if m.l2 < 0:
        raise UserError(f"--l2 must be 0 or more, got {m.l2}")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"--dropout must be in [0, 1), got {m.dropout}")
    if m.dense < 0:
        raise UserError("--dense must be 0 or more")
    for name in ("head_epochs", "finetune_epochs", "patience"):
        if getattr(t, name) is not None and getattr(t, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more")
    for name, v in (("lr_head", t.lr_head), ("lr_finetune", t.lr_finetune), ("lr_qat", cfg.qat.lr_qat)):
        if v is not None and not v > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {v}")
    if cfg.qat.qat_epochs < 0:
        raise UserError("--qat-epochs must be 0 or more")
    if cfg.export.rep_samples < 1:
        raise UserError("--rep-samples must be at least 1")
    from edgeft.core.onnx_opsets import check_opset

    check_opset(cfg.export.opset)   # from tf2onnx's own table, before TensorFlow loads
    if cfg.qat.qat_freeze_epochs < 0:
        raise UserError("--qat-freeze-epochs must be 0 or more")
    pc = cfg.parity
    if not 0.0 < pc.max_accuracy_drop < 100.0:
        raise UserError(f"--max-accuracy-drop is in points: a number above 0 and below 100, got {pc.max_accuracy_drop}")
    if not 0.0 <= pc.clear_margin < 1.0:
        raise UserError(f"--clear-margin must be in [0, 1), got {pc.clear_margin}")
    if not 0.0 <= pc.floor_slack < 100.0:
        raise UserError(f"--floor-slack is in points: 0 or more and below 100, got {pc.floor_slack}")
    if pc.floor_inputs < 0:
        raise UserError("--floor-inputs must be 0 or more (0: no floor; int8 agreement is then judged against 100 %)")
    if not 0 <= t.seed <= SEED_MAX:
        raise UserError(f"--seed must be from 0 to {SEED_MAX} (2**32 - 1: the random generators' range), got {t.seed}")
    if cfg.parity.parity_inputs < 1:
        raise UserError("--parity-inputs must be at least 1")
    _check_bounded_counts(cfg)
    if cfg.parity.client_inputs < 0:
        raise UserError("--client-inputs must be 0 or more")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping; every way it can be unusable is one line (UserError): not a
    file, too large, not UTF-8 text, not YAML, YAML anchors or aliases (a 414-byte "billion laughs"
    file grew past 3 GiB; configs never need them), nesting deeper than a config has."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"--config {p} is a directory, not a YAML file")
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        if p.stat().st_size > CONFIG_MAX_BYTES:
            raise UserError(f"config file {p} has {p.stat().st_size:,} bytes: a config holds a few keys "
                            f"(at most {CONFIG_MAX_BYTES:,} bytes)")
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"config file {p} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise UserError(f"config file {p} cannot be read: {os.strerror(e.errno) if e.errno else e}") from None
    if "\0" in text:
        raise UserError(f"config file {p} is not text (it holds NUL bytes)")
    try:
        depth = 0
        for token in yaml.scan(text):
            if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
                raise UserError(f"config file {p} uses YAML anchors or aliases (line {token.start_mark.line + 1}): "
                                f"edgeft configs hold plain keys and values; write the values out")
            if isinstance(token, (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
                                  yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)):
                depth += 1
                if depth > CONFIG_MAX_DEPTH:
                    raise UserError(f"config file {p} nests deeper than {CONFIG_MAX_DEPTH} levels "
                                    f"(line {token.start_mark.line + 1}): a config holds sections of keys")
            elif isinstance(token, (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)):
                depth -= 1
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config file {p} is not valid YAML: {clip_line(str(e))}") from None
    except RecursionError:
        raise UserError(f"config file {p} nests too deeply to read") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of keys to values")
    return data


def clip_line(text: str, limit: int = QUOTE_LIMIT) -> str:
    line = (text.splitlines() or [""])[0]
    return line if len(line) <= limit else line[:limit - 4] + " ..."


def to_dict(cfg: EdgeftConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: EdgeftConfig, run: str | Path | None = None) -> str:
    """The config as YAML; for a run's config.yaml (`run`: its directory) every path absolute, with
    the same paths relative to the run beside the sections (edgeft.core.paths)."""
    values = to_dict(cfg)
    if run is not None:
        from edgeft.core import paths

        values = paths.record(values, run)
    return yaml.safe_dump(values, sort_keys=False)


def from_yaml_file(path: str | Path) -> EdgeftConfig:
    """A run's config.yaml (every later stage reads its run this way: resume, qat, export, parity).

    A config.yaml written before the recipe (no `recipe` key) reads its missing keys as what that
    run did (BEFORE_RECIPE: no augmentation unless its old `augment` key says so, no smoothing, no
    class weights, no warm-up), never as today's defaults.
    A config.yaml without a `head` key reads it as gap, the default before `--head auto`.
    A config.yaml written before edgeft had a test split has no `test_split` key: it is read as 0,
    not as today's default, so the run's train/val split is rebuilt exactly as it was trained
    (a test split would take images out of both). `--config FILE` for a new run reads the file
    with `load_yaml` instead, where a missing key takes the default like any other.
    Each recorded path reads as it is found now: absolute, else relative to the run (core/paths.py).
    """
    from edgeft.core import paths

    raw = load_yaml(path)
    values = paths.resolve(_flatten(raw), raw.get(paths.FROM_RUN), Path(path).parent)
    values.setdefault("test_split", 0.0)
    values.setdefault("head", "gap")   # written before --head auto was the default: GAP was
    if "recipe" not in values:   # made before the recipe: the keys it lacks read as what it did
        values = {**BEFORE_RECIPE, **upgrade_keys(values)}
    return build_config(values)
