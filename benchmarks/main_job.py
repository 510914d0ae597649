"""The main job as a new user runs it: a fresh clone, `make run`, timed; its results table is the README's.

    python benchmarks/main_job.py                 # clone HEAD into a temporary folder, `make run` there, record
    python benchmarks/main_job.py --from DIR      # record a project folder where `make run` already finished

Writes benchmarks/results/main-job.json (the results rows, teacher accuracy, the commit, the wall time of the
whole `make run` and of its pipeline, the load average before and after) and main-job.md. The README's headline
table is :func:`readme_table` of that file, and tests/test_readme.py checks that the README shows exactly it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# How the README names each method (one line each; the terms are defined above the table).
LABELS = {
    "dsv_herding": "DSVs refined from herding's picks",
    "herding": "herding (core-set)",
    "kkt_herding": "KKT-filtered herding (core-set)",
    "dsv_nshot": "DSVs refined from the random draw",
    "random": "random real images",
    "dsv_0shot": "DSVs from another dataset (0-shot)",
    "dsv_noise": "DSVs from noise",
    "lambda_topk": "top-λ (the paper's core-set)",
    "support_topk": "top support score",
    "dm": "DM (distribution matching)",
}


def readme_table(payload: dict[str, Any]) -> str:
    """The README's headline table: one row per method, ranked, accuracies in percent."""
    rows = sorted((r for r in payload["rows"] if r["method"] != "full"), key=lambda r: r.get("rank") or 99)
    lines = ["| rank | training set (IPC 10) | real images seen per class | test acc. (%) | linear probe (%) |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        acc = f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}"
        probe = "" if r.get("probe_acc") is None else f"{100 * r['probe_acc']:.2f}"
        lines.append(f"| {r['rank']} | {LABELS.get(r['method'], r['method'])} | {r['shots']} | "
                     f"{'**' + acc + '**' if r.get('best') else acc} | {probe} |")
    return "\n".join(lines) + "\n"


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _record(project: Path, meta: dict[str, Any]) -> dict[str, Any]:
    results = json.loads((project / "artifacts" / "evaluate" / "results.json").read_text())
    timings = {p.stem: json.loads(p.read_text()) for p in sorted((project / "timings").glob("*.json"))}
    payload = {**meta, "teacher_acc": results["teacher_acc"], "protocol": results.get("protocol"),
               "rows": results["rows"],
               "stage_seconds": {k: v.get("wall_seconds") for k, v in timings.items()},
               "devices": sorted({str(v.get("device")) for v in timings.values() if v.get("device")})}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "main-job.json").write_text(json.dumps(payload, indent=1) + "\n")
    md = [f"# The main job (`make run`, params.yaml) at commit `{payload['commit']}`", "",
          f"- {payload['how']}; load average {payload['loadavg_start']} → {payload['loadavg_end']}.",
          f"- Teacher: {100 * payload['teacher_acc']:.2f}% test accuracy; students: protocol `{payload['protocol']}`.",
          "- Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in payload["stage_seconds"].items() if v),
          "", readme_table(payload)]
    (RESULTS / "main-job.md").write_text("\n".join(md))
    return payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="project", default=None, help="a project folder where `make run` finished")
    ap.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    if args.project:
        project = Path(args.project).resolve()
        meta = {"commit": commit, "how": f"recorded from {project.name} (run before)", "loadavg_start": _loadavg(),
                "loadavg_end": _loadavg(), "wall_s": None}
    else:
        project = Path(tempfile.mkdtemp(prefix="dsv-main-job-")) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(project)], check=True)
        load0 = _loadavg()
        t0 = time.perf_counter()
        log = project.parent / "make-run.log"
        with log.open("w") as fh:
            proc = subprocess.run(["make", "run"], cwd=project, stdout=fh, stderr=subprocess.STDOUT,
                                  env={k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")})
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(log.read_text()[-3000:], file=sys.stderr)
            return proc.returncode
        found = re.search(r"pipeline finished in ([0-9.]+) s", log.read_text())
        meta = {"commit": commit, "wall_s": round(wall, 1),
                "pipeline_s": float(found.group(1)) if found else None,
                "how": f"`make run` in a fresh clone took {wall:.0f} s (venv install included; the pipeline "
                       f"{found.group(1) if found else '?'} s)",
                "loadavg_start": load0, "loadavg_end": _loadavg()}
    payload = _record(project, meta)
    print((RESULTS / "main-job.md").read_text())
    print(json.dumps({k: payload[k] for k in ("commit", "wall_s", "loadavg_start", "loadavg_end")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
