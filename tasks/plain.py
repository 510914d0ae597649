"""Plain data: configs as YAML/JSON-able dicts, their canonical hash, and flat keys for MLflow and DVC.

Part of every stage's code closure (the resolved params files and the params hashes stored with artifacts are
written with it), unlike :mod:`tasks.config`, whose values reach the stages only through the params they are
keyed on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists (YAML/JSON-able, hash-stable)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def dump_yaml(data: Any, width: int = 4096, flow: bool | None = None) -> str:
    """Deterministic YAML 1.2 text of plain data, keys in their order, written by the library that reads params
    (ruamel.yaml, as DVC; re-readable by ``tasks.config.parse_yaml``): collections of scalars in flow style, one per
    line (``flow`` None; ruamel would wrap a long one between a key and its value), or block style everywhere
    (``flow`` False, lines of at most about ``width`` characters)."""
    from ruamel.yaml import YAML

    writer = YAML(typ="safe", pure=True)
    writer.default_flow_style, writer.width, writer.sort_base_mapping_type_on_output = flow, width, False
    buf = io.StringIO()
    writer.dump(to_plain(data), buf)
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def params_hash(data: Any) -> str:
    """SHA-256 of the canonical JSON of plain data (the "params hash" stored with artifacts)."""
    text = json.dumps(to_plain(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
