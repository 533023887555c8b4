"""A tfds dataset that is not prepared, on a machine without a network: one line at once.

tfds retries a download whose host does not resolve for minutes before it fails; the source fails
within seconds instead, naming the host, that the machine seems offline, the root data_dir (what
``--config.data_dir`` takes, not tfds' ``<root>/cifar10/<version>`` folder) and what to do. A file
already in tfds' download cache needs no network, so it still goes to tfds. Other failures of the
download are one line too, the exception's text cut at a word. No test touches the network: host
name lookups fail (socket.getaddrinfo), and tfds' download_and_prepare is replaced.
"""

from __future__ import annotations

import socket
import time
import types

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import resource

from cifar_flax import UserError
from cifar_flax.data import sources

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"  # tfds' cifar10 checksums list
FIX = ("Set --config.data_dir to a folder holding a prepared copy (with cifar10/3.0.2/ in it), or "
       "use --config.dataset=imagefolder:<dir>.")


@pytest.fixture(scope="module", autouse=True)
def warm_builder(tmp_path_factory):
    """Build the cifar10 builder once, so that the timed calls do not time tfds' own imports."""
    tfds.builder("cifar10", data_dir=str(tmp_path_factory.mktemp("warm")))


@pytest.fixture
def download(monkeypatch):
    """Replace tfds' download_and_prepare: calls are recorded, then ``download.error`` raised
    (by default a failure of the test: the download must not start)."""
    state = types.SimpleNamespace(calls=[], error=AssertionError("download must not start"))

    def download_and_prepare(builder, *args, **kwargs):
        state.calls.append(builder.name)
        raise state.error

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download_and_prepare)
    return state


def _offline_line(root) -> str:
    return (f"tfds dataset 'cifar10' is not prepared in data_dir {str(root)!r} and its download "
            f"host www.cs.toronto.edu cannot be resolved (DNS): this machine seems to be offline. "
            f"{FIX}")


def test_unresolvable_host_fails_at_once(tmp_path, no_dns, download, smoke_config):
    """Through get_source (what training calls) with config.data_dir: the offline line, at once."""
    root = tmp_path / "tfds"
    smoke_config.dataset, smoke_config.data_dir = "cifar10", str(root)
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        sources.get_source(smoke_config)
    elapsed = time.monotonic() - start
    print(f"\n{e.value} ({elapsed:.2f} s)")
    assert elapsed < 5
    assert str(e.value) == _offline_line(root)
    assert f"{root}/cifar10" not in str(e.value)  # the root, not the versioned folder
    assert no_dns == ["www.cs.toronto.edu"] and download.calls == []


def test_unresolvable_proxy_is_named(tmp_path, no_dns, download, monkeypatch):
    """Behind a proxy, the proxy's name is the one that must resolve."""
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    with pytest.raises(UserError, match="download host proxy.example cannot be resolved"):
        sources._tfds_source("cifar10", str(tmp_path), ["train", "test"])
    assert no_dns == ["proxy.example"] and download.calls == []


def _cache_the_download(root) -> None:
    """Put cifar10's archive where tfds' download cache keeps it: the download needs no network."""
    info = tfds.builder("cifar10", data_dir=str(root)).url_infos[URL]
    path = root / "downloads" / "cifar10" / resource.get_dl_fname(URL, info.checksum)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")


def test_cached_download_goes_to_tfds_and_errors_are_cut_at_a_word(tmp_path, no_dns, download):
    """A download in the cache needs no DNS: tfds runs. Its failure: one line, root data_dir,
    the exception's text cut at a word boundary with '...'."""
    _cache_the_download(tmp_path)
    download.error = RuntimeError("Extraction of the archive failed because " +
                                  "the archive is rather damaged " * 12 + "ENDWORD\nsecond line")
    with pytest.raises(UserError) as e:
        sources._tfds_source("cifar10", str(tmp_path), ["train", "test"])
    msg = str(e.value)
    print(f"\n{msg}")
    assert download.calls == ["cifar10"] and no_dns == []
    head = (f"tfds dataset 'cifar10' is not prepared in data_dir {str(tmp_path)!r} and its "
            "download or preparation failed (RuntimeError: Extraction of the archive failed ")
    assert msg.startswith(head) and msg.endswith(f"...). {FIX}")
    reason = msg[len(head) - len("Extraction of the archive failed "):-len(f"). {FIX}")]
    assert len(reason) <= 203 and "ENDWORD" not in msg and "\n" not in msg
    assert reason[:-3].split()[-1] in {"the", "archive", "is", "rather", "damaged"}  # whole word


def test_dns_failure_inside_the_download_is_the_offline_line(tmp_path, no_dns, download):
    """A DNS failure that only shows inside tfds' download (wrapped, as requests wraps it) gives
    the same offline line."""
    _cache_the_download(tmp_path)
    try:
        try:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        except socket.gaierror as dns:
            raise ConnectionError("Max retries exceeded with url: /~kriz/...") from dns
    except ConnectionError as wrapped:
        download.error = wrapped
    with pytest.raises(UserError) as e:
        sources._tfds_source("cifar10", str(tmp_path), ["train", "test"])
    assert str(e.value) == _offline_line(tmp_path)
