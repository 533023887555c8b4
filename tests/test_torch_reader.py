"""torch.save files read without PyTorch (cifar_flax/weights/torch_pickle.py).

Every dtype and tensor layout a state dict can hold comes back exactly as torch holds it, read in
a process where torch cannot be imported; a big-endian file too. A pickle that asks for any other
Python object (one that would run a command, a whole pickled model) is refused with one error line
before anything runs; a tensor that reaches past its storage is refused as corrupt; the legacy
format of PyTorch < 1.6 gets its own line. torch (the ``torch`` extra) writes the files and is the
reference.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from conftest import ROOT, env_without

from cifar_flax import UserError, pretrained
from cifar_flax.weights import files

torch = pytest.importorskip("torch")

# The child process: read the file as the weight loading does, save what it read as .npz.
READ_WITHOUT_TORCH = """import importlib.util, sys
import numpy as np
from cifar_flax.weights import files
assert importlib.util.find_spec("torch") is None
np.savez(sys.argv[2], **files.read_state_dict(sys.argv[1]))
assert "torch" not in sys.modules
"""


def as_read(t) -> np.ndarray:
    """What the reader must give for the tensor ``t``: float32 for floating types, else as is."""
    t = t.detach().resolve_neg()
    return (t.float() if t.is_floating_point() else t).numpy()


def assert_same(got: dict, state: dict) -> None:
    assert sorted(got) == sorted(state)
    for name, t in state.items():
        want = as_read(t)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_every_dtype_and_layout_read_exactly_without_torch(tmp_path):
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    state = torch.nn.BatchNorm2d(3).state_dict()  # An OrderedDict with _metadata; an int64 scalar.
    state.update({
        "conv.weight": torch.randn(8, 3, 3, 3),
        "transposed": base.t(),  # These three share base's storage: strides, an offset.
        "sliced": base[2:],
        "every_other_column": base[:, 1::2],
        "half": torch.randn(5).half(),
        "bfloat16": torch.randn(3, 2).bfloat16(),
        "double": torch.randn(3, dtype=torch.float64),
        "int32": torch.arange(-3, 3, dtype=torch.int32),
        "uint8": torch.arange(250, 256, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "float8": torch.randn(4).to(torch.float8_e4m3fn),  # _rebuild_tensor_v3, untyped storage.
        "uint16": torch.tensor([1, 65535], dtype=torch.uint16),
        "negated": torch._neg_view(torch.randn(3)),  # Saved with the metadata {"neg": True}.
        "parameter": torch.nn.Parameter(torch.randn(2)),  # _rebuild_parameter.
        "empty": torch.zeros(0, 3),
    })
    torch.save(state, tmp_path / "state.pth")
    with zipfile.ZipFile(tmp_path / "state.pth") as z:
        # The three views of base are one storage in the file.
        assert len([n for n in z.namelist() if "/data/" in n]) == len(state) - 2
    proc = subprocess.run(
        [sys.executable, "-c", READ_WITHOUT_TORCH, str(tmp_path / "state.pth"),
         str(tmp_path / "read.npz")],
        env=env_without(tmp_path, "torch"), cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(tmp_path / "read.npz") as got:
        assert_same(dict(got), state)


def test_big_endian_file(tmp_path):
    """A file written on a big-endian machine (its ``byteorder`` record says "big"): made here by
    swapping each storage's bytes; torch.load reads it back as the original, and so must we."""
    state = {"w": torch.randn(3, 2), "n": torch.tensor(7), "b": torch.randn(4).bfloat16()}
    torch.save(state, tmp_path / "little.pth")
    # torch numbers the storages in the order it pickles them: the dict's order here.
    itemsize = {str(i): t.element_size() for i, t in enumerate(state.values())}
    with zipfile.ZipFile(tmp_path / "little.pth") as src, \
            zipfile.ZipFile(tmp_path / "big.pth", "w") as dst:
        for info in src.infolist():
            data, record = src.read(info), info.filename.split("/", 1)[1]
            if record == "byteorder":
                assert data == b"little"
                data = b"big"
            elif record.startswith("data/"):
                data = np.frombuffer(data, f"u{itemsize[record[5:]]}").byteswap().tobytes()
            dst.writestr(info.filename, data)
    by_torch = torch.load(tmp_path / "big.pth", weights_only=True)
    assert all(torch.equal(by_torch[k], t) for k, t in state.items())
    assert_same(files.read_state_dict(tmp_path / "big.pth"), state)


class _RunsCode:
    """Pickled as a call of ``function(*args)``: what a malicious weight file holds."""

    def __init__(self, function, *args):
        self.call = (function, args)

    def __reduce__(self):
        return self.call


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "whole model"])
def test_objects_other_than_tensors_are_refused_before_anything_runs(tmp_path, capsys, payload):
    """Through the convert command: one ``error:`` line naming the file and the refused global,
    no marker file (torch.load without weights_only would have run the payload), no output."""
    marker = tmp_path / "marker"
    evil, refused = {
        "os.system": (_RunsCode(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        "builtins.eval": (_RunsCode(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
                          "__builtin__.eval"),  # Pickle protocol 2 writes Python 2's name.
        "whole model": (torch.nn.Linear(2, 2), "torch.nn.modules.linear.Linear"),
    }[payload]
    path = tmp_path / "evil.pth"
    torch.save(OrderedDict(weight=torch.ones(2), evil=evil), path)
    status = pretrained.main(["convert", "--source=torchvision", f"--input={path}",
                              f"--output={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 1 and len(errors) == 1, err
    assert str(path) in errors[0] and f"object {refused}," in errors[0], errors[0]
    assert "nothing was executed" in errors[0] and "state_dict()" in errors[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
    if payload != "whole model":  # The file does run its payload when unpickled by pickle.
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_tensor_past_its_storage_is_corrupt(tmp_path):
    """Offsets, sizes and strides are checked before a view is made (no read out of bounds)."""

    class TooLong:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (torch.ones(4)._typed_storage(), 1, (2, 2), (2, 1), False, OrderedDict()))

    torch.save({"w": TooLong()}, tmp_path / "bad.pth")
    with pytest.raises(UserError) as e:
        files.read_state_dict(tmp_path / "bad.pth")
    assert "bad.pth' could not be read as a .pth weight file (truncated or corrupt" in str(e.value)
    assert "reaches past its storage of 4 elements" in str(e.value)


def test_legacy_format_and_other_files(tmp_path):
    state = {"w": torch.randn(3)}
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(UserError) as e:
        files.read_state_dict(tmp_path / "legacy.pth")
    assert str(e.value) == (
        f"{str(tmp_path / 'legacy.pth')!r} is in the legacy torch.save format of PyTorch < 1.6, "
        "which is not read without PyTorch: re-save it with a current PyTorch "
        "(torch.save(torch.load(f), 'new.pth')) or convert it to .safetensors.")
    (tmp_path / "page.pth").write_text("<html>Not found</html>")  # A failed download's page.
    with pytest.raises(UserError, match=r"page\.pth' could not be read .* not a zip archive"):
        files.read_state_dict(tmp_path / "page.pth")
