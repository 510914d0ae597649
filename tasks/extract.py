"""Stage ``extract``: Deep Support Vectors for every init kind and IPC, one DeepKKT problem per shard.

A *shard* is a stratified slice of the candidates: for IPC k and S shards, shard s holds about k/S
candidates of every class, so each shard is a complete DeepKKT problem and the shards' survivors
concatenate. The candidates of one (init, IPC) are drawn once (seeded) and then sliced, so the result
does not depend on which process runs which shard.

Outputs (``artifacts/extract/``): ``shards/<init>_ipc<k>_shard<s>.safetensors`` (+ ``.trace.json``),
``dsv.parquet`` (see :mod:`tasks.artifacts`), ``trace.json`` / ``trace.parquet`` (all shards' traces,
for plots); ``metrics/extract.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from dsv.baselines import SELECTOR_INPUTS
from dsv.data.core import denormalize
from dsv.extract import INITS, ExtractConfig, ExtractEvent, extract, init_candidates
from dsv.generate import generate_images, noise_start
from dsv.train import predict_logits
from tasks.artifacts import (
    PARAMS_HASH_KEY,
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
from tasks.output import StageOutput, device_of, finish, hash_files
from tasks.paths import Paths
from tasks.plain import params_hash
from tasks.progress import Bar
from tasks.tracking import StageLog

if TYPE_CHECKING:
    from tasks.config import ExtractStageConfig, PipelineConfig


@dataclass(frozen=True)
class ShardJob:
    """One DeepKKT problem: ``per_class`` DSVs per class of init kind ``init`` at IPC ``ipc``."""

    init: str
    ipc: int
    shard: int
    shards: int

    @property
    def per_class(self) -> int:
        """This shard's share of the IPC (the first ``ipc % shards`` shards take one more)."""
        return self.ipc // self.shards + (1 if self.shard < self.ipc % self.shards else 0)

    @property
    def offset(self) -> int:
        """Candidates per class taken by the shards before this one."""
        return sum(ShardJob(self.init, self.ipc, s, self.shards).per_class for s in range(self.shard))

    @property
    def tag(self) -> str:
        return f"{self.init}_ipc{self.ipc}_shard{self.shard}"


def jobs(cfg: PipelineConfig) -> list[ShardJob]:
    """Every shard of every (init, IPC), in a fixed order."""
    e = cfg.extract
    return [ShardJob(i, k, s, e.shards) for i in e.inits for k in e.ipcs for s in range(e.shards)]


