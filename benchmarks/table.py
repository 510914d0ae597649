"""The benchmark table: every method at several IPCs under one student protocol, through the pipeline.

Runs the real pipeline (`dsv run`, so every finished (method, IPC) cell and extraction shard is cached
and a re-run resumes where it stopped) on params.yaml plus the overrides below, in its own output
folder, then writes benchmarks/results/<dataset>-<protocol>.md (a table like the paper's Tables 1-2,
with the teacher, the exact command and git commit, and each cell's wall time) and .json (the row
schema of metrics/evaluate.json), and logs both to MLflow.

    .venv/bin/python benchmarks/table.py --protocol paper --ipcs 1 10 50 --n-runs 3
    .venv/bin/python benchmarks/table.py --protocol dd --ipcs 10 --n-runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

DSV_ROWS = ("dsv_nshot", "dsv_0shot", "dsv_noise")
ALL_METHODS = ("dsv_nshot", "dsv_0shot", "dsv_noise", "lambda_topk", "support_topk", "random", "herding", "kcenter",
               "forgetting", "el2n", "entropy", "dm", "full")


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--protocol", default="paper", choices=["paper", "dd", "soft"])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--n-runs", type=int, default=3)
    ap.add_argument("--student-width", type=int, default=32, help="ConvNet-3 width of every student")
    ap.add_argument("--epochs", type=int, default=200, help="student epochs (protocol.epochs)")
    ap.add_argument("--min-steps", type=int, default=400, help="student minimum optimizer steps")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--output", default=None, help="pipeline output folder (default outputs/bench/<dataset>)")
    ap.add_argument("-S", "--set", dest="extra", action="append", default=[], help="more pipeline overrides")
    ap.add_argument("--name", default=None, help="results file stem (default <dataset>-<protocol>)")
    ap.add_argument("--render-only", action="store_true",
                    help="re-render benchmarks/results/<dataset>-<protocol>.md from its .json; runs nothing")
    ap.add_argument("--reuse-from", default=None,
                    help="copy the prepare/pretrain/extract/coreset outputs of this pipeline output folder (the "
                         "hash-checked cache then reuses them when their params are identical)")
    args = ap.parse_args(argv)

    stem = RESULTS / (args.name or f"{args.dataset}-{args.protocol}")
    if args.render_only:
        payload = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(render(payload, _with_students(args, payload)))
        print(stem.with_suffix(".md").read_text())
        return 0
    out_dir = args.output or f"outputs/bench/{args.dataset}"
    ipcs = "[" + ",".join(str(i) for i in args.ipcs) + "]"
    overrides = [
        f"prepare.data.name={args.dataset}",
        f"extract.ipcs={ipcs}",
        f"distill.ipcs={ipcs}",
        f"distill.protocol.name={args.protocol}",
        f"distill.protocol.n_runs={args.n_runs}",
        f"distill.protocol.epochs={args.epochs}",
        f"distill.protocol.min_steps={args.min_steps}",
        f"distill.protocol.model.width={args.student_width}",
        f"runtime.output_dir={out_dir}",
        "extract.inits=[nshot,0shot,noise]",
        f"distill.methods=[{','.join(ALL_METHODS)}]",  # every method (the main job runs the headline ones)
        *args.extra,
    ]
    if args.reuse_from and (ROOT / args.reuse_from).resolve() != (ROOT / out_dir).resolve():
        import shutil

        for stage in ("prepare", "pretrain", "extract", "coreset"):
            src, dst = ROOT / args.reuse_from, ROOT / out_dir
            if not (src / "metrics" / f"{stage}.json").exists():
                continue
            shutil.copytree(src / "artifacts" / stage, dst / "artifacts" / stage, dirs_exist_ok=True)
            (dst / "metrics").mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / "metrics" / f"{stage}.json", dst / "metrics" / f"{stage}.json")
    cmd = [str(ROOT / ".venv" / "bin" / "dsv"), "run", "-p", args.params]
    for o in overrides:
        cmd += ["-S", o]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(f"bench: the pipeline failed (exit {proc.returncode}); finished cells stay cached, re-run to resume",
              file=sys.stderr)
        return proc.returncode

    base = ROOT / out_dir
    evaluate = json.loads((base / "artifacts" / "evaluate" / "results.json").read_text())
    extract = json.loads((base / "metrics" / "extract.json").read_text())
    pretrain = json.loads((base / "metrics" / "pretrain.json").read_text())
    cell_seconds = json.loads((base / "timings" / "distill.json").read_text()).get("cell_seconds", {})
    for r in evaluate["rows"]:  # each cell's wall time (timings/ is outside the DVC-tracked metrics)
        r["wall_s"] = cell_seconds.get(f"{r['method']}_ipc{0 if r['method'] == 'full' else r['ipc']}",
                                       cell_seconds.get(f"{r['method']}_ipc{r['ipc']}"))
    rows = [r for r in evaluate["rows"] if r["method"] == "full" or r["ipc"] in args.ipcs]
    previous: list[dict[str, Any]] = []
    history: list[dict[str, Any]] = []
    if stem.with_suffix(".json").exists():  # merge with cells of earlier invocations (other IPCs, methods)
        old = json.loads(stem.with_suffix(".json").read_text())
        history = _invocations(old)
        fresh = {(r["method"], r["ipc"]) for r in rows}
        fresh_methods = {r["method"] for r in rows}
        previous = [r for r in old.get("rows", []) if (r["method"], r["ipc"]) not in fresh
                    and not (r["method"] == "full" and "full" in fresh_methods)]
        args.ipcs = sorted(set(args.ipcs) | {r["ipc"] for r in previous if r["method"] != "full"})
    rows = sorted(previous + rows, key=lambda r: (r["method"], r["ipc"]))
    command = "python benchmarks/table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    commit = _sh("git", "rev-parse", "HEAD")
    this = {"command": command, "git_commit": commit, "pipeline_wall_s": wall,
            "cells": sorted(f"{r['method']}@{r['ipc']}" for r in evaluate["rows"] if r in rows)}
    payload: dict[str, Any] = {
        "dataset": args.dataset, "protocol": args.protocol, "command": command, "git_commit": commit,
        "teacher_acc": evaluate["teacher_acc"], "pipeline_wall_s": wall, "pipeline_overrides": overrides,
        "students": {"width": args.student_width, "epochs": args.epochs, "min_steps": args.min_steps,
                     "n_runs": args.n_runs},
        "invocations": history + [this],
        "extract": extract, "pretrain": pretrain, "rows": rows,
        "solver": _solver(base),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(payload, args))
    _log_mlflow(stem, payload)
    print(stem.with_suffix(".md").read_text())
    return 0


def _invocations(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The commands whose cells a results file holds (files from before this field: its one command)."""
    if "invocations" in payload:
        return list(payload["invocations"])
    return [{"command": payload["command"], "git_commit": payload["git_commit"],
             "pipeline_wall_s": payload.get("pipeline_wall_s"), "cells": None}]


