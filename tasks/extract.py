"""Stage ``extract``: Deep Support Vectors for every init kind and IPC, one DeepKKT problem per shard.

A *shard* is a stratified slice of the candidates (:class:`dsv.extract.Shard`): for IPC k and S shards, shard s
holds about k/S candidates of every class, so each shard is a complete DeepKKT problem and the shards' DSVs
concatenate; :func:`dsv.extract.extract_shard` draws, warms up and optimises them.

Outputs (``artifacts/extract/``): ``shards/<init>_ipc<k>_shard<s>.safetensors`` (+ ``.trace.json``),
``dsv.parquet`` (see :mod:`tasks.artifacts`), ``trace.json`` / ``trace.parquet`` (all shards' traces,
for plots); ``metrics/extract.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from dsv.checks import at_least, choices, positive_ints
from dsv.extract import INITS, TEACHER_ONLY, ExtractConfig, ExtractEvent, Shard, extract_shard
from dsv.generate import GenerateConfig
from tasks.artifacts import (
    PARAMS_HASH_KEY,
    DataMeta,
    load_model,
    load_split,
    load_tensors,
    read_data_meta,
    read_json,
    save_tensors,
    write_dsv_parquet,
    write_records_parquet,
)
from tasks.atomic import write_json
from tasks.figures import curves, image_grid
from tasks.output import StageConfig, StageOutput, device_of, finish, hash_files
from tasks.paths import Paths
from tasks.plain import params_hash, to_plain
from tasks.progress import Bar
from tasks.ranges import GE1, SEED, build, register
from tasks.tracking import StageLog

# Per-init solver settings that differ from ``extract.solver``: none by default but the teacher-only inits'
# within-class repulsion (dsv.kkt.repulsion), which their warm-up has too, and their augmented copy without flip
# (an image optimised under flips becomes mirror-symmetric; classes have an orientation): measured on
# Fashion-MNIST and digits (benchmarks/results/diversity-*.md). The
# KKT regime study (benchmarks/results/kkt-regime-*.md) found no per-init setting that beats the shared solver on
# both datasets at every IPC; its best n-shot setting at IPC 1 is one override away (README, "The KKT regime"):
#   -S pretrain.converge.scope=last -S 'extract.by_init={nshot: {lam_solver: nnls, spare: 1.0, kkt: {distance: l2}}}'
_TEACHER_ONLY_KKT = {"kkt": {"beta_repel": 0.05, "augment": "translate|crop|noise"}}
DEFAULT_BY_INIT: dict[str, dict[str, Any]] = {"0shot": _TEACHER_ONLY_KKT, "noise": _TEACHER_ONLY_KKT}


@dataclass(frozen=True)
class ExtractStageConfig:
    """Stage ``extract``: DSV synthesis for each init kind and IPC.

    Attributes:
        inits: initialisations to run (:data:`dsv.extract.INITS`): "nshot" (IPC real images per class, the
            random row's draw), a core-set selector's picks ("herding", "kcenter", "kkt_herding"), "0shot" (the
            init pool) or "noise".
        ipcs: images per class to synthesise.
        shards: stratified shards per (init, IPC); each is a complete DeepKKT problem over every class
            with about IPC/shards candidates per class, run as its own task.
        seed: seeds candidate initialisation and the augmentation draws.
        solver: the DeepKKT optimisation (``dsv.extract.ExtractConfig``), for every init kind.
        by_init: per init kind, keys of ``solver`` to override for that kind (nested sections merge key by key),
            e.g. ``{nshot: {lam_solver: nnls, spare: 1.0}}``. Default: ``DEFAULT_BY_INIT``.
        warmup: the teacher-only inits ("0shot", "noise") are first inverted with this generator recipe
            (``dsv.generate.GenerateConfig``: coarse-to-fine, augmented views, priors; noise is drawn at its
            coarsest grid), then refined by the DeepKKT solver; null = DeepKKT from the raw starts.
    """

    inits: tuple[str, ...] = ("herding", "nshot", "0shot")
    ipcs: tuple[int, ...] = (10,)
    shards: int = 1
    seed: int = 0
    solver: ExtractConfig = field(default_factory=ExtractConfig)
    by_init: dict[str, dict[str, Any]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_BY_INIT)))
    warmup: GenerateConfig | None = field(default_factory=GenerateConfig)

    def __post_init__(self) -> None:
        choices("inits", self.inits, INITS)
        unknown = [k for k in self.by_init if k not in INITS]
        if unknown:
            raise ValueError(f"by_init has {unknown}; its keys are init kinds: {', '.join(INITS)}")
        for init, keys in self.by_init.items():  # validated here, merged by solver_for
            errors: list[str] = []
            build(ExtractConfig, keys, f"extract.by_init.{init}", errors, base=self.solver)
            if errors:
                raise ValueError("; ".join(errors))
        positive_ints("ipcs", self.ipcs)
        at_least(self, 1, "shards")
        if self.ipcs and self.shards > min(self.ipcs):
            raise ValueError(f"shards = {self.shards} exceeds the smallest IPC ({min(self.ipcs)}); "
                             "every shard needs at least one candidate per class")


register(ExtractStageConfig, {"ipcs": GE1, "shards": GE1, "seed": SEED})


class Config(StageConfig, Protocol):
    @property
    def extract(self) -> ExtractStageConfig: ...


def check(cfg: Any, data: dict[str, Any] | None = None) -> list[str]:
    """Problems of the ``extract`` section in the whole config, or with ``data`` (meta.json) in the prepared data:
    IPCs beyond the real images there are, 0-shot starts for inputs that are not images."""
    e, p = cfg.extract, cfg.prepare
    if data is None:
        if p.data.n_per_class is None or not [k for k in e.ipcs if k > p.data.n_per_class - p.val_per_class]:
            return []
        return [f"extract.ipcs {[k for k in e.ipcs if k > p.data.n_per_class - p.val_per_class]} exceed the "
                f"{p.data.n_per_class - p.val_per_class} training images per class (prepare.data.n_per_class "
                f"{p.data.n_per_class} - prepare.val_per_class {p.val_per_class})"]
    errors = []
    fewest = min(data["train_per_class"]) if data["train_per_class"] else 0
    too_big = [k for k in e.ipcs if k > fewest] if "nshot" in e.inits else []
    if too_big and fewest > 0:
        errors.append(f"extract.ipcs {too_big} exceed the {fewest} training images of the smallest class")
    shape = data.get("input_shape")
    if shape is not None and len(data["classes"]) >= 2 and len(shape) != 3 and "0shot" in e.inits:
        errors.append(f"extract.inits: '0shot' starts from images of another dataset, and {p.data.name!r} "
                      f"inputs of shape {list(shape)} are not images; use extract.inits=[nshot,noise] and "
                      "leave dsv_0shot out of distill.methods")
    return errors


def shards(cfg: Config) -> list[Shard]:
    """Every shard of every (init, IPC), in a fixed order."""
    e = cfg.extract
    return [Shard(i, k, s, e.shards) for i in e.inits for k in e.ipcs for s in range(e.shards)]


def units(cfg: Config) -> list[dict[str, Any]]:
    """The shards as plain dicts (what the flow maps its shard tasks over)."""
    return [asdict(s) for s in shards(cfg)]


def _merged(base: Any, keys: dict[str, Any]) -> Any:
    """``base`` (a config dataclass) with ``keys`` replaced; nested mappings merge into nested dataclasses."""
    def value(old: Any, new: Any) -> Any:
        if isinstance(new, dict) and dataclasses.is_dataclass(old):
            return _merged(old, new)
        return tuple(value(None, v) for v in new) if isinstance(new, list) else new

    return dataclasses.replace(base, **{k: value(getattr(base, k), v) for k, v in keys.items()})


def solver_for(e: ExtractStageConfig, init: str) -> ExtractConfig:
    """``extract.solver`` with the keys ``extract.by_init[init]`` overrides (validated by the params loader)."""
    return _merged(e.solver, e.by_init.get(init, {}))  # type: ignore[no-any-return]


def _pool(paths: Paths, meta: DataMeta) -> torch.Tensor:
    """The 0-shot pool, normalised like the task's inputs."""
    pool = load_tensors(paths.init_pool, ("x",))["x"]
    if pool.shape[0] == 0:
        raise ValueError("init '0shot' needs the init pool, which is empty (see prepare.init_pool)")
    return meta.normalize(pool)


def run_unit(cfg: Config, paths: Paths, unit: dict[str, Any], log: StageLog) -> dict[str, Any]:
    """Solve one shard and write its tensors and trace.

    Returns:
        {"files": {relative path: sha256}, "seconds": wall time, "unit": the shard}.
    """
    started = time.perf_counter()
    shard, e = Shard(**unit), cfg.extract
    meta = read_data_meta(paths.data_meta)
    teacher = load_model(paths.teacher, paths.teacher_spec, device_of(cfg))
    real = load_split(paths.train, meta) if shard.init not in TEACHER_ONLY or not meta.images else None
    solver = solver_for(e, shard.init)
    bar = Bar(cfg.runtime.progress, solver.steps, f"extract {shard.tag}", unit="step")

    def on_step(ev: ExtractEvent) -> None:
        log.metrics({f"{shard.tag}/{k}": v for k, v in ev.metrics.items() if k != "step"}, step=ev.step)
        bar.to(ev.step, loss=ev.metrics.get("loss", float("nan")), residual=ev.metrics.get("residual_l2", 0.0))

    with bar:
        res = extract_shard(teacher, shard, solver, meta.num_classes, meta.input_shape, e.seed,
                            real=real if shard.init not in TEACHER_ONLY else None,
                            pool=_pool(paths, meta) if shard.init == "0shot" else None,
                            bounds=meta.bounds(real[0] if real is not None else None), warmup=e.warmup,
                            callback=on_step)
    shard_file = paths.extract_shard(shard.init, shard.ipc, shard.shard)
    save_tensors(
        shard_file,
        {"x": res.x, "y": res.y, "lam": res.lam, "probs": res.probs, "entropy": res.entropy,
         "support": res.support, "margin": res.margin, "source_index": res.source_index,
         "counts": torch.tensor([res.dropped, res.lambda_zero, res.repaired, res.infeasible])},
        metadata={"lam_scale": repr(res.lam_scale), "dual": res.dual},
    )
    trace_file = paths.extract_shard_trace(shard.init, shard.ipc, shard.shard)
    write_json(trace_file, [{**row, "init": shard.init, "ipc": shard.ipc, "shard": shard.shard} for row in res.trace])
    files = hash_files(paths, [shard_file, trace_file])
    return {"files": files, "seconds": round(time.perf_counter() - started, 3), "unit": unit}


SHARD_TENSORS = ("x", "y", "lam", "probs", "entropy", "support", "margin", "counts")


def merge(cfg: Config, paths: Paths, log: StageLog, unit_results: list[dict[str, Any]]) -> StageOutput:
    """Concatenate all shards into ``dsv.parquet`` and the trace files; write metrics and figures.

    Args:
        unit_results: what :func:`run_unit` returned for every shard (their wall times are summed
            into the metrics).
    """
    started = time.perf_counter()
    meta = read_data_meta(paths.data_meta)
    parts = [(s, load_tensors(paths.extract_shard(s.init, s.ipc, s.shard), SHARD_TENSORS)) for s in shards(cfg)]
    trace = [row for s in shards(cfg) for row in read_json(paths.extract_shard_trace(s.init, s.ipc, s.shard))]
    cols = _columns(parts, meta)
    digest = params_hash(to_plain(cfg.extract))
    duals = {i: solver_for(cfg.extract, i).dual if solver_for(cfg.extract, i).lam_solver == "adam" else "nnls"
             for i in cfg.extract.inits}
    write_dsv_parquet(
        paths.dsv_parquet, **cols, feature_names=meta.features,
        metadata={PARAMS_HASH_KEY: digest, "dsv.dataset": meta.name, "dsv.dual": json.dumps(duals),
                  "dsv.classes": ",".join(meta.classes)},
    )
    write_json(paths.extract_trace, trace)
    write_records_parquet(paths.extract_trace_parquet, trace, {PARAMS_HASH_KEY: digest})
    metrics: dict[str, Any] = {}
    for init in cfg.extract.inits:
        for ipc in cfg.extract.ipcs:
            counts = torch.stack([t["counts"] for s, t in parts if (s.init, s.ipc) == (init, ipc)]).sum(0)
            metrics[f"{init}_ipc{ipc}"] = _summary(init, ipc, cols, counts, trace, meta, log)
    metrics["n_dsv"] = int(cols["y"].numel())
    metrics["shard_seconds"] = round(sum(float(r["seconds"]) for r in unit_results), 3)
    flat = {f"{k}.{m}": v for k, d in metrics.items() if isinstance(d, dict) for m, v in d.items()
            if isinstance(v, (int, float))}
    log.metrics({**flat, "n_dsv": metrics["n_dsv"]})
    log.artifact(paths.dsv_parquet)
    shard_files = [f for s in shards(cfg) for f in (paths.extract_shard(s.init, s.ipc, s.shard),
                                                     paths.extract_shard_trace(s.init, s.ipc, s.shard))]
    files = [*shard_files, paths.dsv_parquet, paths.extract_trace, paths.extract_trace_parquet]
    return finish("extract", cfg, paths, files, metrics, started, extra_seconds=metrics["shard_seconds"],
                  device=device_of(cfg))


def _columns(parts: list[tuple[Shard, dict[str, torch.Tensor]]], meta: DataMeta) -> dict[str, Any]:
    """The shards' DSVs as the columns of ``dsv.parquet`` (images back in pixel units)."""
    cols: dict[str, list[Any]] = {k: [] for k in ("x", "y", "lam", "entropy", "confidence", "support", "margin",
                                                  "class_names", "init", "ipc", "shard")}
    for s, t in parts:
        y = t["y"].long() if t["y"].dim() == 1 else t["y"].argmax(1)
        n = y.numel()
        cols["x"].append(meta.denormalize(t["x"]) if n else t["x"])
        cols["y"].append(y)
        cols["confidence"].append(t["probs"].gather(1, y.view(-1, 1)).squeeze(1) if n else t["lam"])
        for k in ("lam", "entropy", "support", "margin"):
            cols[k].append(t[k])
        cols["class_names"] += [meta.classes[i] for i in y.tolist()]
        cols["init"] += [s.init] * n
        cols["ipc"] += [s.ipc] * n
        cols["shard"] += [s.shard] * n
    empty = {"x": torch.zeros((0, *meta.input_shape)), "y": torch.zeros(0, dtype=torch.long)}
    out: dict[str, Any] = {k: cols[k] for k in ("class_names", "init", "ipc", "shard")}
    for k in ("x", "y", "lam", "entropy", "confidence", "support", "margin"):
        out[k] = torch.cat(cols[k]) if cols[k] else empty.get(k, torch.zeros(0))
    return out


def _summary(init: str, ipc: int, cols: dict[str, Any], counts: torch.Tensor, trace: list[dict[str, Any]],
             meta: DataMeta, log: StageLog) -> dict[str, Any]:
    """The metrics of one (init, IPC) and its figures (the DSV grid, the candidates' entropy per step)."""
    sel = torch.tensor([a == init and b == ipc for a, b in zip(cols["init"], cols["ipc"])], dtype=torch.bool)
    rows = [r for r in trace if r["init"] == init and r["ipc"] == ipc]
    steps = sorted({r["step"] for r in rows})

    def avg(step: float, key: str) -> float:
        vals = [float(r[key]) for r in rows if r["step"] == step and key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    first, last, key, n = (steps[0] if steps else 0), (steps[-1] if steps else 0), f"{init}_ipc{ipc}", int(sel.sum())
    dropped, lambda_zero, repaired, infeasible = counts.tolist()
    if n and meta.images:
        log.figure(image_grid(cols["x"][sel], cols["y"][sel], meta.classes, f"DSVs: {init}, IPC {ipc}"),
                   f"extract/dsv_grid_{key}.png")
    if steps:
        log.figure(curves({key: (steps, [avg(s, "entropy") for s in steps])}, "step", "mean entropy (nats)",
                          f"candidate entropy, {key}"), f"extract/entropy_{key}.png")
    return {"n": n, "per_class": torch.bincount(cols["y"][sel], minlength=meta.num_classes).tolist(),
            "lambda_zero": lambda_zero, "dropped": dropped, "repaired": repaired, "infeasible": infeasible,
            "acc_target": avg(last, "acc_target"), "entropy_start": avg(first, "entropy"),
            "entropy_end": avg(last, "entropy"), "residual_l2_start": avg(first, "residual_l2"),
            "residual_l2_end": avg(last, "residual_l2"),
            "lam_mean": float(cols["lam"][sel].mean()) if n else float("nan"),
            "support_mean": float(cols["support"][sel].mean()) if n else float("nan"),
            "asked": int(ipc * meta.num_classes)}


def run(cfg: Config, paths: Paths, log: StageLog) -> StageOutput:
    """All shards in order, then the merge (the path ``dsv stage extract`` and DVC take)."""
    return merge(cfg, paths, log, [run_unit(cfg, paths, u, log) for u in units(cfg)])
