"""Does a ranking find support vectors? λ, the support score, the margin and random against SVC.

On 2-D data with a known answer: a teacher converged to a KKT point of mean CE + (ω/2)‖θ‖² (full-batch
L-BFGS in float64, ``dsv.certificate.converge``), λ fitted on the whole training set (``dsv.lam``,
NNLS), and scikit-learn's SVC with the same regularisation (C = 1/(nω): the hinge-loss counterpart of
the teacher's objective; linear kernel for the linear teacher, RBF for the MLP). For each ranking
(``lambda``, ``support`` = λ_i·‖∇_θ L_i‖, ``margin`` = smallest teacher margin first, ``random``):
precision@k with k = the number of SVC support vectors, and the AUC of the score for "is a support
vector". Separable data (two well-apart Gaussian blobs) and overlapping data (closer blobs), several
seeds. Writes benchmarks/results/svm-oracle.json and .md.

    .venv/bin/python benchmarks/svm_oracle.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC

from dsv.certificate import ConvergeConfig, converge
from dsv.kernel import kkt_certificate
from dsv.lam import LambdaConfig, fit_lambdas
from dsv.models import ModelConfig, build_seeded

OUT = Path(__file__).parent / "results"
DATA = {"separable": (torch.tensor([2.0, 0.5]), 0.7), "overlapping": (torch.tensor([0.8, 0.3]), 0.7)}


def make_data(kind: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs of n points each at ±centre, (2n, 2) float64 and (2n,) labels."""
    centre, std = DATA[kind]
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n, 2, generator=g, dtype=torch.float64) * std + centre,
                   torch.randn(n, 2, generator=g, dtype=torch.float64) * std - centre])
    return x, torch.cat([torch.zeros(n), torch.ones(n)]).long()


def teacher_for(kind: str, seed: int) -> torch.nn.Module:
    if kind == "linear":
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(2, 2)).double()
    return build_seeded(ModelConfig(name="mlp", width=16, depth=1, activation="tanh"), (2,), 2, seed).double()


def precision_at_k(score: np.ndarray, is_sv: np.ndarray) -> float:
    k = int(is_sv.sum())
    top = np.argsort(-score, kind="stable")[:k]
    return float(is_sv[top].mean()) if k else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--n", type=int, default=100, help="points per class")
    ap.add_argument("--omega", type=float, default=1e-3, help="the teacher's weight decay ω")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    started = time.perf_counter()
    for data in DATA:
        for teacher_kind in ("linear", "mlp"):
            for seed in args.seeds:
                x, y = make_data(data, args.n, seed)
                model = teacher_for(teacher_kind, seed)
                conv = converge(model, x, y, args.omega, ConvergeConfig(scope="all", max_iter=3000, target=1e-10))
                cert = kkt_certificate(model, x, y, args.omega, list(model.parameters()))
                lam = fit_lambdas(model, x, y, LambdaConfig(batch_size=10**6, steps=3000, solver="nnls"), n_train=len(y))
                c_svm = 1.0 / (len(y) * args.omega)
                kernel = "linear" if teacher_kind == "linear" else "rbf"
                svc = SVC(kernel=kernel, C=c_svm, gamma="scale").fit(x.numpy(), y.numpy())
                is_sv = np.zeros(len(y), dtype=bool)
                is_sv[svc.support_] = True
                rng = np.random.default_rng(seed)
                scores = {
                    "lambda": lam.lam.numpy(),
                    "support": lam.support.numpy(),
                    "margin": -lam.margin.numpy(),
                    "random": rng.random(len(y)),
                }
                with torch.no_grad():
                    acc = float((model(x).argmax(1) == y).double().mean())
                for name, sc in scores.items():
                    rows.append({
                        "ranking": name, "teacher": teacher_kind, "data": data, "seed": seed,
                        "precision_at_k": precision_at_k(sc, is_sv),
                        "auc": float(roc_auc_score(is_sv, sc)) if 0 < is_sv.sum() < len(y) else float("nan"),
                        "k": int(is_sv.sum()), "kkt_certificate": cert.relative, "lbfgs_iterations": conv.iterations,
                        "lambda_residual_l2": lam.residual_l2[0], "train_acc": acc,
                    })
                print(f"{data:11s} {teacher_kind:6s} seed {seed}: certificate {cert.relative:.2e}, k={int(is_sv.sum())}, "
                      + ", ".join(f"{r['ranking']} P@k {r['precision_at_k']:.2f}" for r in rows[-4:]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"command": "python benchmarks/svm_oracle.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "commit": commit, "omega": args.omega, "n_per_class": args.n, "seconds": round(time.perf_counter() - started, 1),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
    (OUT / "svm-oracle.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# SVM oracle: which ranking finds SVC's support vectors?", "",
        f"`{meta['command']}` (commit {commit}; ω = {args.omega}, {args.n} points per class, SVC C = 1/(nω); "
        f"{meta['seconds']} s, load {' '.join(meta['loadavg'])})", "",
        "Teachers converged with full-batch L-BFGS (float64); λ fitted on the whole training set (NNLS). "
        "P@k: precision of the top k (k = number of SVC support vectors); AUC of the score. Mean over seeds "
        "(min over seeds in brackets).", "",
        "| data | teacher | max certificate | ranking | P@k mean (min) | AUC mean (min) |", "|---|---|---:|---|---:|---:|",
    ]
    for data in DATA:
        for teacher_kind in ("linear", "mlp"):
            for name in scores:
                sel = [r for r in rows if r["data"] == data and r["teacher"] == teacher_kind and r["ranking"] == name]
                p = [r["precision_at_k"] for r in sel]
                a = [r["auc"] for r in sel]
                cmax = max(r["kkt_certificate"] for r in sel)
                lines.append(f"| {data} | {teacher_kind} | {cmax:.1e} | {name} | {np.mean(p):.2f} ({min(p):.2f}) | "
                             f"{np.nanmean(a):.2f} ({np.nanmin(a):.2f}) |")
    (OUT / "svm-oracle.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
