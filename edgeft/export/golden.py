"""Golden vectors: what each exported file gave, at export time, on a few validation images.

`write_golden` writes RUN/export/golden/ (format in edgeft/device.py's docstring):

    golden/inputs/000.png ...   a few validation images, the original files byte for byte
    golden/expected.json        per input the sha256 of its decoded pixels; per exported file its
                                probabilities on those inputs and its tier

On the device, `python edgeft_device.py verify MODEL golden/` decodes the same files, runs the
model and compares, with no TensorFlow: it checks the device's image decoding, its runtime and
the file itself in one go. Expected outputs are made by the device script's own runners
(`edgeft.device`), each image run alone, exactly as verify runs it, so replaying on the export
machine gives the same numbers bit for bit.

The tiers here bound the difference between one file on two machines, not between a file and
Keras (that is the parity gate's job): float files may drift by rounding only; quantized files
by a few quantization steps (other CPUs take other integer kernels), and must keep the top-1
class. Inputs are picked spread over the classes and, where possible, with a top-1 margin of at
least twice the file's bound, so the top-1 check can only trip on a real difference.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgeft import device
from edgeft.core import rundir
from edgeft.core.errors import UserError
from edgeft.core.tiers import TIERS as GATE_TIERS

GOLDEN_DIR = "golden"
POOL_FACTOR = 4   # candidates decoded and run per golden input picked
# tier -> (max |Δprob| against the same file's export-time outputs, top-1 must match): the gate's
# tier table (edgeft.core.tiers.TIERS) holds them, with where they were measured
TIERS: dict[str, tuple[float, bool]] = {t.name: (t.golden_atol, t.golden_top1) for t in GATE_TIERS.values()}


def tier_rule(tier: str | dict) -> dict:
    """{"tier", "max_abs_diff", "top1_must_match"} for a tier name (see TIERS), or a dict giving
    "tier" and optionally its own bound / top-1 rule."""
    spec = {"tier": tier} if isinstance(tier, str) else dict(tier)
    name = spec.get("tier")
    tier = GATE_TIERS.get(name)
    if tier is None and not ("max_abs_diff" in spec and "top1_must_match" in spec):
        raise UserError(f"golden vectors: unknown tier {name!r} (choose from {', '.join(GATE_TIERS)})")
    bound, top1 = (tier.golden_atol, tier.golden_top1) if tier is not None else (None, None)
    return {"tier": name, "max_abs_diff": float(spec.get("max_abs_diff", bound)),
            "top1_must_match": bool(spec.get("top1_must_match", top1))}


def _round_robin(groups: list[list[int]], n: int) -> list[int]:
    out, i = [], 0
    while len(out) < n and any(i < len(g) for g in groups):
        out += [g[i] for g in groups if i < len(g)][:n - len(out)]
        i += 1
    return out


def _by_class(indices: list[int], classes: list[str]) -> list[list[int]]:
    order = sorted({classes[i] for i in indices})
    return [[i for i in indices if classes[i] == c] for c in order]


def _margin(probs: np.ndarray) -> np.ndarray:
    top2 = np.sort(probs, axis=-1)[:, -2:] if probs.shape[-1] > 1 else np.concatenate(
        [np.zeros_like(probs), probs], axis=-1)
    return top2[:, 1] - top2[:, 0]


def write_golden(export_dir: str | Path, image_paths: list[str], image_size: int | tuple[int, int],
                 files: dict[str, str | dict], n: int = 8, labels: list[str] | None = None) -> Path:
    """Writes export_dir/golden/ for `files` ({file name in export_dir: tier}) from `n` of
    `image_paths` (validation images; their class is `labels[i]`, else the parent folder name).

    Replaces an existing golden/ whole (built in a hidden folder beside it, then renamed).
    Returns the golden folder. Raises UserError for a missing file or no readable image.
    """
    export_dir = Path(export_dir)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if not files:
        raise UserError("golden vectors: no exported files given")
    rules = {name: tier_rule(tier) for name, tier in files.items()}
    for name in rules:
        if not (export_dir / name).is_file():
            raise UserError(f"golden vectors: {export_dir / name} not found")
    classes = [str(c) for c in labels] if labels is not None else [Path(p).parent.name for p in image_paths]
    if len(classes) != len(image_paths):
        raise UserError(f"golden vectors: {len(image_paths)} images but {len(classes)} labels")

    pool, pixels = [], []
    for i in _round_robin(_by_class(list(range(len(image_paths))), classes), POOL_FACTOR * n):
        try:
            pixels.append(device.load_image(image_paths[i], (h, w)))
            pool.append(i)
        except Exception:  # an unreadable validation file is simply not a golden input
            continue
    if not pool:
        raise UserError("golden vectors: none of the validation images could be read")
    x = np.stack(pixels).astype(np.float32)

    outputs, entries = {}, {}
    for name, rule in rules.items():
        path = export_dir / name
        try:
            runner = device.open_runner(path)
        except device.DeviceError as e:
            raise UserError(f"golden vectors: {e}") from None
        if tuple(runner.input_hw) != (h, w):
            raise UserError(f"golden vectors: {name} takes {runner.input_hw} images, not {(h, w)}")
        # one image per call, as verify runs them: the replay on this machine is exact
        outputs[name] = np.concatenate([runner.predict(x[k:k + 1]) for k in range(len(x))])
        entries[name] = {**rule, "sha256": device.file_sha256(path),
                         "runtime": f"{runner.runtime} {runner.runtime_version}"}
        del runner

    safe = np.ones(len(pool), bool)
    for name, rule in rules.items():
        if rule["top1_must_match"]:
            safe &= _margin(outputs[name]) >= 2 * rule["max_abs_diff"]
    # classes in turn; within a class, inputs with a safe top-1 margin first
    pool_classes = [classes[i] for i in pool]
    groups = [sorted(g, key=lambda k: not safe[k]) for g in _by_class(list(range(len(pool))), pool_classes)]
    picks = _round_robin(groups, n)

    model_labels = device.model_labels(export_dir / next(iter(rules)))[0]
    export_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{GOLDEN_DIR}.", dir=export_dir))
    try:
        (tmp / device.GOLDEN_INPUTS).mkdir()
        inputs = []
        for j, k in enumerate(picks):
            src = Path(image_paths[pool[k]])
            rel = f"{device.GOLDEN_INPUTS}/{j:03d}{src.suffix.lower() or '.img'}"
            shutil.copyfile(src, tmp / rel)
            inputs.append({"file": rel, "label": classes[pool[k]], "source": f"{classes[pool[k]]}/{src.name}",
                           "pixels_sha256": device.pixels_sha256(pixels[k])})
        golden = {"format": device.GOLDEN_FORMAT, "version": device.GOLDEN_VERSION,
                  "decoder_version": device.DECODER_VERSION, "image_size": [h, w],
                  "labels": model_labels, "inputs": inputs,
                  "files": {name: {**entries[name], "outputs": [[float(v) for v in outputs[name][k]] for k in picks]}
                            for name in rules}}
        rundir.write_json(tmp / device.GOLDEN_FILE, golden)
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700
        return _replace_dir(tmp, export_dir / GOLDEN_DIR)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, target: Path) -> Path:
    """Renames `new` onto `target`; an old `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rename(target, old / target.name)
    try:
        os.rename(new, target)
    except OSError:
        if old is not None:   # put the previous golden folder back
            os.rename(old / target.name, target)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target
