"""``dsv`` is a pure PyTorch library: importing every module of it loads no pipeline tooling."""

from __future__ import annotations

import json
import subprocess
import sys

# Pipeline/orchestration packages dsv must never import.
FORBIDDEN = ("prefect", "mlflow", "dvc", "tasks", "flows")
# Optional dependencies dsv may only import lazily, inside the function that needs them (pyarrow: only to
# read a user's CSV or Parquet table in dsv.data.readers.read_tabular; timm: only for "timm:" models).
LAZY = ("sklearn", "PIL", "torchvision", "matplotlib", "pandas", "pyarrow", "timm")

_SCRIPT = """
import importlib, json, pkgutil, sys
import dsv
names = ["dsv"]
for info in pkgutil.walk_packages(dsv.__path__, "dsv."):
    importlib.import_module(info.name)
    names.append(info.name)
print(json.dumps({"imported": names, "loaded": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def _import_all_of_dsv() -> dict[str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_dsv_imports_no_pipeline_tooling() -> None:
    out = _import_all_of_dsv()
    assert {"dsv.models", "dsv.train", "dsv.augment", "dsv.data.registry"} <= set(out["imported"])
    bad = sorted(set(FORBIDDEN) & set(out["loaded"]))
    assert not bad, f"importing dsv loaded {bad}"
    lazy = sorted(set(LAZY) & set(out["loaded"]))
    assert not lazy, f"importing dsv eagerly loaded optional dependencies {lazy}; import them inside functions"
