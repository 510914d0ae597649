"""The stage registry: what each stage reads (its params section, upstream stages) and which code it runs.

Used by the Prefect flow (cache keys), ``dsv stage`` (the DVC path) and the dvc.yaml consistency test,
so the three can never disagree about a stage's inputs.

A stage's *code closure* is its own module ``tasks/<stage>.py``, every ``tasks`` module it imports
(transitively, except logging-only modules and what only they import), and every ``dsv`` module that the
stage module imports, followed transitively through ``dsv``'s own imports; imports under
``if TYPE_CHECKING:`` never run and are not followed. The params loader (:mod:`tasks.config`) and this
registry are outside every closure: a stage sees the loader's work only as the values of its params
section, which are part of its cache key (and its DVC ``params``), so editing a message, a check or the
dvc.yaml writer reruns nothing.
``dsv`` imports are followed from the stage module only: an edit to ``dsv/dm.py`` must not rerun ``extract``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from tasks import coreset, distill, evaluate, extract, generate, judge, prepare, pretrain
from tasks.atomic import file_sha256, write_json
from tasks.output import StageOutput
from tasks.paths import STAGE_NAMES, Paths
from tasks.plain import dump_yaml

# tasks modules that only log/plot: editing them never changes an artifact.
LOGGING_ONLY: frozenset[str] = frozenset({"tasks.tracking", "tasks.figures", "tasks.progress"})
# ...except for stages whose artifacts include figures (generate writes its PNGs next to its tables).
FIGURE_ARTIFACTS: dict[str, frozenset[str]] = {"generate": frozenset({"tasks.figures"})}
# Never in a closure (see the module docstring): tests/tasks/test_stages.py checks that no stage reaches them.
OUTSIDE_CLOSURES: frozenset[str] = frozenset({"tasks.config", "tasks.stages"})
PACKAGES = ("tasks", "dsv")


@dataclass(frozen=True)
class StageSpec:
    """One stage: its module and what it reads.

    Attributes:
        module: the stage module ``tasks.<name>``: ``run(cfg, paths, log)`` and, for a mapped stage,
            ``units(cfg)``, ``run_unit(cfg, paths, unit, log)`` and ``merge(cfg, paths, log, unit_results)``.
        upstream: stages whose artifacts it reads.
        sections: the params sections it reads: its own (``evaluate`` has none, it only summarises).
    """

    module: ModuleType
    upstream: tuple[str, ...]
    sections: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """The stage name (params section, artifact folder, metrics file, MLflow run)."""
        return self.module_name.removeprefix("tasks.")

    @property
    def module_name(self) -> str:
        return str(self.module.__name__)

    @property
    def mapped(self) -> bool:
        """True when the stage module splits its work into units (``units``/``run_unit``/``merge``)."""
        return hasattr(self.module, "units")


STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec(prepare, (), ("prepare",)),
    StageSpec(pretrain, ("prepare",), ("pretrain",)),
    StageSpec(judge, ("prepare",), ("judge",)),
    StageSpec(extract, ("prepare", "pretrain"), ("extract",)),  # mapped: class shards
    StageSpec(coreset, ("prepare", "pretrain"), ("coreset",)),
    StageSpec(distill, ("prepare", "pretrain", "extract", "coreset"), ("distill",)),  # mapped: (method, IPC) cells
    StageSpec(generate, ("prepare", "pretrain", "judge"), ("generate",)),
    StageSpec(evaluate, ("prepare", "pretrain", "judge", "distill")),
)}
# Stages whose work is split into independent units (extract: shards; distill: (method, IPC) cells).
MAPPED: frozenset[str] = frozenset(name for name, spec in STAGES.items() if spec.mapped)
assert tuple(STAGES) == STAGE_NAMES
# Stages that compute on ``runtime.device``: the resolved device type is part of their cache key (flows.pipeline),
# since CUDA and CPU results differ in their bits (not in their science); prepare and evaluate run on the CPU.
DEVICE_STAGES: frozenset[str] = frozenset({"pretrain", "judge", "extract", "coreset", "distill", "generate"})
assert all(spec.sections in ((), (name,)) for name, spec in STAGES.items())  # one section per stage


# -------------------------------------------------------------------------------------- code closure


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # "pkg.module.Class": the parent is a module, not a package
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _walk(node: ast.AST) -> Any:
    """``ast.walk`` that skips ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not _type_checking(child):
            yield from _walk(child)


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by a source file (``from a.b import c`` -> a.b and a.b.c)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[str] = []
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out.extend(f"{node.module}.{a.name}" for a in node.names)
    return out


def _closure(start: list[str], follow: tuple[str, ...], skip: frozenset[str] = frozenset()) -> dict[str, Path]:
    seen: dict[str, Path] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in seen or name in skip or name.split(".")[0] not in follow:
            continue
        path = _module_file(name)
        if path is None:  # e.g. "dsv.data.core.ImageDataset" is a class, not a module
            continue
        seen[name] = path
        todo.extend(_imports(path))
    return seen


def code_modules(stage: str) -> dict[str, Path]:
    """Module name -> source file of everything in ``stage``'s code closure (see module docstring)."""
    return dict(_code_modules(stage))


