"""The gate's runs of each file, started as the file is written (issue 26 item 6: exports that scale).

The parity gate runs every exported file by its own runtime on the same 1,000 parity inputs, and the
export reports each file's test-split accuracy. Those runs depend only on the file, so they need not
wait for the last file to be built: `GatePrefetch.add(fmt, path)` starts them in worker threads as
soon as a file is written, beside the next conversions (the TFLite converter and ONNX Runtime's
calibration leave a core idle much of the time); the gate then `take`s a file's outputs, waiting only
for what is still running. The outputs are those of the same runner on the same inputs as the gate's
own loop (LiteRT and ONNX Runtime release the GIL while they compute), so the verdicts do not change.

Two workers: with the main thread converting and the client matrix's child process, the two cores
stay busy without queueing many interpreters at once (each holds its model and arena in memory).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

WORKERS = 2


class GatePrefetch:
    """`add` each written file; `take` its parity outputs (or None when it was never added);
    `test_accuracy` its test-split metrics; `cancel` when the export stops early."""

    def __init__(self, x: np.ndarray, splits=None, workers: int = WORKERS):
        self.x, self.splits = x, splits
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgeft-gate")
        self._parity: dict[tuple[str, str], Future] = {}
        self._test: dict[str, Future] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ submitting
    def add(self, fmt, path: Path, probs: np.ndarray | None = None) -> None:
        """The file's parity outputs (not for the TFLite Micro row: it is judged on LiteRT's outputs
        of the same bytes) and its test-split metrics, queued now. `probs`: its outputs by this
        row's runtime on the same inputs, already computed (the int8 choice ran the same model by
        LiteRT on the parity inputs, its metadata aside), taken as they are."""
        path = Path(path)
        if fmt.runtime == "tflm":
            return
        with self._lock:
            key = (path.name, fmt.runtime)
            if key not in self._parity and probs is not None:
                self._parity[key] = Future()
                self._parity[key].set_result(np.asarray(probs))
            elif key not in self._parity:
                self._parity[key] = self._pool.submit(self._parity_outputs, fmt, path)
            if self.splits is not None and path.name not in self._test:
                self._test[path.name] = self._pool.submit(self._test_metrics, path)

    def _parity_outputs(self, fmt, path: Path) -> np.ndarray:
        from edgeft.verify.parity import predict_with_progress
        from edgeft.verify.runners import open_format_runner

        # one thread each: two of these run beside the converter and the matrix on the same cores
        return predict_with_progress(open_format_runner(fmt, path, threads=1), self.x,
                                     f"parity: {path.name} ({fmt.runtime})")

    def _test_metrics(self, path: Path):
        from edgeft.verify.evaluate import test_accuracy_of_file

        return test_accuracy_of_file(path, self.splits)

    # ------------------------------------------------------------ taking
    def take(self, fmt, path: Path) -> np.ndarray | None:
        """The parity outputs of this file by this row's runtime (waits while they run); None when
        the file was not added. An error the run raised is raised here, as the gate's own run would."""
        with self._lock:
            future = self._parity.pop((Path(path).name, fmt.runtime), None)
        return None if future is None else future.result()

    def test_accuracy(self, name: str):
        """(True, metrics) for a file added (by its name); (False, None) when it was not."""
        with self._lock:
            future = self._test.pop(name, None)
        return (False, None) if future is None else (True, future.result())

    def cancel(self) -> None:
        """Drops what has not started; what runs finishes in the background (a thread cannot be killed)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
