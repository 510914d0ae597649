"""The benchmark figures: accuracy vs IPC per method, DSVs next to the top-λ real images, and per-class Σλ vs
per-class teacher accuracy with Pearson ρ.

Reads a benchmark table (benchmarks/results/<dataset>-<protocol>.json, written by benchmarks/table.py) and the
pipeline output folder the table ran in (its dsv.parquet, lambdas.parquet and metrics/coreset.json); writes
PNGs to benchmarks/results/ and prints their paths. Nothing is recomputed.

    .venv/bin/python benchmarks/plots.py --table benchmarks/results/fashion_mnist-paper.json \
        --from outputs/bench/fashion_mnist --ipc 10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.artifacts import load_tensors, read_data_meta, read_dsv_parquet, read_lambdas_parquet  # noqa: E402
from tasks.figures import close, image_grid, plt, scatter_labeled  # noqa: E402
from tasks.paths import Paths  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

# Line style per method family: DSVs solid, core-sets dashed, distillation dotted.
_DSV = ("dsv_nshot", "dsv_0shot", "dsv_noise")
_DISTILL = ("dm",)


_REFERENCE = ("full", "teacher")


def accuracy_vs_ipc(rows: list[dict], title: str, teacher_acc: float | None = None):
    """One line per method (mean ± std over student seeds) across the IPCs it was evaluated at; the whole
    training set and the teacher as horizontal reference lines."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] not in _REFERENCE:
            by_method.setdefault(r["method"], []).append(r)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = plt.get_cmap("tab20").colors
    for i, method in enumerate(sorted(by_method, key=lambda m: (m not in _DSV, m))):
        pts = sorted(by_method[method], key=lambda r: r["ipc"])
        xs = [r["ipc"] for r in pts]
        ys = [100 * r["acc_mean"] for r in pts]
        es = [100 * r["acc_std"] for r in pts]
        style = "-" if method in _DSV else (":" if method in _DISTILL else "--")
        ax.errorbar(xs, ys, yerr=es, fmt=style, marker="o", ms=3, capsize=2, lw=1.6 if method == "dsv_nshot" else 1,
                    color=colors[(2 * i) % 20 + (2 * i) // 20 % 2], label=method)
    ax.set_xscale("log")
    ticks = sorted({r["ipc"] for pts in by_method.values() for r in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    refs = [(r["method"] + " data", r["acc_mean"]) for r in rows if r["method"] in _REFERENCE]
    if teacher_acc is not None and not any(r["method"] == "teacher" for r in rows):
        refs.append(("teacher", teacher_acc))
    for name, acc in refs:
        ax.axhline(100 * acc, color="grey", lw=0.8, ls="-.")
        ax.annotate(f"{name} {100 * acc:.1f}", (ax.get_xlim()[0], 100 * acc), fontsize=6, va="bottom")
    ax.set_xlabel("images per class (IPC)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def dsv_vs_topk(output: Path, ipc: int, init: str, per_class: int):
    """Two grids side by side, one row per class: the DSVs of ``init`` at ``ipc`` and the top-λ real images."""
    paths = Paths(output)
    meta = read_data_meta(paths.data_meta)
    dsv = read_dsv_parquet(paths.dsv_parquet, init=init, ipc=ipc)
    if dsv.y.numel() == 0:
        raise SystemExit(f"{paths.dsv_parquet} has no DSVs for init={init} ipc={ipc}")
    lam = read_lambdas_parquet(paths.lambdas_parquet)
    k = min(per_class, ipc)
    idx = lam.topk(k, meta.num_classes)
    train = load_tensors(paths.train, ("x", "y"))
    real_x, real_y = train["x"][idx], train["y"][idx].long()
    # Within each class, the DSVs with the largest λ first (the ones the teacher leans on most).
    order = torch.argsort(-dsv.lam)
    order = order[torch.argsort(dsv.y[order], stable=True)]
    left = image_grid(dsv.x[order], dsv.y[order], meta.classes, f"DSVs ({init}, IPC {ipc}), largest λ first", k)
    right = image_grid(real_x, real_y, meta.classes, f"top-λ real images (of {lam.index.numel()})", k)
    fig, axes = plt.subplots(1, 2, figsize=(2 * (k * 0.9 + 1.2), meta.num_classes * 0.9 + 0.6))
    for ax, sub in zip(axes, (left, right)):
        sub.canvas.draw()
        ax.imshow(sub.canvas.buffer_rgba())
        ax.axis("off")
    close(left)
    close(right)
    fig.tight_layout()
    return fig


def lam_vs_accuracy(output: Path):
    """Per-class Σλ (coreset stage) against the teacher's per-class test accuracy, with Pearson ρ."""
    paths = Paths(output)
    meta = read_data_meta(paths.data_meta)
    m = json.loads(paths.metrics("coreset").read_text())
    return scatter_labeled(
        m["sum_lam_per_class"], [100 * a for a in m["teacher_acc_per_class"]], meta.classes,
        "Σλ of the class (real images)", "teacher test accuracy of the class (%)",
        f"{meta.name}: per-class Σλ vs accuracy, ρ = {m['pearson_sum_lam_vs_acc']:.3f} (n = {m['n']})",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True, help="benchmarks/results/<dataset>-<protocol>.json")
    ap.add_argument("--from", dest="output", default=None,
                    help="the pipeline output folder the table ran in (without it: only the accuracy-vs-IPC plot)")
    ap.add_argument("--ipc", type=int, default=10, help="IPC of the DSV vs top-λ grid")
    ap.add_argument("--init", default="nshot", help="DSV init kind of the grid")
    ap.add_argument("--per-class", type=int, default=10, help="columns of the grid")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    table = json.loads(Path(args.table).read_text())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{table['dataset']}-{table['protocol']}"
    figs = {
        out / f"{stem}-acc-vs-ipc.png": accuracy_vs_ipc(
            table["rows"], f"{table['dataset']}, protocol {table['protocol']}: accuracy vs IPC",
            table.get("teacher_acc")),
    }
    if args.output is not None:
        figs[out / f"{table['dataset']}-dsv-vs-topk-ipc{args.ipc}.png"] = dsv_vs_topk(
            Path(args.output), args.ipc, args.init, args.per_class)
        figs[out / f"{table['dataset']}-lambda-vs-acc.png"] = lam_vs_accuracy(Path(args.output))
    for path, fig in figs.items():
        fig.savefig(path, dpi=80 if "dsv-vs-topk" in path.name else 110)
        close(fig)
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
