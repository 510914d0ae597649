"""Stage ``evaluate``: summarise the students' runs into the results table.

Outputs: ``metrics/evaluate.json`` = ``{"teacher_acc": ..., "protocol": ..., "rows": [{method, ipc,
shots, protocol, label_type, acc_mean, acc_std, n_runs, accs, val_acc_mean, wall_s}, ...]}`` and
``artifacts/evaluate/results.md`` (a markdown table naming the protocol and label type).
"""

from __future__ import annotations

import math
import time
from typing import Any

from dsv.protocols import ResultRow
from tasks.artifacts import read_json
from tasks.atomic import write_text
from tasks.config import PipelineConfig
from tasks.paths import Paths
from tasks.stages import StageOutput, finish
from tasks.tracking import StageLog


def rows_from_cells(cells: list[dict[str, Any]], cell_seconds: dict[str, float]) -> list[dict[str, Any]]:
    """One table row per cell: mean ± population std over the runs (never the max)."""
    rows = []
    for c in cells:
        key = f"{c['method']}_ipc{0 if c['method'] == 'full' else c['ipc']}"
        if not c["runs"]:  # empty training set (see tasks.distill): no accuracy, said explicitly
            rows.append({"method": c["method"], "ipc": int(c["ipc"]), "shots": int(c["shots"]),
                         "protocol": c["protocol"], "label_type": c["label_type"], "acc_mean": None,
                         "acc_std": None, "n_runs": 0, "accs": [], "wall_s": cell_seconds.get(key),
                         "val_acc_mean": None, "n_train": 0, "note": c.get("note", "")})
            continue
        row = ResultRow.from_results(
            c["method"], int(c["ipc"]), int(c["shots"]), c["protocol"], [r["test_acc"] for r in c["runs"]],
            wall_s=float(cell_seconds.get(key, float("nan"))),
        ).to_dict()
        vals = [r["val_acc"] for r in c["runs"] if not math.isnan(r["val_acc"])]
        row["val_acc_mean"] = sum(vals) / len(vals) if vals else float("nan")
        row["n_train"] = int(c["n_train"])
        rows.append(row)
    return rows


def markdown(teacher_acc: float, rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table (accuracies in %)."""
    lines = [
        f"Teacher test accuracy: {100 * teacher_acc:.2f}%",
        "",
        "| method | IPC | shots | protocol | labels | test acc (%) | runs | val acc (%) |",
        "|---|---:|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["n_runs"] == 0:
            lines.append(f"| {r['method']} | {r['ipc']} | {r['shots']} | {r['protocol']} | {r['label_type']} | "
                         f"n/a ({r.get('note', 'no runs')}) | 0 | n/a |")
            continue
        lines.append(
            f"| {r['method']} | {r['ipc']} | {r['shots']} | {r['protocol']} | {r['label_type']} | "
            f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | {r['n_runs']} | "
            f"{100 * r['val_acc_mean']:.2f} |"
        )
    lines += ["", "Mean ± population std over runs; wall times per cell: metrics/evaluate.json (`wall_s`)."]
    return "\n".join(lines) + "\n"


def run(cfg: PipelineConfig, paths: Paths, log: StageLog) -> StageOutput:
    """Build the table; see the module docstring."""
    started = time.perf_counter()
    teacher_acc = float(read_json(paths.metrics("pretrain"))["test_acc"])
    cells = read_json(paths.distill_runs)
    try:
        cell_seconds = read_json(paths.metrics("distill")).get("cell_seconds", {})
    except Exception:  # wall times are informative only; the table does not depend on them
        cell_seconds = {}
    rows = rows_from_cells(cells, cell_seconds)
    write_text(paths.results_table, markdown(teacher_acc, rows))
    for r in rows:
        if r["n_runs"] == 0:
            continue
        log.metrics({f"{r['method']}_ipc{r['ipc']}.acc_mean": r["acc_mean"],
                     f"{r['method']}_ipc{r['ipc']}.acc_std": r["acc_std"]})
    log.metric("teacher_acc", teacher_acc)
    log.artifact(paths.results_table)
    metrics = {"teacher_acc": teacher_acc, "protocol": cfg.evaluate.protocol.name, "rows": rows}
    return finish("evaluate", cfg, paths, [paths.results_table], metrics, started)
