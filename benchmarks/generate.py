"""The classifier as a generator, judged independently: what each start and each recipe ingredient gives.

For one dataset, runs the pipeline's `prepare`, `pretrain` and `judge` stages (`dsv stage`, cached, default
params.yaml plus the dataset) into outputs/bench/generate-<dataset>/, then, in this process:

1. **inits**: `per_class` images per class generated with the default recipe (`generate.recipe`) from
   noise, from 0-shot pools (digits, photos: crops of scikit-learn's bundled photographs; a pool that is the
   dataset itself is skipped), and from real training images (n-shot); plus real test images as the
   reference row. Each row: judge accuracy on the intended class, judge confidence, Fréchet distance in the
   judge's features to as many real test images of the same classes (noise's distance beside it), the
   teacher's accuracy, steps and seconds per image.
2. **ablation** (noise start): the default recipe with one ingredient removed or changed at a time
   (coarse-to-fine, TV, norm prior, augmented views, stationarity term added); the BatchNorm-statistics
   prior is measured with the BN judge as the generator and the teacher (InstanceNorm) as its judge.
3. **students** (`--students`): ConvNet students trained on the generated sets under the paper protocol
   (Adam lr 1e-4, DSA) at IPC = `per_class`, 3 seeds, against the same number of random real images.

Writes benchmarks/results/generate-<dataset>.json and .md and the grids generate-<dataset>-<init>.png,
with the command, commit and the load average beside every wall time.

    .venv/bin/python benchmarks/generate.py --dataset fashion_mnist --students
    .venv/bin/python benchmarks/generate.py --dataset digits
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from dsv.data.core import denormalize, per_class_indices  # noqa: E402
from dsv.data.registry import DataConfig, load_dataset, resize_images  # noqa: E402
from dsv.generate import GenerateConfig, sample  # noqa: E402
from dsv.judge import judge_score, matched_real  # noqa: E402
from dsv.protocols import train_students  # noqa: E402
from tasks.artifacts import load_model, load_split, read_data_meta  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.figures import image_grid  # noqa: E402
from tasks.paths import Paths  # noqa: E402

POOLS = ("digits", "photos")


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def _load() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def stages(dataset: str, out: str, extra: list[str]) -> None:
    for stage in ("prepare", "pretrain", "judge"):
        cmd = [str(ROOT / ".venv" / "bin" / "dsv"), "stage", stage, "--no-mlflow", "-S", f"prepare.data.name={dataset}",
               "-S", f"runtime.output_dir={out}", "-S", "runtime.progress=off", *[a for e in extra for a in ("-S", e)]]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"dsv stage {stage} failed")


def ablations(recipe: GenerateConfig) -> dict[str, GenerateConfig]:
    """The default recipe with one ingredient changed at a time."""
    return {
        "default": recipe,
        "no coarse-to-fine (levels 0)": replace(recipe, levels=0),
        "one coarse level (levels 1)": replace(recipe, levels=1),
        "TV prior 0.3" if not recipe.beta_tv else "TV prior x3": replace(recipe, beta_tv=3 * recipe.beta_tv if recipe.beta_tv else 0.3),
        "no TV prior" if recipe.beta_tv else "TV prior 0.1": replace(recipe, beta_tv=0.0 if recipe.beta_tv else 0.1),
        "no norm prior": replace(recipe, beta_norm=0.0),
        "no augmentation": replace(recipe, augment="none"),
        "4 augmented views": replace(recipe, views=4),
        "half the steps": replace(recipe, steps=recipe.steps // 2),
        "twice the steps": replace(recipe, steps=2 * recipe.steps),
        "+ stationarity (beta_stat 1)": replace(recipe, beta_stat=1.0),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--students", action="store_true", help="train paper-protocol students on the generated sets")
    ap.add_argument("--n-runs", type=int, default=3)
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("DSV_THREADS", "2")))
    out = f"outputs/bench/generate-{args.dataset}"
    t0, load0 = time.perf_counter(), _load()
    stages(args.dataset, out, args.overrides)
    cfg = load_config(ROOT / "params.yaml", [f"prepare.data.name={args.dataset}", *args.overrides])
    recipe = cfg.generate.recipe
    paths = Paths(ROOT / out)
    meta = read_data_meta(paths.data_meta)
    mean, std = meta.stats()
    bounds = meta.bounds()
    shape, c, k = tuple(meta.input_shape), meta.num_classes, args.per_class
    teacher, judge = load_model(paths.teacher, paths.teacher_spec), load_model(paths.judge, paths.judge_spec)
    x_test, y_test = load_split(paths.test, meta)
    x_train, y_train = load_split(paths.train, meta)
    y_set = torch.arange(c).repeat_interleave(k)
    g = torch.Generator().manual_seed(0)
    reference = x_test[matched_real(y_set, y_test, g)]
    noise = (cfg.generate.noise_std * torch.randn((y_set.numel(), *shape), generator=g)).clamp(
        bounds[0].view(1, -1, 1, 1), bounds[1].view(1, -1, 1, 1))
    noise_score = judge_score(judge, noise, y_set, reference)

    def row(name: str, x: torch.Tensor, probs: torch.Tensor | None, seconds: float, steps: int, **extra: Any
            ) -> dict[str, Any]:
        s = judge_score(judge, x, y_set, reference)
        return {"init": name, "judge_acc": s.acc, "judge_conf": s.conf, "frechet": s.frechet,
                "frechet_noise": noise_score.frechet,
                "teacher_acc": float((probs.argmax(1) == y_set).float().mean()) if probs is not None else None,
                "steps": steps, "seconds_per_image": seconds / x.shape[0], "n": s.n, **extra}

    starts: dict[str, torch.Tensor | None] = {"noise": None}
    for pool in POOLS:
        if pool == args.dataset:
            continue
        p = load_dataset(DataConfig(name=pool)).train_x
        p = resize_images(p[torch.randperm(p.shape[0], generator=torch.Generator().manual_seed(0))[: y_set.numel()]], shape)
        starts[f"0shot:{pool}"] = meta.normalize(p)
    starts["nshot"] = x_train[per_class_indices(y_train, k, c, torch.Generator().manual_seed(0))]

    inits, grids, sets = [], {}, {}
    for name, x0 in starts.items():
        began = time.perf_counter()
        gen = sample(teacher, k, c, shape, recipe, seed=0, pixel_bounds=bounds, x0=x0,
                     noise_std=cfg.generate.noise_std)
        inits.append(row(name, gen.x, gen.probs, time.perf_counter() - began, recipe.steps,
                         start_judge_acc=judge_score(judge, x0, y_set, reference).acc if x0 is not None else noise_score.acc))
        sets[name] = gen.x
        grid = RESULTS / f"generate-{args.dataset}-{name.replace(':', '-')}.png"
        fig = image_grid(denormalize(gen.x, mean, std), gen.y, meta.classes,
                         f"{args.dataset}: generated from {name} ({recipe.steps} steps, default recipe)")
        fig.savefig(grid, dpi=100)
        grids[name] = grid.relative_to(ROOT).as_posix()
        print(json.dumps(inits[-1]), flush=True)
    real = x_test[matched_real(y_set, y_test, torch.Generator().manual_seed(1),
                               exclude=torch.isin(torch.arange(y_test.numel()), matched_real(y_set, y_test,
                                                                                        torch.Generator().manual_seed(0))))]
    inits.append(row("real", real, None, 0.0, 0))
    inits.append(row("noise (raw, not optimised)", noise, None, 0.0, 0))

    ablation = []
    if not args.no_ablation:
        for name, r in ablations(recipe).items():
            began = time.perf_counter()
            gen = sample(teacher, k, c, shape, r, seed=0, pixel_bounds=bounds, noise_std=cfg.generate.noise_std)
            ablation.append(row(name, gen.x, gen.probs, time.perf_counter() - began, r.steps))
            print(json.dumps(ablation[-1]), flush=True)
        # The BatchNorm prior needs a BN teacher: the judge generates, the teacher judges.
        ref_t = x_test[matched_real(y_set, y_test, torch.Generator().manual_seed(0))]
        for name, beta in (("BN teacher, BN prior on", max(recipe.beta_bn, 0.01)), ("BN teacher, BN prior off", 0.0)):
            began = time.perf_counter()
            gen = sample(judge, k, c, shape, replace(recipe, beta_bn=beta), seed=0, pixel_bounds=bounds,
                         noise_std=cfg.generate.noise_std)
            s = judge_score(teacher, gen.x, y_set, ref_t)
            ablation.append({"init": name, "judge_acc": s.acc, "judge_conf": s.conf, "frechet": s.frechet,
                             "frechet_noise": judge_score(teacher, noise, y_set, ref_t).frechet,
                             "teacher_acc": float((gen.probs.argmax(1) == y_set).float().mean()),
                             "steps": recipe.steps, "seconds_per_image": (time.perf_counter() - began) / y_set.numel(),
                             "n": s.n, "note": "generator = the BN judge; judged by the InstanceNorm teacher"})
            print(json.dumps(ablation[-1]), flush=True)

    students = []
    if args.students:
        proto = replace(cfg.distill.protocol, name="paper", epochs=200, min_steps=400, n_runs=args.n_runs)
        random_real = x_train[per_class_indices(y_train, k, c, torch.Generator().manual_seed(0))]
        for name, x in [*sets.items(), ("random real", random_real)]:
            began = time.perf_counter()
            res = train_students(x, y_set, x_test, y_test, None, proto, shape, c, list(range(args.n_runs)))
            accs = [r.accuracy for r in res]
            m = sum(accs) / len(accs)
            students.append({"set": name, "ipc": k, "acc_mean": m,
                             "acc_std": (sum((a - m) ** 2 for a in accs) / len(accs)) ** 0.5, "accs": accs,
                             "seconds": time.perf_counter() - began})
            print(json.dumps(students[-1]), flush=True)

    payload = {
        "dataset": args.dataset, "per_class": k, "recipe": asdict(recipe), "inits": inits, "ablation": ablation,
        "students": students, "grids": grids,
        "judge": json.loads(paths.metrics("judge").read_text()),
        "teacher": json.loads(paths.metrics("pretrain").read_text()).get("test_acc"),
        "command": "python benchmarks/generate.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": _sh("git", "rev-parse", "--short", "HEAD"), "wall_seconds": time.perf_counter() - t0,
        "loadavg_before": load0, "loadavg_after": _load(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"generate-{args.dataset}"
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    stem.with_suffix(".md").write_text(render(payload))
    print(f"wrote {stem}.json/.md")
    return 0


def _f(v: Any, pct: bool = False) -> str:
    if v is None:
        return ""
    return f"{100 * v:.1f}" if pct else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def render(p: dict[str, Any]) -> str:
    r = p["recipe"]
    lines = [
        f"# The classifier as a generator on {p['dataset']}, judged independently",
        "",
        f"Command: `{p['command']}` (commit `{p['commit']}`, {p['wall_seconds']:.0f} s, load average "
        f"{' '.join(map(str, p['loadavg_before']))} before, {' '.join(map(str, p['loadavg_after']))} after; 2-core CPU).",
        f"Teacher test accuracy {100 * p['teacher']:.2f}%; judge (another architecture and seed, trained on the real "
        f"training split) {100 * p['judge']['test_acc']:.2f}%. {p['per_class']} images per class.",
        f"Default recipe: {r['steps']} steps, levels {r['levels']}, lr {r['lr']}, views {r['views']}, TV {r['beta_tv']}, "
        f"norm {r['beta_norm']}, BN {r['beta_bn']}, stationarity {r['beta_stat']}, augmentation "
        f"{r['augment']}.",
        "",
        "Fréchet: distance between the judge's penultimate features of the set and of as many real test images of the",
        "same classes (lower = closer to real; `real` is a second, disjoint real draw: the floor at this size).",
        "",
        "## Where generation starts",
        "",
        "| init | judge acc (%) | judge conf | Fréchet | Fréchet of noise | teacher acc (%) | judge acc of the start (%) | steps | s / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in p["inits"]:
        lines.append(f"| {x['init']} | {_f(x['judge_acc'], True)} | {x['judge_conf']:.3f} | {x['frechet']:.1f} | "
                     f"{x['frechet_noise']:.1f} | {_f(x['teacher_acc'], True)} | {_f(x.get('start_judge_acc'), True)} | "
                     f"{x['steps']} | {x['seconds_per_image']:.3f} |")
    if p["ablation"]:
        lines += ["", "## What each ingredient contributes (noise start)", "",
                  "| recipe | judge acc (%) | judge conf | Fréchet | teacher acc (%) | steps | s / image |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for x in p["ablation"]:
            lines.append(f"| {x['init']} | {_f(x['judge_acc'], True)} | {x['judge_conf']:.3f} | {x['frechet']:.1f} | "
                         f"{_f(x['teacher_acc'], True)} | {x['steps']} | {x['seconds_per_image']:.3f} |")
        lines += ["", "The two BN rows swap roles (the BN judge generates, the InstanceNorm teacher judges): the "
                  "default teacher has no BatchNorm layer, so the prior is a no-op for it."]
    if p["students"]:
        lines += ["", f"## Students trained on the generated sets (protocol `paper`, IPC {p['per_class']})", "",
                  "| set | test acc (%) | seeds |", "|---|---:|---:|"]
        for s in p["students"]:
            lines.append(f"| {s['set']} | {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} | {len(s['accs'])} |")
    lines += ["", "Grids: " + ", ".join(f"`{g}`" for g in p["grids"].values()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
