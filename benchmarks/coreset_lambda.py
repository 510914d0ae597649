"""Which λ fit the core-set stage ships: the residual it reaches and the core-sets it ranks, on one dataset.

Fits λ on the core-set stage's pool (``coreset.per_class`` images per class) with each setting, reports the
relative l2 stationarity residual ‖θ* + Gᵀλ‖/‖θ*‖ per batch, and trains students (paper protocol, the same
student seeds) on the top-λ and top-support core-sets at each IPC, beside ``kkt_herding`` and herding on the
whole split. Runs in process on the outputs of the pipeline's prepare and pretrain stages:

    python benchmarks/coreset_lambda.py --base outputs/refine/fashion_mnist --ipcs 1 10

Writes benchmarks/results/coreset-lambda-<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
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
from dsv.data.core import per_class_indices  # noqa: E402
from dsv.lam import LambdaConfig, fit_lambdas, topk_by_rank  # noqa: E402
from dsv.models import ModelConfig  # noqa: E402
from dsv.protocols import ProtocolConfig, train_students  # noqa: E402
from dsv.train import predict_logits  # noqa: E402
from tasks.artifacts import load_model, load_split, read_data_meta  # noqa: E402
from tasks.paths import Paths  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = {
    "all parameters, Adam on l1 (first release)": LambdaConfig(solver="adam", param_subset="all", distance="l1"),
    "final layer, NNLS": LambdaConfig(solver="nnls", param_subset="last"),
}


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, math.sqrt(sum((a - m) ** 2 for a in v) / len(v))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--per-class", type=int, default=300, help="the λ pool per class (coreset.per_class)")
    ap.add_argument("--students", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--min-steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    t0 = time.perf_counter()
    paths = Paths((ROOT / args.base).resolve())
    meta = read_data_meta(paths.data_meta)
    c = meta.num_classes
    x, y = load_split(paths.train, meta)
    xt, yt = load_split(paths.test, meta)
    teacher = load_model(paths.teacher, paths.teacher_spec)
    pool = per_class_indices(y, args.per_class, c, torch.Generator().manual_seed(0), at_most=True).sort().values
    protocol = ProtocolConfig(name="paper", epochs=args.epochs, min_steps=args.min_steps, n_runs=args.students,
                              model=ModelConfig(name="convnet", width=32, depth=3))
    rows: list[dict[str, Any]] = []

    def students(name: str, setting: str, ipc: int, idx: torch.Tensor, extra: dict[str, Any]) -> None:
        res = train_students(x[idx], y[idx], xt, yt, None, protocol, meta.input_shape, c,
                             list(range(args.students)))
        m, sd = _mean_std([r.accuracy for r in res])
        rows.append({"core_set": name, "lambda_fit": setting, "ipc": ipc, "n_train": int(idx.numel()),
                     "acc_mean": m, "acc_std": sd, "accs": [r.accuracy for r in res], **extra})
        print(json.dumps(rows[-1]), flush=True)

    feats = predict_logits(teacher, x, batch_size=256, embed=True)
    logits = predict_logits(teacher, x)
    for ipc in args.ipcs:
        for name in ("herding", "kkt_herding"):
            idx = select(name, y=y, k=ipc, num_classes=c, seed=0, features=feats, logits=logits)
            students(name, "-", ipc, idx, {"shots": "all"})
    for setting, cfg in SETTINGS.items():
        t1 = time.perf_counter()
        res = fit_lambdas(teacher, x[pool], y[pool], cfg, seed=0, n_train=int(y.numel()))
        fit_s = time.perf_counter() - t1
        resid = sum(res.residual_l2) / len(res.residual_l2)
        for ipc in args.ipcs:
            for name, rank in (("top-λ", res.rank), ("top-support", res.support_rank)):
                assert rank is not None
                idx = pool[topk_by_rank(rank, res.labels, ipc)]
                students(name, setting, ipc, idx, {"residual_l2": resid, "fit_s": fit_s,
                                                   "shots": args.per_class})
    payload = {"dataset": meta.name, "rows": rows, "args": vars(args),
               "command": "python benchmarks/coreset_lambda.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=ROOT).stdout.strip(),
               "wall_s": time.perf_counter() - t0, "loadavg_start": load0,
               "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3])}
    stem = RESULTS / f"coreset-lambda-{meta.name}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = [f"# λ fit of the core-set stage: {meta.name}", "",
             f"- Command: `{payload['command']}` at commit `{payload['git_commit'][:7]}`; wall {payload['wall_s']:.0f} s, "
             f"load average {load0} → {payload['loadavg_end']}.",
             f"- λ pool: {args.per_class} images per class; students: paper protocol, {args.students} seeds. Residual: "
             "relative l2 ‖θ* + Gᵀλ‖/‖θ*‖ over the parameters the fit uses, mean over batches.", "",
             "| core-set | λ fit | IPC | images | acc (%) | residual | fit s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        res_s = f"{r['residual_l2']:.3f}" if "residual_l2" in r else ""
        fit_s_s = f"{r['fit_s']:.0f}" if "fit_s" in r else ""
        lines.append(f"| {r['core_set']} | {r['lambda_fit']} | {r['ipc']} | {r['n_train']} | "
                     f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {res_s} | {fit_s_s} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
