"""Shared test fixtures. Telemetry of the pipeline tools is switched off before anything imports them."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Unit tests use tiny tensors: on a shared 2-core machine, intra-op threads only add synchronisation
# (a tiny fit ran ~10x slower with 2 threads under load). DSV_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("DSV_TEST_THREADS", "1")))

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Run a test on the CPU always and on CUDA when one is present."""
    return request.param
