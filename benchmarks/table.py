"""The benchmark table: methods × IPCs under one student protocol, over several seeds, through the pipeline.

Each seed s is one real pipeline run (`dsv run`: cached, resumable) with ``extract.seed = distill.seed = s``, in
``outputs/bench/<name>/seed<s>``; the seeds after the first reuse its prepare, pretrain and coreset outputs
and rerun only what depends on the seed (DSVs: their augmentation draws and random starts; the random
core-set's draw; DM). A seed-independent selection (herding, kcenter, kkt_herding, the λ core-sets) is run
once. So a row's ± covers everything random in it: draws, extraction and students (``n_runs`` = seeds ×
student seeds), and rows that differ only by the method start from the same images:

* ``dsv_herding`` refines herding's picks (paired with ``herding`` by student seed);
* ``dsv_nshot`` refines the ``random`` row's draw of the same seed (paired by seed and student seed).

Writes benchmarks/results/<name>.json (rows: method, ipc, init, shots, n_train, per_class, acc_mean, acc_std,
n_runs, accs, probe_mean, and for paired rows delta_vs, delta_mean, delta_std) and .md.

    python benchmarks/table.py --name fashion_mnist-paper-v3 --ipcs 1 10 50 --seeds 3
    python benchmarks/table.py --name digits-paper-v3 -p benchmarks/params.digits.yaml --ipcs 1 10 50 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

METHODS = ("dsv_herding", "herding", "dsv_nshot", "random", "kkt_herding", "lambda_topk", "support_topk",
           "dsv_0shot", "dsv_noise")
# Methods whose set depends on extract.seed / distill.seed (the others are run with the first seed only).
SEEDED = ("dsv_", "random", "dm", "forgetting", "el2n")
# Paired rows: the DSV row and the selection it starts from.
PAIRS = {"dsv_herding": "herding", "dsv_nshot": "random", "dsv_kcenter": "kcenter", "dsv_kkt_herding": "kkt_herding"}
INIT_OF = {"dsv_nshot": "nshot", "dsv_0shot": "0shot", "dsv_noise": "noise", "dsv_herding": "herding",
           "dsv_kcenter": "kcenter", "dsv_kkt_herding": "kkt_herding"}


def _seeded(method: str) -> bool:
    return any(method.startswith(p) for p in SEEDED)


def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout.strip()


def _mean_std(v: list[float]) -> tuple[float, float]:
    m = sum(v) / len(v)
    return m, math.sqrt(sum((a - m) ** 2 for a in v) / len(v))


def _run_seed(args: argparse.Namespace, seed: int, methods: list[str]) -> Path:
    out = ROOT / "outputs" / "bench" / args.name / f"seed{seed}"
    first = ROOT / "outputs" / "bench" / args.name / "seed0"
    if seed > 0:  # the teacher, data and λ do not depend on the seed: reuse them (the cache checks hashes)
        for stage in ("prepare", "pretrain", "judge", "coreset"):
            if (first / "metrics" / f"{stage}.json").exists():
                shutil.copytree(first / "artifacts" / stage, out / "artifacts" / stage, dirs_exist_ok=True)
                (out / "metrics").mkdir(parents=True, exist_ok=True)
                shutil.copy2(first / "metrics" / f"{stage}.json", out / "metrics" / f"{stage}.json")
    ipcs = "[" + ",".join(str(i) for i in args.ipcs) + "]"
    inits = sorted({INIT_OF[m] for m in methods if m in INIT_OF})
    overrides = [
        f"extract.ipcs={ipcs}", f"distill.ipcs={ipcs}", f"extract.inits=[{','.join(inits)}]",
        f"distill.methods=[{','.join(methods)}]", f"extract.seed={seed}", f"distill.seed={seed}",
        f"distill.protocol.name={args.protocol}", f"distill.protocol.n_runs={args.n_runs}",
        f"distill.protocol.epochs={args.epochs}", f"distill.protocol.min_steps={args.min_steps}",
        f"distill.protocol.model.width={args.student_width}", f"runtime.output_dir={out.relative_to(ROOT)}",
        "runtime.progress=off", *args.extra,
    ]
    if not inits:
        overrides.remove("extract.inits=[]")
    cmd = [str(ROOT / ".venv" / "bin" / "dsv"), "run", "-p", args.params]
    for o in overrides:
        cmd += ["-S", o]
    print("bench:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"bench: seed {seed} failed (exit {proc.returncode}); finished cells stay cached, re-run to resume")
    return out


def _resolved_student(out: Path) -> dict[str, Any] | None:
    from tasks.config import parse_yaml

    f = out / "artifacts" / "distill" / "params.resolved.yaml"
    return parse_yaml(f.read_text())["distill"]["protocol"]["model"] if f.exists() else None


def collect(outs: dict[int, Path], ipcs: list[int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows over seeds, with paired deltas; and per-seed extraction metrics."""
    cells: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    extract: dict[str, Any] = {}
    for seed, out in outs.items():
        for c in json.loads((out / "artifacts" / "distill" / "runs.json").read_text()):
            if c["method"] != "full" and int(c["ipc"]) in ipcs and c["runs"]:
                cells.setdefault((c["method"], int(c["ipc"])), {})[seed] = c
        if (out / "metrics" / "extract.json").exists():
            extract[f"seed{seed}"] = json.loads((out / "metrics" / "extract.json").read_text())
    rows = []
    for (method, ipc), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [r["test_acc"] for s in sorted(by_seed) for r in by_seed[s]["runs"]]
        n_train = {int(c["n_train"]) for c in by_seed.values()}
        assert len(n_train) == 1, (method, ipc, n_train)
        first = by_seed[min(by_seed)]
        m, sd = _mean_std(accs)
        probes = [c["probe_acc"] for c in by_seed.values() if c.get("probe_acc") is not None]
        row: dict[str, Any] = {
            "method": method, "ipc": ipc, "init": INIT_OF.get(method, "-"), "shots": int(first["shots"]),
            "n_train": n_train.pop(), "per_class": first.get("per_class"), "acc_mean": m, "acc_std": sd,
            "n_runs": len(accs), "seeds": sorted(by_seed), "accs": accs,
            "probe_mean": sum(probes) / len(probes) if probes else None, "protocol": first["protocol"],
        }
        base = PAIRS.get(method)
        if base and (base, ipc) in cells:
            ref = cells[(base, ipc)]
            deltas = []
            for s, c in sorted(by_seed.items()):
                rc = ref.get(s if _seeded(base) else min(ref))
                if rc is None:
                    continue
                ref_acc = {r["seed"]: r["test_acc"] for r in rc["runs"]}
                deltas += [r["test_acc"] - ref_acc[r["seed"]] for r in c["runs"] if r["seed"] in ref_acc]
            if deltas:
                dm, dsd = _mean_std(deltas)
                row.update({"delta_vs": base, "delta_mean": dm, "delta_std": dsd, "n_pairs": len(deltas)})
        rows.append(row)
    return rows, extract