def units(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """The shards as plain dicts (what the flow maps its shard tasks over)."""
    return [asdict(j) for j in jobs(cfg)]


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


# Inits that use no real image of the task: the generator warm-up (extract.warmup) applies to them.
TEACHER_ONLY = ("0shot", "noise")


def _seed(base: int, *parts: int) -> int:
    """A deterministic seed per (init, IPC, shard), independent of Python's hash randomisation."""
    h = base
    for p in parts:
        h = (h * 1_000_003 + p) % (2**31 - 1)
    return h


def _dual(solver: ExtractConfig) -> str:
    """How λ ≥ 0 was enforced: the dual rule of the Adam λ solver, or "nnls"."""
    return solver.dual if solver.lam_solver == "adam" else "nnls"


def _with_spare(n: int, spare: float) -> int:
    return math.ceil(n * (1.0 + spare))


def _bounds(paths: Paths, meta: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid input range in normalised space, per channel or feature: pixels in [0, 1]; a tabular
    feature between its smallest and largest training value (DSVs stay in the range of the real data)."""
    mean, std = meta.stats()
    if len(meta.input_shape) == 3:
        return (0.0 - mean) / std, (1.0 - mean) / std
    x, _ = load_split(paths.train, meta)
    return x.min(dim=0).values, x.max(dim=0).values


def run_unit(cfg: PipelineConfig, paths: Paths, unit: dict[str, Any], log: StageLog) -> dict[str, Any]:
    """Solve one shard and write its tensors and trace.

    Returns:
        {"files": {relative path: sha256}, "seconds": wall time, "unit": the shard}.
    """
    started = time.perf_counter()
    job = ShardJob(**unit)
    e = cfg.extract
    device = device_of(cfg)
    meta = read_data_meta(paths.data_meta)
    teacher = load_model(paths.teacher, paths.teacher_spec, device)
    mean, std = meta.stats()
    c = meta.num_classes
    # All candidates of this (init, IPC) are drawn at once, then sliced per shard.
    all_jobs = [ShardJob(job.init, job.ipc, s, job.shards) for s in range(job.shards)]
    solver = solver_for(e, job.init)
    widths = [_with_spare(j.per_class, solver.spare) for j in all_jobs]
    total = sum(widths)
    real_x = real_y = other_x = features = logits = None
    if job.init in ("noise", "0shot"):
        g = torch.Generator().manual_seed(_seed(e.seed, INITS.index(job.init), job.ipc))
    else:
        # Real images are drawn as the core-set selectors draw them (dsv.baselines.select seeds a generator
        # with the seed): "nshot" with extract.seed = distill.seed starts from the random row's images.
        g = torch.Generator().manual_seed(e.seed)
        real_x, real_y = load_split(paths.train, meta)
        needs = SELECTOR_INPUTS.get(job.init, ())
        if "features" in needs:
            features = predict_logits(teacher, real_x, batch_size=256, embed=True)
        if "logits" in needs:
            logits = predict_logits(teacher, real_x)
    if job.init == "0shot":
        pool = load_tensors(paths.init_pool, ("x",))["x"]
        if pool.shape[0] == 0:
            raise ValueError("init '0shot' needs the init pool, which is empty (see prepare.init_pool)")
        other_x = (pool - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    warm = e.warmup if job.init in TEACHER_ONLY and len(meta.input_shape) == 3 else None
    if job.init == "noise" and warm is not None:  # noise on the warm-up's coarsest grid (see noise_start)
        y0 = torch.arange(c).repeat_interleave(total)
        x0 = noise_start(y0.numel(), meta.input_shape, warm, g)
    else:
        x0, y0 = init_candidates(job.init, total, c, meta.input_shape, g, real_x, real_y, other_x, features, logits)
    start = sum(widths[: job.shard])
    keep = torch.cat([torch.arange(k * total + start, k * total + start + widths[job.shard]) for k in range(c)])
    x0, y0 = x0[keep], y0[keep]
    lo, hi = _bounds(paths, meta)
    if warm is not None:
        x0 = generate_images(teacher, x0.to(device), y0.to(device), warm, seed=_seed(e.seed, INITS.index(job.init),
                             job.ipc, job.shard), pixel_bounds=(lo, hi)).x

    prefix = job.tag
    bar = Bar(cfg.runtime.progress, solver.steps, f"extract {prefix}", unit="step")

    def on_step(ev: ExtractEvent) -> None:
        log.metrics({f"{prefix}/{k}": v for k, v in ev.metrics.items() if k != "step"}, step=ev.step)
        bar.to(ev.step, loss=ev.metrics.get("loss", float("nan")), residual=ev.metrics.get("residual_l2", 0.0))

    try:
        with bar:
            res = extract(
                teacher, x0.to(device), y0.to(device), solver,
                seed=_seed(e.seed, INITS.index(job.init), job.ipc, job.shard),
                callback=on_step, pixel_bounds=(lo, hi), keep_per_class=job.per_class,
            )
    except FloatingPointError as exc:
        # dsv names the step and the last finite loss; the user also needs to know which problem.
        raise FloatingPointError(
            f"extract shard {job.shard + 1}/{job.shards} (init {job.init}, IPC {job.ipc}, "
            f"{job.per_class} per class) diverged: {exc}"
        ) from exc
    shard_file = paths.extract_shard(job.init, job.ipc, job.shard)
    save_tensors(
        shard_file,
        {"x": res.x, "y": res.y, "lam": res.lam, "probs": res.probs, "entropy": res.entropy,
         "support": res.support, "margin": res.margin, "source_index": res.source_index,
         "counts": torch.tensor([res.dropped, res.lambda_zero, res.repaired, res.infeasible])},
        metadata={"lam_scale": repr(res.lam_scale), "dual": res.dual},
    )
    trace_file = paths.extract_shard_trace(job.init, job.ipc, job.shard)
    write_json(trace_file, [{**row, "init": job.init, "ipc": job.ipc, "shard": job.shard} for row in res.trace])
    files = hash_files(paths, [shard_file, trace_file])
    return {"files": files, "seconds": round(time.perf_counter() - started, 3), "unit": unit}


def merge(cfg: PipelineConfig, paths: Paths, log: StageLog, unit_results: list[dict[str, Any]]) -> StageOutput:
    """Concatenate all shards into ``dsv.parquet`` and the trace files; write metrics and figures.

    Args:
        unit_results: what :func:`run_unit` returned for every shard (their wall times are summed
            into the metrics).
    """
    started = time.perf_counter()
    meta = read_data_meta(paths.data_meta)
    mean, std = meta.stats()
    xs, ys, lams, ents, confs, names, inits, ipcs, shard_ids = [], [], [], [], [], [], [], [], []
    supports, margins = [], []
    counts: dict[tuple[str, int], torch.Tensor] = {}
    trace: list[dict] = []
    metrics: dict[str, object] = {}
    for job in jobs(cfg):
        t = load_tensors(paths.extract_shard(job.init, job.ipc, job.shard),
                         ("x", "y", "lam", "probs", "entropy", "support", "margin", "counts"))
        counts[(job.init, job.ipc)] = counts.get((job.init, job.ipc), torch.zeros(4, dtype=torch.long)) + t["counts"]
        y = t["y"].long() if t["y"].dim() == 1 else t["y"].argmax(1)
        n = y.numel()
        xs.append(denormalize(t["x"], mean, std) if n else t["x"])
        ys.append(y)
        lams.append(t["lam"])
        supports.append(t["support"])
        margins.append(t["margin"])
        ents.append(t["entropy"])
        confs.append(t["probs"].gather(1, y.view(-1, 1)).squeeze(1) if n else t["lam"])
        names += [meta.classes[i] for i in y.tolist()]
        inits += [job.init] * n
        ipcs += [job.ipc] * n
        shard_ids += [job.shard] * n
        trace += read_json(paths.extract_shard_trace(job.init, job.ipc, job.shard))
    x = torch.cat(xs) if xs else torch.zeros((0, *meta.input_shape))
    y_all = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
    digest = params_hash(cfg.section_dict("extract"))
    write_dsv_parquet(
        paths.dsv_parquet, x=x, y=y_all, lam=torch.cat(lams) if lams else torch.zeros(0),
        entropy=torch.cat(ents) if ents else torch.zeros(0), confidence=torch.cat(confs) if confs else torch.zeros(0),
        class_names=names, init=inits, ipc=ipcs, shard=shard_ids,
        support=torch.cat(supports) if supports else None, margin=torch.cat(margins) if margins else None,
        metadata={PARAMS_HASH_KEY: digest, "dsv.dataset": meta.name,
                  "dsv.dual": json.dumps({i: _dual(solver_for(cfg.extract, i)) for i in cfg.extract.inits}),
                  "dsv.classes": ",".join(meta.classes)},
        feature_names=meta.features,
    )
    write_json(paths.extract_trace, trace)
    write_records_parquet(paths.extract_trace_parquet, trace, {PARAMS_HASH_KEY: digest})

    for init in cfg.extract.inits:
        for ipc in cfg.extract.ipcs:
            sel = torch.tensor([a == init and b == ipc for a, b in zip(inits, ipcs)], dtype=torch.bool)
            rows = [r for r in trace if r["init"] == init and r["ipc"] == ipc]
            first_step = min((r["step"] for r in rows), default=0)
            last_step = max((r["step"] for r in rows), default=0)
            start = [r for r in rows if r["step"] == first_step]
            end = [r for r in rows if r["step"] == last_step]

            def avg(rs: list[dict], key: str) -> float:
                vals = [float(r[key]) for r in rs if key in r]
                return sum(vals) / len(vals) if vals else float("nan")

            key = f"{init}_ipc{ipc}"
            dropped, lambda_zero, repaired, infeasible = counts[(init, ipc)].tolist()
            metrics[key] = {
                "n": int(sel.sum()),
                "per_class": torch.bincount(y_all[sel], minlength=meta.num_classes).tolist(),
                "lambda_zero": lambda_zero,
                "dropped": dropped,
                "repaired": repaired,
                "infeasible": infeasible,
                "acc_target": avg(end, "acc_target"),
                "entropy_start": avg(start, "entropy"),
                "entropy_end": avg(end, "entropy"),
                "residual_l2_start": avg(start, "residual_l2"),
                "residual_l2_end": avg(end, "residual_l2"),
                "lam_mean": float(torch.cat(lams)[sel].mean()) if int(sel.sum()) else float("nan"),
                "support_mean": float(torch.cat(supports)[sel].mean()) if int(sel.sum()) else float("nan"),
                "asked": int(ipc * meta.num_classes),
            }
            if int(sel.sum()) and len(meta.input_shape) == 3:
                log.figure(image_grid(x[sel], y_all[sel], meta.classes, f"DSVs: {init}, IPC {ipc}"),
                           f"extract/dsv_grid_{key}.png")
            steps = sorted({r["step"] for r in rows})
            ent = [avg([r for r in rows if r["step"] == s], "entropy") for s in steps]
            if steps:
                log.figure(curves({key: (steps, ent)}, "step", "mean entropy (nats)", f"candidate entropy, {key}"),
                           f"extract/entropy_{key}.png")
    metrics["n_dsv"] = int(y_all.numel())
    metrics["shard_seconds"] = round(sum(float(r["seconds"]) for r in unit_results), 3)
    flat = {f"{k}.{m}": v for k, d in metrics.items() if isinstance(d, dict) for m, v in d.items()
            if isinstance(v, (int, float))}
    log.metrics({**flat, "n_dsv": metrics["n_dsv"]})
    log.artifact(paths.dsv_parquet)
    shard_files = [f for j in jobs(cfg) for f in (paths.extract_shard(j.init, j.ipc, j.shard),
                                                   paths.extract_shard_trace(j.init, j.ipc, j.shard))]
    files = [*shard_files, paths.dsv_parquet, paths.extract_trace, paths.extract_trace_parquet]
    return finish("extract", cfg, paths, files, metrics, started, extra_seconds=metrics["shard_seconds"],
                  device=device_of(cfg))


def run(cfg: PipelineConfig, paths: Paths, log: StageLog) -> StageOutput:
    """All shards in order, then the merge (the path ``dsv stage extract`` and DVC take)."""
    return merge(cfg, paths, log, [run_unit(cfg, paths, u, log) for u in units(cfg)])
