"""The examples under examples/ run as documented and do what their text says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return {k: float(v) for k, v in (line.split(": ") for line in done.stdout.strip().splitlines())}


def test_python_api_example() -> None:
    out = _run("python_api.py")
    assert out["teacher_acc"] > 0.85
    assert out["n_dsv"] >= 1 and out["dsv_min"] >= 0.0 and out["dsv_max"] <= 1.0
    assert out["lam_rows"] == 300
    # δ = 0 ends classified as class a, δ = 1 as class b
    assert (out["strip_start_class"], out["strip_end_class"]) == (3.0, 8.0)
