"""Benchmark: the main job on a GPU against the same machine's CPU, students looped vs batched, DeepKKT vs training.

What is measured (one script, each part in its own subprocess so one failure cannot take the others down):

* ``runs``: the eight stages of a params file (the shipped params.yaml by default) in one process through the
  project's own stage code (``tasks.stages.STAGES``: ``units``/``run_unit``/``merge`` for mapped stages, else
  ``run``, with ``tasks.tracking.NullLog``; no Prefect, MLflow or DVC is imported), once per configuration:
  ``cuda`` (the shipped runtime: device auto, CUDA graphs auto, students batched auto), ``cuda_eager``
  (``runtime.cuda_graphs=off``: what the graphs buy, their capture time counted in the stage times) and ``cpu``
  (``runtime.device=cpu``, torch's default threads: every core of the same machine). Wall time per stage, with
  the device synchronised at the end of each stage, and the results table (every method's accuracy).
* ``micro``: ms per student-step of the protocol's student (a cell's training set, IPC 10 x classes images):
  one student at a time (``dsv.train.fit``) and students trained together (``dsv.batched.fit_batched``, S = a
  cell's seeds and S = every student of the main job), eager and with CUDA graphs; the DeepKKT step of
  ``extract`` (objective + gradients w.r.t. x and λ + Adam, as ``dsv.extract`` runs it) against a training step
  of the same teacher on the same K candidates (forward + backward + Adam), medians over repeats.
* ``checks``: the numbers issue 28 is judged on (stage sum on cuda, speed-up over the CPU, largest accuracy gap
  between the cuda and cpu tables in points, ms per student-step batched, DeepKKT/train ratio).

Writes ``benchmarks/results/gpu.json`` and ``gpu.md`` (``--out`` to change), after every part, so a run cut
short keeps what it measured. ``/proc/loadavg`` is recorded before and after each part.

Usage:
  python benchmarks/gpu.py                         # on the GPU machine: cuda, micro, cpu, cuda_eager (<= ~5 min)
  python benchmarks/gpu.py --device cpu --tiny     # tiny params on the CPU (tests/test_gpu_benchmark.py, CI)

On the lent GPU machine (Python 3.12, torch, numpy, scipy, pyarrow, matplotlib, scikit-learn, pyyaml, timm and
safetensors are there; Prefect, MLflow, DVC, pydantic and ruamel are not), prepare the carried folder here once
with ``bash benchmarks/gpu_prepare.sh`` (wheels of pydantic, pydantic_core, typing_inspection, annotated_types,
typing_extensions, ruamel.yaml and pydot at this venv's versions for CPython 3.12, plus the four Fashion-MNIST
IDX files; 33 MB in ``.gpu/``, ignored by git), then run with ``carry: [".gpu"]`` and ``timeout_s: 540``:

  set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .gpu/wheels/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --data-root .gpu/data \
    2>&1 | tee $OUT/gpu.log; cp benchmarks/results/gpu.json benchmarks/results/gpu.md $OUT/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
# Modules the in-process stage runs must never import (the GPU machine has none of them).
PIPELINE_TOOLS = ("prefect", "mlflow", "dvc")

# The tiny configuration of --tiny: scikit-learn's bundled digits (nothing is downloaded), the main job's methods.
TINY_PARAMS = """\
prepare:
  data: {name: digits, n_per_class: 30, seed: 0}
  val_per_class: 5
  init_pool: {dataset: photos, size: 40}
pretrain:
  model: {name: convnet_tiny}
  fit: {optimizer: adam, lr: 5e-3, weight_decay: 5e-3, steps: 12, min_steps: 0, batch_size: 64, augment: none,
        schedule: none}
extract:
  ipcs: [2]
  solver: {steps: 3, log_every: 1}
  warmup: {steps: 3, log_every: 1}
coreset:
  per_class: null
  lam: {batch_size: 150, steps: 5}
distill:
  ipcs: [2]
  dm: {iterations: 2, batch_real: 8, model: {name: convnet_tiny}}
  proxy: {model: {name: convnet_tiny}, fit: {optimizer: sgd, lr: 0.01, epochs: 1, batch_size: 64}}
  protocol: {name: dd, epochs: 1, min_steps: 4, n_runs: 2, model: {name: convnet_tiny}}
