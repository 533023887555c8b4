"""PyTorch ``torch.save`` files read without PyTorch: tensors as numpy arrays, nothing executed.

Why not ``torch.load``: PyTorch is a multi-GB install that a JAX user does not expect, only to
read the default weights (torchvision's ``.pth``). The format (zip, ``torch.save``'s default
since PyTorch 1.6) is small: a zip holding ``<name>/data.pkl``, a pickle, and one raw storage per
``<name>/data/<key>``. The pickle names its storages by persistent ids
``("storage", storage type, key, location, numel)`` and rebuilds each tensor by calling
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[,
metadata])`` (``_v3`` with a dtype for float8 and unsigned types stored untyped).

Safety: a pickle can name any Python callable. The unpickler here resolves only an allow-list
(the rebuild functions, ``_rebuild_parameter``, ``collections.OrderedDict``, the storage types
and dtypes), each mapped to our own numpy code; any other global is refused with a
:class:`UserError` before anything runs. Every offset, size and stride is checked against its
storage before a view is made. Floating tensors come back as float32 (float16, bfloat16 and
float8 widen exactly, through ``ml_dtypes``), integer and bool tensors as they are. The legacy
format of PyTorch < 1.6 is refused with one line saying how to re-save the file.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from cifar_flax import UserError

# torch.save's legacy format starts with this number, pickled; the zip format with "PK".
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _Dtype(NamedTuple):
    """What a storage type or dtype global resolves to (a tuple: a pickle cannot alter it)."""

    dtype: np.dtype
    is_float: bool


def _dtypes() -> dict[str, _Dtype]:
    """``torch.<name>`` globals -> dtypes: the typed storages (``_rebuild_tensor_v2``), the
    untyped storage (bytes) and the dtypes ``_rebuild_tensor_v3`` names."""
    floats = {"Float": np.float32, "Double": np.float64, "Half": np.float16,
              "BFloat16": ml_dtypes.bfloat16}
    ints = {"Long": np.int64, "Int": np.int32, "Short": np.int16, "Char": np.int8,
            "Byte": np.uint8, "Bool": np.bool_}
    out = {f"torch.{k}Storage": _Dtype(np.dtype(v), True) for k, v in floats.items()}
    out.update({f"torch.{k}Storage": _Dtype(np.dtype(v), False) for k, v in ints.items()})
    out["torch.UntypedStorage"] = out["torch.storage.UntypedStorage"] = _Dtype(
        np.dtype(np.uint8), False)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                 "float8_e8m0fnu"):
        if hasattr(ml_dtypes, name):  # e8m0fnu is newer than some ml_dtypes jax accepts.
            out[f"torch.{name}"] = _Dtype(np.dtype(getattr(ml_dtypes, name)), True)
    out.update({f"torch.{n}": _Dtype(np.dtype(n), False) for n in ("uint16", "uint32", "uint64")})
    return out


class _Storage(NamedTuple):
    array: np.ndarray  # 1-D, read-only, the storage's elements in native byte order.
    is_float: bool


def _check_ints(what: str, values: Any) -> tuple[int, ...]:
    if not isinstance(values, tuple) or not all(type(v) is int and v >= 0 for v in values):
        raise ValueError(f"bad tensor {what} {values!r}")
    return values


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, metadata: Any) -> np.ndarray:
    """The tensor ``size``/``stride`` at ``offset`` in ``storage`` (in elements), as a new array:
    float32 for floating types. Out-of-range views are refused before they are made."""
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage is a {type(storage).__name__}")
    (offset,) = _check_ints("offset", (offset,))
    size, stride = _check_ints("size", size), _check_ints("stride", stride)
    data = storage.array
    if len(size) != len(stride):
        raise ValueError(f"tensor size {size} and stride {stride} differ in length")
    if 0 in size:
        view = np.zeros(size, data.dtype)
    elif offset + sum((n - 1) * s for n, s in zip(size, stride)) >= data.size:
        raise ValueError(f"a tensor (offset {offset}, size {size}, stride {stride}) reaches past "
                         f"its storage of {data.size} elements")
    else:
        view = np.lib.stride_tricks.as_strided(
            data[offset:], size, [s * data.itemsize for s in stride], writeable=False)
    meta = {} if metadata is None else metadata  # {"neg": True}: a negated view.
    if not isinstance(meta, dict) or any(v for k, v in meta.items() if k != "neg"):
        raise ValueError(f"unsupported tensor metadata {metadata!r}")
    out = view.astype(np.float32) if storage.is_float else view.copy()
    return -out if meta.get("neg") else out


def _rebuild_tensor_v2(*args: Any) -> np.ndarray:
    """(storage, offset, size, stride, requires_grad, backward_hooks[, metadata])."""
    if len(args) not in (6, 7):
        raise ValueError(f"_rebuild_tensor_v2 takes 6 or 7 arguments, got {len(args)}")
    return _tensor(*args[:4], args[6] if len(args) == 7 else None)


def _rebuild_tensor_v3(*args: Any) -> np.ndarray:
    """(untyped storage, offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])."""
    if len(args) not in (7, 8) or not isinstance(args[0], _Storage) \
            or not isinstance(args[6], _Dtype):
        raise ValueError("_rebuild_tensor_v3 takes an untyped storage and a dtype")
    storage, dtype = args[0], args[6]
    if storage.array.dtype != np.uint8 or storage.array.size % dtype.dtype.itemsize:
        raise ValueError(f"an untyped storage does not hold whole {dtype.dtype} elements")
    typed = _Storage(storage.array.view(dtype.dtype), dtype.is_float)
    return _tensor(typed, *args[1:4], args[7] if len(args) == 8 else None)


def _rebuild_parameter(*args: Any) -> np.ndarray:
    """(data, requires_grad, backward_hooks): an ``nn.Parameter`` is its tensor here."""
    if len(args) != 3 or not isinstance(args[0], np.ndarray):
        raise ValueError("_rebuild_parameter takes a tensor and two flags")
    return args[0]


_ALLOWED: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    **_dtypes(),
}


class _Unpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED` globals; storages come from the zip, each read once."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: str) -> None:
        super().__init__(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        self._archive, self._prefix, self._path = archive, prefix, path
        order = f"{prefix}byteorder"
        self._big_endian = order in archive.namelist() and archive.read(order) == b"big"
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get(f"{module}.{name}")
        if allowed is None:
            raise UserError(
                f"{self._path!r} asks to load the Python object {module}.{name}, which a state "
                "dict of tensors never needs: refused, nothing was executed. If the file holds a "
                "whole model or a training checkpoint, load it with PyTorch and torch.save its "
                "model.state_dict(), or convert it to .safetensors."
            )
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Dtype) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise ValueError(f"unknown persistent id {pid!r}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}data/{key}")
            dtype = kind.dtype
            if len(raw) < numel * dtype.itemsize:
                raise ValueError(f"storage data/{key} holds {len(raw)} bytes, fewer than its "
                                 f"{numel} elements of {dtype}")
            array = np.frombuffer(raw, dtype, numel)
            if self._big_endian and dtype.itemsize > 1:
                array = array.view(f"u{dtype.itemsize}").byteswap().view(dtype)
            self._storages[key] = _Storage(array, kind.is_float)
        storage = self._storages[key]
        if storage.array.dtype != kind.dtype:
            raise ValueError(f"storage data/{key} is named {storage.array.dtype} and {kind.dtype}")
        return storage


def _refuse_legacy(path: str, head: bytes) -> None:
    """Raise the error for a file that is not a zip archive: the legacy format (PyTorch < 1.6:
    a pickled magic number, or the tar of PyTorch < 0.4) by name, anything else as corrupt."""
    if (head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]) or head[257:262] == b"ustar":
        raise UserError(
            f"{path!r} is in the legacy torch.save format of PyTorch < 1.6, which is not read "
            "without PyTorch: re-save it with a current PyTorch (torch.save(torch.load(f), "
            "'new.pth')) or convert it to .safetensors."
        )
    raise ValueError("not a zip archive, which torch.save has written since PyTorch 1.6")


def load(path: str) -> Any:
    """The object ``torch.save`` wrote to ``path`` (a local file), tensors as numpy arrays.

    Raises UserError for a refused global or a legacy-format file; ValueError, KeyError,
    zipfile or pickle errors for a damaged file (the caller names the file)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head.startswith(b"PK"):
        _refuse_legacy(path, head)
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"expected one <name>/data.pkl in the archive, found {len(pickles)}")
        return _Unpickler(archive, pickles[0][: -len("data.pkl")], path).load()
