"""params.yaml -> one typed, frozen :class:`PipelineConfig`, validated before anything runs.

The file has one section per stage that has settings (``prepare``, ``pretrain``, ``judge``, ``extract``,
``coreset``, ``distill``, ``generate``; ``evaluate`` only summarises and has none) plus ``runtime`` (device,
output folder, logging, parallelism; never part of a cache key but for the device). Each stage owns its
section: the frozen dataclass (composing the ``dsv`` components' own config dataclasses) and its checks live in
``tasks/<stage>.py`` (:data:`STAGE_MODULES`); this module only assembles them and parses the file.

Defaults: the sections' defaults are the pipeline's, i.e. the main job (a 15-minute run on a 2-core CPU);
params.yaml writes every one of them out and a test keeps the two equal. A nested key left out of a file keeps
its section's default (``pretrain.fit.lr=...`` keeps the section's epochs). The ``dsv`` dataclasses keep their
own defaults, the field's and the paper's values, for people who call the library directly.

Validation is driven by the dataclass fields (:func:`tasks.ranges.build`: types, ranges, did-you-mean, the
dataclasses' own checks), then the stages' checks that span sections (:func:`cross_check`) and, right after
``prepare``, those that need the data (:func:`data_checks`). All problems are collected into one
:class:`ConfigError` whose message is a single line.

This module decides nothing a stage computes, and it is outside every stage's code closure
(:mod:`tasks.stages`): editing a message here reruns nothing.

YAML is parsed exactly as DVC parses it (ruamel.yaml's safe loader, YAML 1.2: ``5e-4`` is a float;
duplicate keys are errors); aliases, non-UTF-8 text and files over 1 MiB are refused. Every float must
be finite (NaN and inf are rejected, naming the key).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks import coreset, distill, evaluate, extract, generate, judge, prepare, pretrain
from tasks.coreset import CoresetConfig
from tasks.distill import DistillConfig
from tasks.extract import ExtractStageConfig
from tasks.generate import GenerateStageConfig
from tasks.judge import JudgeConfig
from tasks.plain import to_plain
from tasks.prepare import PrepareConfig
from tasks.pretrain import PretrainConfig
from tasks.ranges import build
from tasks.runtime import RuntimeConfig

# The stage modules, in pipeline order: each has its section's checks (``check(cfg, data=None)``).
STAGE_MODULES = (prepare, pretrain, judge, extract, coreset, distill, generate, evaluate)

# Keys that moved or went away, and what to write instead (an old params file gets this, not a bare "unknown key").
MOVED: dict[str, str] = {
    "evaluate": "the student protocol moved to the stage that trains the students: distill.protocol and "
                "distill.cross_model (the evaluate stage has no settings)",
    "extract.solver.kkt.eta": "the paper's η is split in two: extract.solver.kkt.eta_stat (stationarity on the "
                              "augmented copy) and extract.solver.kkt.eta_primal (the primal term on it)",
    "runtime.task_runner": "runtime.workers > 1 (or runtime.dask_address) runs the mapped units on Dask worker "
                           "processes; threads are gone",
    "*.augment": "an augmentation is one string: a preset (none, flip_crop, dsa, kkt, generate) or explicit ops "
                 "such as 'translate|crop|flip|noise' (one per step) or 'translate+flip' (all); see dsv.augment",
    "*.kd_temperature": "knowledge distillation belongs to the soft student protocol: distill.protocol.kd_temperature",
    "*.kd_alpha": "knowledge distillation belongs to the soft student protocol: distill.protocol.kd_alpha",
    "distill.dm_real": "DM's real pool is the few-shot one (ipc images per class, dsv_nshot's budget); the "
                       "whole-split variant was never set anywhere and is gone",
    "distill.protocol.eval_batch_size": "test sets are scored in batches of 1024 everywhere (memory only, no "
                                        "effect on any result)",
    "distill.dm.report_every": "the pipeline reports no DM progress (dsv.dm.distribution_matching's report_every)",
    "generate.recipe.target_mix": "moved to generate.target_mix (only the samples read it)",
    "extract.warmup.target_mix": "the warm-up never read it (it steers generate's samples: generate.target_mix)",
}


class ConfigError(ValueError):
    """Invalid params: the message names every bad key and what is allowed, on one line."""


@dataclass(frozen=True)
class PipelineConfig:
    """The whole params file."""

    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    extract: ExtractStageConfig = field(default_factory=ExtractStageConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    generate: GenerateStageConfig = field(default_factory=GenerateStageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def section_dict(self, name: str) -> dict[str, Any]:
        """One section as plain YAML-able data (tuples as lists)."""
        return to_plain(getattr(self, name))

    def sections(self, names: Sequence[str]) -> dict[str, Any]:
        """The named sections as plain data, e.g. the inputs of a stage's cache key."""
        return {n: self.section_dict(n) for n in names}

    def restricted(self, names: Sequence[str]) -> PipelineConfig:
        """A copy where every section not in ``names`` (except runtime) is back to its default.

        A stage runs on ``cfg.restricted(its sections)`` on every code path, so it cannot read a
        section its cache key (and dvc.yaml) does not list.
        """
        keep = set(names) | {"runtime"}
        defaults = PipelineConfig()
        return dataclasses.replace(
            defaults, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in keep}
        )

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PipelineConfig))


