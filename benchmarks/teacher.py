"""Benchmark: train the default Fashion-MNIST teacher and record test accuracy and wall time.

The teacher follows the paper: ConvNet-3 (instance norm, average pooling), Adam lr 1e-3, weight
decay 5e-3, flip + crop augmentation, the full 60k training set. Width, epochs, batch size, weight
decay, lr and schedule are CLI arguments so the trade-offs can be measured and rerun.

Writes (by default)
  benchmarks/results/teacher.json         this run: config, accuracy, per-class accuracy, timings
  benchmarks/results/teacher_trials.jsonl one line appended per run (the trial history)
  benchmarks/results/teacher.md           this run + a table of every recorded trial

Usage:
  .venv/bin/python benchmarks/teacher.py                      # the default teacher
  .venv/bin/python benchmarks/teacher.py --width 128 --epochs 20 --schedule cosine   # stronger
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dsv.data import normalize
from dsv.data.registry import DataConfig, load_dataset
from dsv.models import ModelConfig, build_seeded
from dsv.train import FitConfig, TrainEvent, evaluate, fit

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dsv", "benchmarks/teacher.py"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=5e-3)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--schedule", choices=["none", "step", "cosine"], default="cosine")
    p.add_argument("--augment", choices=["none", "flip_crop", "dsa"], default="flip_crop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default="data", help="dataset root (Debian's system copy is searched too)")
    p.add_argument("--n-per-class", type=int, default=None, help="train subset per class (smoke runs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--tag", default="", help="free-text note stored with the trial")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(["teacher.py", *argv])
    commit = _git_commit()  # at start: the code that actually ran

    t0 = time.perf_counter()
    ds = load_dataset(DataConfig(name="fashion_mnist", root=args.root, n_per_class=args.n_per_class))
    x_tr = normalize(ds.train_x, ds.mean, ds.std)
    x_te = normalize(ds.test_x, ds.mean, ds.std)
    t_load = time.perf_counter() - t0

    mcfg = ModelConfig(name="convnet", width=args.width, depth=args.depth, norm="instance", pool="avg")
    fcfg = FitConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        epochs=args.epochs,
        batch_size=args.batch_size,
        schedule=args.schedule,
        augment=args.augment,
    )
    model = build_seeded(mcfg, ds.input_shape, ds.num_classes, seed=args.seed)
    load_before = _loadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    epochs: list[dict[str, float]] = []

    def on_epoch(ev: TrainEvent) -> None:
        el = time.perf_counter() - t1
        epochs.append({"step": ev.step, "loss": ev.loss, "lr": ev.lr, "elapsed_s": round(el, 1)})
        print(f"step {ev.step}/{ev.total_steps} loss {ev.loss:.4f} lr {ev.lr:.2e} {el:.0f}s", flush=True)

    res = fit(model, x_tr, ds.train_y, fcfg, seed=args.seed, callback=on_epoch)
    t_train = time.perf_counter() - t1
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_train = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    t2 = time.perf_counter()
    ev = evaluate(model, x_te, ds.test_y, ds.num_classes)
    tr_ev = evaluate(model, x_tr[:10000], ds.train_y[:10000], ds.num_classes)
    t_eval = time.perf_counter() - t2

    out = {
        "test_accuracy": ev.accuracy,
        "train_accuracy_first10k": tr_ev.accuracy,
        "per_class_test_accuracy": dict(zip(ds.classes, ev.per_class)),
        "n_train": int(ds.train_y.numel()),
        "n_test": ev.n,
        "wall_s": {"load": round(t_load, 1), "train": round(t_train, 1), "eval": round(t_eval, 1),
                   "total": round(time.perf_counter() - t0, 1)},
        # CPU seconds of this process while training: less sensitive to other users' load than wall time
        # (wall ~= cpu / threads on an idle machine).
        "cpu_s_train": round(cpu_train, 1),
        "steps": res.steps,
        "epoch_log": epochs,
        "model": asdict(mcfg),
        "fit": asdict(fcfg),
        "seed": args.seed,
        "tag": args.tag,
        "command": command,
        "git_commit": commit,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg_1m": {"before_train": round(load_before, 2), "after_train": round(_loadavg(), 2)},
        "data_source": ds.source,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "teacher.json").write_text(json.dumps(out, indent=2) + "\n")
    with (args.out / "teacher_trials.jsonl").open("a") as f:
        f.write(json.dumps(out) + "\n")
    (args.out / "teacher.md").write_text(_markdown(out, args.out / "teacher_trials.jsonl"))
    print(f"test accuracy {ev.accuracy:.4f}  train {t_train:.0f}s  total {out['wall_s']['total']:.0f}s")
    return out


def _markdown(run: dict, trials_path: Path) -> str:
    f, m = run["fit"], run["model"]
    lines = [
        "# Fashion-MNIST teacher benchmark",
        "",
        f"Latest run: **test accuracy {100 * run['test_accuracy']:.2f}%**, training {run['wall_s']['train']:.0f} s, "
        f"total {run['wall_s']['total']:.0f} s ({run['threads']} torch threads on {run['cpus']} CPUs, "
        f"1-min load average {run['loadavg_1m']['before_train']} before / {run['loadavg_1m']['after_train']} after"
        " training: the machine is shared, so times include contention); "
        f"{run.get('cpu_s_train', float('nan')):.0f} CPU-seconds spent training.",
        "",
        f"- command: `{run['command']}`",
        f"- git commit: `{run['git_commit']}`, torch {run['torch']}",
        f"- model: ConvNet depth {m['depth']}, width {m['width']}, {m['norm']} norm, {m['pool']} pool",
        f"- fit: {f['optimizer']} lr {f['lr']}, weight decay {f['weight_decay']}, {f['epochs']} epochs, "
        f"batch {f['batch_size']}, schedule {f['schedule']}, augment {f['augment']}; {run['n_train']} train / "
        f"{run['n_test']} test images",
        "",
        "## All recorded trials (benchmarks/results/teacher_trials.jsonl)",
        "",
        "| width | epochs | batch | lr | wd | schedule | augment | test acc % | train s | CPU s | total s | load avg | tag |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for line in trials_path.read_text().splitlines():
        t = json.loads(line)
        tf = t["fit"]
        lines.append(
            f"| {t['model']['width']} | {tf['epochs']} | {tf['batch_size']} | {tf['lr']} | {tf['weight_decay']} "
            f"| {tf['schedule']} | {tf['augment']} | {100 * t['test_accuracy']:.2f} | {t['wall_s']['train']:.0f} "
            f"| {t.get('cpu_s_train', float('nan')):.0f} | {t['wall_s']['total']:.0f} | {t['loadavg_1m']['before_train']} | {t['tag']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
