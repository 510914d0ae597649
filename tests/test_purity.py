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


# The one exception to "no IO in dsv", decided and written down (README, Layout): a library people import in
# notebooks owns its dataset readers (dsv/data: IDX, CIFAR, ImageFolder, CSV/Parquet, and the opt-in download)
# and reads a checkpoint a user hands it (dsv.models.load_checkpoint, never unpickling code). Nothing else in
# dsv touches a file; writing files is the pipeline's job (tasks/, atomically).
PATH_IO = ("read_bytes", "read_text", "write_bytes", "write_text", "mkdir", "unlink", "rmdir", "touch")
MODULE_IO = {"torch": ("save", "load"), "os": ("replace", "rename", "remove", "makedirs"), "shutil": None,
             "urllib": None, "request": None}
BARE_IO = ("open", "load_file", "save_file", "urlopen", "urlretrieve")
IO_ALLOWED = {"dsv/models.py": {"torch.load", "load_file"}}


def test_file_io_in_dsv_only_where_decided() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found: dict[str, set[str]] = {}
    for path in sorted((root / "dsv").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("dsv/data/"):
            continue  # the dataset readers (see above)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if isinstance(f, ast.Name) and f.id in BARE_IO:
                found.setdefault(rel, set()).add(f.id)
            elif isinstance(f, ast.Attribute):
                owner = f.value.id if isinstance(f.value, ast.Name) else ""
                if f.attr in PATH_IO or (owner in MODULE_IO and (MODULE_IO[owner] is None
                                                                 or f.attr in MODULE_IO[owner])):
                    found.setdefault(rel, set()).add(f"{owner}.{f.attr}" if owner in MODULE_IO else f.attr)
    extra = {f: names - IO_ALLOWED.get(f, set()) for f, names in found.items()}
    assert not {f: n for f, n in extra.items() if n}, f"file IO outside dsv/data and the checkpoint reader: {extra}"
    assert found.get("dsv/models.py") == {"torch.load", "load_file"}  # the checkpoint reader is really found