def _model(p: dict[str, Any]) -> str:
    m = p.get("student_model") or {"name": "convnet", "depth": 3, "width": p["args"]["student_width"]}
    return f"{m['name']} depth {m.get('depth')} width {m.get('width')}"


def render(p: dict[str, Any]) -> str:
    ipcs = p["ipcs"]
    by = {(r["method"], r["ipc"]): r for r in p["rows"]}
    methods = [m for m in dict.fromkeys(r["method"] for r in sorted(p["rows"], key=lambda r: -r["acc_mean"]))]
    a = p["args"]
    lines = [
        f"# {p['dataset']}: test accuracy (%) of students trained on each set, protocol `{a['protocol']}`", "",
        f"- Command: `{p['command']}` at commit `{p['git_commit'][:7]}`"
        + (f" (seeds {p['kept_seeds']} collected from an earlier run of the same command, at the commits of that run)"
           if p.get("kept_seeds") else "") + f"; wall {p['wall_s']:.0f} s, load average "
        f"{p['loadavg_start']} → {p['loadavg_end']}." + (f" {p['note']}" if p.get("note") else ""),
        f"- Teacher: {100 * p['teacher_acc']:.2f}% test accuracy. Students: {_model(p)}, "
        f"{a['n_runs']} student seeds per set, max({a['epochs']} epochs, {a['min_steps']} steps).",
        f"- Seeds: {a['seeds']} pipeline seeds (extract.seed = distill.seed = s). Rows that depend on a seed (DSVs, "
        "random) have seeds × students runs; deterministic selections have one selection × students.",
        "- Every row trains on IPC × classes images (`images`). Δ: paired difference to the row it starts from "
        "(dsv_herding − herding by student seed; dsv_nshot − random by seed and student seed), mean ± std over the pairs.",
        "", "| method | " + " | ".join(f"IPC {k}" for k in ipcs) + " |", "|---|" + "---:|" * len(ipcs),
    ]
    for m in methods:
        cells = []
        for k in ipcs:
            r = by.get((m, k))
            cells.append("–" if r is None else f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired differences (points)", "", "| row | vs | " + " | ".join(f"IPC {k}" for k in ipcs) + " |",
              "|---|---|" + "---:|" * len(ipcs)]
    for m, base in PAIRS.items():
        cells = []
        for k in ipcs:
            r = by.get((m, k))
            cells.append("–" if r is None or "delta_mean" not in r else
                         f"{100 * r['delta_mean']:+.2f} ± {100 * r['delta_std']:.2f} (n={r['n_pairs']})")
        if any(c != "–" for c in cells):
            lines.append(f"| {m} | {base} | " + " | ".join(cells) + " |")
    lines += ["", "## Cells", "", "| method | IPC | init | shots | images | runs | acc (%) | probe (%) |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in sorted(p["rows"], key=lambda r: (r["ipc"], -r["acc_mean"])):
        probe = "" if r["probe_mean"] is None else f"{100 * r['probe_mean']:.2f}"
        lines.append(f"| {r['method']} | {r['ipc']} | {r['init']} | {r['shots']} | {r['n_train']} | {r['n_runs']} | "
                     f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {probe} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="results file stem, e.g. fashion_mnist-paper-v3")
    ap.add_argument("-p", "--params", default="params.yaml")
    ap.add_argument("--protocol", default="paper", choices=["paper", "dd", "soft"])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    ap.add_argument("--seeds", type=int, default=3, help="pipeline seeds (extraction, draws)")
    ap.add_argument("--n-runs", type=int, default=3, help="student seeds per set")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--student-width", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--min-steps", type=int, default=400)
    ap.add_argument("-S", "--set", dest="extra", action="append", default=[], help="more pipeline overrides")
    ap.add_argument("--keep-seeds", type=int, nargs="*", default=[],
                    help="seeds whose finished output is collected as it is, without a pipeline run (a run interrupted "
                    "after these seeds finished, resumed on a later commit: their stage keys no longer match)")
    ap.add_argument("--render-only", action="store_true", help="re-render the .md from the .json; runs nothing")
    args = ap.parse_args(argv)
    stem = RESULTS / args.name
    if args.render_only:
        stem.with_suffix(".md").write_text(render(json.loads(stem.with_suffix(".json").read_text())))
        return 0
    load0 = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    started = time.perf_counter()
    outs = {}
    for seed in range(args.seeds):
        methods = args.methods if seed == 0 else [m for m in args.methods if _seeded(m)]
        if seed in args.keep_seeds:
            out = ROOT / "outputs" / "bench" / args.name / f"seed{seed}"
            done = json.loads((out / "metrics" / "distill.json").read_text())
            missing = [f"{m}_ipc{k}" for m in methods for k in args.ipcs if f"{m}_ipc{k}_acc_mean" not in done]
            if missing:
                raise SystemExit(f"bench: --keep-seeds {seed}: {out} lacks {', '.join(missing)}")
            outs[seed] = out
        elif methods:
            outs[seed] = _run_seed(args, seed, methods)
    rows, extract = collect(outs, args.ipcs)
    first = outs[0]
    payload = {
        "dataset": json.loads((first / "artifacts" / "prepare" / "meta.json").read_text())["name"],
        "command": "python benchmarks/table.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": _sh("git", "rev-parse", "HEAD"), "kept_seeds": args.keep_seeds, "wall_s": time.perf_counter() - started,
        "loadavg_start": load0, "loadavg_end": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "teacher_acc": json.loads((first / "metrics" / "pretrain.json").read_text())["test_acc"],
        "ipcs": args.ipcs, "args": vars(args), "rows": rows, "extract": extract,
        "solver": (first / "artifacts" / "extract" / "params.resolved.yaml").read_text()
        if (first / "artifacts" / "extract" / "params.resolved.yaml").exists() else None,
        "student_model": _resolved_student(first),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(render(payload))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
