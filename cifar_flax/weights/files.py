"""Reading published weight files into flat ``{name: numpy array}`` dicts, and downloading them.

Kept apart from the name mapping (convert.py) so that each file format is read in one place:

- Keras HDF5 (``.h5``/``.hdf5``), the layout ``save_weights`` writes and the published notop file
  uses: a top-level ``layer_names`` attribute, one group per layer with a ``weight_names``
  attribute, one dataset per weight. Weights are keyed ``"<layer>/<weight>"`` by the *group* (layer)
  name and the last part of the weight name without ``:0``, so TF-Keras 2 names
  (``conv1_conv/kernel:0``), Keras 3 names (``conv1_conv/kernel``) and uniquified variable names
  (``conv1_conv_1/kernel:0``) all read the same. Read with h5py: no TensorFlow needed.
- PyTorch ``.pth``/``.pt`` (``torch.save``'s zip format) without PyTorch: torch_pickle.py's
  allow-listed unpickler, which refuses any object but tensors in (ordered) dicts. PyTorch is not
  a dependency, and is not used even when it is installed (one reader, the same results).
- ``.safetensors`` and ``.npz`` state dicts.

Every failure to read becomes a :class:`UserError` that names the file and says what to do.
Paths may be local or remote (``gs://...``, through ``etils.epath``); a remote weight file is
copied to a local temporary file before it is read. A download whose host name does not resolve
(no network) fails at once with one line that names the host and how to pass a local copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from typing import Any, Iterator

import h5py
import numpy as np
import safetensors.numpy
from etils import epath
from tqdm import tqdm

from cifar_flax import UserError, atomic_file, brief, user_errors
from cifar_flax.weights import torch_pickle

_H5_SUFFIXES = (".h5", ".hdf5")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SUPPORTED_SUFFIXES = _H5_SUFFIXES + _TORCH_SUFFIXES + (".safetensors", ".npz")


def as_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an absolute ``epath.Path``; remote URIs (``gs://``) are kept as they are."""
    text = os.fspath(path)
    if "://" in text:
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


@contextlib.contextmanager
def _local_copy(path: epath.Path) -> Iterator[str]:
    """A local file name for ``path``: itself, or a temporary copy of a remote file."""
    if "://" not in os.fspath(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, path.name)
        with path.open("rb") as src, open(local, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
        yield local


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a weight file into float32/int numpy arrays, keyed by name."""
    path = os.fspath(path)
    if not as_path(path).is_file():
        raise UserError(
            f"Weight file {path!r} does not exist; check --config.pretrained.file / --input."
        )
    suffix = os.path.splitext(path)[1].lower()
    readers = {".safetensors": _read_safetensors, ".npz": _read_npz}
    readers.update({s: _read_keras_h5 for s in _H5_SUFFIXES})
    readers.update({s: _read_torch for s in _TORCH_SUFFIXES})
    if suffix not in readers:
        raise UserError(
            f"{path!r}: unsupported weight file type {suffix!r}; expected one of "
            f"{', '.join(SUPPORTED_SUFFIXES)}."
        )
    with (user_errors(lambda e: f"{path!r} could not be read as a {suffix} weight file (truncated "
                      f"or corrupt download?): {type(e).__name__}: {brief(e)}. Delete it and "
                      "download it again.", Exception),  # Each library raises its own types.
          _local_copy(as_path(path)) as local):
        return readers[suffix](local)


def _put(out: dict[str, np.ndarray], name: str, value: Any, path: str) -> None:
    if name in out:
        raise UserError(f"{path!r}: the tensor {name!r} appears twice; the file is ambiguous.")
    out[name] = np.asarray(value)


def _decode(names: Any) -> list[str]:
    return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def _read_keras_h5(path: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        root = f["model_weights"] if "model_weights" in f else f  # model.save("x.h5") files
        if "layer_names" not in root.attrs:
            hint = (
                " It looks like a Keras 3 '.weights.h5' file, which names layers by class, not by"
                " name; save with model.save('model.h5') instead."
                if "layers" in root and "vars" in root else ""
            )
            raise UserError(
                f"{path!r} is not a Keras HDF5 weight file (no 'layer_names' attribute).{hint}"
            )
        for layer in _decode(root.attrs["layer_names"]):
            group = root[layer]
            for wname in _decode(group.attrs.get("weight_names", [])):
                short = wname.split("/")[-1].split(":")[0]
                _put(out, f"{layer}/{short}", group[wname][()], path)
    return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
    obj = torch_pickle.load(path)
    if not isinstance(obj, dict):
        raise UserError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")
    out: dict[str, np.ndarray] = {}
    for name, t in obj.items():
        if not isinstance(t, np.ndarray):
            raise UserError(f"{path!r}: entry {name!r} is a {type(t).__name__}, not a tensor.")
        _put(out, name, t, path)
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    return dict(safetensors.numpy.load_file(path))


def _read_npz(path: str) -> dict[str, np.ndarray]:
    with (user_errors(lambda e: f"{path!r} is not a valid .npz archive (truncated?): {e}.",
                      zipfile.BadZipFile),
          np.load(path, allow_pickle=False) as z):
        return {k: z[k] for k in z.files}


def file_hash(path: str | os.PathLike, algorithm: str) -> str:
    """Hex digest of a file ("sha256" or "md5"), read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with as_path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(
    url: str, dest: str | os.PathLike, algorithm: str, expected: str, local_hint: str
) -> epath.Path:
    """Download ``url`` to ``dest`` (progress bar), verify its hash, and return ``dest``.

    The bytes go to a temporary file beside ``dest`` (atomic_file) that replaces it only after
    the hash matched, so an interrupted or corrupt download never looks like a cached file.
    ``local_hint`` says how to pass a local copy instead (a sentence); it ends the error
    messages. A host name that does not resolve (DNS: the machine is offline) fails at once,
    naming the host.
    """
    dest = as_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.new(algorithm)
    with atomic_file(dest) as tmp, tmp.open("wb") as out:
        try:
            with urllib.request.urlopen(url, timeout=60) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise UserError(_download_failed(url, e, local_hint)) from e
        if h.hexdigest() != expected:
            raise UserError(
                f"Checksum mismatch for {url}: {algorithm} {h.hexdigest()}, expected {expected}; "
                f"the download was discarded. Try again, or {local_hint[0].lower()}{local_hint[1:]}"
            )
    return dest


def _resolving_host(url: str) -> tuple[str, bool]:
    """The host name a download of ``url`` must resolve, and whether it is a proxy's (the
    ``*_proxy`` environment variables that urllib and requests honour)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy_host = urllib.parse.urlsplit(proxy if "://" in proxy else f"//{proxy}").hostname
        return proxy_host or host, True
    return host, False


def _offline_problem(url: str) -> str:
    """The first words of the error for a download of ``url`` whose host does not resolve."""
    host, proxy = _resolving_host(url)
    return (f"Could not download {url}: {'its proxy host' if proxy else 'its host'} {host} "
            "cannot be resolved (DNS), so this machine seems to be offline.")


def _dns_failed(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps: ``reason``, the cause or context) is a DNS failure."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror):
            return True
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__]
    return False


def _download_failed(url: str, error: BaseException, local_hint: str) -> str:
    if _dns_failed(error):
        return f"{_offline_problem(url)} {local_hint}"
    reason = getattr(error, "reason", None) or error
    return f"Could not download {url} ({brief(reason)}). {local_hint}"