judge:
  model: {name: convnet_tiny, norm: batch, pool: max}
  fit: {optimizer: adam, lr: 5e-3, epochs: 1, min_steps: 0, steps: 6, batch_size: 64}
generate:
  per_class: 1
  deltas: [0.0, 1.0]
  edits: 2
  recipe: {steps: 3, views: 1, log_every: 1}
runtime: {threads: 1, log_models: false, progress: off}
"""


# ----------------------------------------------------------------------------------------------- helpers


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _block_pipeline_tools() -> None:
    """Make any import of Prefect, MLflow or DVC fail loudly in this process (what the GPU machine lacks)."""

    class _Blocker:
        def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
            if name.split(".")[0] in PIPELINE_TOOLS:
                raise ImportError(f"benchmarks/gpu.py must not import {name!r} (absent on the GPU machine)")
            return None

    sys.meta_path.insert(0, _Blocker())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- worker: stages


def run_stages(params: Path, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """The eight stages in this process through the stage registry; returns wall times, devices, results."""
    import torch

    from tasks.config import load_config
    from tasks.output import device_of
    from tasks.paths import Paths
    from tasks.stages import STAGES, stage_module
    from tasks.tracking import NullLog

    cfg = load_config(params, overrides)
    if cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)
    device = device_of(cfg)
    if device == "cuda":
        torch.zeros(1, device="cuda")  # the CUDA context: process start-up, not a stage's time
    paths = Paths(out_dir.resolve())
    log = NullLog()
    seconds: dict[str, float] = {}
    devices: dict[str, str] = {}
    caught: list[str] = []
    for name, spec in STAGES.items():
        view = cfg.restricted(spec.sections)
        module = stage_module(name)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always", RuntimeWarning)
            if spec.mapped:
                done = [module.run_unit(view, paths, u, log) for u in module.units(view)]
                out = module.merge(view, paths, log, done)
            else:
                out = module.run(view, paths, log)
            _sync(device)
        seconds[name] = round(time.perf_counter() - t0, 3)
        devices[name] = str(out.timings.get("device", "?"))
        caught += [f"{name}: {w.message}" for w in got if "CUDA graph" in str(w.message)]
        print(f"  {name}: {seconds[name]:.2f} s on {devices[name]}", flush=True)
    results = json.loads(paths.results_json.read_text())
    rows = [{k: r.get(k) for k in ("method", "ipc", "acc_mean", "acc_std", "accs", "n_runs")} for r in results["rows"]]
    return {
        "device": device, "threads": torch.get_num_threads(), "overrides": overrides,
        "stage_seconds": seconds, "stage_sum_seconds": round(sum(seconds.values()), 3), "devices": devices,
        "teacher_acc": results.get("teacher_acc"), "rows": rows, "graph_warnings": caught,
        "imported_pipeline_tools": sorted(m for m in sys.modules if m.split(".")[0] in PIPELINE_TOOLS),
    }


# ---------------------------------------------------------------------------------------- worker: micro


def _timed(fn: Any, device: str) -> tuple[float, Any]:
    """(wall seconds, result) of one call of ``fn()``, the device synchronised before and after."""
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - t0, result


def _time_fn(fn: Any, device: str, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls (device synchronised around each)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def micro(params: Path, overrides: list[str], device: str, tiny: bool) -> dict[str, Any]:
    """ms per student-step (looped vs batched, eager vs graphs) and the DeepKKT/train step ratio; a measurement
    that fails is recorded as an error next to the others."""
    import dataclasses

    import torch

    from dsv.protocols import student_fit_config
    from tasks.config import load_config

    cfg = load_config(params, overrides)
    if cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)
    protocol = cfg.distill.protocol
    shape, classes = ((1, 8, 8), 10) if tiny else ((1, 28, 28), 10)
    n = cfg.distill.ipcs[0] * classes  # a cell's training set
    steps = 6 if tiny else 300
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=g)
    y = torch.arange(n) % classes
    fit_cfg = dataclasses.replace(student_fit_config(protocol, n), steps=steps)
    cell = protocol.n_runs
    everyone = max(cell, cell * len(cfg.distill.methods))
    out: dict[str, Any] = {"student_model": dataclasses.asdict(protocol.model), "n_train": n, "steps": steps,
                           "batch": min(fit_cfg.batch_size, n), "augment": fit_cfg.augment, "students_per_cell": cell,
                           "students_in_main_job": everyone, "student_ms": {}, "errors": {}}
    try:  # first: it does not depend on the students' code
        out.update(_kkt_micro(cfg, x, y, shape, classes, device, tiny))
    except Exception as exc:  # noqa: BLE001 - recorded, the other measurements go on
        out["errors"]["kkt"] = f"{type(exc).__name__}: {exc}"
    for graphs in (False, True):
        if graphs and device != "cuda":
            continue
        for s in (1, cell, everyone):
            key = f"{'looped' if s == 1 else f'batched{s}'}_{'graphs' if graphs else 'eager'}"
            if key in out["student_ms"]:
                continue
            try:
                out["student_ms"].update(_student_micro(key, protocol, fit_cfg, x, y, shape, classes, s, graphs, device))
            except Exception as exc:  # noqa: BLE001
                out["errors"][key] = f"{type(exc).__name__}: {exc}"
        print(f"  students: {out['student_ms']} {out['errors'] or ''}", flush=True)
    if device == "cuda":  # a graphed student equals the eager one (the same kernels, replayed)
        try:
            from dsv.models import build_seeded
            from dsv.train import fit

            warm = dataclasses.replace(fit_cfg, steps=10)
            a, b = (build_seeded(protocol.model, shape, classes, 0).to(device) for _ in range(2))
            fit(a, x, y, warm, seed=3)
            fit(b, x, y, warm, seed=3, graphs=True)
            out["graphs_vs_eager_max_weight_diff"] = max(float((p - q).abs().max()) for p, q in
                                                         zip(a.parameters(), b.parameters()))
        except Exception as exc:  # noqa: BLE001
            out["errors"]["graphs_vs_eager"] = f"{type(exc).__name__}: {exc}"
    return out


def _student_micro(key: str, protocol: Any, fit_cfg: Any, x: Any, y: Any, shape: tuple[int, ...], classes: int,
                   s: int, graphs: bool, device: str) -> dict[str, Any]:
    """ms per student-step of ``s`` students: one ``fit`` (s = 1) or one ``fit_batched`` of s students."""
    import dataclasses

    from dsv.batched import fit_batched
    from dsv.models import build_seeded
    from dsv.train import fit

    def students() -> list[Any]:
        return [build_seeded(protocol.model, shape, classes, seed).to(device) for seed in range(s)]

    warm = dataclasses.replace(fit_cfg, steps=min(fit_cfg.steps, 10))
    if s == 1:
        fit(students()[0], x, y, warm, seed=0, graphs=graphs)  # warm-up: kernels, allocator
        model = students()[0]
        t, res = _timed(lambda: fit(model, x, y, fit_cfg, seed=0, graphs=graphs), device)
    else:
        fit_batched(students(), x, y, warm, list(range(s)), graphs=graphs)
        models = students()
        t, many = _timed(lambda: fit_batched(models, x, y, fit_cfg, list(range(s)), graphs=graphs), device)
        res = many[0]
    out: dict[str, Any] = {key: round(1e3 * t / (fit_cfg.steps * s), 4), f"{key}_captured": bool(res.graphed)}
    if res.graph_error:
        out[f"{key}_error"] = res.graph_error
    return out


def _kkt_micro(cfg: Any, x: Any, y: Any, shape: tuple[int, ...], classes: int, device: str, tiny: bool
               ) -> dict[str, Any]:
    """The DeepKKT step of ``extract`` (objective, gradients w.r.t. x and λ, Adam, λ clamp) against a training step
    of the same teacher on the same K candidates (forward, backward, Adam), as benchmarks/perf.py defines them;
    medians of interleaved repeats."""
    import dataclasses

    import torch

    from dsv.extract import ExtractConfig
    from dsv.kernel import soft_cross_entropy, stationarity_params
    from dsv.kkt import kkt_objective
    from dsv.models import build_seeded

    n = x.shape[0]
    solver: ExtractConfig = cfg.extract.solver
    teacher = build_seeded(cfg.pretrain.model, shape, classes, 0).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(True)
    params_t = stationarity_params(teacher, solver.kkt.param_subset, x[:8].to(device))
    xk = x.clone().to(device).requires_grad_(True)
    yk = y.to(device)
    u = torch.ones(n, device=device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [xk], "lr": solver.lr_x}, {"params": [u], "lr": solver.lr_lam}])
    gen = torch.Generator().manual_seed(1)

    def kkt_step() -> None:
        total, _ = kkt_objective(teacher, params_t, xk, yk, 1e-3 * u, solver.kkt, gen)
        gx, gu = torch.autograd.grad(total, [xk, u])
        opt.zero_grad(set_to_none=True)
        xk.grad, u.grad = gx, gu
        opt.step()
        with torch.no_grad():
            u.clamp_(min=0.0)

    student = build_seeded(cfg.pretrain.model, shape, classes, 0).to(device).train()
    topt = torch.optim.Adam(student.parameters(), lr=1e-3)
    xt = x.to(device)

    def train_step() -> None:
        topt.zero_grad(set_to_none=True)
        soft_cross_entropy(student(xt), yk).mean().backward()
        topt.step()

    for fn in (kkt_step, train_step):
        for _ in range(3):
            fn()
    kkt_s, train_s = [], []
    for _ in range(5 if tiny else 50):  # interleaved: load on the machine hits both alike
        kkt_s.append(_time_fn(kkt_step, device, 1))
        train_s.append(_time_fn(train_step, device, 1))
    out = {"kkt_step_ms": round(1e3 * statistics.median(kkt_s), 4),
           "train_step_ms": round(1e3 * statistics.median(train_s), 4),
           "kkt_train_ratio": round(statistics.median(kkt_s) / statistics.median(train_s), 3),
           "kkt": {"candidates": n, "param_subset": solver.kkt.param_subset, "impl": solver.kkt.impl,
                   "teacher": dataclasses.asdict(cfg.pretrain.model)}}
    print(f"  DeepKKT {out['kkt_step_ms']} ms, train {out['train_step_ms']} ms, ratio {out['kkt_train_ratio']}",
          flush=True)
    return out


# --------------------------------------------------------------------------------------------- driver


def _worker(args: argparse.Namespace) -> None:
    _block_pipeline_tools()
    params = Path(args.params)
    overrides = list(args.set or [])
    if args.worker == "stages":
        result = run_stages(params, overrides, Path(args.work))
    else:
        result = micro(params, overrides, args.device, args.tiny)
    Path(args.result).write_text(json.dumps(result, indent=1))


def _spawn(kind: str, params: Path, overrides: list[str], device: str, tiny: bool, work: Path,
           timeout: float) -> dict[str, Any]:
    """One part in a fresh process; its result, or {"error": ...} when it failed or ran out of time."""
    result = work / f"{kind}-{len(list(work.iterdir()))}.json"
    out_dir = work / f"out-{result.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--params", str(params),
           "--device", device, "--result", str(result), "--work", str(out_dir)]
    cmd += ["--tiny"] if tiny else []
    for o in overrides:
        cmd += ["--set", o]
    load_before = _loadavg()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, timeout=timeout, text=True, capture_output=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "loadavg_before": load_before}
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stderr or proc.stdout)[-2000:]
        print(tail, file=sys.stderr)
        return {"error": f"exit {proc.returncode}: {tail[-600:]}", "loadavg_before": load_before}
    data: dict[str, Any] = json.loads(result.read_text())
    data.update(process_seconds=round(time.perf_counter() - t0, 2), loadavg_before=load_before,
                loadavg_after=_loadavg())
    return data


def _checks(report: dict[str, Any]) -> dict[str, Any]:
    runs, micro_r = report["runs"], report.get("micro", {})
    out: dict[str, Any] = {}
    fast, cpu = runs.get("cuda", {}), runs.get("cpu", {})
    if "error" in fast and "stage_sum_seconds" in runs.get("cuda_plain", {}):
        fast = runs["cuda_plain"]
        out["device_run"] = "cuda_plain (the shipped configuration failed)"
    if "stage_sum_seconds" in fast:
        out["stage_sum_cuda_s"] = fast["stage_sum_seconds"]
    if "stage_sum_seconds" in fast and "stage_sum_seconds" in cpu:
        out["speedup_vs_cpu"] = round(cpu["stage_sum_seconds"] / fast["stage_sum_seconds"], 2)
    if fast.get("rows") and cpu.get("rows"):
        ref = {(r["method"], r["ipc"]): r["acc_mean"] for r in cpu["rows"]}
        gaps = {f"{r['method']}_ipc{r['ipc']}": round(100 * (r["acc_mean"] - ref[(r["method"], r["ipc"])]), 2)
                for r in fast["rows"] if (r["method"], r["ipc"]) in ref}
        out["acc_gap_points"] = gaps
        out["max_abs_acc_gap_points"] = max((abs(v) for v in gaps.values()), default=None)
    ms = micro_r.get("student_ms", {})
    batched = {k: v for k, v in ms.items() if k.startswith("batched") and isinstance(v, float)}
    if batched:
        out["best_student_ms_per_student"] = min(batched.values())
        out["best_student_config"] = min(batched, key=lambda k: batched[k])
    if "kkt_train_ratio" in micro_r:
        out["kkt_train_ratio"] = micro_r["kkt_train_ratio"]
    return out


def _markdown(report: dict[str, Any]) -> str:
    meta, runs, micro_r, checks = report["meta"], report["runs"], report.get("micro", {}), report.get("checks", {})
    lines = ["# GPU benchmark (issue 28)", "",
             f"Machine: {meta['gpu']} · {meta['cpu_count']} CPU cores · torch {meta['torch']} · Python "
             f"{meta['python']} · commit {meta['commit']} · params {meta['params']}{' (tiny)' if meta['tiny'] else ''}",
             f"Written by `python benchmarks/gpu.py{' ' + ' '.join(meta['argv']) if meta['argv'] else ''}`; "
             f"load average at start {meta['loadavg_start']}, at end {report.get('loadavg_end', 'n/a')}.", ""]
    names = [k for k in ("cuda", "cuda_eager", "cuda_plain", "cpu") if k in runs]
    lines += ["## Stage wall times (s), in-process stage code, no Prefect/MLflow/DVC", "",
              "| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    stages = next((list(r["stage_seconds"]) for r in runs.values() if "stage_seconds" in r), [])
    for st in stages:
        lines.append(f"| {st} | " + " | ".join(f"{runs[n].get('stage_seconds', {}).get(st, float('nan')):.2f}"
                                               for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{runs[n].get('stage_sum_seconds', float('nan')):.2f}**"
                                               for n in names) + " |")
    for n in names:
        r = runs[n]
        if "error" in r:
            lines.append(f"\n`{n}` failed: {r['error']}")
        else:
            extra = f"; graph warnings: {r['graph_warnings']}" if r.get("graph_warnings") else ""
            lines.append(f"\n`{n}`: overrides {r['overrides'] or 'none'}, {r['threads']} torch threads, devices "
                         f"{r['devices']}, load {r['loadavg_before']} -> {r['loadavg_after']}{extra}")
    lines += ["", "## Results table (test accuracy %, mean over seeds)", "",
              "| method | IPC | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    keys = next(([(r["method"], r["ipc"]) for r in runs[n]["rows"]] for n in names if runs[n].get("rows")), [])
    for m, k in keys:
        cells = []
        for n in names:
            row = next((r for r in runs[n].get("rows", []) if (r["method"], r["ipc"]) == (m, k)), None)
            cells.append(f"{100 * row['acc_mean']:.2f} ± {100 * row['acc_std']:.2f}" if row else "n/a")
        lines.append(f"| {m} | {k} | " + " | ".join(cells) + " |")
    if micro_r and "error" not in micro_r:
        lines += ["", f"## Students and DeepKKT on {meta['device']} (ms)", "",
                  f"Student: {micro_r['student_model']['name']} width {micro_r['student_model']['width']}, "
                  f"{micro_r['n_train']} images, batch {micro_r['batch']}, augment {micro_r['augment']}, "
                  f"{micro_r['steps']} steps per run.", "", "| configuration | ms per student-step |", "|---|---|"]
        for k, v in micro_r["student_ms"].items():
            if isinstance(v, float):
                cap = micro_r["student_ms"].get(f"{k}_captured")
                lines.append(f"| {k}{' (graph captured)' if cap else ''} | {v:.3f} |")
        if "kkt_step_ms" in micro_r:
            lines += ["", f"DeepKKT step {micro_r['kkt_step_ms']:.3f} ms, training step {micro_r['train_step_ms']:.3f} "
                      f"ms (same teacher, K = {micro_r['kkt']['candidates']}): ratio **{micro_r['kkt_train_ratio']:.2f}**"
                      f" (θ = {micro_r['kkt']['param_subset']}, impl {micro_r['kkt']['impl']})."]
        if micro_r.get("errors"):
            lines += ["", f"Failed measurements: {micro_r['errors']}"]
        if "graphs_vs_eager_max_weight_diff" in micro_r:
            lines.append(f"Graphed vs eager student after 10 steps: max weight difference "
                         f"{micro_r['graphs_vs_eager_max_weight_diff']:.3g}.")
    elif micro_r:
        lines += ["", f"Micro benchmark failed: {micro_r['error']}"]
    lines += ["", "## Checks (issue 28)", "", "```", json.dumps(checks, indent=1), "```", ""]
    return "\n".join(lines)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="the fast device (cpu: a dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny params (bundled digits), seconds on a CPU")
    ap.add_argument("--params", default=None, help="params file (default params.yaml, or the tiny one)")
    ap.add_argument("--data-root", default=None, help="prepare.data.root (folder holding fashion_mnist/)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for gpu.json and gpu.md")
    ap.add_argument("--skip", action="append", default=[], choices=("cuda_eager", "cpu", "micro"),
                    help="leave a part out")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="wall budget: a part whose expected time does not fit in what is left is skipped")
    ap.add_argument("--set", action="append", help=argparse.SUPPRESS)
    ap.add_argument("--worker", choices=("stages", "micro"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dsv-gpu-bench-"))
    if args.params:
        params = Path(args.params).resolve()
    elif args.tiny:
        params = work / "params.tiny.yaml"
        params.write_text(TINY_PARAMS)
    else:
        params = REPO / "params.yaml"
    base = [f"prepare.data.root={Path(args.data_root).resolve()}"] if args.data_root else []
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a dry run", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "meta": {"gpu": gpu, "device": args.device, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "python": platform.python_version(), "commit": _git_commit(), "params": str(params.name),
                 "tiny": args.tiny, "argv": list(argv if argv is not None else sys.argv[1:]),
                 "loadavg_start": _loadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
        "runs": {},
    }

    def save() -> None:
        report["checks"] = _checks(report)
        report["loadavg_end"] = _loadavg()
        report["benchmark_seconds"] = round(time.perf_counter() - started, 1)
        (out / "gpu.json").write_text(json.dumps(report, indent=1))
        (out / "gpu.md").write_text(_markdown(report))

    fast = [f"runtime.device={args.device}"]
    # (name, worker, overrides, device, expected seconds on one H200 machine: a part starts only if it fits)
    parts: list[tuple[str, str, list[str], str, float]] = [
        ("cuda", "stages", fast, args.device, 45.0),
        ("micro", "micro", fast, args.device, 40.0),
        ("cpu", "stages", ["runtime.device=cpu"], "cpu", 170.0),
        ("cuda_eager", "stages", [*fast, "runtime.cuda_graphs=off"], args.device, 45.0),
    ]
    for name, kind, overrides, device, expected in parts:
        if name in args.skip:
            continue
        if name == "cuda_eager" and "error" in report["runs"].get("cuda", {}):
            # the shipped CUDA configuration failed: measure the plain one (no graphs, students one by one)
            name, overrides = "cuda_plain", [*fast, "runtime.cuda_graphs=off", "distill.protocol.batched=off"]
        if name == "cuda_eager" and args.device != "cuda" and not args.tiny:
            continue  # graphs are a CUDA matter
        left = args.budget_s - (time.perf_counter() - started)
        if not args.tiny and name != "cuda" and expected > left:
            print(f"{name}: skipped (expected {expected:.0f} s, {left:.0f} s of the budget left)")
            report.setdefault("skipped", []).append(name)
            continue
        print(f"{name}: {kind} on {device} ({' '.join(overrides)})", flush=True)
        result = _spawn(kind, params, base + overrides, device, args.tiny, work, timeout=max(left, 2 * expected))
        if kind == "micro":
            report["micro"] = result
        else:
            report["runs"][name] = result
        save()
    save()
    print(json.dumps(report["checks"], indent=1))
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} in {time.perf_counter() - started:.0f} s")
    failed = [n for n, r in [*report["runs"].items(), ("micro", report.get("micro", {}))] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
