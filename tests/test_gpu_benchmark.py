"""benchmarks/gpu.py keeps working without a GPU: tiny params on the CPU, and no pipeline tool on its import path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tasks.distill import HEADLINE_METHODS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def test_stage_code_imports_no_pipeline_tool() -> None:
    """The GPU machine has no Prefect, MLflow or DVC: the stage registry, every stage module, the params loader
    and the null logger import none of them (a finder that refuses them makes any such import fail)."""
    code = f"""
import runpy, sys
bench = runpy.run_path({str(SCRIPT)!r})
bench["_block_pipeline_tools"]()
try:
    import mlflow
except ImportError as exc:
    assert "must not import 'mlflow'" in str(exc), exc
else:
    raise SystemExit("the import blocker let mlflow through")
from tasks.config import load_config
from tasks.stages import STAGES, stage_module
from tasks.tracking import NullLog
load_config({str(ROOT / "params.yaml")!r})
for name in STAGES:
    stage_module(name)
tools = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "mlflow", "dvc"))
assert not tools, tools
print("clean")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("clean")


def test_tiny_benchmark_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out),
                           "--skip", "cuda_eager"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    stages = ["prepare", "pretrain", "judge", "extract", "coreset", "distill", "generate", "evaluate"]
    for name in ("cuda", "cpu"):  # --device cpu: the "cuda" run is the dry run of the device's configuration
        run = report["runs"][name]
        assert "error" not in run, run.get("error")
        assert list(run["stage_seconds"]) == stages and all(v > 0 for v in run["stage_seconds"].values())
        assert set(run["devices"].values()) == {"cpu"} and run["imported_pipeline_tools"] == []
        assert {r["method"] for r in run["rows"]} == set(HEADLINE_METHODS)  # the main job's methods
    checks = report["checks"]
    assert checks["max_abs_acc_gap_points"] == 0.0  # the same configuration on the same CPU: bit-identical
    assert checks["stage_sum_cuda_s"] == report["runs"]["cuda"]["stage_sum_seconds"] and checks["speedup_vs_cpu"] > 0
    micro = report["micro"]
    assert "error" not in micro, micro.get("error")
    every = 2 * len(HEADLINE_METHODS)  # every student of the main job (2 seeds per method)
    assert {"looped_eager", "batched2_eager", f"batched{every}_eager"} <= set(micro["student_ms"])
    assert micro["kkt_step_ms"] > 0 and micro["train_step_ms"] > 0 and checks["kkt_train_ratio"] > 0
    md = (out / "gpu.md").read_text()
    assert "| **total** |" in md and "| dsv_herding | 2 |" in md and "DeepKKT step" in md
