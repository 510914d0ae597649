"""Stage ``distill``: build every method's training set and train students on it under the protocol.

One *cell* per (method, IPC) (``full`` has a single cell, IPC 0 in file names): the cell builds its
set (DSVs from ``extract``, top-λ from ``coreset``, a core-set baseline via ``dsv.baselines.select``
on the teacher's features/logits, DM via ``dsv.dm``, or the whole training split), then trains
``protocol.n_runs`` students (seeds 0..n-1) and records test and validation accuracy of each.

Outputs: ``artifacts/distill/cells/<method>_ipc<k>.json`` (per-run results),
``sets/<method>_ipc<k>.safetensors`` (the training set: ``x`` normalised, ``y``), ``runs.json``
(all runs, the table ``evaluate`` summarises); ``metrics/distill.json`` with per-cell wall times.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dsv.baselines import ProxyConfig
from dsv.checks import at_least, choices, positive_ints
from dsv.dm import DMConfig
from dsv.models import ModelConfig
from dsv.protocols import (
    DSV_METHODS,
    METHOD_NAMES,
    ProtocolConfig,
    linear_probe,
    student_fit_config,
    train_students,
)
from dsv.sets import RANKED, SET_INPUTS, build_set
from dsv.train import EvalResult, FitConfig, TrainEvent, evaluate, predict_logits
from tasks.artifacts import (
    DataMeta,
    LambdaTable,
    load_model,
    load_split,
    read_data_meta,
    read_dsv_parquet,
    read_json,
    read_lambdas_parquet,
    save_model,
    save_tensors,
)
from tasks.atomic import write_json
from tasks.figures import image_grid
from tasks.output import StageConfig, StageOutput, device_of, finish, graphs_of, hash_files, model_errors
from tasks.paths import Paths
from tasks.plain import to_plain
from tasks.progress import Bar
from tasks.ranges import GE1, SEED, register
from tasks.tracking import StageLog

# Real images per class a DSV init sees: IPC for a random draw, none for 0-shot and noise, all for a selector.
_DSV_SHOTS = {"nshot": "ipc", "0shot": "none", "noise": "none"}
# The linear probe's ω when the teacher's spec does not record its weight decay (a bring-your-own checkpoint).
PROBE_WEIGHT_DECAY = 5e-3


# The main job's comparison (15 minutes on a 2-core CPU); every method runs in benchmarks/table.py.
HEADLINE_METHODS = ("dsv_herding", "herding", "dsv_nshot", "random", "kkt_herding", "dsv_0shot")


@dataclass(frozen=True)
class DistillConfig:
    """Stage ``distill``: build each method's training set and train students on it.

    Attributes:
        methods: method names (``dsv.protocols.METHOD_NAMES``); default: the main job's headline comparison
            (``HEADLINE_METHODS``).
        ipcs: images per class; DSV methods need the same IPC in ``extract.ipcs``.
        seed: seeds the selection (random, proxies, DM init).
        dm: distribution matching settings (its real pool is the whole training split).
        proxy: proxy model of the forgetting/EL2N selectors.
        full_epochs: epochs of the ``full`` method's students (the protocol's epoch budget is meant
            for tiny sets; on the whole training split it would take days).
        protocol: the students: architecture, trainer, label type and number of seeds
            (``dsv.protocols.ProtocolConfig``).
        cross_model: a second student architecture (e.g. ``{name: mlp, width: 256, depth: 2}`` or
            ``{name: resnet18}``) trained with the same protocol and seeds on every set; its accuracy is
            reported in extra columns (cross-architecture generalisation). None (default) skips it: it
            doubles the students' cost.
    """

    methods: tuple[str, ...] = HEADLINE_METHODS
    ipcs: tuple[int, ...] = (10,)
    seed: int = 0
    dm: DMConfig = field(default_factory=lambda: DMConfig(iterations=200, model=ModelConfig(name="convnet", width=64)))
    proxy: ProxyConfig = field(default_factory=lambda: ProxyConfig(
        model=ModelConfig(name="convnet", width=32),
        fit=FitConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, epochs=2, batch_size=256,
                      augment="flip_crop"),
        el2n_models=2, el2n_epochs=1))
    full_epochs: int = 2
    protocol: ProtocolConfig = field(default_factory=lambda: ProtocolConfig(
        name="dd", epochs=300, min_steps=300, n_runs=2, model=ModelConfig(name="convnet", width=32)))
    cross_model: ModelConfig | None = None

    def __post_init__(self) -> None:
        choices("methods", self.methods, METHOD_NAMES)
        positive_ints("ipcs", self.ipcs)
        at_least(self, 1, "full_epochs")


register(DistillConfig, {"ipcs": GE1, "seed": SEED, "full_epochs": GE1})


class Config(StageConfig, Protocol):
    @property
    def distill(self) -> DistillConfig: ...


def check(cfg: Any, data: dict[str, Any] | None = None) -> list[str]:
    """Problems of the ``distill`` section in the whole config (the sets its methods need from extract, coreset
    and the data), or with ``data`` (meta.json) in the prepared data; one message per problem."""
    d, e, p = cfg.distill, cfg.extract, cfg.prepare
    errors = []
    if data is not None:
        fewest = min(data["train_per_class"]) if data["train_per_class"] else 0
        if fewest > 0 and [k for k in d.ipcs if k > fewest]:
            errors.append(f"distill.ipcs {[k for k in d.ipcs if k > fewest]} exceed the {fewest} training images "
                          "of the smallest class")
        models = {"distill.protocol.model": d.protocol.model,
                  **({"distill.dm.model": d.dm.model} if "dm" in d.methods else {}),
                  **({"distill.proxy.model": d.proxy.model} if {"forgetting", "el2n"} & set(d.methods) else {}),
                  **({"distill.cross_model": d.cross_model} if d.cross_model is not None else {})}
        return errors + model_errors(models, data)
    dsv_methods = [m for m in d.methods if m.startswith("dsv_")]
    missing_init = [m for m in dsv_methods if m.removeprefix("dsv_") not in e.inits]
    if missing_init:
        errors.append(f"distill.methods lists {missing_init} but extract.inits = {list(e.inits)} "
                      "does not produce them")
    missing_ipc = [k for k in d.ipcs if k not in e.ipcs] if dsv_methods else []
    if missing_ipc:
        errors.append(f"distill.ipcs {missing_ipc} are not in extract.ipcs = {list(e.ipcs)} "
                      "(the DSV methods need them extracted)")
    k, ranked = cfg.coreset.per_class, [m for m in ("lambda_topk", "support_topk") if m in d.methods]
    if k is not None and ranked and any(i > k for i in d.ipcs):
        errors.append(f"distill.ipcs {list(d.ipcs)} exceed coreset.per_class = {k} "
                      f"({', '.join(ranked)} pick from the images λ was fitted on)")
    n = p.data.n_per_class
    if n is not None and [k for k in d.ipcs if k > n - p.val_per_class]:
        errors.append(f"distill.ipcs {[k for k in d.ipcs if k > n - p.val_per_class]} exceed the "
                      f"{n - p.val_per_class} training images per class (prepare.data.n_per_class {n} - "
                      f"prepare.val_per_class {p.val_per_class})")
    return errors


def units(cfg: Config) -> list[dict[str, Any]]:
    """One cell per (method, IPC); ``full`` once (IPC 0)."""
    d = cfg.distill
    out: list[dict[str, Any]] = []
    for method in d.methods:
        if method == "full":
            out.append({"method": "full", "ipc": 0})
        else:
            out.extend({"method": method, "ipc": k} for k in d.ipcs)
    return out


@dataclass
class _Inputs:
    """Lazily loaded inputs shared by the set builders of one cell."""

    cfg: Config
    paths: Paths
    device: str

    @cached_property
    def meta(self) -> DataMeta:
        return read_data_meta(self.paths.data_meta)

    @cached_property
    def train(self) -> tuple[Tensor, Tensor]:
        return load_split(self.paths.train, self.meta)

    @cached_property
    def teacher(self) -> nn.Module:
        return load_model(self.paths.teacher, self.paths.teacher_spec, self.device)

    @cached_property
    def features(self) -> Tensor:
        return predict_logits(self.teacher, self.train[0], batch_size=256, embed=True)

    @cached_property
    def logits(self) -> Tensor:
        return predict_logits(self.teacher, self.train[0])

    @cached_property
    def test(self) -> tuple[Tensor, Tensor]:
        return load_split(self.paths.test, self.meta)

    @cached_property
    def ranked(self) -> LambdaTable:
        return read_lambdas_parquet(self.paths.lambdas_parquet)

    @property
    def per_class(self) -> int:
        return int(torch.bincount(self.train[1], minlength=self.meta.num_classes).min())

    def ranking(self, by: str) -> tuple[Tensor, Tensor, Tensor]:
        rank = self.ranked.rank if by == "lambda" else self.ranked.support_rank
        if rank is None:
            raise ValueError(f"lambdas.parquet has no {by} ranking (written by an older version: rerun coreset)")
        return self.ranked.index, self.ranked.label, rank


def cell_set(method: str, ipc: int, inp: _Inputs) -> tuple[Tensor, Tensor, int]:
    """The training set of one method at one IPC: DSVs from ``extract``, the whole split (``full``), or a set
    builder of :func:`dsv.baselines.build_set` (a selector, DM, the λ top-k of ``coreset``).

    Returns:
        (x (M, C, H, W) normalised, y (M,) int64, shots: real images per class the method used).
    """
    d = inp.cfg.distill
    if method in DSV_METHODS:
        init = DSV_METHODS[method]
        t = read_dsv_parquet(inp.paths.dsv_parquet, init=init, ipc=ipc)
        return inp.meta.normalize(t.x), t.y, {"ipc": ipc, "none": 0}.get(_DSV_SHOTS.get(init, "all"), inp.per_class)
    x, y = inp.train
    if method == "full":
        return x, y, inp.per_class
    if ipc > inp.per_class:
        raise ValueError(f"distill.ipcs: IPC {ipc} exceeds the {inp.per_class} training images per class")
    lazy = {"features": lambda: inp.features, "logits": lambda: inp.logits, "x": lambda: x, "dm": lambda: d.dm,
            "ranking": lambda: inp.ranking(RANKED.get(method, ""))}
    x_set, y_set = build_set(method, x=x, y=y, k=ipc, num_classes=inp.meta.num_classes, seed=d.seed,
                             proxy=d.proxy, **{n: lazy[n]() for n in SET_INPUTS[method] if n != "x"})
    if method in RANKED:  # ranked among the images λ was fitted on (coreset.per_class of each class)
        return x_set, y_set, int(torch.bincount(inp.ranked.label, minlength=inp.meta.num_classes).min())
    return x_set, y_set, ipc if method in ("random", "dm") else inp.per_class


def run_unit(cfg: Config, paths: Paths, unit: dict[str, Any], log: StageLog) -> dict[str, Any]:
    """Build one cell's set and train its students.

    Returns:
        {"files": {relative path: sha256}, "seconds", "select_seconds", "unit"}.
    """
    started = time.perf_counter()
    method, ipc, d = str(unit["method"]), int(unit["ipc"]), cfg.distill
    inp = _Inputs(cfg, paths, device_of(cfg))
    x, y, shots = cell_set(method, ipc, inp)
    seconds = {"select_seconds": round(time.perf_counter() - started, 3), "unit": unit}
    protocol = dataclasses.replace(d.protocol, epochs=d.full_epochs, min_steps=0) if method == "full" else d.protocol
    cell: dict[str, Any] = {"method": method, "ipc": ipc, "shots": shots, "protocol": protocol.name,
                            "label_type": protocol.label_type, "n_train": int(y.shape[0])}
    files = [paths.distill_cell(method, ipc)]
    if method != "full":
        files.append(save_tensors(paths.distill_set(method, ipc), {"x": x, "y": y}))
    if y.shape[0] == 0:
        # Every candidate was dropped (the paper's dual rule can do that): nothing to train on. The cell is
        # recorded with no runs, and the table says so, instead of failing the pipeline.
        write_json(files[0], {**cell, "steps": 0, "runs": [], "note": "empty training set: no DSV survived extraction"})
        return {"files": hash_files(paths, files), "seconds": round(time.perf_counter() - started, 3), **seconds}
    runs = _students(cfg, paths, inp, method, ipc, x, y, protocol, log)
    set_features = inp.features if method == "full" else predict_logits(inp.teacher, x, batch_size=256, embed=True)
    test_features = predict_logits(inp.teacher, inp.test[0], batch_size=256, embed=True)
    wd = read_json(paths.teacher_spec).get("weight_decay") or PROBE_WEIGHT_DECAY
    cell.update({"ipc": ipc if method != "full" else inp.per_class, "steps": student_fit_config(protocol, len(y)).steps,
                 "per_class": torch.bincount(y if y.dim() == 1 else y.argmax(1), minlength=inp.meta.num_classes).tolist(),
                 "probe_acc": linear_probe(set_features, y, test_features, inp.test[1], inp.meta.num_classes, float(wd)),
                 "runs": runs, **({"cross_model": d.cross_model.name} if d.cross_model is not None else {})})
    write_json(files[0], cell)
    files[1:1] = [paths.distill_student(method, ipc), paths.distill_student_spec(method, ipc)]
    if method != "full" and inp.meta.images:
        log.figure(image_grid(inp.meta.denormalize(x), y, inp.meta.classes, f"{method}, IPC {ipc}"),
                   f"distill/set_{method}_ipc{ipc}.png")
    return {"files": hash_files(paths, files), "seconds": round(time.perf_counter() - started, 3), **seconds}


def _students(cfg: Config, paths: Paths, inp: _Inputs, method: str, ipc: int, x: Tensor, y: Tensor,
              protocol: ProtocolConfig, log: StageLog) -> list[dict[str, Any]]:
    """Train the protocol's students on (x, y) (and on ``distill.cross_model``), save the first; one dict per seed."""
    meta, (x_val, y_val), key = inp.meta, load_split(paths.val, inp.meta), f"{method}_ipc{ipc}"
    teacher = inp.teacher if protocol.name == "soft" else None
    seeds, runs, done = list(range(protocol.n_runs)), [], {}  # done: steps finished per seed (batched: in turn)
    bar = Bar(cfg.runtime.progress, protocol.n_runs * student_fit_config(protocol, len(y)).steps, f"distill {key}",
              unit="step")

    def on_fit(s: int, e: TrainEvent) -> None:
        log.metric(f"{key}/seed{s}/loss", e.loss, step=e.step)
        done[s] = e.step
        bar.total(protocol.n_runs * e.total_steps)
        bar.to(sum(done.values()), seed=s, loss=e.loss)

    def on_student(s: int, model: nn.Module, test: EvalResult) -> None:
        val = evaluate(model, x_val, y_val, meta.num_classes) if y_val.numel() else None
        runs.append({"seed": s, "test_acc": test.accuracy, "val_acc": val.accuracy if val else float("nan"),
                     "per_class": test.per_class})
        log.metric(f"{key}/test_acc", test.accuracy, step=s)
        if s == 0:  # saved here; the flow logs it to MLflow in the cell's result run (flows.pipeline)
            spec = {"model": to_plain(protocol.model), "in_shape": list(meta.input_shape),
                    "num_classes": meta.num_classes}
            save_model(paths.distill_student(method, ipc), paths.distill_student_spec(method, ipc), model.cpu(), spec)

    args = (x, y, *inp.test, teacher)
    train_students(*args, protocol, meta.input_shape, meta.num_classes, seeds, inp.device, on_fit, on_student,
                   graphs_of(cfg))
    bar.close()
    if cfg.distill.cross_model is not None:  # the same sets, seeds and protocol on a second architecture
        other = train_students(*args, dataclasses.replace(protocol, model=cfg.distill.cross_model), meta.input_shape,
                               meta.num_classes, seeds, inp.device, graphs=graphs_of(cfg))
        for run, res in zip(runs, other):
            run["cross_acc"] = res.accuracy
    return runs


