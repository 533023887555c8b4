"""Fixtures shared by the test files: one smoke run of the real entry point per test session."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import jax  # noqa: F401  (before the cache settings below: this process keeps its own)
import pytest
from filelock import FileLock

from cifar_flax.config import load_config_file

ROOT = pathlib.Path(__file__).resolve().parent.parent

# One JAX compilation cache for the commands the tests start (the environment reaches every child
# process): the same tiny steps compile once per machine instead of once per run (a smoke run:
# 48 -> 23 CPU-seconds). Entries are keyed by the program, the devices and the flags, so a cached
# step is the step the run would have compiled. Tests that train in this process opt in with
# train_utils.enable_compilation_cache (JAX read its settings when conftest imported it).
COMPILATION_CACHE_DIR = os.path.join(tempfile.gettempdir(), "cifar_flax_test_jax_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILATION_CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # Tiny steps: < 1 s.

# The tests compile without LLVM's optimisations (XLA's CPU backend at level 0): compiling is most
# of a test's time and the tiny programs run for milliseconds (a cold smoke run: 46 -> 31
# CPU-seconds). The programs are the same; float results may differ from an optimised build in
# the last bits (fused multiply-adds), so every process of the tests, this one included (JAX reads
# XLA_FLAGS when its backend starts), compiles this way: give children ``cpu_devices_env``.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_TEST_FLAGS}".strip()


def cpu_devices_env(count: int, **extra: str) -> dict[str, str]:
    """The environment of a child process that sees ``count`` CPU devices, with this process's
    other XLA flags (the compiler flags above), plus ``extra`` variables."""
    device_flag = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(device_flag)]
    return {**os.environ, "XLA_FLAGS": " ".join([*flags, f"{device_flag}={count}"]), **extra}


# A child's sitecustomize.py (env_without, env_with_only): the packages in HIDDEN, or with ONLY
# set every package outside ONLY and the standard library, are not found, as if not installed.
# One finder that consults the original ones replaces sys.meta_path, so ``import`` raises "No
# module named ...", ``importlib.util.find_spec`` returns None and ``importlib.metadata`` lists no
# such distribution. (``sys.modules[name] = None`` would also stop imports, but libraries that
# test ``name in sys.modules`` (etils, scipy) then break.)
_HIDING_SITECUSTOMIZE = """import os
import re
import sys
import sysconfig

HIDDEN, ONLY = {hidden!r}, {only!r}
_STDLIB = tuple(os.path.realpath(sysconfig.get_paths()[k]) + os.sep
                for k in ("stdlib", "platstdlib"))


def _visible(name, spec):
    if name in HIDDEN:
        return False
    if ONLY is None or name in ONLY or name in sys.stdlib_module_names:
        return True
    origin = os.path.realpath(spec.origin or "") if spec is not None else ""
    return origin.startswith(_STDLIB) and "-packages" + os.sep not in origin


class _Hiding:
    def __init__(self, finders):
        self.finders = finders

    def find_spec(self, name, path=None, target=None):
        for finder in self.finders:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                return spec if _visible(name.partition(".")[0], spec) else None
        return None

    def find_distributions(self, *args, **kwargs):
        for finder in self.finders:
            for dist in getattr(finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs):
                name = re.sub(r"[-.]+", "_", dist.metadata["Name"] or "").lower()
                if name not in HIDDEN and (ONLY is None or name in ONLY):
                    yield dist

    def invalidate_caches(self):
        for finder in self.finders:
            getattr(finder, "invalidate_caches", lambda: None)()


sys.meta_path[:] = [_Hiding(list(sys.meta_path))]
"""


def _hiding_env(directory: pathlib.Path, hidden: tuple, only: tuple | None,
                env: dict | None) -> dict[str, str]:
    """``env`` (default: this process's) with the sitecustomize.py above, written into
    ``directory``, first on PYTHONPATH: it reaches the child and every Python process it starts."""
    (directory / "sitecustomize.py").write_text(_HIDING_SITECUSTOMIZE.format(
        hidden=tuple(sorted(set(hidden))), only=None if only is None else tuple(sorted(set(only)))))
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory), env.get("PYTHONPATH")) if p)
    return env


def env_without(directory: pathlib.Path, *modules: str, env: dict | None = None
                ) -> dict[str, str]:
    """The environment of child Python processes in which ``modules`` (top-level names, e.g.
    "torch") are missing as if not installed."""
    return _hiding_env(directory, modules, None, env)


def env_with_only(directory: pathlib.Path, *packages: str, env: dict | None = None
                  ) -> dict[str, str]:
    """The environment of child Python processes that see nothing but the standard library and
    ``packages`` (top-level names, e.g. "jax", "numpy"), as in a fresh virtual environment
    holding only those."""
    return _hiding_env(directory, (), packages, env)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, worker_id) -> pathlib.Path:
    """The workdir of one finished ``python -m cifar_flax.main --config configs/smoke.py`` run.

    Shared by every test that needs a trained run (predict, evaluate, export, init_from), and by
    the parallel workers of one session (the first to need it trains it, the others wait on a
    file lock); tests must not write into it (copy it first)."""
    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # The session's folder, all workers'.
    workdir = root / "smoke_run"
    with FileLock(str(root / "smoke_run.lock")):
        if not (workdir / "report" / "results.json").exists():
            p = subprocess.run(
                [sys.executable, "-m", "cifar_flax.main", "--config", "configs/smoke.py",
                 "--workdir", str(workdir)],
                cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ},
            )
            assert p.returncode == 0, p.stderr[-3000:]
    assert (workdir / "report" / "results.json").exists()
    return workdir


def load_config(name: str, arg: str | None = None):
    """``configs/<name>.py``'s ``get_config(arg)`` (what ``--config configs/<name>.py:arg`` loads)."""
    path = str(ROOT / "configs" / f"{name}.py")
    return load_config_file(path if arg is None else f"{path}:{arg}")


@pytest.fixture
def smoke_config():
    """A fresh copy of configs/smoke.py's config."""
    return load_config("smoke")


@pytest.fixture
def fresh_caches():
    """Clear the input pipeline's per-dataset caches before and after a test (tests that build
    their own datasets under reused paths; use with ``pytest.mark.usefixtures``)."""
    from cifar_flax.data import input_pipeline

    input_pipeline.clear_caches()
    yield
    input_pipeline.clear_caches()


# The files whose end-to-end runs take minutes (experiments/README.md, "The test suite's time").
LONGEST_FILES = ("test_data_efficiency.py", "test_multiprocess.py", "test_notebook_ablation.py")


def pytest_collection_modifyitems(items):
    """The longest files first, then the other files with end-to-end (slow) tests: the parallel
    workers (pytest.ini) take whole files in this order, so the long ones start early and short
    ones fill the end, instead of one long file running alone while the other cores wait."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (item.path.name not in LONGEST_FILES,
                                 item.path not in slow_files))  # Stable: the order in a file.


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the commands and scripts (the "
                            "fast tier, -m 'not slow', leaves them out)")


@pytest.fixture
def no_dns(monkeypatch):
    """A machine without a network: every host name lookup fails (nothing is ever contacted).
    The names looked up are recorded; proxy settings of the environment are removed."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    looked_up = []

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up