def _with_students(args: argparse.Namespace, payload: dict[str, Any]) -> argparse.Namespace:
    """``args`` with the student settings and IPCs recorded in ``payload`` (for ``--render-only``)."""
    st = payload.get("students", {})
    ipcs = sorted({r["ipc"] for r in payload["rows"] if r["method"] != "full"})
    return argparse.Namespace(**{**vars(args), "ipcs": ipcs, "student_width": st.get("width", args.student_width),
                                 "epochs": st.get("epochs", args.epochs),
                                 "min_steps": st.get("min_steps", args.min_steps),
                                 "n_runs": st.get("n_runs", args.n_runs)})


def _commands(p: dict[str, Any]) -> list[str]:
    inv = _invocations(p)
    if len(inv) == 1:
        return [f"- Command: `{inv[0]['command']}` at commit `{inv[0]['git_commit']}`; pipeline wall time "
                f"{inv[0]['pipeline_wall_s']:.0f} s (including cached stages; each cell's own time is below)."]
    out = [f"- Commands ({len(inv)} invocations merged, later cells replace earlier ones; finished stages and cells "
           "are cached and shared through `--reuse-from`):"]
    for i, c in enumerate(inv, 1):
        wall = "" if c.get("pipeline_wall_s") is None else f", pipeline wall time {c['pipeline_wall_s']:.0f} s"
        note = f" {c['note']}" if c.get("note") else ""
        out.append(f"  {i}. `{c['command']}` (commit `{c['git_commit'][:7]}`{wall}).{note}")
    return out


