"""The stage cache: JSON records keyed by SHA-256, nothing ever unpickled.

Prefect's own result persistence stores task results with cloudpickle, and the *file* names its
serializer: a crafted result file would be unpickled on the next run whatever the task asks for. So the
tasks persist nothing through Prefect (``persist_result=False``, no Prefect cache policy) and cache here
instead: one JSON file per key under ``<root>/.dsv/cache/<stage>/<key>.json`` holding the task's small
result (relative artifact paths with their SHA-256, metrics, plain values), read back with ``json``
only and checked for shape. A hit is used only when every artifact it names is on disk with the
recorded hash; otherwise the task runs again and overwrites the record.

The key covers what Prefect's policy covered: the stage, the params sections it reads, the hashes of
its upstream artifacts, its unit (mapped stages), the task wrapper's source and the stage's code closure
(``tasks.stages.code_hash``); never the runtime context (paths, MLflow run id, device).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.atomic import write_json
from tasks.paths import Paths, ProjectPaths
from tasks.stages import StageOutput, code_hash, verify


def source_hash(fn: Callable[..., Any]) -> str:
    """SHA-256 of a function's source (computed where the module is imported, so that a function shipped
    to a Dask worker, whose source is not at hand there, keys the same as in the main process)."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()


def cache_key(kind: str, source: str, stage: str, **inputs: Any) -> str:
    """SHA-256 over the task kind, its wrapper's source hash, the stage's code closure and the JSON inputs."""
    h = hashlib.sha256()
    h.update(kind.encode() + b"\0" + stage.encode() + b"\0" + source.encode() + b"\0")
    h.update(code_hash(stage).encode())
    h.update(json.dumps(inputs, sort_keys=True, default=str, allow_nan=True).encode())
    return h.hexdigest()


def cache_dir(root: Path) -> Path:
    """``<root>/.dsv/cache``."""
    return ProjectPaths(root).cache


def load_record(path: Path) -> dict[str, Any] | None:
    """A cache record, or None when absent or malformed (a malformed record is a miss, not an error)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["files"].items()):
        return None
    return data


def lookup(root: Path, stage: str, key: str, paths: Paths) -> dict[str, Any] | None:
    """The recorded result for ``key`` when every artifact it names is intact, else None."""
    rec = load_record(cache_dir(root) / stage / f"{key}.json")
    if rec is None or verify(paths, StageOutput(stage, rec["files"], {})):
        return None
    return rec


def store(root: Path, stage: str, key: str, result: dict[str, Any]) -> None:
    """Write a record atomically (temp file + fsync + rename)."""
    write_json(cache_dir(root) / stage / f"{key}.json", result)
