"""TensorFlow Lite Micro: C++ sources for microcontrollers, and the TFLM interpreter as a runtime.

`write_tflm` turns a full-integer .tflite file into RUN/export/tflm/: the model as an aligned C
array, a MicroMutableOpResolver with exactly the model's ops, the labels, and a README with the
flash size and the tensor-arena size measured by the TFLite Micro interpreter itself (the pip
package `tflite-micro`). `TFLMRunner` runs the same file in that interpreter for the parity gate.

Which ops TFLM has, from two sources: `RESOLVER_METHODS` (every builtin that
tflite::MicroMutableOpResolver can register, taken from tflite-micro's
micro_mutable_op_resolver.h) names the AddXxx() call for op_resolver.h and rejects any other op at
once; then the model is really loaded by the TFLM interpreter, whose resolver holds every kernel
TFLM has, and any op or op variant it refuses ("Didn't find op for builtin opcode 'X'", a kernel
that fails to prepare) is reported by name. That load runs in a child process, because TFLM
aborts the process (TFLITE_CHECK) on some bad models instead of returning an error.

Imports neither TensorFlow nor, until used, tflite_micro.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from edgeft.core import rundir
from edgeft.core.errors import UserError
from edgeft.nn.runtime import dequantize, quantize

TFLM_DIR = "tflm"
ARRAY_NAME = "g_model_data"

# BuiltinOperator name -> tflite::MicroMutableOpResolver method, from tflite-micro's
# tensorflow/lite/micro/micro_mutable_op_resolver.h (commit 90b983c, 2026-08).
RESOLVER_METHODS = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul", "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "DYNAMIC_UPDATE_SLICE": "AddDynamicUpdateSlice", "EMBEDDING_LOOKUP": "AddEmbeddingLookup",
    "ELU": "AddElu", "EQUAL": "AddEqual", "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill",
    "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv", "FLOOR_MOD": "AddFloorMod",
    "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather", "GATHER_ND": "AddGatherNd",
    "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual", "HARD_SWISH": "AddHardSwish", "IF": "AddIf",
    "L2_NORMALIZATION": "AddL2Normalization", "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu",
    "LESS": "AddLess", "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D",
    "MIRROR_PAD": "AddMirrorPad", "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MUL": "AddMul", "NEG": "AddNeg",
    "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2", "PRELU": "AddPrelu",
    "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable", "REDUCE_ALL": "AddReduceAll",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu", "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2", "ROUND": "AddRound",
    "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin", "SLICE": "AddSlice",
    "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd", "SPACE_TO_DEPTH": "AddSpaceToDepth",
    "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQUEEZE": "AddSqueeze", "SQRT": "AddSqrt",
    "SQUARE": "AddSquare", "SQUARED_DIFFERENCE": "AddSquaredDifference", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf", "TANH": "AddTanh",
    "TRANSPOSE_CONV": "AddTransposeConv", "TRANSPOSE": "AddTranspose", "UNPACK": "AddUnpack",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "VAR_HANDLE": "AddVarHandle",
    "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}
CUSTOM_RESOLVER_METHODS = {"TFLite_Detection_PostProcess": "AddDetectionPostprocess"}


def _runtime():
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise UserError("TFLite Micro needs the tflite-micro package (wheels for Linux x86-64 only): "
                        "pip install tflite-micro") from None
    return runtime


# ---------------------------------------------------------------- the flatbuffer
def flatbuffer_bytes(data: bytes) -> bytes:
    """The TFLite flatbuffer alone: edgeft appends a zip archive with labels.txt to its .tflite
    files; a microcontroller needs only the flatbuffer (the labels go to labels.h), so the archive
    is dropped and costs no flash."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            start = min((info.header_offset for info in zf.infolist()), default=len(data))
    except zipfile.BadZipFile:
        return data
    if data[start:start + 4] != b"PK\x03\x04":   # not an archive after the model: keep every byte
        return data
    return data[:start]


