"""The client matrix: every exported file under every client a user would ship it with.

A file that passes the parity gate under LiteRT or ONNX Runtime may still be refused by the
library an app actually links (MediaPipe Tasks, OpenCV DNN, TensorFlow Lite Micro) or give other
answers there. `client_matrix` runs each exported file in each client that takes its format and
records, per (file, client): whether it loads and runs, the client's one-line error if not, and
its top-1 agreement with the float Keras model on the same inputs.

Clients (CLIENTS): .tflite files go to LiteRT with its default op resolver (XNNPACK delegate),
LiteRT's reference kernels (OpResolverType.BUILTIN_REF), MediaPipe Tasks ImageClassifier (class
names read from the file's TFLite Model Metadata; its own top category is its top-1) and, for
files that compute in integers (int8; 16x8, whose float32 input and output are its only float
tensors), TensorFlow Lite Micro; .onnx files go to ONNX Runtime (CPU) and OpenCV
DNN. A client whose package is not installed gives loads=False and "not installed: pip install X",
never an exception. Each non-reference client also reports how often its top-1 equals the
reference client's on the same file (LiteRT default for .tflite, ONNX Runtime for .onnx).
Each cell runs in its own child process (`python -m edgeft.verify.clients cell ...`, without
TensorFlow, as on a device): a client that aborts the process (SIGABRT, SIGSEGV) instead of
raising gives that cell an error, not the end of the export.

Inputs are float32 NHWC RGB 0-255 at the model's size (the parity inputs); the first `limit` are
used. MediaPipe gets them as uint8 SRGB images (exact: the parity inputs are whole numbers) of
the model's own size, so it neither crops nor resizes differently from the other clients.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.core.errors import UserError
from edgeft.core.tiers import MIN_JUDGED

LIMIT = 200          # inputs each client sees (MediaPipe and TFLite Micro run one image at a time)
OPENCV_BATCH = 32    # OpenCV DNN gets the NHWC batch in chunks of this many
CELL_TIMEOUT = 900   # seconds one client may take on one file (TFLite Micro's reference kernels are slow)
TFLM_INPUTS = MIN_JUDGED   # inputs TFLite Micro runs (its outputs must equal LiteRT's reference kernels')
FEW_INPUTS = MIN_JUDGED    # inputs LiteRT's reference kernels run on a float-arithmetic file (checked close to XNNPACK's)
CLOSE_TOLERANCE = 1e-4     # max |difference| of any output score, float kernels against float kernels


class ClientFailure(Exception):
    """A client could not load (stage "load") or run (stage "run") a file; message is one line."""

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage


@dataclass
class ClientOutput:
    probs: np.ndarray                 # (n, classes) scores as the client reports them
    top1: np.ndarray                  # (n,) the client's own top-1 class index
    names: list[str] | None = None    # class names the client read from the file (MediaPipe)


@dataclass(frozen=True)
class Client:
    name: str                          # key in the matrix rows
    title: str                         # column header
    suffix: str                        # ".tflite" or ".onnx"
    modules: tuple[str, ...]           # import names it needs
    pip: str                           # what to install when missing
    run: Callable[[Path, np.ndarray], ClientOutput]
    applies: Callable[[Path], bool] = lambda path: True
    limit: int | None = None           # at most this many of the matrix's inputs
    identical_to: str | None = None    # a client whose outputs this one's must equal, input for input
    identical_for: Callable[[Path], bool] = lambda path: True   # ... on these files
    # files on which this client runs only FEW_INPUTS inputs; on those `close_for` accepts, each output
    # is checked within CLOSE_TOLERANCE of `close_to`'s (the same float arithmetic in another order)
    few_for: Callable[[Path], bool] | None = None
    close_to: str | None = None
    close_for: Callable[[Path], bool] | None = None   # None: every file `few_for` accepts
    cost: int = 1                      # rough relative cost of a full cell: the longest start first

    def inputs_for(self, path: Path, n: int) -> int:
        """How many of the matrix's `n` inputs this client runs on `path`."""
        if self.few_for is not None and self.few_for(path):
            return min(n, FEW_INPUTS)
        return min(n, self.limit or n)

    def checks_close(self, path: Path) -> bool:
        """Whether this client's outputs on `path` are checked within CLOSE_TOLERANCE of `close_to`'s."""
        if self.close_to is None or self.few_for is None or not self.few_for(path):
            return False
        return self.close_for is None or self.close_for(path)


