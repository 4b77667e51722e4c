"""The runner a device would use for each row of the formats table (edgeft.core.formats).

Kept out of the table itself: the TFLite Micro runner and the Keras runner sit above the TF-free
ground the table lives in. parity (which gates each row) and bench (which times it) use this.
"""
from __future__ import annotations

from edgeft.core.formats import Format


def open_format_runner(fmt: Format, path, threads: int | None = None):
    """The runner a device would use for this row's file."""
    if fmt.runtime == "tflm":
        from edgeft.export.tflm import TFLMRunner   # tflite-micro is needed only for the TFLM row

        return TFLMRunner(path, threads)
    from edgeft.nn.runtime import open_runner

    return open_runner(path, threads)