def model_ops(flatbuffer: bytes, what: str = "model") -> list[str]:
    """The model's operators (every subgraph), unique, in order of first use. Custom ops are
    named by their custom code."""
    _runtime()
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as fb

    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    try:
        model = fb.Model.GetRootAsModel(flatbuffer, 0)
        ops = []
        for s in range(model.SubgraphsLength()):
            graph = model.Subgraphs(s)
            for i in range(graph.OperatorsLength()):
                code = model.OperatorCodes(graph.Operators(i).OpcodeIndex())
                builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
                name = names.get(builtin, f"BUILTIN_{builtin}")
                if name == "CUSTOM":
                    name = (code.CustomCode() or b"?").decode()
                if name not in ops:
                    ops.append(name)
    except Exception as e:   # not a TFLite flatbuffer
        raise UserError(f"{what}: not a TFLite model ({(str(e).splitlines() or [type(e).__name__])[0][:120]})") from None
    return ops


def resolver_methods(ops: list[str], what: str = "model") -> list[str]:
    """The MicroMutableOpResolver call for each op; UserError naming the ops TFLM lacks."""
    table = {**RESOLVER_METHODS, **CUSTOM_RESOLVER_METHODS}
    missing = [op for op in ops if op not in table]
    if missing:
        raise UserError(f"{what}: TensorFlow Lite Micro has no kernel for op {', '.join(missing)}; "
                        "change the model (e.g. another activation or head) or export TFLite instead")
    return [table[op] for op in ops]


# ---------------------------------------------------------------- the TFLM interpreter
def _details(d: dict) -> dict:
    q = d["quantization_parameters"]
    scales, zps = np.asarray(q["scales"]).ravel(), np.asarray(q["zero_points"]).ravel()
    return {"shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
            "scale": float(scales[0]) if scales.size else 0.0,
            "zero_point": int(zps[0]) if zps.size else 0}


def _loads(runtime, flatbuffer: bytes, arena: int) -> bool:
    """Whether the model allocates and runs one inference in `arena` bytes."""
    try:
        interp = runtime.Interpreter.from_bytes(flatbuffer, arena_size=arena)
        d = interp.get_input_details(0)
        interp.set_input(np.zeros(d["shape"], d["dtype"]), 0)
        interp.invoke()
    except RuntimeError:
        return False
    return True


def _loads_isolated(runtime, flatbuffer: bytes, arena: int) -> bool:
    """`_loads` in a forked process: TFLM crashes (SIGSEGV) on some arenas that are too small."""
    if not hasattr(os, "fork"):
        return _loads(runtime, flatbuffer, arena)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:   # the child: quiet (TFLM logs every failed allocation), then report by exit code
        ok = False
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            ok = _loads(runtime, flatbuffer, arena)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _probe_in_process(flatbuffer: bytes) -> dict:
    """Runs in the child process: load with a generous arena (the interpreter's own allocation
    report), then bisect for the smallest arena that loads and runs (each try in its own process)."""
    runtime = _runtime()
    generous = max(1 << 20, 16 * len(flatbuffer))
    interp = runtime.Interpreter.from_bytes(flatbuffer, arena_size=generous)
    d = interp.get_input_details(0)
    interp.set_input(np.zeros(d["shape"], d["dtype"]), 0)
    interp.invoke()
    info = {"input": _details(d), "output": _details(interp.get_output_details(0))}
    sys.stdout.flush()
    sys.stderr.flush()
    interp.print_allocations()   # "[RecordingMicroAllocator] Arena allocation total N bytes" (parsed by the parent)
    lo, hi = 0, generous         # lo fails, hi works
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _loads_isolated(runtime, flatbuffer, mid):
            hi = mid
        else:
            lo = mid
    info["arena_bytes"] = hi
    return info


def _tflm_failure(output: str) -> str | None:
    """The one line of TFLM's log that says why a model did not load."""
    m = re.search(r"Didn't find op for (?:builtin|custom) opcode '([^']+)'", output)
    if m:
        return f"TensorFlow Lite Micro has no kernel for op {m.group(1)}"
    m = re.search(r"Node (\w+) \(number \d+\) failed to prepare", output)
    if m:
        return f"TensorFlow Lite Micro cannot run op {m.group(1)} with these tensor types or shapes"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not ln.startswith(("Traceback", "  "))]
    return lines[-1][:200] if lines else None