@cache
def _code_modules(stage: str) -> dict[str, Path]:
    spec = STAGES[stage]
    keep = FIGURE_ARTIFACTS.get(stage, frozenset()) | {spec.module_name}
    # A logging-only module is not followed: what only it imports (e.g. tasks.lock, through tasks.tracking)
    # never changes an artifact either.
    own = _closure([spec.module_name], ("tasks",), skip=LOGGING_ONLY - keep)
    dsv_roots = [m for m in _imports(own[spec.module_name]) if m.split(".")[0] == "dsv"]
    lib = _closure(dsv_roots, ("dsv",))
    return dict(sorted({**own, **lib}.items()))


def code_files(stage: str, root: Path) -> list[str]:
    """The closure's files relative to ``root`` (the dvc.yaml ``deps`` of the stage)."""
    return [p.resolve().relative_to(root.resolve()).as_posix() for p in code_modules(stage).values()]


def code_hash(stage: str) -> str:
    """SHA-256 over (module name, source bytes) of the stage's code closure, read now."""
    h = hashlib.sha256()
    for name, path in code_modules(stage).items():
        h.update(name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- running


def stage_module(stage: str) -> Any:
    """``tasks.<stage>`` (the module held by the stage table)."""
    return STAGES[stage].module


def stage_function(stage: str) -> Callable[..., StageOutput]:
    """``tasks.<stage>.run``: the whole stage in this process."""
    return STAGES[stage].module.run  # type: ignore[no-any-return]


def verify(paths: Paths, out: StageOutput) -> list[str]:
    """Artifacts of a recorded output that are missing or whose bytes changed (empty = all good)."""
    bad = []
    for rel, sha in out.files.items():
        f = paths.base / rel
        if not f.is_file() or file_sha256(f) != sha:
            bad.append(rel)
    return bad


def restore_metrics(paths: Paths, out: StageOutput) -> None:
    """Rewrite ``metrics/<stage>.json`` (and the timings file) from a cached output when missing or different."""
    for target, data in ((paths.metrics(out.stage), out.metrics), (paths.timings(out.stage), out.timings)):
        try:
            current = json.loads(target.read_text())
        except (OSError, ValueError):
            current = None
        if current != data:
            write_json(target, data)


# ------------------------------------------------------------------------------------------ dvc.yaml

# Files a stage reads from upstream stages, beyond their artifact folders.
_EXTRA_DEPS: dict[str, tuple[str, ...]] = {"evaluate": ("metrics/pretrain.json",)}
# DVC plots: file -> (x, y) fields.
DVC_PLOTS: dict[str, tuple[str, str]] = {
    "artifacts/pretrain/curve.json": ("step", "loss"),
    "artifacts/extract/trace.json": ("step", "entropy"),
    "artifacts/coreset/trace.json": ("batch", "residual_l2"),
    "artifacts/generate/trace.json": ("step", "conf_target"),
    "artifacts/evaluate/acc_vs_ipc.json": ("ipc", "acc"),
}


def dvc_stages(root: Path) -> dict[str, Any]:
    """The ``stages`` mapping of dvc.yaml, derived from the registry (default output folder).

    Each stage: ``cmd: dsv stage <name>``, its params sections, its code closure and upstream
    artifact folders as deps, ``artifacts/<name>`` as a persistent out (not deleted before the command runs,
    so finished work can be reused), ``metrics/<name>.json`` as a git-tracked output and, for ``evaluate``,
    ``metrics/accuracy.json`` as its metrics.
    """
    out: dict[str, Any] = {}
    for name, spec in STAGES.items():
        deps = code_files(name, root) + [f"artifacts/{u}" for u in spec.upstream] + list(_EXTRA_DEPS.get(name, ()))
        out[name] = {
            "cmd": f"dsv stage {name}",
            "params": list(spec.sections),
            "deps": deps,
            # persist: DVC would delete the folder before running the command, and `dsv stage` could then not
            # reuse the stage's verified work from the shared cache (flows.pipeline.run_stage_direct)
            # metrics/<stage>.json are plain (git-tracked) outputs: DVC lists one metrics file, the accuracy of
            # every method, so `dvc metrics show` and `dvc exp show` lead with the results
            "outs": [{f"artifacts/{name}": {"persist": True}}, {f"metrics/{name}.json": {"cache": False}}],
            # (persist: it is one of evaluate's recorded artifacts, which `dsv stage` verifies to restore the stage)
            **({"metrics": [{"metrics/accuracy.json": {"cache": False, "persist": True}}]} if name == "evaluate"
               else {}),
        }
    return out


def dvc_yaml(root: Path) -> str:
    """The whole dvc.yaml text (stages + plots)."""
    header = (
        "# Generated from tasks/stages.py (the stage registry); tests/tasks/test_stages.py checks it is\n"
        "# current. Regenerate: python -c \"from pathlib import Path; from tasks.stages import dvc_yaml;\n"
        "#   Path('dvc.yaml').write_text(dvc_yaml(Path('.')))\"\n"
        "# Each stage runs the same code as `dsv run` (tasks/<stage>.py) through `dsv stage <name>`.\n"
    )
    plots = [{f: {"x": x, "y": y}} for f, (x, y) in DVC_PLOTS.items()]
    body = dump_yaml({"stages": dvc_stages(root), "plots": plots}, width=110, flow=False)
    return header + body
