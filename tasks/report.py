"""``dsv report``: one self-contained HTML file describing the last run of an output folder.

Everything is read back from the artifacts (``metrics/*.json``, ``artifacts/*``), so the report
shows exactly what is on disk: the results table, per-stage metrics, the DSV image grids (redrawn
from ``dsv.parquet``), the training/entropy/λ plots and the resolved params. Images are embedded as
base64 PNGs, so the file opens anywhere without its folder. The report is logged to MLflow as an
artifact of the output folder's latest pipeline run (tag ``output_dir``), or of a new run named
``report`` when there is none. Reads only: no stage artifact is changed.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tasks.artifacts import ArtifactError, read_dsv_parquet, read_json, read_lambdas_parquet
from tasks.atomic import write_text
from tasks.config import PipelineConfig
from tasks.paths import STAGE_NAMES, Paths
from tasks.plain import flatten

REPORT_NAME = "report.html"


class ReportError(RuntimeError):
    """Nothing to report (no run in the output folder) or the report cannot be written."""


def _png(fig: Any) -> str:
    """A matplotlib figure as an ``<img>`` tag with a base64 PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if v is None:
        return "n/a"
    return str(v)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pm(v: Any, std: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} ± {100 * (std or 0):.2f}"


def _results(res: dict[str, Any]) -> str:
    """The results ranked within each IPC (best marked ★), with the label-robust score, and a bar chart."""
    from tasks.figures import ranked_bars

    ordered = sorted(res.get("rows", []), key=lambda r: (r["method"] == "full", r.get("label_type", ""), r["ipc"],
                                                         r.get("rank") or 1 << 30))
    rows = []
    for r in ordered:
        rank = "" if r.get("rank") is None else f"{r['rank']}{' ★' if r.get('best') else ''}"
        rows.append([rank, r["method"], r["ipc"], r.get("shots"), r.get("protocol"), r.get("label_type"),
                     _pm(r.get("acc_mean"), r.get("acc_std")), _pm(r.get("lrs_mean"), r.get("lrs_std")),
                     r.get("n_runs")])
    table = _table(["rank", "method", "IPC", "shots", "protocol", "labels", "test acc % (mean ± std)",
                    "label-robust score %", "runs"], rows)
    chart = _png(ranked_bars(res.get("rows", []), "student test accuracy, best in red, DSV methods in blue"))
    return table + chart


def _metrics_tables(paths: Paths) -> str:
    parts = []
    for stage in STAGE_NAMES:
        try:
            m = read_json(paths.metrics(stage))
        except ArtifactError:
            continue
        if stage == "evaluate":
            m = {k: v for k, v in m.items() if k != "rows"}
        flat = {k: v for k, v in flatten(m).items() if isinstance(v, (int, float, str)) or v is None}
        parts.append(f"<h3>{stage}</h3>" + _table(["metric", "value"], sorted(flat.items())))
    return "".join(parts)


def _figures(paths: Paths, classes: list[str]) -> tuple[str, str]:
    """(DSV grids section, plots section) as HTML."""
    from tasks.figures import curves, image_grid, lam_histograms

    grids = []
    if paths.dsv_parquet.is_file():
        t = read_dsv_parquet(paths.dsv_parquet)
        for init, ipc in sorted({(a, b) for a, b in zip(t.init, t.ipc)}):
            sel = [i for i, (a, b) in enumerate(zip(t.init, t.ipc)) if a == init and b == ipc]
            if sel and t.x.dim() == 4:
                fig = image_grid(t.x[sel], t.y[sel], classes, f"DSVs: {init}, IPC {ipc}")
                grids.append(f'<figure class="grid">{_png(fig)}<figcaption>{html.escape(init)}, IPC {ipc}: '
                             f"{len(sel)} DSVs</figcaption></figure>")
    plots = []
    if paths.pretrain_curve.is_file():
        c = read_json(paths.pretrain_curve)
        if c:
            plots.append(_png(curves({"loss": ([r["step"] for r in c], [r["loss"] for r in c])}, "step", "loss",
                                     "teacher training loss")))
    if paths.extract_trace.is_file():
        trace = read_json(paths.extract_trace)
        series: dict[str, tuple[Sequence[float], Sequence[float]]] = {}
        for key in sorted({(r["init"], r["ipc"]) for r in trace}):
            rows = [r for r in trace if (r["init"], r["ipc"]) == key and "entropy" in r]
            steps = sorted({r["step"] for r in rows})
            ent = [sum(r["entropy"] for r in rows if r["step"] == s) / max(1, sum(r["step"] == s for r in rows))
                   for s in steps]
            series[f"{key[0]} IPC {key[1]}"] = (steps, ent)
        if series:
            plots.append(_png(curves(series, "step", "mean entropy (nats)", "candidate entropy")))
    if paths.lambdas_parquet.is_file():
        lt = read_lambdas_parquet(paths.lambdas_parquet)
        if lt.lam.numel():
            plots.append(_png(lam_histograms(lt.lam, lt.label, classes)))
    return "".join(grids) or "<p>No DSVs on disk.</p>", "".join(plots) or "<p>No plots.</p>"