def probe(model_path: str | Path) -> dict:
    """Loads the model in the TFLM interpreter (child process); returns input/output details,
    `arena_bytes` (the smallest arena it loads and runs in) and `arena_recorded_bytes` (the
    RecordingMicroAllocator's own total). UserError naming the op when TFLM refuses the model."""
    model_path = Path(model_path)
    _runtime()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    with tempfile.TemporaryDirectory(prefix="edgeft-tflm-") as tmp:
        out = Path(tmp) / "probe.json"
        try:
            proc = subprocess.run([sys.executable, "-m", "edgeft.export.tflm", "probe", str(model_path), str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                  timeout=600)
        except subprocess.TimeoutExpired:
            raise UserError(f"{model_path.name}: TensorFlow Lite Micro did not load the model in 600 s") from None
        log = proc.stdout
        if proc.returncode != 0 or not out.is_file():
            why = _tflm_failure(log)
            if proc.returncode < 0:
                sig = signal.Signals(-proc.returncode).name
                why = f"TensorFlow Lite Micro crashed ({sig})" + (f": {why}" if why else "")
            raise UserError(f"{model_path.name}: {why or 'TensorFlow Lite Micro could not load the model'}")
        info = json.loads(out.read_text())
    m = re.search(r"Arena allocation total (\d+) bytes", log)
    info["arena_recorded_bytes"] = int(m.group(1)) if m else None
    return info


class TFLMRunner:
    """A full-integer .tflite file in the TensorFlow Lite Micro interpreter (reference kernels, one
    thread: `threads` is accepted for the Runner signature and ignored), with the arena size the
    file needs (measured by `probe` unless given)."""

    def __init__(self, path: str | Path, threads: int | None = None, arena_size: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"model file not found: {self.path}")
        self.flatbuffer = flatbuffer_bytes(self.path.read_bytes())
        resolver_methods(model_ops(self.flatbuffer, self.path.name), self.path.name)
        if arena_size is None:   # the child process proves the model loads without aborting this one
            arena_size = probe(self.path)["arena_bytes"]
        self.arena_size = arena_size
        self.interpreter = _runtime().Interpreter.from_bytes(self.flatbuffer, arena_size=arena_size)
        self.input = _details(self.interpreter.get_input_details(0))
        self.output = _details(self.interpreter.get_output_details(0))
        self.input_hw = tuple(self.input["shape"][1:3])

    # prepare / invoke / probabilities: the device runners' three steps (`device.time_runner`)
    def prepare(self, image: np.ndarray) -> np.ndarray:
        i = self.input
        return quantize(np.asarray(image, np.float32)[None], i["dtype"], i["scale"], i["zero_point"])

    def invoke(self, batch: np.ndarray) -> np.ndarray:
        self.interpreter.set_input(batch, 0)
        self.interpreter.invoke()
        return self.interpreter.get_output(0)

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        o = self.output
        return dequantize(raw, o["scale"], o["zero_point"])[0]

    def predict_one(self, image: np.ndarray) -> np.ndarray:
        return self.probabilities(self.invoke(self.prepare(image)))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([self.predict_one(img) for img in np.asarray(batch, np.float32)])


# ---------------------------------------------------------------- the C++ sources
def c_array(data: bytes, per_line: int = 12) -> str:
    rows = (", ".join(f"0x{b:02x}" for b in data[i:i + per_line]) for i in range(0, len(data), per_line))
    return ",\n".join("    " + r for r in rows)


def c_string(text: str) -> str:
    """A C string literal; octal escapes (never hex, which would swallow the next characters)."""
    out = []
    for b in text.encode("utf-8"):
        ch = chr(b)
        out.append("\\" + ch if ch in '"\\' else ch if 32 <= b < 127 else f"\\{b:03o}")
    return '"' + "".join(out) + '"'


def _guard(name: str) -> str:
    return "EDGEFT_" + re.sub(r"\W", "_", name).upper() + "_"


def model_data_h() -> str:
    g = _guard("model_data.h")
    return (f"// Generated by edgeft. The model flatbuffer, for tflite::GetModel({ARRAY_NAME}).\n"
            f"#ifndef {g}\n#define {g}\n\n"
            f"extern const unsigned char {ARRAY_NAME}[];\nextern const unsigned int {ARRAY_NAME}_len;\n\n"
            f"#endif  // {g}\n")


def model_data_cc(flatbuffer: bytes) -> str:
    return ("// Generated by edgeft: the TFLite flatbuffer (labels archive stripped), 16-byte aligned\n"
            "// as TFLite Micro requires. Const, so it stays in flash.\n"
            '#include "model_data.h"\n\n'
            f"alignas(16) const unsigned char {ARRAY_NAME}[] = {{\n{c_array(flatbuffer)}\n}};\n"
            f"const unsigned int {ARRAY_NAME}_len = {len(flatbuffer)};\n")


def op_resolver_h(ops: list[str], methods: list[str]) -> str:
    g = _guard("op_resolver.h")
    calls = "\n".join(f"  TF_LITE_ENSURE_STATUS(resolver.{m}());  // {op}" for op, m in zip(ops, methods))
    return (f"// Generated by edgeft: exactly the {len(ops)} ops the model uses.\n"
            f"#ifndef {g}\n#define {g}\n\n"
            '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"\n\n'
            f"constexpr int kModelOpCount = {len(ops)};\n"
            "using ModelOpResolver = tflite::MicroMutableOpResolver<kModelOpCount>;\n\n"
            "inline TfLiteStatus RegisterModelOps(ModelOpResolver& resolver) {\n"
            f"{calls}\n  return kTfLiteOk;\n}}\n\n#endif  // {g}\n")


def labels_h(labels: list[str]) -> str:
    g = _guard("labels.h")
    items = "\n".join(f"    {c_string(lb)}," for lb in labels)
    return (f"// Generated by edgeft: class names in output order.\n#ifndef {g}\n#define {g}\n\n"
            f"constexpr int kLabelCount = {len(labels)};\n"
            f"constexpr const char* kLabels[kLabelCount] = {{\n{items}\n}};\n\n#endif  // {g}\n")


def readme(info: dict) -> str:
    i, o = info["input"], info["output"]
    arena_kib = -(-info["arena_bytes"] // 1024)
    ops = ", ".join(info["ops"])
    return f"""# TensorFlow Lite Micro export

Generated by edgeft from `{info['source']}` (tflite-micro {info['tflm_version']}).

| | |
|---|---|
| flash_bytes (model array) | {info['flash_bytes']} |
| arena_bytes (smallest tensor arena that loads and runs) | {info['arena_bytes']} |
| arena_recorded_bytes (RecordingMicroAllocator total) | {info['arena_recorded_bytes']} |
| input | shape {i['shape']}, {i['dtype']}, scale {i['scale']!r}, zero_point {i['zero_point']} |
| output | shape {o['shape']}, {o['dtype']}, scale {o['scale']!r}, zero_point {o['zero_point']} |
| ops ({len(info['ops'])}) | {ops} |

Files: `model_data.cc` / `model_data.h` (the model as `alignas(16) const unsigned char
{ARRAY_NAME}[]`, {ARRAY_NAME}_len bytes), `op_resolver.h` (a `tflite::MicroMutableOpResolver`
with exactly these ops), `labels.h` (class names in output order:
{', '.join(info['labels'])}).

The flash size is the flatbuffer alone: the labels archive edgeft appends to its .tflite files
is stripped (TFLite Micro does not read it; the labels are in `labels.h`).

The arena was measured with the TFLite Micro Python interpreter (reference kernels, 64-bit
host, recording allocator): `arena_bytes` is the smallest `arena_size` in which the model
allocated its tensors and ran one inference; `arena_recorded_bytes` is what the interpreter's
RecordingMicroAllocator reports (tensors and buffers only, not the allocator's own objects).
Optimized kernels (CMSIS-NN, ESP-NN) may ask for extra scratch memory and a 32-bit MCU needs
smaller structs; leave some headroom and check on the device with
`tflite::RecordingMicroInterpreter`.

## Calling it

Input: RGB pixels 0-255, NHWC, quantized as `q = round(pixel / {i['scale']!r}) + ({i['zero_point']})`
(clamped to {i['dtype']}). Output: `prob = (q - ({o['zero_point']})) * {o['scale']!r}`.

```cpp
#include <cmath>
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "labels.h"
#include "model_data.h"
#include "op_resolver.h"

constexpr int kTensorArenaSize = {arena_kib} * 1024;  // measured {info['arena_bytes']} bytes; add headroom
alignas(16) static uint8_t tensor_arena[kTensorArenaSize];

static {_ctype(i)} quantize_pixel(uint8_t pixel) {{
  int q = static_cast<int>(lroundf(pixel / {i['scale']!r}f)) + ({i['zero_point']});
  return q < {_lim(i)[0]} ? {_lim(i)[0]} : q > {_lim(i)[1]} ? {_lim(i)[1]} : q;
}}

int classify(const uint8_t* rgb) {{  // {'x'.join(map(str, i['shape'][1:]))} RGB pixels, row-major
  static ModelOpResolver resolver;
  static bool registered = RegisterModelOps(resolver) == kTfLiteOk;
  static tflite::MicroInterpreter interpreter(tflite::GetModel({ARRAY_NAME}), resolver,
                                              tensor_arena, kTensorArenaSize);
  static bool allocated = registered && interpreter.AllocateTensors() == kTfLiteOk;
  if (!allocated) return -1;
  TfLiteTensor* in = interpreter.input(0);
  for (int k = 0; k < {int(np.prod(i['shape']))}; ++k) in->data.{i['dtype']}[k] = quantize_pixel(rgb[k]);
  if (interpreter.Invoke() != kTfLiteOk) return -1;
  const {_ctype(o)}* out = interpreter.output(0)->data.{o['dtype']};
  int best = 0;
  for (int c = 1; c < kLabelCount; ++c)
    if (out[c] > out[best]) best = c;
  return best;  // kLabels[best]; probability = (out[best] - ({o['zero_point']})) * {o['scale']!r}
}}
```
"""


def _ctype(t: dict) -> str:
    return f"{t['dtype']}_t"


def _lim(t: dict) -> tuple[int, int]:
    info = np.iinfo(t["dtype"])
    return int(info.min), int(info.max)


# ---------------------------------------------------------------- the export
def write_tflm(model_path: Path, out_dir: Path, labels: list[str]) -> dict:
    """Writes model_data.cc/.h, op_resolver.h, labels.h and README.md into `out_dir` from a
    full-integer .tflite file; returns the numbers the README states."""
    model_path, out_dir = Path(model_path), Path(out_dir)
    if not model_path.is_file():
        raise UserError(f"model file not found: {model_path}")
    flatbuffer = flatbuffer_bytes(model_path.read_bytes())
    ops = model_ops(flatbuffer, model_path.name)
    methods = resolver_methods(ops, model_path.name)
    info = probe(model_path)
    for side in ("input", "output"):
        if info[side]["dtype"] not in ("int8", "uint8"):
            raise UserError(f"{model_path.name}: TFLite Micro export needs a full-integer model "
                            f"(int8/uint8 input and output), this one has a {info[side]['dtype']} {side}")
    n_out = int(np.prod(info["output"]["shape"][1:]))
    if len(labels) != n_out:
        raise UserError(f"{model_path.name}: {len(labels)} labels for {n_out} model outputs")
    from tflite_micro import __version__ as tflm_version

    info.update(source=model_path.name, tflm_version=tflm_version, flash_bytes=len(flatbuffer), ops=ops,
                resolver_methods=methods, labels=list(labels))
    files = {"model_data.h": model_data_h(), "model_data.cc": model_data_cc(flatbuffer),
             "op_resolver.h": op_resolver_h(ops, methods), "labels.h": labels_h(labels),
             "README.md": readme(info)}
    for name, text in files.items():
        rundir.write_text(out_dir / name, text)
    return info


def _main(argv: list[str]) -> int:
    """`python -m edgeft.export.tflm probe MODEL OUT.json` (the child process of `probe`)."""
    if len(argv) != 3 or argv[0] != "probe":
        print("usage: python -m edgeft.export.tflm probe MODEL.tflite OUT.json", file=sys.stderr)
        return 2
    flatbuffer = flatbuffer_bytes(Path(argv[1]).read_bytes())
    try:
        info = _probe_in_process(flatbuffer)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    Path(argv[2]).write_text(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
