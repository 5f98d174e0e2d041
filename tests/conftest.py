"""Test configuration: where kernels run, and hypothesis profiles.

``pytest`` (default ``--device cpu``) runs every Triton kernel through the interpreter on CPU
tensors; ``pytest --device cuda`` runs the same tests on a GPU. ``TRITON_INTERPRET`` is set in
``pytest_configure``, which runs before any test module (and so any kernel module) is imported.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=["cpu", "cuda"],
                     help="run kernel tests on CPU through Triton's interpreter (default) or on a CUDA GPU")


def pytest_configure(config):
    if config.getoption("--device") == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda given but torch sees no CUDA device")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device kernel tests run on (CPU means: through the Triton interpreter)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)


@pytest.fixture
def poisoned_kernel_outputs(monkeypatch):
    """Every buffer a kernel candidate hands a launcher to fill starts as NaN (a kernel that skips an
    element fails the comparison instead of passing on stale memory). Imported here, not at the top:
    ``pytest_configure`` must set the interpreter first."""
    from lora_triton.ops import candidates
    from lora_triton.testing import poison_

    original = candidates.new_output
    monkeypatch.setattr(candidates, "new_output", lambda *shape, **kw: poison_(original(*shape, **kw)))
