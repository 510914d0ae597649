"""The study behind the DeepKKT refinement defaults: what DSV refinement adds to the real images it starts from.

For each IPC, the starting images are herding's picks (deterministic) and random draws (one per seed). Every
solver variant refines the same starting images with each extraction seed; students (the paper protocol) are
trained with the same student seeds on the refined and on the unrefined images, so each Δ is paired: same
start, same student seed, only the refinement differs. ± is the population std over (extraction seed ×
student seed) pairs, and over (draw × student seed) for the random rows.

It runs in process on the outputs of the pipeline's `prepare` and `pretrain` stages (no Prefect or MLflow):

    dsv stage prepare -S runtime.output_dir=outputs/refine/fashion_mnist --no-mlflow
    dsv stage pretrain -S runtime.output_dir=outputs/refine/fashion_mnist --no-mlflow
    python benchmarks/refine.py --base outputs/refine/fashion_mnist --ipcs 1 10
    (digits: the same with -p benchmarks/params.digits.yaml and --base outputs/refine/digits)

Writes benchmarks/results/refine-<dataset>.json and .md (rows: variant, start, ipc, acc_mean, acc_std,
delta_mean, delta_std, n_train, residual_l2 start → end, seconds), with the load average beside the wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv.baselines import select  # noqa: E402
from dsv.extract import ExtractConfig, extract  # noqa: E402
from dsv.models import ModelConfig  # noqa: E402
from dsv.protocols import ProtocolConfig, train_students  # noqa: E402
from dsv.train import predict_logits  # noqa: E402
from tasks.artifacts import load_model, load_split, read_data_meta  # noqa: E402
from tasks.paths import Paths  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


# The variants of the study, one factor at a time from the paper's η (η_s = η_p = 5): "name": "key=value,...",
# keys of dsv.extract.ExtractConfig (kkt.* for the objective). ``--variant NAME=SPEC`` adds or replaces one.
VARIANTS: dict[str, str] = {
    "paper η (η_s = η_p = 5)": "",
    "η_s = 0, η_p = 5": "kkt.eta_stat=0",
    "η_s = 0, η_p = 5, 500 steps": "kkt.eta_stat=0,steps=500",
    "η_s = 0, η_p = 20": "kkt.eta_stat=0,kkt.eta_primal=20",
    "η_s = 0, η_p = 0 (no augmented copy)": "kkt.eta_stat=0,kkt.eta_primal=0",
    "η_s = 0, no L_stat (β_stat = 0)": "kkt.eta_stat=0,kkt.beta_stat=0",
    "η_s = 0, lr_x 0.03": "kkt.eta_stat=0,lr_x=0.03",
    "η_s = 0, NNLS λ (l2)": "kkt.eta_stat=0,lam_solver=nnls,kkt.distance=l2",
}


def configure(base: ExtractConfig, spec: str) -> ExtractConfig:
    """``base`` with the ``key=value`` pairs of ``spec`` (comma-separated; ``kkt.`` keys go to the objective)."""
    top: dict[str, Any] = {}
    kkt: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, _, raw = item.partition("=")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        (kkt if key.startswith("kkt.") else top)[key.removeprefix("kkt.")] = value
    return dataclasses.replace(base, **top, kkt=dataclasses.replace(base.kkt, **{"eta_stat": 5.0, "eta_primal": 5.0, **kkt}))


def _load(base: Path, device: str) -> dict[str, Any]:
    paths = Paths(base.resolve())
    meta = read_data_meta(paths.data_meta)
    x, y = load_split(paths.train, meta)
    xt, yt = load_split(paths.test, meta)
    teacher = load_model(paths.teacher, paths.teacher_spec, device)
    bounds = meta.bounds()
    return {"meta": meta, "x": x, "y": y, "xt": xt, "yt": yt, "teacher": teacher, "bounds": bounds,
            "features": predict_logits(teacher, x, batch_size=256, embed=True)}


def _students(d: dict[str, Any], x: torch.Tensor, y: torch.Tensor, protocol: ProtocolConfig, device: str) -> list[float]:
    res = train_students(x, y, d["xt"], d["yt"], None, protocol, d["meta"].input_shape, d["meta"].num_classes,
                         list(range(protocol.n_runs)), device)
    return [r.accuracy for r in res]


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, math.sqrt(sum((a - m) ** 2 for a in v) / len(v))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    d = _load(Path(args.base), args.device)
    meta = d["meta"]
    c = meta.num_classes
    protocol = ProtocolConfig(name="paper", epochs=args.epochs, min_steps=args.min_steps, n_runs=args.students,
                              model=ModelConfig(name="convnet", width=args.width, depth=args.depth))
    base = ExtractConfig(steps=args.steps, log_every=args.steps)
    specs = {**VARIANTS, **dict(v.split("=", 1) for v in args.variant)}
    if args.variants:
        specs = {k: v for k, v in specs.items() if any(s in k for s in args.variants)}
    chosen = {k: configure(base, v) for k, v in specs.items()}
    rows: list[dict[str, Any]] = []

    def row(**kw: Any) -> None:
        rows.append(kw)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in kw.items()
                          if k not in ("accs", "deltas")}), flush=True)

    for ipc in args.ipcs:
        starts = {"herding": [select("herding", y=d["y"], k=ipc, num_classes=c, seed=0, features=d["features"])]}
        if args.random_draws:
            starts["random"] = [select("random", y=d["y"], k=ipc, num_classes=c, seed=s)
                                for s in range(args.random_draws)]
        for start, picks in starts.items():
            base_accs = [_students(d, d["x"][idx], d["y"][idx], protocol, args.device) for idx in picks]
            flat = [a for accs in base_accs for a in accs]
            row(variant="(real images, unrefined)", start=start, ipc=ipc, n_train=ipc * c, accs=flat,
                acc_mean=_mean_std(flat)[0], acc_std=_mean_std(flat)[1], delta_mean=0.0, delta_std=0.0)
            for name, cfg in chosen.items():
                if start == "random" and name not in args.random_variants:
                    continue
                accs, deltas, res_start, res_end, secs, lam0, rep = [], [], [], [], [], [], []
                for draw, idx in enumerate(picks):
                    seeds = range(args.seeds) if start == "herding" else [draw]
                    for s in seeds:
                        t0 = time.perf_counter()
                        res = extract(d["teacher"], d["x"][idx].to(args.device), d["y"][idx].to(args.device), cfg,
                                      seed=1000 + s, pixel_bounds=d["bounds"], keep_per_class=ipc)
                        secs.append(time.perf_counter() - t0)
                        assert res.per_class == [ipc] * c, res.per_class
                        got = _students(d, res.x, res.y, protocol, args.device)
                        accs += got
                        deltas += [a - b for a, b in zip(got, base_accs[draw])]
                        res_start.append(res.trace[0]["residual_l2"])
                        res_end.append(res.trace[-1]["residual_l2"])
                        lam0.append(res.lambda_zero)
                        rep.append(res.repaired)
                m, sd = _mean_std(accs)
                dm, dsd = _mean_std(deltas)
                row(variant=name, start=start, ipc=ipc, n_train=ipc * c, accs=accs, deltas=deltas, acc_mean=m,
                    acc_std=sd, delta_mean=dm, delta_std=dsd, residual_l2_start=sum(res_start) / len(res_start),
                    residual_l2_end=sum(res_end) / len(res_end), lambda_zero=sum(lam0) / len(lam0),
                    repaired=sum(rep) / len(rep), extract_s=sum(secs) / len(secs))
    return {"dataset": meta.name, "rows": rows}


def render(p: dict[str, Any]) -> str:
    lines = [f"# DSV refinement study: {p['dataset']}", "", f"- Command: `{p['command']}` at commit `{p['git_commit'][:7]}`; "
             f"wall {p['wall_s']:.0f} s, load average {p['loadavg_start']} → {p['loadavg_end']}.",
             f"- Students: ConvNet (depth {p['args'].get('depth', 3)}) width {p['args']['width']}, protocol `paper` (Adam lr 1e-4, DSA, "
             f"max({p['args']['epochs']} epochs, {p['args']['min_steps']} steps)), {p['args']['students']} student seeds; "
             f"herding starts refined with {p['args']['seeds']} extraction seeds, random starts: one per draw.",
             "- Δ: paired by start and student seed (refined − unrefined), mean ± population std over the pairs. "
             "Residual: relative l2 stationarity residual ‖θ* + Σλ∇L‖/‖θ*‖ of the final layer, first → last step.",
             "", "| IPC | start | variant | images | acc (%) | Δ (points) | residual | λ = 0 | repaired | extract s |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        res = (f"{r['residual_l2_start']:.3f} → {r['residual_l2_end']:.3f}" if "residual_l2_start" in r else "")
        lines.append(f"| {r['ipc']} | {r['start']} | {r['variant']} | {r['n_train']} | "
                     f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | "
                     f"{100 * r['delta_mean']:+.2f} ± {100 * r['delta_std']:.2f} | {res} | "
                     f"{r.get('lambda_zero', '')} | {r.get('repaired', '')} | "
                     f"{'' if 'extract_s' not in r else format(r['extract_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="pipeline output folder with prepare and pretrain done")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--seeds", type=int, default=3, help="extraction seeds per herding start")
    ap.add_argument("--random-draws", type=int, default=0, help="random starts (one extraction each)")
    ap.add_argument("--random-variants", nargs="*", default=[], help="variants also run from the random starts")
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--min-steps", type=int, default=400)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=3, help="student ConvNet depth")
    ap.add_argument("--variants", nargs="*", default=[], help="substrings of the variant names to run (default all)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=SPEC",
                    help="add a variant, e.g. 'η_s 20=kkt.eta_stat=20' (keys of ExtractConfig, kkt.* for the objective)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default=None, help="results file stem (default refine-<dataset>)")
    args = ap.parse_args(argv)
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.perf_counter()
    payload = run(args)
    payload.update({
        "command": "python benchmarks/refine.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
        "wall_s": time.perf_counter() - t0, "loadavg_start": " ".join(load0),
        "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]), "args": vars(args),
    })
    stem = RESULTS / (args.name or f"refine-{payload['dataset']}")
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(payload))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
