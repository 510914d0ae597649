"""The stage cache: JSON records keyed by SHA-256, nothing ever unpickled.

Prefect's own result persistence stores task results with cloudpickle, and the *file* names its
serializer: a crafted result file would be unpickled on the next run whatever the task asks for. So the
tasks persist nothing through Prefect (``persist_result=False``, no Prefect cache policy) and cache here
instead: one JSON file per key under ``<root>/.dsv/cache/<stage>/<key>.json`` holding the task's small
result (relative artifact paths with their SHA-256, metrics, plain values), read back with ``json``
only and checked for shape. A hit is used only when every artifact it names is on disk with the
recorded hash; otherwise the task runs again and overwrites the record.

A record cannot lie about what it does not name as a file either (its metrics, timings, the producing
run): it carries ``record_sha256``, a SHA-256 over its own canonical JSON and its place in the cache
(stage and key), so a record edited by hand or by another tool, or copied under another key, no longer
matches; it is then a miss, reported with a warning, and the stage is recomputed. (A writer who
recomputes the digest is not stopped: there is no secret it could not read beside the records.)

The key covers what Prefect's policy covered: the stage, the params sections it reads, the hashes of
its upstream artifacts, its unit (mapped stages), the task wrapper's source and the stage's code closure
(``tasks.stages.code_hash``), and for the stages that compute on a device the resolved device type (cpu or
cuda: the bits differ, so a CPU result never stands in for a CUDA run); never the rest of the runtime context
(paths, MLflow run id, threads).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
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


RECORD_DIGEST = "record_sha256"


def record_digest(path: Path, record: dict[str, Any]) -> str:
    """SHA-256 binding ``record`` (without its digest) to its place in the cache (``<stage>/<key>``)."""
    body = json.dumps({k: v for k, v in record.items() if k != RECORD_DIGEST}, sort_keys=True, allow_nan=True,
                      separators=(",", ":"), default=str)
    return hashlib.sha256(f"{path.parent.name}/{path.stem}\0{body}".encode()).hexdigest()


def load_record(path: Path) -> dict[str, Any] | None:
    """A cache record (without its digest), or None when absent, malformed or not matching its digest (a
    malformed or altered record is a miss, not an error; an altered one is reported on stderr)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["files"].items()):
        return None
    digest = data.pop(RECORD_DIGEST, None)
    if digest != record_digest(path, data):
        why = "has no integrity digest" if digest is None else "does not match its integrity digest (edited?)"
        _warn(f"cache record {path} {why}; not trusted, the stage is recomputed")
        return None
    return data


def _warn(message: str) -> None:
    """A warning in the Prefect run's log when inside a flow or task run, else one line on stderr."""
    try:
        from prefect.exceptions import MissingContextError
        from prefect.logging import get_run_logger

        get_run_logger().warning(message)
    except (ImportError, MissingContextError):
        print(f"dsv: warning: {message}", file=sys.stderr, flush=True)


def lookup(root: Path, stage: str, key: str, paths: Paths, verify_files: bool = True) -> dict[str, Any] | None:
    """The recorded result for ``key`` when every artifact it names is intact, else None. ``verify_files``
    False: the caller verified them an instant ago (the record's own digest is checked all the same)."""
    rec = load_record(cache_dir(root) / stage / f"{key}.json")
    if rec is None or (verify_files and verify(paths, StageOutput(stage, rec["files"], {}))):
        return None
    return rec


def store(root: Path, stage: str, key: str, result: dict[str, Any]) -> None:
    """Write a record with its digest atomically (temp file + fsync + rename)."""
    _write(cache_dir(root) / stage / f"{key}.json", result)


def _write(path: Path, record: dict[str, Any]) -> None:
    write_json(path, {**record, RECORD_DIGEST: record_digest(path, record)})


def _tree_fingerprint(root: Path) -> str:
    """SHA-256 over (relative path, size, mtime) of every file under ``root`` (a data folder can hold
    60,000 images: their metadata, not their bytes)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _fingerprint(path: Path) -> str:
    if path.is_dir():
        return "tree:" + _tree_fingerprint(path)
    if path.is_file():
        from tasks.atomic import file_sha256

        return "sha256:" + file_sha256(path)
    return "missing"


def external_inputs(cfg: Any, stage: str) -> dict[str, str]:
    """Inputs of ``stage`` that live outside the artifacts, by content, for its cache key: the teacher
    checkpoint (``pretrain.checkpoint``, SHA-256 of its bytes) and the user's own data (``prepare``:
    an ImageFolder tree by file metadata, a tabular file by its bytes). A new file at the same path reruns
    the stage and everything downstream."""
    out: dict[str, str] = {}
    if stage == "pretrain" and cfg.pretrain.checkpoint is not None:
        out["external:pretrain.checkpoint"] = _fingerprint(Path(cfg.pretrain.checkpoint))
    if stage == "prepare":
        for key, name, root in (("prepare.data", cfg.prepare.data.name, cfg.prepare.data.root),
                                ("prepare.init_pool", cfg.prepare.init_pool.dataset, cfg.prepare.init_pool.root)):
            if name in ("imagefolder", "tabular"):
                out[f"external:{key}.root"] = _fingerprint(Path(root))
    return out


# ----------------------------------------------------------------------------- the last output of a stage


def store_last(root: Path, out: StageOutput) -> None:
    """Record ``out`` as the stage's latest output (``.dsv/cache/<stage>/last.json``), written by ``dsv run``
    and ``dsv stage`` alike, so either path can name its upstream artifacts the way the other does."""
    _write(cache_dir(root) / out.stage / "last.json", out.to_dict())


def last_output(root: Path, stage: str, paths: Paths) -> StageOutput | None:
    """The stage's latest recorded output when every artifact it names is intact, else None."""
    rec = load_record(cache_dir(root) / stage / "last.json")
    if rec is None or not isinstance(rec.get("metrics"), dict):
        return None
    out = StageOutput.from_dict({**rec, "stage": stage})
    return None if verify(paths, out) else out