def cross_check(cfg: PipelineConfig) -> list[str]:
    """The stages' checks that span sections (run on the full file, not on a stage's restricted view)."""
    return [e for m in STAGE_MODULES if hasattr(m, "check") for e in m.check(cfg)]


def data_checks(cfg: PipelineConfig, classes: Sequence[str], train_per_class: Sequence[int],
                test_per_class: Sequence[int], input_shape: Sequence[int] | None = None) -> list[str]:
    """The stages' checks that need the prepared data (run right after ``prepare``, before any expensive stage).

    Args:
        cfg: the whole config.
        classes: class names; train_per_class / test_per_class: images per class in the training split
            (after the validation hold-out) and in the test split.
        input_shape: one input's shape (the models must take it; the memory estimate of the λ fit).

    Returns:
        One message per problem, naming the key to change.
    """
    data = {"classes": list(classes), "train_per_class": list(train_per_class),
            "test_per_class": list(test_per_class), "input_shape": None if input_shape is None else list(input_shape)}
    return [e for m in STAGE_MODULES if hasattr(m, "check") for e in m.check(cfg, data)]


# ------------------------------------------------------------------------------------------ loading


MAX_PARAMS_BYTES = 1 << 20  # a params file is a few KB; refuse anything that is not one
MAX_PARAMS_NODES = 100_000


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML exactly as DVC does (ruamel.yaml, ``YAML(typ="safe")``: YAML 1.2, so ``5e-4`` is a
    float and ``on`` a string; a duplicate key is an error). Anchors/aliases are refused (a tiny alias
    bomb expands to gigabytes when the data is copied), and so is a text over 1 MiB; every problem
    becomes one :class:`ConfigError` line naming ``source``."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    if len(text) > MAX_PARAMS_BYTES:
        raise ConfigError(f"{source}: {len(text)} characters; a params file may have at most {MAX_PARAMS_BYTES}")
    try:
        data = YAML(typ="safe").load(text)
    except YAMLError as exc:
        msg = " ".join(str(exc).split())
        raise ConfigError(f"{source}: not valid YAML: {msg}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: YAML nested too deeply") from exc
    _check_tree(data, source)
    return data


def _check_tree(data: Any, source: str) -> None:
    """Refuse shared nodes (YAML aliases) and oversized trees without expanding anything."""
    seen: set[int] = set()
    stack = [data]
    count = 0
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            if id(node) in seen:
                raise ConfigError(f"{source}: YAML anchors and aliases (&name / *name) are not allowed in params")
            seen.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
        count += 1
        if count > MAX_PARAMS_NODES:
            raise ConfigError(f"{source}: more than {MAX_PARAMS_NODES} values; not a params file")


def _read_text(path: str | Path) -> str:
    """A params file's text (at most 1 MiB of UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file {str(p)!r} not found")
    try:
        if p.stat().st_size > MAX_PARAMS_BYTES:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes; a params file may have at most {MAX_PARAMS_BYTES}")
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise ConfigError(f"params file {str(p)!r} cannot be read: {exc.strerror}") from None


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply DVC-style ``section.key=value`` overrides (value parsed as YAML) to a copy of ``raw``."""
    out: dict[str, Any] = json.loads(json.dumps(raw, default=list))  # deep copy of plain data
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(value, f"override {item!r}") if value.strip() else None
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Load, override and validate a params file; raises :class:`ConfigError` naming every bad key.

    Parsed once per process: ``dsv run`` validates before Prefect starts and the flow asks again for the same
    file; the second call returns the same frozen object (keyed on the file's text, not its name or age).

    Args:
        path: params.yaml path; None = defaults only.
        overrides: ``section.key=value`` strings (``-S`` on the command line).
    """
    text = _read_text(path) if path is not None else None
    # Relative paths in the params (a checkpoint, a CSV) are read from the working directory: part of the key.
    key = (os.getcwd(), text, tuple(overrides))
    if key not in _PARSED:
        source = str(path) if path is not None else "params"
        raw = parse_yaml(text, source) if text is not None else {}
        if raw is None:  # an empty file: all defaults
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), "
                              f"got {type(raw).__name__}")
        _PARSED[key] = config_from_dict(apply_overrides(raw, overrides), source=source)
    return _PARSED[key]


_PARSED: dict[tuple[str, str | None, tuple[str, ...]], PipelineConfig] = {}


def config_from_dict(raw: Mapping[str, Any], source: str = "params") -> PipelineConfig:
    """Validate plain data (the parsed file with its overrides) into a config, with the cross-section checks.

    Args:
        raw: sections as plain data.
        source: file name used in messages.
    """
    errors: list[str] = []
    cfg = build(PipelineConfig, raw, "", errors, moved=MOVED)
    if cfg is not None and not errors:
        errors.extend(cross_check(cfg))
    if errors or cfg is None:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return cfg
