"""Deep support vectors of a 2-D toy problem: do they sit on the decision boundary?

Trains an MLP teacher (weight decay 5e-3, as the paper's teachers) on `moons` or `blobs`, extracts DSVs
from real points (n-shot) and from noise, and measures for the training data and for the DSVs:
the teacher's mean prediction entropy and the mean Euclidean distance to the decision boundary
(nearest point of a fine grid where the predicted class changes). Writes
benchmarks/results/toy-<dataset>.json, .md and .png (data, boundary, DSVs sized by λ).

    .venv/bin/python benchmarks/toy.py --dataset moons
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsv.data.registry import DataConfig, load_dataset
from dsv.extract import ExtractConfig, extract, init_candidates
from dsv.kernel import entropy
from dsv.models import ModelConfig, build_seeded
from dsv.train import FitConfig, evaluate, fit

OUT = Path(__file__).parent / "results"


def boundary_points(model: torch.nn.Module, lo: torch.Tensor, hi: torch.Tensor, n: int = 400) -> torch.Tensor:
    """Grid cells whose predicted class differs from a right/up neighbour: (M, 2) points on the boundary."""
    xs, ys = torch.linspace(float(lo[0]), float(hi[0]), n), torch.linspace(float(lo[1]), float(hi[1]), n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([gx.flatten(), gy.flatten()], 1)
    with torch.no_grad():
        pred = model(grid).argmax(1).view(n, n)
    edge = torch.zeros(n, n, dtype=torch.bool)
    edge[:, :-1] |= pred[:, :-1] != pred[:, 1:]
    edge[:-1, :] |= pred[:-1, :] != pred[1:, :]
    return grid[edge.flatten()]


def mean_distance(points: torch.Tensor, boundary: torch.Tensor) -> float:
    return float(torch.cdist(points, boundary).min(dim=1).values.mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="moons", choices=["moons", "blobs"])
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ds = load_dataset(DataConfig(name=args.dataset, seed=args.seed))
    teacher = build_seeded(ModelConfig(name="mlp", width=64, depth=2), ds.input_shape, ds.num_classes, args.seed)
    fit(teacher, ds.train_x, ds.train_y, FitConfig(lr=1e-2, weight_decay=5e-3, epochs=200, batch_size=100), seed=args.seed)
    teacher.eval()
    acc = evaluate(teacher, ds.test_x, ds.test_y, ds.num_classes).accuracy
    lo, hi = ds.train_x.min(0).values - 0.5, ds.train_x.max(0).values + 0.5
    boundary = boundary_points(teacher, lo, hi)
    with torch.no_grad():
        data_entropy = float(entropy(teacher(ds.train_x)).mean())
    rows = [{"set": "training data", "n": int(ds.train_x.shape[0]), "entropy": data_entropy,
             "dist_to_boundary": mean_distance(ds.train_x, boundary)}]
    results = {}
    for init in ("nshot", "noise"):
        g = torch.Generator().manual_seed(args.seed)
        x0, y0 = init_candidates(init, args.ipc, ds.num_classes, ds.input_shape, g, real_x=ds.train_x, real_y=ds.train_y)
        t0 = time.perf_counter()
        res = extract(teacher, x0, y0, ExtractConfig(steps=args.steps), seed=args.seed)
        wall = time.perf_counter() - t0
        results[init] = (x0, res)
        rows.append({"set": f"initial candidates ({init})", "n": int(x0.shape[0]),
                     "entropy": res.trace[0]["entropy"], "dist_to_boundary": mean_distance(x0, boundary)})
        rows.append({"set": f"DSVs ({init})", "n": int(res.x.shape[0]), "entropy": float(res.entropy.mean()),
                     "dist_to_boundary": mean_distance(res.x, boundary),
                     "acc_target": res.trace[-1]["acc_target"], "residual_l2_start": res.trace[0]["residual_l2"],
                     "residual_l2_end": res.trace[-1]["residual_l2"], "wall_s": wall})
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/toy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    stem = OUT / f"toy-{args.dataset}"
    payload = {"dataset": args.dataset, "teacher_test_acc": acc, "command": command, "git_commit": commit, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# DSVs on the 2-D `{args.dataset}` toy set", "",
             f"Teacher: MLP 2x64, Adam lr 1e-2, weight decay 5e-3, 200 epochs; test accuracy {acc:.3f}.",
             f"DeepKKT: library defaults (`ExtractConfig()`), {args.steps} steps, IPC {args.ipc}.", "",
             f"Command: `{command}` at commit `{commit}`.", "",
             "| set | n | mean entropy (nats) | mean distance to boundary |", "|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['n']} | {r['entropy']:.3f} | {r['dist_to_boundary']:.3f} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    _plot(teacher, ds, lo, hi, results, stem.with_suffix(".png"))
    print("\n".join(lines))
    return 0


def _plot(teacher, ds, lo, hi, results, path: Path) -> None:  # noqa: ANN001
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 300
    xs, ys = torch.linspace(float(lo[0]), float(hi[0]), n), torch.linspace(float(lo[1]), float(hi[1]), n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    with torch.no_grad():
        pred = teacher(torch.stack([gx.flatten(), gy.flatten()], 1)).argmax(1).view(n, n)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, (init, (x0, res)) in zip(axes, results.items()):
        ax.contourf(gx, gy, pred, alpha=0.15, levels=ds.num_classes - 1 if ds.num_classes > 2 else 1, cmap="coolwarm")
        ax.contour(gx, gy, pred, colors="k", linewidths=0.8)
        ax.scatter(ds.train_x[:, 0], ds.train_x[:, 1], c=ds.train_y, s=4, alpha=0.3, cmap="coolwarm")
        ax.scatter(x0[:, 0], x0[:, 1], marker="x", c="gray", s=20, label="initial candidates")
        size = 30 + 300 * res.lam / res.lam.max().clamp_min(1e-12)
        ax.scatter(res.x[:, 0], res.x[:, 1], c=res.y, s=size, edgecolors="k", cmap="coolwarm", label="DSVs (size ∝ λ)")
        ax.set_title(f"{ds.name}: DSVs from {init}")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