def _fmt(r: dict[str, Any] | None) -> str:
    if r is None:
        return "–"
    if not r.get("n_runs"):
        return "n/a"
    return f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}"


def render(p: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown table: methods as rows, IPCs as columns, then per-cell details."""
    by = {(r["method"], r["ipc"]): r for r in p["rows"]}
    methods = [m for m in dict.fromkeys(r["method"] for r in p["rows"]) if m != "full"]
    ipcs = args.ipcs
    label = "soft (KD from the teacher)" if args.protocol == "soft" else "hard"
    lines = [
        f"# {p['dataset']}: test accuracy (%) of students trained on each set, protocol `{args.protocol}`",
        "",
        *_commands(p),
        f"- Teacher: test accuracy {100 * p['teacher_acc']:.2f}% ({_teacher_desc(p)}).",
        f"- Students: ConvNet-3 width {args.student_width}, protocol `{args.protocol}` "
        f"({_protocol_desc(args)}), {label} labels, mean ± std over {args.n_runs} student seeds "
        "(selection methods, random included, draw one selection with `distill.seed`; the seeds vary the students).",
        f"- DSV solver: {_solver_desc(p)}.",
        "- `shots` = real training images per class the method saw (0 for dsv_0shot/dsv_noise; all for the "
        "selectors, which rank the whole training set).",
        "",
        "| method | " + " | ".join(f"IPC {k}" for k in ipcs) + " |",
        "|---|" + "---:|" * len(ipcs),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(_fmt(by.get((m, k))) for k in ipcs) + " |")
    full = [r for r in p["rows"] if r["method"] == "full"]
    if full:
        lines.append(f"| full (all {full[0]['ipc']} per class) | " + " | ".join(_fmt(full[0]) for _ in ipcs) + " |")
    lines += ["", "## Cells", "", "| method | IPC | shots | acc (%) | runs | wall s |", "|---|---:|---:|---:|---:|---:|"]
    for r in p["rows"]:
        wall = r.get("wall_s")
        lines.append(f"| {r['method']} | {r['ipc']} | {r['shots']} | {_fmt(r)} | {r['n_runs']} | "
                     f"{'' if wall is None else f'{wall:.0f}'} |")
    lines += ["", "## Where DSVs win and lose", "", _verdict(by, ipcs), ""]
    return "\n".join(lines) + "\n"


def _teacher_desc(p: dict[str, Any]) -> str:
    pre = p.get("pretrain", {})
    keys = [k for k in ("wall_s", "train_s", "epochs") if k in pre]
    return ", ".join(f"{k} {pre[k]:.0f}" if isinstance(pre[k], float) else f"{k} {pre[k]}" for k in keys) or "params.yaml"


def _protocol_desc(args: argparse.Namespace) -> str:
    if args.protocol == "paper":
        return f"Adam lr 1e-4, DSA augmentation, max({args.epochs} epochs, {args.min_steps} steps)"
    if args.protocol == "dd":
        return f"SGD lr 0.01 momentum 0.9 wd 5e-4, lr x0.1 at half, DSA, max({args.epochs} epochs, {args.min_steps} steps)"
    from dsv.protocols import ProtocolConfig

    d = ProtocolConfig(name="soft")  # the table sets no base/temperature/alpha: the defaults apply
    return (f"base `{d.base}` (SGD lr 0.01 momentum 0.9 wd 5e-4, lr x0.1 at half, DSA) + knowledge distillation "
            f"from the teacher's logits on every augmented batch, T = {d.kd_temperature:g}, "
            f"loss = {1 - d.kd_alpha:g}·CE(hard) + {d.kd_alpha:g}·T²·KL, max({args.epochs} epochs, {args.min_steps} steps)")


def _solver(base: Path) -> dict[str, Any]:
    import yaml

    resolved = yaml.safe_load((base / "artifacts" / "extract" / "params.resolved.yaml").read_text())
    solver = resolved["extract"]["solver"]
    kkt = solver["kkt"]
    out = {"steps": solver["steps"], "lr_x": solver["lr_x"], "lr_lam": solver["lr_lam"], "dual": solver["dual"],
           "lam_solver": solver.get("lam_solver", "adam"), "spare": solver.get("spare", 0.0),
           "param_subset": kkt["param_subset"], "distance": kkt["distance"], "primal": kkt["primal"],
           "beta_primal": kkt["beta_primal"], "eta": kkt["eta"]}
    by_init = resolved["extract"].get("by_init")
    if by_init:
        out["by_init"] = json.dumps(by_init, sort_keys=True)
    pre = yaml.safe_load((base / "artifacts" / "pretrain" / "params.resolved.yaml").read_text())["pretrain"]
    if "converge" in pre:
        out["teacher_converge"] = pre["converge"]["scope"]
    return out


def _solver_desc(p: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p["solver"].items())


def _verdict(by: dict[tuple[str, int], dict[str, Any]], ipcs: list[int]) -> str:
    out = []
    for k in ipcs:
        n = by.get(("dsv_nshot", k))
        if not n or not n.get("n_runs"):
            continue
        rivals = {m: r for (m, kk), r in by.items() if kk == k and m not in DSV_ROWS and r.get("n_runs")}
        beaten = sorted(m for m, r in rivals.items() if n["acc_mean"] > r["acc_mean"])
        lost = sorted(f"{m} ({100 * (r['acc_mean'] - n['acc_mean']):+.2f})" for m, r in rivals.items()
                      if n["acc_mean"] <= r["acc_mean"])
        out.append(f"- IPC {k}: dsv_nshot {100 * n['acc_mean']:.2f}% beats {', '.join(beaten) or 'nothing'}; "
                   f"loses to {', '.join(lost) or 'nothing'} (points above dsv_nshot).")
        rd = by.get(("random", k))
        for method, label in (("lambda_topk", "top-λ"), ("support_topk", "top-support")):
            lt = by.get((method, k))
            if lt and rd and lt.get("n_runs") and rd.get("n_runs"):
                out.append(f"  {label} {100 * lt['acc_mean']:.2f}% vs random {100 * rd['acc_mean']:.2f}% "
                           f"({100 * (lt['acc_mean'] - rd['acc_mean']):+.2f}).")
    return "\n".join(out) or "(no DSV rows)"


def _log_mlflow(stem: Path, payload: dict[str, Any]) -> None:
    from tasks.tracking import Tracker

    tracker = Tracker(ROOT, "dsv-bench")
    run_id = tracker.start_run(stem.name, tags={"protocol": payload["protocol"], "dataset": payload["dataset"]})
    log = tracker.log(run_id)
    log.metrics({f"{r['method']}_ipc{r['ipc']}": r["acc_mean"] for r in payload["rows"] if r.get("n_runs")})
    log.artifact(stem.with_suffix(".md"))
    log.artifact(stem.with_suffix(".json"))
    tracker.end_run(run_id)


if __name__ == "__main__":
    raise SystemExit(main())