def merge(cfg: Config, paths: Paths, log: StageLog, unit_results: list[dict[str, Any]]) -> StageOutput:
    """Collect the cells into ``runs.json`` (deterministic) and their wall times into the metrics."""
    started = time.perf_counter()
    cells = [read_json(paths.distill_cell(u["method"], u["ipc"])) for u in units(cfg)]
    write_json(paths.distill_runs, cells)
    seconds = {f"{r['unit']['method']}_ipc{r['unit']['ipc']}": float(r["seconds"]) for r in unit_results}
    select_seconds = {f"{r['unit']['method']}_ipc{r['unit']['ipc']}": float(r["select_seconds"]) for r in unit_results}
    metrics: dict[str, Any] = {"cell_seconds": seconds, "select_seconds": select_seconds, "n_cells": len(cells)}
    for c in cells:
        accs = [r["test_acc"] for r in c["runs"]]
        if accs:
            metrics[f"{c['method']}_ipc{c['ipc']}_acc_mean"] = sum(accs) / len(accs)
    log.metrics({k: v for k, v in metrics.items() if isinstance(v, float)})
    # The students are logged as MLflow models by the flow, each in its own result run (flows.pipeline).
    files = [paths.distill_runs]
    for u in units(cfg):
        files.append(paths.distill_cell(u["method"], u["ipc"]))
        if paths.distill_student(u["method"], u["ipc"]).exists():
            files += [paths.distill_student(u["method"], u["ipc"]), paths.distill_student_spec(u["method"], u["ipc"])]
        if u["method"] != "full":
            files.append(paths.distill_set(u["method"], u["ipc"]))
    return finish("distill", cfg, paths, files, metrics, started, extra_seconds=sum(seconds.values()),
                  device=device_of(cfg))


def run(cfg: Config, paths: Paths, log: StageLog) -> StageOutput:
    """Every cell in order, then the merge (the path ``dsv stage distill`` and DVC take)."""
    return merge(cfg, paths, log, [run_unit(cfg, paths, u, log) for u in units(cfg)])
