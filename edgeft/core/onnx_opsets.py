"""The ONNX opsets an export may ask for: from MIN_OPSET to the highest the installed tf2onnx
converts. Read from tf2onnx's own table (`tf2onnx.constants.OPSET_TO_IR_VERSION`, the opsets its
graph writer accepts) without importing tf2onnx, whose package imports TensorFlow: a typed
`--opset` is refused before TensorFlow loads, as every typed value is."""
from __future__ import annotations

import ast
import functools
import importlib.util
from importlib import metadata
from pathlib import Path

from edgeft.core.errors import UserError

# Measured with tf2onnx 1.17 and ONNX Runtime on MobileNetV2: opsets 1 to 5 leave FusedBatchNormV3
# unconverted (an invalid file, after tf2onnx's own tracebacks), 6 has no Add kernel in ONNX Runtime,
# 7 and 8 fail at run time (a buffer shape mismatch); 9 to 18 give Keras' outputs exactly. tf2onnx
# tests 14 to 18 and says 6 to 13 "should work".
MIN_OPSET = 9


@functools.lru_cache(maxsize=1)
def tf2onnx_opsets() -> tuple[int, int] | None:
    """(lowest, highest) opset in tf2onnx's OPSET_TO_IR_VERSION table, or None when tf2onnx is not
    installed or keeps its table elsewhere (then nothing is refused here: tf2onnx says)."""
    try:
        spec = importlib.util.find_spec("tf2onnx")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    constants = Path(next(iter(spec.submodule_search_locations))) / "constants.py"
    try:
        tree = ast.parse(constants.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "OPSET_TO_IR_VERSION" for t in node.targets):
            try:
                table = ast.literal_eval(node.value)
            except ValueError:
                return None
            opsets = [k for k in table if isinstance(k, int)] if isinstance(table, dict) else []
            return (min(opsets), max(opsets)) if opsets else None
    return None


def check_opset(opset: int) -> None:
    """UserError (one line) for an opset outside what edgeft can export with this tf2onnx."""
    known = tf2onnx_opsets()
    if known is None:
        return
    low, high = max(MIN_OPSET, known[0]), known[1]
    if not low <= opset <= high:
        try:
            version = f"tf2onnx {metadata.version('tf2onnx')}"
        except metadata.PackageNotFoundError:
            version = "tf2onnx"
        raise UserError(f"--opset must be from {low} to {high}, got {opset} ({version} converts up to opset "
                        f"{high}; below {MIN_OPSET} the files it writes do not load or run in ONNX Runtime)")