def _generation(paths: Paths) -> str:
    """The generate stage's pictures (embedded from artifacts/generate) and the judge's view of the samples and of
    every training set (artifacts/evaluate/judge.json)."""
    import base64

    parts = []
    with contextlib.suppress(ArtifactError):
        m = read_json(paths.metrics("generate"))
        if "samples_judge_acc" in m:
            rows = [[name, f"{100 * m[f'{name}_judge_acc']:.1f}", f"{m[f'{name}_judge_conf']:.3f}",
                     f"{m[f'{name}_judge_frechet']:.1f}"] for name in ("samples", "real", "noise")]
            parts.append("<p>The independent judge on the samples, on real test images (a second draw: the Fréchet "
                         "floor) and on raw noise:</p>" + _table(["images", "judge acc %", "judge conf", "Fréchet"], rows))
            extra = [[k, f"{v:.3f}"] for k, v in sorted(m.items()) if k.startswith(("strips_", "edits_"))]
            if extra:
                parts.append(_table(["interpolation / edits", "value"], extra))
    for name, caption in (("samples", "samples from noise"), ("interpolation", "interpolation strips (soft targets)"),
                          ("edits", "edits: real test images pushed to the next class")):
        f = paths.generate_figure(name)
        if f.is_file():
            data = base64.b64encode(f.read_bytes()).decode()
            parts.append(f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{caption}'
                         "</figcaption></figure>")
    with contextlib.suppress(ArtifactError):
        judged = read_json(paths.judge_table)
        if judged:
            parts.append("<h3>The judge on every training set</h3>" + _table(
                ["set", "IPC", "images", "judge acc %", "judge conf", "Fréchet"],
                [[j["method"], j["ipc"], j["n"], f"{100 * j['judge_acc']:.1f}", f"{j['judge_conf']:.3f}",
                  f"{j['frechet']:.1f}"] for j in sorted(judged, key=lambda j: (j["ipc"], j["frechet"]))]))
    return "".join(parts) or "<p>No generation yet.</p>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f0f0f0}figure.grid{display:inline-block;margin:.5em}img{max-width:100%}