def one_line(e: BaseException, limit: int = 240) -> str:
    """An exception as one short line (OpenCV's: the part after "error: ")."""
    text = " ".join(str(e).split()) or type(e).__name__
    m = re.search(r"\berror: (\(-?\d+:.*)", text)   # OpenCV(5.0.0) /path/x.cpp:12: error: (-215:...) ...
    if m:
        text = m.group(1)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_PROGRESS: list[Path] = []   # in a cell's child process: the file where each stage is noted as it starts


class _stage:
    """`with _stage("load"):` turns any exception into ClientFailure(stage, one line)."""

    def __init__(self, stage: str):
        self.stage = stage

    def __enter__(self):
        if _PROGRESS:   # so the parent knows how far a client got when it kills the process
            _PROGRESS[0].write_text(self.stage)
        return self

    def __exit__(self, kind, e, tb):
        if e is None or isinstance(e, ClientFailure) or not isinstance(e, Exception):
            return False
        raise ClientFailure(self.stage, one_line(e)) from None


def _output(probs) -> ClientOutput:
    probs = np.asarray(probs, np.float32)
    return ClientOutput(probs, probs.argmax(-1))


# ---------------------------------------------------------------- TFLite clients
def _litert(path: Path, x: np.ndarray, resolver: str) -> ClientOutput:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgeft.nn.runtime import dequantize, quantize

    with _stage("load"):
        interp = Interpreter(model_path=str(path),
                             experimental_op_resolver_type=getattr(OpResolverType, resolver))
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0], interp.get_output_details()[0]
    out = []
    with _stage("run"):
        for img in x:
            interp.set_tensor(i["index"], quantize(img[None], i["dtype"], *i["quantization"]))
            interp.invoke()
            out.append(dequantize(interp.get_tensor(o["index"]), *o["quantization"])[0])
    return _output(np.stack(out))


def litert_default(path: Path, x: np.ndarray) -> ClientOutput:
    """LiteRT as apps get it: the default op resolver, with the XNNPACK delegate."""
    return _litert(path, x, "AUTO")


def litert_reference(path: Path, x: np.ndarray) -> ClientOutput:
    """LiteRT's reference kernels (no XNNPACK, no optimized kernels): what a plain port runs."""
    return _litert(path, x, "BUILTIN_REF")


def mediapipe_classifier(path: Path, x: np.ndarray) -> ClientOutput:
    """MediaPipe Tasks ImageClassifier: the file's own metadata (normalization, labels) drives it."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    images = np.clip(np.round(x), 0, 255).astype(np.uint8)
    with _stage("load"):
        options = vision.ImageClassifierOptions(base_options=BaseOptions(model_asset_buffer=path.read_bytes()),
                                                max_results=-1)
        classifier = vision.ImageClassifier.create_from_options(options)
    probs, top1, names = None, [], {}
    with _stage("run"), classifier:
        for k, img in enumerate(images):
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)))
            cats = result.classifications[0].categories
            if probs is None:
                probs = np.zeros((len(images), max(c.index for c in cats) + 1), np.float32)
            for c in cats:
                probs[k, c.index] = c.score
                names[c.index] = c.category_name
            top1.append(cats[0].index)     # categories come sorted by score: MediaPipe's own top-1
    ordered = [names.get(c) for c in range(probs.shape[1])]
    return ClientOutput(probs, np.asarray(top1), ordered)


def full_integer(path: Path) -> bool:
    """Whether a .tflite file has integer input and output (what TFLite Micro runs). A file LiteRT
    cannot read counts as one, so TFLite Micro's own error for it is reported too."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        return all(np.dtype(d["dtype"]).kind in "iu"
                   for d in interp.get_input_details()[:1] + interp.get_output_details()[:1])
    except ImportError:
        return "int8" in path.name
    except Exception:   # noqa: BLE001 - unreadable: let TFLite Micro say why
        return True


BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")   # a 16x8 file's float32 input -> int16, int16 -> float32 output


def integer_arithmetic(path: Path) -> bool:
    """Whether a .tflite file computes in integers: full-integer (integer input and output), or every
    op but the QUANTIZE / DEQUANTIZE at its float32 input and output reads and writes integers only
    (the 16x8 file). A file LiteRT cannot read counts as one (TensorFlow Lite Micro says why)."""
    if full_integer(path):
        return True
    try:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        kinds = {t["index"]: np.dtype(t["dtype"]).kind for t in interp.get_tensor_details()}
        return not any(kinds.get(i) == "f" for op in interp._get_ops_details()   # noqa: SLF001
                       if op["op_name"] not in BOUNDARY_OPS for i in list(op["inputs"]) + list(op["outputs"]))
    except Exception:   # noqa: BLE001 - ImportError or an unreadable file
        return False


def float_arithmetic(path: Path) -> bool:
    """Whether a .tflite file computes in float32 only: no tensor of an integer type other than
    int32 (shapes, indices) and no hybrid op (the float file; the fp16 file, whose float16 weights
    are dequantized once when it loads). Its reference kernels then compute what XNNPACK computes,
    in another order: a wrong kernel differs on every input, not on a rare one. A file LiteRT cannot
    read is not one (it gets the full cell, and LiteRT's own error)."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        return all(np.dtype(t["dtype"]).kind == "f" or np.dtype(t["dtype"]) == np.int32
                   for t in interp.get_tensor_details())
    except Exception:   # noqa: BLE001 - ImportError or an unreadable file
        return False


def tflite_micro(path: Path, x: np.ndarray) -> ClientOutput:
    """TensorFlow Lite Micro (reference kernels), arena sized by edgeft.export.tflm.probe in a child process."""
    from edgeft.export.tflm import TFLMRunner

    with _stage("load"):
        try:
            runner = TFLMRunner(path)
        except UserError as e:   # its messages start with the file name: the matrix names the file already
            raise ClientFailure("load", re.sub(rf"^{re.escape(path.name)}: ", "", one_line(e))) from None
    with _stage("run"):
        return _output(runner.predict(x))


# ---------------------------------------------------------------- ONNX clients
def onnxruntime_cpu(path: Path, x: np.ndarray) -> ClientOutput:
    import onnxruntime as ort

    with _stage("load"):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
    with _stage("run"):
        return _output(session.run(None, {name: np.asarray(x, np.float32)})[0])


def opencv_dnn(path: Path, x: np.ndarray) -> ClientOutput:
    """OpenCV DNN (cv2.dnn.readNetFromONNX), fed the NHWC float32 batch as it is."""
    import cv2

    with _stage("load"):
        net = cv2.dnn.readNetFromONNX(str(path))
    out = []
    with _stage("run"):
        for k in range(0, len(x), OPENCV_BATCH):
            chunk = np.ascontiguousarray(x[k:k + OPENCV_BATCH], np.float32)
            net.setInput(chunk)
            out.append(np.asarray(net.forward(), np.float32).reshape(len(chunk), -1))
    return _output(np.concatenate(out))


CLIENTS: tuple[Client, ...] = (
    Client("litert", "LiteRT (default, XNNPACK)", ".tflite", ("ai_edge_litert",), "ai-edge-litert", litert_default),
    # LiteRT's reference kernels run at a third of an image a second at 224 px (float) and not much
    # faster on integer files: the first FEW_INPUTS inputs of every file; on a float-arithmetic file
    # each output is checked within CLOSE_TOLERANCE of XNNPACK's; on the int8 file the statistical
    # comparison with XNNPACK is the floor's (the gate's own, on up to 300 inputs) and TFLite Micro
    # must equal these outputs (docs/export.md)
    Client("litert_ref", "LiteRT (reference kernels)", ".tflite", ("ai_edge_litert",), "ai-edge-litert",
           litert_reference, few_for=lambda path: True, close_to="litert", close_for=float_arithmetic, cost=10),
    Client("mediapipe", "MediaPipe ImageClassifier", ".tflite", ("mediapipe",), "--no-deps mediapipe==1.2.3",
           mediapipe_classifier),
    # TFLite Micro runs LiteRT's reference kernels, one image a second at 224 px: checked for identical
    # outputs on the first TFLM_INPUTS inputs instead of statistically on all (docs/export.md). Not on
    # 16x8 files: TFLM's int16 FULLY_CONNECTED and SOFTMAX round one int16 step apart from LiteRT's
    # (tools/tflm_int16_ops.py), so there its cell is its agreement, as any client's
    Client("tflm", "TensorFlow Lite Micro", ".tflite", ("tflite_micro",), "tflite-micro", tflite_micro,
           integer_arithmetic, limit=TFLM_INPUTS, identical_to="litert_ref", identical_for=full_integer, cost=5),
    Client("onnxruntime", "ONNX Runtime (CPU)", ".onnx", ("onnxruntime",), "onnxruntime", onnxruntime_cpu),
    Client("opencv", "OpenCV DNN", ".onnx", ("cv2",), "opencv-python-headless", opencv_dnn),
)
REFERENCE = {".tflite": "litert", ".onnx": "onnxruntime"}   # what the other clients' top-1 is compared with


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _call(client: Client, path: Path, x: np.ndarray) -> tuple:
    """("ok", ClientOutput) or ("fail", stage, message); ImportError of an installed client's
    dependencies counts as a load failure."""
    try:
        return ("ok", client.run(path, x))
    except ClientFailure as e:
        return ("fail", e.stage, str(e))
    except ImportError as e:
        return ("fail", "load", f"not importable: {one_line(e)}")


def _last_error_line(log: str) -> str | None:
    lines = [ln.strip() for ln in log.splitlines() if re.search(r"error|abort|fatal|check failed", ln, re.IGNORECASE)]
    return one_line(Exception(lines[-1])) if lines else None


def _call_isolated(client: Client, path: Path, x: np.ndarray, timeout: float) -> tuple:
    """`_call` in a fresh child process (`python -m edgeft.verify.clients cell ...`, TensorFlow blocked):
    LiteRT's reference kernels and TensorFlow Lite Micro abort the process (SIGABRT) on some
    models instead of raising, and a fork of a process that has TensorFlow's threads is not safe
    (Abseil's mutex checks abort the child). A child that dies is reported with its last error line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent.parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    with tempfile.TemporaryDirectory(prefix="edgeft-client-") as tmp:
        inputs, result, progress = Path(tmp) / "x.npy", Path(tmp) / "result.json", Path(tmp) / "stage"
        np.save(inputs, np.asarray(x, np.float32))
        try:
            proc = subprocess.run([sys.executable, "-m", "edgeft.verify.clients", "cell", client.name, str(Path(path).resolve()),
                                   str(inputs), str(result), str(progress)], check=False, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, errors="replace", env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            stage = progress.read_text() if progress.is_file() else "load"
            return ("fail", stage, f"no answer in {timeout:.0f} s (stopped)")
        if proc.returncode == 0 and result.is_file():
            out = json.loads(result.read_text())
            if not out["ok"]:
                return ("fail", out["stage"], out["message"])
            return ("ok", ClientOutput(np.asarray(out["probs"], np.float32), np.asarray(out["top1"], np.int64),
                                       out["names"]))
        stage = progress.read_text() if progress.is_file() else "load"
        how = (f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        why = _last_error_line(proc.stdout)
        return ("fail", stage, f"the client ended the process ({how})" + (f": {why}" if why else ""))


def client_cell(client: Client, path: Path, x: np.ndarray, keras_probs: np.ndarray, classes: list[str],
                isolate: bool = True, timeout: float = CELL_TIMEOUT) -> tuple[dict, ClientOutput | None]:
    """One (file, client) cell of the matrix, and the client's outputs when it ran. `isolate`:
    run the client in its own child process, so that a crash is a cell, not the end of the caller."""
    row = {"file": path.name, "client": client.name, "loads": False, "runs": False, "error": None,
           "n": len(x), "top1_agreement": None, "agreement_with_reference": None,
           "reference": REFERENCE[client.suffix] if client.name != REFERENCE[client.suffix] else None,
           "max_abs_diff": None, "seconds": None}
    missing = [m for m in client.modules if not _installed(m)]
    if missing:
        row["error"] = f"not installed: pip install {client.pip}"
        return row, None
    start = time.perf_counter()
    if isolate:
        outcome = _call_isolated(client, path, x, timeout)
    else:
        outcome = _call(client, path, x)
    if outcome[0] == "fail":
        _, stage, message = outcome
        for long in (str(Path(path).resolve()), str(path)):   # the row names the file already
            message = message.replace(long, path.name)
        row.update(loads=stage != "load", error=f"{stage}: {message}")
        return row, None
    out = outcome[1]
    row["seconds"] = round(time.perf_counter() - start, 3)
    row.update(loads=True, runs=True)
    if out.probs.shape != keras_probs.shape:
        row["error"] = f"output shape {tuple(out.probs.shape)}, expected {tuple(keras_probs.shape)}"
        return row, out
    row["top1_agreement"] = float(np.mean(out.top1 == keras_probs.argmax(-1)))
    row["max_abs_diff"] = float(np.max(np.abs(out.probs - keras_probs)))
    if out.names is not None:
        row["category_names"] = out.names
        row["names_match"] = out.names == list(classes)
    return row, out


def export_files(export_dir: Path) -> list[Path]:
    """The model files in an export folder that some client takes."""
    suffixes = {c.suffix for c in CLIENTS}
    return sorted(p for p in Path(export_dir).iterdir() if p.is_file() and p.suffix.lower() in suffixes)


class MatrixRun:
    """The client matrix, started before every file exists: `add(path)` queues the cells of a file
    as soon as it is written, `workers` child processes at a time (the longest waiting cell first:
    reference kernels on hundreds of inputs, then TensorFlow Lite Micro), in the background, and
    `rows()` waits for every cell and returns the matrix. The export starts one before it builds
    the files, so the cells of the float files run beside the int8 conversion instead of after it.
    `client_matrix` is one of these given every file at once."""

    def __init__(self, x: np.ndarray, keras_probs: np.ndarray, classes: list[str], limit: int = LIMIT,
                 clients: tuple[Client, ...] = CLIENTS, isolate: bool = True, workers: int | None = None,
                 provided: tuple[str, ...] = ()):
        import queue

        x, keras_probs = np.asarray(x, np.float32), np.asarray(keras_probs, np.float32)
        if x.ndim != 4 or len(x) != len(keras_probs) or len(x) == 0:
            raise UserError(f"client matrix: {len(x)} inputs of shape {x.shape[1:]} for {len(keras_probs)} Keras outputs")
        if limit < 1:
            raise UserError("client matrix: limit must be at least 1")
        self.x, self.ref, self.classes = x[:limit], keras_probs[:limit], classes
        self.clients, self.isolate = clients, isolate
        # clients whose outputs the caller computes anyway (the gate runs every .tflite file under LiteRT's
        # default resolver on all parity inputs): `provide` fills their cells; one never provided runs at rows()
        self.provided = set(provided)
        self._waiting: set[int] = set()
        self.paths: list[Path] = []
        self.jobs: list[tuple[Path, Client, int]] = []
        self.done: dict[int, tuple] = {}
        self._finished: dict[int, threading.Event] = {}
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._lock = threading.Lock()
        self._bar = None
        # each isolated cell is a child process: as many at once as there are cores (one each: most
        # clients here run one image at a time on one thread)
        n = max(1, workers or (os.cpu_count() or 1)) if isolate else 1
        self._threads = [threading.Thread(target=self._work, name=f"edgeft-client-matrix-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def cell(self, name: str, client: str) -> tuple | None:
        """(row, ClientOutput or None) of one cell, waiting for it; None when it is not queued."""
        with self._lock:
            k = next((k for k, (p, c, _) in enumerate(self.jobs) if p.name == name and c.name == client), None)
        if k is None:
            return None
        self._finished[k].wait()
        return self.done[k]

    def add(self, path: Path) -> None:
        """Queues every cell of `path` (a .tflite or .onnx file that will not change any more)."""
        path = Path(path)
        if path.suffix.lower() not in REFERENCE or any(p.name == path.name for p in self.paths):
            return   # FORMATS names model_int8.tflite twice (the TFLM row)
        self.paths.append(path)
        for client in self.clients:
            if client.suffix == path.suffix.lower() and client.applies(path):
                with self._lock:
                    k = len(self.jobs)
                    self.jobs.append((path, client, client.inputs_for(path, len(self.x))))
                    self._finished[k] = threading.Event()
                    if client.name in self.provided:
                        self._waiting.add(k)
                        continue
                self._queue.put((-client.cost * self.jobs[k][2], k))

    def provide(self, name: str, client: str, probs: np.ndarray, seconds: float | None = None) -> None:
        """Fills a provided client's cell of file `name` with outputs the caller computed on the same
        inputs (at least the matrix's first ones) by the same runtime."""
        with self._lock:
            k = next((k for k in self._waiting if self.jobs[k][0].name == name and self.jobs[k][1].name == client), None)
            if k is None:
                return
            self._waiting.discard(k)
        path, c, n = self.jobs[k]
        probs = np.asarray(probs, np.float32)[:n]
        row = {"file": path.name, "client": c.name, "loads": True, "runs": True, "error": None, "n": n,
               "top1_agreement": None, "agreement_with_reference": None,
               "reference": REFERENCE[c.suffix] if c.name != REFERENCE[c.suffix] else None,
               "max_abs_diff": None, "seconds": seconds, "outputs_from": "the parity gate's run of this file"}
        if probs.shape != self.ref[:n].shape:
            row["error"] = f"output shape {tuple(probs.shape)}, expected {tuple(self.ref[:n].shape)}"
            out = ClientOutput(probs, probs.argmax(-1))
        else:
            out = ClientOutput(probs, probs.argmax(-1))
            row["top1_agreement"] = float(np.mean(out.top1 == self.ref[:n].argmax(-1)))
            row["max_abs_diff"] = float(np.max(np.abs(probs - self.ref[:n])))
        with self._lock:
            self.done[k] = (row, out)
        self._finished[k].set()

    def _work(self) -> None:
        while True:
            _, k = self._queue.get()
            if k is None:
                return
            path, client, n = self.jobs[k]
            try:
                out = client_cell(client, path, self.x[:n], self.ref[:n], self.classes, self.isolate)
            except Exception as e:   # noqa: BLE001 - a cell never ends the matrix (nor hangs rows())
                row = {"file": path.name, "client": client.name, "loads": False, "runs": False,
                       "error": f"run: {one_line(e)}", "n": n, "top1_agreement": None,
                       "agreement_with_reference": None, "reference": None, "max_abs_diff": None, "seconds": None}
                out = (row, None)
            with self._lock:
                self.done[k] = out
                bar = self._bar
            self._finished[k].set()
            if bar is not None:
                bar.update()

    def cancel(self) -> None:
        """Drops the cells not started (the export failed); the running ones end on their own."""
        import queue

        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._queue.put((float("inf"), None))

    def rows(self) -> list[dict]:
        """Waits for every cell queued so far; the matrix's rows in file order (see client_matrix)."""
        from edgeft.core.progress import Progress

        with self._lock:
            for k in sorted(self._waiting):   # never provided (the caller did not run that file): run it now
                self._queue.put((-self.jobs[k][1].cost * self.jobs[k][2], k))
            self._waiting.clear()
            left = len(self.jobs) - len(self.done)
            self._bar = Progress("client matrix", left, "cells") if left else None
        for _ in self._threads:
            self._queue.put((float("inf"), None))   # after every queued cell
        for t in self._threads:
            t.join()
        if self._bar is not None:
            self._bar.close()
        order = sorted(range(len(self.jobs)), key=lambda k: (sorted(p.name for p in self.paths).index(
            self.jobs[k][0].name), k))
        done = [self.done[k] for k in order]
        return _compare(done, self.clients, len(self.x), {p.name: p for p in self.paths})


def _compare(done: list[tuple], clients: tuple[Client, ...], n_inputs: int, paths: dict[str, Path]) -> list[dict]:
    """The rows, each with how its client's outputs compare with the reference client's on the same file."""
    rows = [row for row, _ in done]
    by_name = {c.name: c for c in clients}
    for name in dict.fromkeys(row["file"] for row in rows):
        outs = {row["client"]: out for row, out in done
                if row["file"] == name and out is not None and row["top1_agreement"] is not None}
        ref = outs.get(REFERENCE[Path(name).suffix.lower()])
        for row in rows:
            if row["file"] != name or row["client"] not in outs:
                continue
            mine = outs[row["client"]]
            if row["reference"] and ref is not None:
                row["agreement_with_reference"] = float(np.mean(mine.top1 == ref.top1[:len(mine.top1)]))
            client = by_name.get(row["client"])
            near = client.close_to if client is not None and client.checks_close(paths[name]) else None
            if near is not None and near in outs and len(mine.probs) < n_inputs:   # the few-inputs check
                diff = np.max(np.abs(mine.probs - outs[near].probs[:len(mine.probs)]), axis=-1)
                row["close_to"], row["close_tolerance"] = near, CLOSE_TOLERANCE
                row["close_inputs"] = int(np.sum(diff <= CLOSE_TOLERANCE))
                row["close_max_abs_diff"] = float(np.max(diff))
            twin = by_name[row["client"]].identical_to if row["client"] in by_name else None
            if twin is not None and twin in outs and client.identical_for(paths[name]):
                other = outs[twin].probs[:len(mine.probs)]
                row["identical_to"] = twin
                row["identical_inputs"] = int(np.sum(np.all(mine.probs == other, axis=-1)))
    return rows


def client_matrix(export_dir: Path, x: np.ndarray, keras_probs: np.ndarray, classes: list[str],
                  limit: int = LIMIT, clients: tuple[Client, ...] = CLIENTS, isolate: bool = True,
                  files: list[Path] | None = None) -> list[dict]:
    """One dict per (file, client that takes the file's format): file, client, loads, runs,
    error (one line or None), n, top1_agreement with `keras_probs`, agreement_with_reference (top-1
    equal to the reference client's on the same file), max_abs_diff, seconds; MediaPipe adds
    category_names (read from the file) and names_match (== `classes`); a client that runs few
    inputs adds close_to / identical_to and how many of its inputs matched.

    `x`: float32 NHWC RGB 0-255 at the model's input size; the first `limit` inputs are used.
    `files`: the model files to run (default: every .tflite and .onnx file in `export_dir`).
    `isolate`: each cell runs in its own child process, so a client that aborts the process on a
    file (LiteRT's reference kernels do on some int8 models) becomes that cell's error.
    """
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise UserError(f"export folder not found: {export_dir}")
    matrix = MatrixRun(x, keras_probs, classes, limit, clients, isolate)
    for path in (export_files(export_dir) if files is None else sorted(Path(p) for p in files)):
        matrix.add(path)
    return matrix.rows()


def matrix_markdown(rows: list[dict], clients: tuple[Client, ...] = CLIENTS) -> str:
    """A table file x client: top-1 agreement with Keras (and with the reference client), or the
    client's error as a numbered note; "-" where the client does not take the file."""
    if not rows:
        return "No model files for the client matrix.\n"
    names = list(dict.fromkeys(r["client"] for r in rows))
    titles = {c.name: c.title for c in clients if c.name in names}
    titles |= {n: n for n in names if n not in titles}   # a client of the caller's own: its name
    files = list(dict.fromkeys(r["file"] for r in rows))
    cells = {(r["file"], r["client"]): r for r in rows}
    n = sorted({r["n"] for r in rows})
    lines = [(f"Each cell: top-1 agreement with the float Keras model on {'/'.join(map(str, n))} inputs; for "
              "clients other than the reference (LiteRT default for .tflite, ONNX Runtime for .onnx), then "
              "\"= ref\" and how often its top-1 equals the reference's on the same file. \"-\": the client does "
              "not take this file (TensorFlow Lite Micro runs .tflite files that compute in integers only)."), "",
             "| file | " + " | ".join(titles.values()) + " |", "|---" * (len(titles) + 1) + "|"]
    notes = []
    for f in files:
        out = []
        for name, title in titles.items():
            r = cells.get((f, name))
            if r is None:
                out.append("-")
            elif r["error"] is not None:
                notes.append(f"{f} / {title}: {r['error']}")
                what = "wrong output" if r["runs"] else "loads, run fails" if r["loads"] else "fails"
                out.append(f"{what} [{len(notes)}]")
            else:
                text = f"{r['top1_agreement']:.1%}"
                if r["agreement_with_reference"] is not None:
                    text += f" (= ref {r['agreement_with_reference']:.1%})"
                if r.get("close_to"):
                    text += (f", within {r['close_tolerance']:g} of {titles.get(r['close_to'], r['close_to'])} on "
                             f"{r['close_inputs']}/{r['n']}")
                if r.get("identical_to"):
                    text += (f", identical to {titles.get(r['identical_to'], r['identical_to'])} on "
                             f"{r['identical_inputs']}/{r['n']}")
                if "names_match" in r:
                    got = r["category_names"]
                    text += (", names from file" if r["names_match"] else ", no class names in the file"
                             if not any(got) else ", names differ: " + ", ".join(map(str, got)))
                out.append(text)
        lines.append(f"| {f} | " + " | ".join(out) + " |")
    if notes:
        lines += [""] + [f"[{k}] {text}" for k, text in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def client_warnings(rows: list[dict], min_agreement: float = 0.98) -> list[str]:
    """One line per cell a user should hear about: a client that cannot load or run a file, one
    whose top-1 agrees with the reference client's on fewer than `min_agreement` of the inputs, and
    MediaPipe class names that are not the run's."""
    out = []
    for r in rows:
        where = f"{r['file']} under {r['client']}"
        if r["error"] is not None:
            out.append(f"{where}: {r['error']}")
        elif (r["agreement_with_reference"] is not None and r["agreement_with_reference"] < min_agreement
              and r.get("close_to")):   # integer files: the gate's floor judges them, on 1,000 inputs, not these 30
            out.append(f"{where}: top-1 equals {r['reference']}'s on only {r['agreement_with_reference']:.1%} "
                       f"of {r['n']} inputs")
        if r.get("close_to") and r["close_inputs"] < r["n"]:
            out.append(f"{where}: outputs differ from {r['close_to']}'s by more than {r['close_tolerance']:g} on "
                       f"{r['n'] - r['close_inputs']} of {r['n']} inputs (max {r['close_max_abs_diff']:.2g}; the same "
                       "float arithmetic should differ only in rounding)")
        if r.get("identical_to") and r["identical_inputs"] < r["n"]:
            out.append(f"{where}: outputs differ from {r['identical_to']}'s on {r['n'] - r['identical_inputs']} of "
                       f"{r['n']} inputs (it runs the same reference kernels)")
        if r.get("names_match") is False:
            out.append(f"{where}: class names read from the file are {r['category_names']}, not the run's labels")
    return out


def _main(argv: list[str]) -> int:
    """`python -m edgeft.verify.clients cell CLIENT MODEL X.npy RESULT.json STAGE` (the child of `_call_isolated`)."""
    if len(argv) != 6 or argv[0] != "cell":
        print("usage: python -m edgeft.verify.clients cell CLIENT MODEL X.npy RESULT.json STAGE", file=sys.stderr)
        return 2
    _, name, model, inputs, result, progress = argv
    client = next(c for c in CLIENTS if c.name == name)
    _PROGRESS[:] = [Path(progress)]
    outcome = _call(client, Path(model), np.load(inputs))
    if outcome[0] == "ok":
        out = outcome[1]
        record = {"ok": True, "probs": out.probs.tolist(), "top1": [int(v) for v in out.top1], "names": out.names}
    else:
        record = {"ok": False, "stage": outcome[1], "message": outcome[2]}
    Path(result).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    # the clients run as on a device: without TensorFlow (MediaPipe imports it only if it can, for
    # its docs tooling; blocking it saves seconds per cell)
    sys.modules.setdefault("tensorflow", None)
    sys.exit(_main(sys.argv[1:]))
