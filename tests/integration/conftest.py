"""Fixtures of the integration tests: a real Prefect test server, a tiny project made in code.

The tiny project uses scikit-learn's bundled 8x8 digits and the ``*_tiny`` models so that one whole
pipeline run takes seconds; every stage and every method still runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsv.protocols import METHOD_NAMES

ROOT = Path(__file__).resolve().parents[2]
_STATE = Path(tempfile.mkdtemp(prefix="dsv-it-"))
# Prefect reads its settings at import: point it at a private home before anything imports it.
os.environ["PREFECT_HOME"] = str(_STATE / "prefect-home")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

# Every key whose section default is the main job's (params.yaml) is written out where the tiny project needs
# another value: every method and init kind, all training images for λ, a constant learning rate.
TINY_PARAMS = """\
prepare:
  data: {name: digits, n_per_class: 40, seed: 0}
  val_per_class: 5
  init_pool: {dataset: photos, size: 60}
pretrain:
  model: {name: convnet_tiny}
  fit: {optimizer: adam, lr: 5e-3, weight_decay: 5e-3, steps: 40, batch_size: 64, augment: none, schedule: none}
extract:
  inits: [nshot, 0shot, noise, herding, kcenter, kkt_herding]
  ipcs: [2]
  shards: 2
  solver: {steps: 4, log_every: 2, dual: clamp}
  warmup: {steps: 4, log_every: 2}
coreset:
  per_class: null
  lam: {batch_size: 200, steps: 10}
distill:
  methods: [__METHODS__]
  ipcs: [2]
  full_epochs: 1
  dm: {iterations: 2, batch_real: 8, model: {name: convnet_tiny}}
  proxy:
    model: {name: convnet_tiny}
    fit: {optimizer: sgd, lr: 0.01, epochs: 1, batch_size: 64}
    el2n_models: 1
    el2n_epochs: 1
  protocol: {name: dd, epochs: 1, min_steps: 3, n_runs: 2, model: {name: convnet_tiny}}
judge:
  model: {name: convnet_tiny, norm: batch, pool: max}
  fit: {optimizer: adam, lr: 5e-3, steps: 20, batch_size: 64}
generate:
  per_class: 1
  deltas: [0.0, 1.0]
  edits: 3
  recipe: {steps: 6, views: 1, log_every: 2}
runtime: {threads: 1, log_models: false}
""".replace("__METHODS__", ", ".join(METHOD_NAMES))
# Rows the tiny project produces: 6 inits x IPC 2 x 10 classes DSVs (always IPC per class), and 10 classes x
# (40 - 5) training images with a λ each.
TINY_DSV_ROWS = 6 * 2 * 10
TINY_TRAIN = 10 * 35
PROJECT_FILES = ("dsv", "tasks", "flows", "dvc.yaml", ".dvcignore", "pyproject.toml")


def copy_project(dest: Path, params: str = TINY_PARAMS) -> Path:
    """A copy of the code (never edit /work/main from a test) with the tiny params.yaml."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "params.yaml").write_text(params)
    return dest


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server for the session (prefect_test_harness); yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def state_dir() -> Path:
    return _STATE