pre{background:#f7f7f7;padding:1em;overflow:auto}.muted{color:#777}
"""


def render(cfg: PipelineConfig, paths: Paths, run_url: str | None = None) -> str:
    """The report's HTML text (self-contained).

    Raises:
        ReportError: the output folder holds no metrics at all (nothing has run).
    """
    if not any(paths.metrics(s).is_file() for s in STAGE_NAMES):
        raise ReportError(f"no run found in {paths.base} (no metrics/*.json); run `dsv run` first")
    try:
        meta = read_json(paths.data_meta)
        classes = [str(c) for c in meta["classes"]]
        dataset = str(meta.get("name", "?"))
    except (ArtifactError, KeyError, TypeError):
        classes, dataset = [], "?"
    ev: dict[str, Any] = {}
    with contextlib.suppress(ArtifactError):
        ev = read_json(paths.results_json)
    kept = []
    try:
        ex = read_json(paths.metrics("extract"))
        kept = [[k, m["n"], m["lambda_zero"], *m["per_class"]]
                for k, m in ex.items() if isinstance(m, dict) and "per_class" in m]
    except ArtifactError:
        pass
    per_class = ""
    with contextlib.suppress(ArtifactError, KeyError, TypeError):
        pre_m = read_json(paths.metrics("pretrain"))
        accs = [pre_m.get(f"test_acc_class_{i}") for i in range(len(classes))]
        if classes and all(a is not None for a in accs):
            per_class = "<h3>Teacher accuracy per class</h3>" + _table(
                ["class", "test accuracy %"], [[c, f"{100 * a:.2f}"] for c, a in zip(classes, accs)])
    grids, plots = _figures(paths, classes) if classes else ("<p>No prepared data.</p>", "")
    teacher = f"{100 * ev['teacher_acc']:.2f}%" if "teacher_acc" in ev else "n/a"
    cert = "n/a (no weight decay, or not computed)"
    with contextlib.suppress(ArtifactError, KeyError, TypeError):
        pre = read_json(paths.metrics("pretrain"))
        cert = (f"all parameters {pre['kkt_certificate']:.3g}, final layer {pre['kkt_certificate_last']:.3g}, "
                f"free parameters {pre['kkt_certificate_free']:.3g}")
    devices = []
    for stage in STAGE_NAMES:
        with contextlib.suppress(ArtifactError, AttributeError, TypeError):
            devices.append(f"{stage} {read_json(paths.timings(stage)).get('device', 'cpu')}")
    params = html.escape(json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str))
    link = f'<p>MLflow run: <a href="{html.escape(run_url)}">{html.escape(run_url)}</a> (start <code>dsv ui</code>)</p>' \
        if run_url else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DSV report: {html.escape(dataset)}</title>
<style>{_CSS}</style></head><body>
<h1>Deep Support Vectors: run report</h1>
<p class="muted">dataset {html.escape(dataset)} · output folder {html.escape(str(paths.base))} ·
written {time.strftime("%Y-%m-%d %H:%M:%S")}</p>
{link}
<h2>Summary</h2>
<p>Teacher test accuracy: <b>{teacher}</b></p>
<p>Computed on: {html.escape(", ".join(devices)) if devices else "n/a"}</p>
<p>Teacher KKT certificate (relative stationarity residual at uniform λ = 1/(nω); 0 = a KKT point, where
DeepKKT's stationarity condition can hold): {html.escape(cert)}</p>
{per_class}
<h3>DSVs per class</h3>{_table(["init / IPC", "DSVs", "with λ = 0", *(classes or [])], kept) if kept else "<p>n/a</p>"}
<h2>Results</h2>{_results(ev) if ev else "<p>No evaluation yet.</p>"}
<h2>Deep Support Vectors</h2>{grids}
<h2>The classifier as a generator</h2>{_generation(paths)}
<h2>Plots</h2>{plots}
<h2>Metrics</h2>{_metrics_tables(paths)}
<h2>Params</h2><pre>{params}</pre>
</body></html>
"""


def _latest_pipeline_run(client: Any, experiment_id: str, base: Path) -> Any:
    runs = client.search_runs(
        [experiment_id], f"tags.output_dir = '{base}' and tags.`dsv.kind` = 'pipeline'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0] if runs else None


def write_report(
    cfg: PipelineConfig, root: Path, out: Path | None = None, track: bool = True
) -> tuple[Path, str | None]:
    """Write the report (atomically) and log it to MLflow.

    Args:
        cfg: the run's config (locates the output folder and the MLflow experiment).
        root: project root.
        out: the HTML file; default ``<output_dir>/report.html``.
        track: log the report to MLflow.

    Returns:
        (the HTML path, the MLflow run id it was logged to or None).
    """
    paths = Paths((Path(root) / cfg.runtime.output_dir).resolve())
    out = Path(out) if out is not None else paths.base / REPORT_NAME
    run_id = url = None
    tracker = parent = None
    if track:
        from tasks.tracking import Tracker

        tracker = Tracker(Path(root), cfg.runtime.mlflow_experiment, cfg.runtime.log_models)
        parent = _latest_pipeline_run(tracker.client, tracker.experiment_id, paths.base)
        if parent is not None:
            run_id = parent.info.run_id
        else:
            run_id = tracker.start_run("report", tags={"output_dir": str(paths.base)})
        url = f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}"
    try:
        text = render(cfg, paths, url)
        write_text(out, text)
    except (ReportError, OSError) as exc:
        if tracker is not None and run_id is not None and parent is None:
            tracker.end_run(run_id, exc)
        raise ReportError(str(exc)) from exc
    if tracker is not None and run_id is not None:
        tracker.client.log_artifact(run_id, str(out), "report")
        if parent is None:
            tracker.end_run(run_id)
    return out, run_id
