"""When does DeepKKT's stationarity term do anything? A study of teacher regime × model × θ × λ solver.

For one dataset, trains two teachers the way the pipeline does (Adam, weight decay 5e-3, a few epochs):
the DD benchmark ConvNet with instance norm (``inorm``) and the paper's norm-free ConvNet (``normfree``:
conv + ReLU + max-pool blocks, one linear layer). Each is used as trained (``today``) and after the
convergence phase (``conv``: full-batch L-BFGS on the final layer, ``dsv.certificate.converge``), with
its KKT certificate. Each *setting* fixes teacher regime, model, θ subset, λ solver, steps and spare;
each is run at IPC 1 and 10, from n-shot real images and from noise, **with and without L_stat** (paired
rows, same budget, same initial candidates: ``kkt.beta_stat`` 1 vs 0), over ``--seeds`` draws (the n-shot
draw, the noise, the augmentation draws of the extraction: one seed per draw; the real-image reference row
uses the same draws). Per row: the certificate, the relative l2 stationarity residual ‖θ* + Σλ∇L‖/‖θ*‖, a memorisation measure (mean over DSVs of the cosine similarity
to the nearest training image vs to the nearest held-out test image) and students' test accuracy under
the ``paper`` protocol (ConvNet-3 width 32, Adam lr 1e-4, DSA, max(200 epochs, 400 steps), n seeds).

The grid is fractional (one factor varied at a time from the converged instance-norm teacher with the
NNLS solver); the settings are listed in the output. Writes benchmarks/results/kkt-regime-<dataset>.json
and .md; resumable (rows already in the JSON are skipped).

    .venv/bin/python benchmarks/kkt_regime.py --dataset digits --epochs 30
    .venv/bin/python benchmarks/kkt_regime.py --dataset fashion_mnist --n-per-class 1000 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsv.certificate import ConvergeConfig, converge
from dsv.data.core import normalize
from dsv.data.registry import DataConfig, load_dataset
from dsv.extract import ExtractConfig, extract, init_candidates
from dsv.kernel import kkt_certificate, stationarity_params
from dsv.kkt import KKTConfig
from dsv.models import ModelConfig, build_seeded
from dsv.protocols import ProtocolConfig, train_students
from dsv.train import FitConfig, evaluate, fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OMEGA = 5e-3

# name -> (regime, model, param_subset, lam_solver, steps, spare); distance l2 with NNLS (its problem), l1 with Adam
SETTINGS: dict[str, tuple[str, str, str, str, int, float]] = {
    "shipped (today, inorm, last, adam, 200)": ("today", "inorm", "last", "adam", 200, 0.0),
    "converged teacher (adam)": ("conv", "inorm", "last", "adam", 200, 0.0),
    "converged + nnls": ("conv", "inorm", "last", "nnls", 200, 0.0),
    "converged + nnls, norm-free": ("conv", "normfree", "last", "nnls", 200, 0.0),
    "converged + nnls, norm-free, all θ": ("conv", "normfree", "all", "nnls", 200, 0.0),
    "converged + nnls, free θ": ("conv", "inorm", "free", "nnls", 200, 0.0),
    "converged + nnls, 1000 steps": ("conv", "inorm", "last", "nnls", 1000, 0.0),
    "converged + nnls, spare 1": ("conv", "inorm", "last", "nnls", 200, 1.0),
    "today + nnls": ("today", "inorm", "last", "nnls", 200, 0.0),
    "today + nnls, spare 1": ("today", "inorm", "last", "nnls", 200, 1.0),
    "shipped + spare 1": ("today", "inorm", "last", "adam", 200, 1.0),
}


def solver_config(setting: str, beta_stat: float) -> ExtractConfig:
    _, _, subset, solver, steps, spare = SETTINGS[setting]
    kkt = KKTConfig(param_subset=subset, distance="l2" if solver == "nnls" else "l1", beta_stat=beta_stat)
    return ExtractConfig(steps=steps, lam_solver=solver, spare=spare, kkt=kkt, log_every=max(steps // 10, 1))


def max_cosine(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each row of a, the largest cosine similarity to any row of b, (len(a),)."""
    an = F.normalize(a.flatten(1).double(), dim=1)
    best = torch.full((a.shape[0],), -1.0, dtype=torch.float64)
    for i in range(0, b.shape[0], chunk):
        bn = F.normalize(b[i : i + chunk].flatten(1).double(), dim=1)
        best = torch.maximum(best, (an @ bn.t()).max(dim=1).values)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--n-per-class", type=int, default=None, help="training subset per class (CPU budget)")
    ap.add_argument("--test-per-class", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=5, help="teacher epochs (Adam lr 1e-3, weight decay 5e-3)")
    ap.add_argument("--teacher-width", type=int, default=64)
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--inits", nargs="+", default=["nshot", "noise"])
    ap.add_argument("--settings", nargs="*", default=None, help="subset of setting names (default: all)")
    ap.add_argument("--n-runs", type=int, default=3, help="student seeds")
    ap.add_argument("--seeds", type=int, default=3, help="draws: initial candidates and extraction seed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--root", default="data", help="where the dataset files are (also the system paths)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an earlier run of the same command in the results file (default: start over)")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    ds = load_dataset(DataConfig(name=args.dataset, root=args.root, n_per_class=args.n_per_class,
                                 test_per_class=args.test_per_class, seed=0))
    dev = args.device
    mean, std = ds.mean, ds.std
    x_train, y_train = normalize(ds.train_x, mean, std), ds.train_y
    x_test, y_test = normalize(ds.test_x, mean, std), ds.test_y
    shape, c = tuple(ds.input_shape), ds.num_classes
    bounds = ((0.0 - mean) / std, (1.0 - mean) / std)
    depth = 2 if shape[-1] < 16 else 3
    stem = RESULTS / (args.name or f"kkt-regime-{args.dataset}")
    resume = args.resume and stem.with_suffix(".json").exists()
    out = json.loads(stem.with_suffix(".json").read_text()) if resume else {"rows": []}
    done = {(r["setting"], r["ipc"], r["init"], r["variant"]) for r in out["rows"]}
    models: dict[tuple[str, str], torch.nn.Module] = {}
    teacher_info: dict[str, Any] = out.get("teachers", {})

    def teacher(regime: str, kind: str) -> torch.nn.Module:
        if (regime, kind) in models:
            return models[(regime, kind)]
        if ("today", kind) not in models:
            mc = ModelConfig(name="convnet", width=args.teacher_width, depth=depth,
                             norm="instance" if kind == "inorm" else "none", pool="avg" if kind == "inorm" else "max")
            m = build_seeded(mc, shape, c, 0).to(dev)
            t0 = time.perf_counter()
            fit(m, x_train, y_train, FitConfig(optimizer="adam", lr=1e-3, weight_decay=OMEGA, epochs=args.epochs,
                                               batch_size=128, schedule="cosine"), seed=0)
            m.eval()
            models[("today", kind)] = m
            teacher_info[f"today/{kind}"] = describe(m, time.perf_counter() - t0)
            print("teacher", "today", kind, teacher_info[f"today/{kind}"], flush=True)
        if regime == "conv":
            m = copy.deepcopy(models[("today", kind)])
            t0 = time.perf_counter()
            r = converge(m, x_train.to(dev), y_train.to(dev), OMEGA, ConvergeConfig(scope="last", max_iter=500))
            m.eval()
            models[("conv", kind)] = m
            teacher_info[f"conv/{kind}"] = {**describe(m, time.perf_counter() - t0), "lbfgs_iterations": r.iterations}
            print("teacher", "conv", kind, teacher_info[f"conv/{kind}"], flush=True)
        return models[(regime, kind)]

    def describe(m: torch.nn.Module, seconds: float) -> dict[str, Any]:
        acc = evaluate(m, x_test, y_test, c).accuracy
        certs = {}
        for subset in ("all", "last", "free"):
            ps = stationarity_params(m, subset, x_train[:8].to(dev))
            certs[subset] = kkt_certificate(m, x_train, y_train, OMEGA, ps, subset).relative
        return {"test_acc": acc, "certificate": certs, "seconds": round(seconds, 1)}

    protocol = ProtocolConfig(name="paper", epochs=200, min_steps=400, n_runs=args.n_runs,
                              model=ModelConfig(name="convnet", width=32, depth=depth))
    seeds = list(range(args.n_runs))
    started = time.perf_counter()

    def save() -> None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        command = "python benchmarks/kkt_regime.py " + " ".join(
            f"'{a}'" if " " in a else a for a in (argv if argv is not None else sys.argv[1:]))
        commands = out.get("commands") or ([out["command"]] if "command" in out else [])
        if command not in commands:
            commands.append(command)
        out.update({
            "dataset": args.dataset, "n_train": int(y_train.numel()), "n_test": int(y_test.numel()),
            "command": command, "commands": commands, "commit": commit, "teachers": teacher_info, "omega": OMEGA,
            "settings": {k: dict(zip(("regime", "model", "param_subset", "lam_solver", "steps", "spare"), v))
                         for k, v in SETTINGS.items()},
            "protocol": dataclasses.asdict(protocol), "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "seeds": args.seeds, "device": args.device,
        })
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(out, indent=1, default=str) + "\n")
        stem.with_suffix(".md").write_text(render(out))

    settings = args.settings or list(SETTINGS)

    def students(x: torch.Tensor, y: torch.Tensor) -> list[float]:
        return [r.accuracy for r in train_students(x, y, x_test, y_test, None, protocol, shape, c, seeds, dev)]

    def mean_std(v: list[float]) -> tuple[float, float]:
        t = torch.tensor(v, dtype=torch.float64)
        return (float(t.mean()), float(t.std(correction=0))) if v else (float("nan"), float("nan"))

    draws = list(range(args.seeds))
    for ipc in args.ipcs:
        for init in args.inits:
            key = ("real images", ipc, init, "reference")
            ref_accs: dict[int, list[float]] = {}
            if init == "nshot":
                for s in draws:
                    x0, y0 = init_candidates("nshot", ipc, c, shape, torch.Generator().manual_seed(s),
                                             real_x=x_train, real_y=y_train)
                    ref_accs[s] = students(x0, y0)
                if key not in done:
                    flat = [a for s in draws for a in ref_accs[s]]
                    m, sd = mean_std(flat)
                    out["rows"].append({"dataset": args.dataset, "setting": "real images", "ipc": ipc, "init": init,
                                        "variant": "reference", "acc_mean": m, "acc_std": sd, "accs": flat})
                    save()
            for setting in settings:
                regime, kind, *_ = SETTINGS[setting]
                for variant, beta in (("full", 1.0), ("no_stat", 0.0)):
                    if (setting, ipc, init, variant) in done:
                        continue
                    t_model = teacher(regime, kind)
                    cfg = solver_config(setting, beta)
                    per = ipc + int(round(ipc * cfg.spare))
                    accs, deltas, r0, r1, sims, lam0, ext_s = [], [], [], [], [], [], 0.0
                    for s in draws:
                        x0, y0 = init_candidates(init, per, c, shape, torch.Generator().manual_seed(s), real_x=x_train,
                                                 real_y=y_train)
                        t0 = time.perf_counter()
                        res = extract(t_model, x0.to(dev), y0.to(dev), cfg, seed=s, pixel_bounds=bounds,
                                      keep_per_class=ipc)
                        ext_s += time.perf_counter() - t0
                        got = students(res.x, res.y)
                        accs += got
                        if s in ref_accs:
                            deltas += [a - b for a, b in zip(got, ref_accs[s])]
                        r0.append(res.trace[0]["residual_l2"])
                        r1.append(res.trace[-1]["residual_l2"])
                        lam0.append(res.lambda_zero)
                        sims.append((float(max_cosine(res.x, x_train).mean()), float(max_cosine(res.x, x_test).mean())))
                    cert = teacher_info[f"{regime}/{kind}"]["certificate"][cfg.kkt.param_subset]
                    m, sd = mean_std(accs)
                    dm, dsd = mean_std(deltas)
                    row = {
                        "dataset": args.dataset, "setting": setting, "ipc": ipc, "init": init, "variant": variant,
                        "acc_mean": m, "acc_std": sd, "accs": accs, "delta_vs_real_mean": dm, "delta_vs_real_std": dsd,
                        "residual_start": sum(r0) / len(r0), "residual_end": sum(r1) / len(r1),
                        "kkt_certificate": cert, "dsvs": ipc * c, "lambda_zero": sum(lam0) / len(lam0),
                        "sim_train": sum(a for a, _ in sims) / len(sims), "sim_test": sum(b for _, b in sims) / len(sims),
                        "extract_seconds": round(ext_s / len(draws), 1),
                    }
                    out["rows"].append(row)
                    done.add((setting, ipc, init, variant))
                    print({k: v for k, v in row.items() if k != "accs"}, flush=True)
                    save()
    out["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    save()
    print(stem.with_suffix(".md").read_text())
    return 0


def render(out: dict[str, Any]) -> str:
    rows = out["rows"]
    lines = [
        f"# KKT regime study: {out['dataset']} ({out['n_train']} training images, {out['n_test']} test)", "",
        "Commands (all merged into this file): " + "; ".join(f"`{c}`" for c in out.get("commands", [out["command"]]))
        + f" (last at commit {out['commit']}; load {' '.join(out['loadavg'])}). Students: `paper` protocol, "
        f"{out['protocol']['n_runs']} student seeds × {out.get('seeds', 1)} draws (initial candidates and extraction "
        "seed; the reference row trains on the same n-shot draws), mean ± std (%). `residual`: relative l2 "
        "stationarity residual ‖θ* + Σλ∇L‖/‖θ*‖ (start → end). `certificate`: the teacher's KKT certificate on the setting's θ subset. `sim train/test`: "
        "mean cosine similarity of each DSV to its nearest training / test image (memorisation shows as "
        "train ≫ test). Paired rows: the same setting with L_stat (`full`) and without (`no_stat`, kkt.beta_stat = 0).", "",
        "## Teachers", "", "| teacher | test acc | certificate all | last | free | seconds |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, t in out["teachers"].items():
        cert = t["certificate"]
        lines.append(f"| {name} | {100 * t['test_acc']:.2f} | {cert['all']:.3g} | {cert['last']:.3g} | "
                     f"{cert['free']:.3g} | {t['seconds']} |")
    lines += ["", "## Settings", "", "| setting | regime | model | θ | λ solver | steps | spare |", "|---|---|---|---|---|---:|---:|"]
    for name, s in out["settings"].items():
        lines.append(f"| {name} | {s['regime']} | {s['model']} | {s['param_subset']} | {s['lam_solver']} | "
                     f"{s['steps']} | {s['spare']} |")
    lines += ["", "## Results", "",
              "| IPC | init | setting | full acc | no_stat acc | Δ (full − no_stat) | residual full | residual no_stat | DSVs | sim train / test |",
              "|---:|---|---|---:|---:|---:|---|---|---:|---|"]

    def acc(r: dict[str, Any] | None) -> str:
        return "" if r is None or r["acc_mean"] != r["acc_mean"] else f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}"

    for ipc in sorted({r["ipc"] for r in rows}):
        for init in ("nshot", "noise"):
            ref = [r for r in rows if r["ipc"] == ipc and r["init"] == init and r["variant"] == "reference"]
            for r in ref:
                lines.append(f"| {ipc} | {init} | real images (reference) | {acc(r)} | | | | | | |")
            for setting in out["settings"]:
                full = next((r for r in rows if (r["setting"], r["ipc"], r["init"], r["variant"]) == (setting, ipc, init, "full")), None)
                ns = next((r for r in rows if (r["setting"], r["ipc"], r["init"], r["variant"]) == (setting, ipc, init, "no_stat")), None)
                if full is None and ns is None:
                    continue
                delta = (f"{100 * (full['acc_mean'] - ns['acc_mean']):+.2f}" if full and ns and full["accs"] and ns["accs"]
                         else "")
                rf = f"{full['residual_start']:.3f} → {full['residual_end']:.3f}" if full else ""
                rn = f"{ns['residual_start']:.3f} → {ns['residual_end']:.3f}" if ns else ""
                sim = f"{full['sim_train']:.3f} / {full['sim_test']:.3f}" if full else ""
                lines.append(f"| {ipc} | {init} | {setting} | {acc(full)} | {acc(ns)} | {delta} | {rf} | {rn} | "
                             f"{full['dsvs'] if full else ''} | {sim} |")
    if out.get("skipped"):
        lines += ["", "Skipped cells: " + out["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
