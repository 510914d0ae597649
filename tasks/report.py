"""``dsv report``: one self-contained HTML file describing the last run of an output folder, and the
ranked results table that the report, the end-of-run summary and the MLflow pipeline run's description share.

Everything is read back from the artifacts (``metrics/*.json``, ``artifacts/*``), so the report shows exactly
what is on disk: results first (ranked, readable method names, Δ against the best and against random), then the
DSVs, the classifier as a generator, the teacher, the training plots; every metric and the resolved params are
folded away at the end. Images are embedded as palette PNGs, so the file opens anywhere without its folder and
stays under :data:`MAX_BYTES`. The caller logs it to MLflow (``flows.cli``: the pipeline run that computed the
results). Reads only: no stage artifact is changed.
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
MAX_BYTES = 1_000_000  # the report's size budget (tests/faults/test_user_view.py)

# What each method's training set is, in words (the tables keep the identifier beside it).
METHOD_LABELS: dict[str, str] = {
    "dsv_nshot": "DSV from random real images (n-shot)",
    "dsv_0shot": "DSV from another dataset's images (0-shot)",
    "dsv_noise": "DSV from noise",
    "dsv_herding": "DSV from herding's picks",
    "dsv_kcenter": "DSV from k-center's picks",
    "dsv_kkt_herding": "DSV from KKT-herding's picks",
    "lambda_topk": "top-λ real images (core-set)",
    "support_topk": "top-support-score real images (core-set)",
    "random": "random real images",
    "herding": "herding's real picks",
    "kcenter": "k-center's real picks",
    "kkt_herding": "KKT-herding's real picks",
    "forgetting": "most-forgotten real images",
    "el2n": "highest-EL2N real images",
    "entropy": "highest-entropy real images",
    "least_confidence": "least-confident real images",
    "margin": "smallest-margin real images",
    "dm": "distribution matching (DM)",
    "full": "all training images",
}


class ReportError(RuntimeError):
    """Nothing to report (no run in the output folder) or the report cannot be written."""


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def ranked_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The result rows with an accuracy, each group (IPC, label type) best first and the ``full`` reference
    last, each with ``label`` (the method in words), ``delta_best`` (accuracy minus the group's best, ≤ 0) and
    ``delta_random`` (minus the group's ``random`` row; None without one), as fractions like ``acc_mean``."""
    scored = [dict(r) for r in rows if r.get("acc_mean") is not None]
    groups: dict[tuple[Any, Any], list[dict[str, Any]]] = {}
    for r in scored:
        if r["method"] != "full":
            groups.setdefault((r["ipc"], r.get("label_type")), []).append(r)
    for members in groups.values():
        best = max(r["acc_mean"] for r in members)
        random = next((r["acc_mean"] for r in members if r["method"] == "random"), None)
        for r in members:
            r["delta_best"] = r["acc_mean"] - best
            r["delta_random"] = None if random is None else r["acc_mean"] - random
    for r in scored:
        r["label"] = method_label(r["method"])
        r.setdefault("delta_best", None)
        r.setdefault("delta_random", None)
    return sorted(scored, key=lambda r: (r["method"] == "full", r.get("label_type") or "", r["ipc"],
                                         -r["acc_mean"]))


def _pct(v: Any, std: Any = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def _delta(v: Any) -> str:
    return "" if v is None else f"{100 * v:+.2f}"


def ranked_markdown(results: dict[str, Any]) -> str:
    """The ranked results (``artifacts/evaluate/results.json``) as markdown: one line naming the best set of
    each IPC, then the table (percentages; Δ in percentage points against the best and against random real
    images). The MLflow pipeline run's description."""
    rows = ranked_rows(results.get("rows", []))
    n_runs = sorted({int(r["n_runs"]) for r in rows if r.get("n_runs")})
    teacher = results.get("teacher_acc")
    winners = []
    for r in rows:
        if r.get("rank") == 1:
            random = "" if r["delta_random"] is None else f", {_delta(r['delta_random'])} pp over random real images"
            winners.append(f"IPC {r['ipc']}: **{r['label']}** (`{r['method']}`) {_pct(r['acc_mean'])}%{random}")
    lines = [f"**Best training set** ({'; '.join(winners) or 'none yet'}){'.' if not teacher else ''}"
             + (f"; the teacher: {100 * teacher:.2f}%." if teacher else ""), "",
             # (no-break spaces: a header wider than the numbers keeps them apart from the next column)
             "| rank | method | IPC | test\u00a0accuracy\u00a0(%) | Δ vs best (pp) | Δ vs random (pp) "
             "| real images per class seen |",
             "|---:|---|---:|---:|:---:|:---:|:---:|"]
    for r in rows:
        acc = _pct(r["acc_mean"], r.get("acc_std")).replace(" ", "\u00a0")  # never wrapped inside a number
        lines.append(f"| {'' if r.get('rank') is None else r['rank']} | {r['label']} (`{r['method']}`) | {r['ipc']} | "
                     f"{f'**{acc}**' if r.get('best') else acc} | {_delta(r['delta_best'])} | "
                     f"{_delta(r['delta_random'])} | {r.get('shots', '')} |")
    lines += ["", f"Students trained on each method's images, test accuracy as mean ± std over "
              f"{'/'.join(map(str, n_runs)) or 'n/a'} seeds, ranked within each IPC (images per class); Δ in "
              "percentage points. One child run per row (`acc_pct`, `delta_best_pct`, `delta_random_pct`, its "
              "training set as `training_set.png`); `dsv report` writes the full report."]
    return "\n".join(lines) + "\n"


def _png_bytes(data: bytes, alt: str, scale: float = 1.0) -> str:
    """PNG bytes as an ``<img>`` tag, re-encoded with a 64-colour palette (grey image grids and line plots lose
    nothing visible; the report stays small), ``scale`` times its size."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        rgb = img.convert("RGB")
        if scale < 1.0:
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.LANCZOS)
        rgb.quantize(colors=64).save(out, format="PNG", optimize=True)
    encoded = base64.b64encode(out.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _png(fig: Any, alt: str = "figure", scale: float = 1.0) -> str:
    """A matplotlib figure as an embedded PNG at ``scale`` × 90 dpi (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90 * scale)
    finally:
        plt.close(fig)
    return _png_bytes(buf.getvalue(), alt)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    if v is None:
        return "n/a"
    return str(v)


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], numeric_from: int = 99) -> str:
    """An HTML table; columns from ``numeric_from`` on are right-aligned."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i >= numeric_from else ""}>{html.escape(_fmt(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _results(res: dict[str, Any], scale: float = 1.0) -> str:
    """The ranked results (best in bold), Δ against the best and against random, the label-robust score, and a
    bar chart."""
    from tasks.figures import ranked_bars

    rows = ranked_rows(res.get("rows", []))
    head = ["rank", "method", "IPC", "real images / class seen", "test acc (%)", "Δ best", "Δ random",
            "label-robust score (%)", "seeds"]
    body = []
    for r in rows:
        acc = html.escape(_pct(r["acc_mean"], r.get("acc_std")))
        cells = ["" if r.get("rank") is None else str(r["rank"]),
                 f"{html.escape(r['label'])} <code>{html.escape(r['method'])}</code>", str(r["ipc"]),
                 html.escape(str(r.get("shots", ""))), f"<b>{acc}</b>" if r.get("best") else acc,
                 _delta(r["delta_best"]), _delta(r["delta_random"]), html.escape(_pct(r.get("lrs_mean"))),
                 html.escape(str(r.get("n_runs", "")))]
        body.append("<tr>" + "".join(f'<td{" class=n" if i != 1 else ""}>{c}</td>' for i, c in enumerate(cells))
                    + "</tr>")
    table = ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
             + "".join(body) + "</tbody></table>")
    chart = _png(ranked_bars(res.get("rows", []), "student test accuracy, best in red, DSV methods in blue"),
                 "bar chart of the results", scale)
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


def _figures(paths: Paths, classes: list[str], scale: float = 1.0) -> tuple[str, str]:
    """(DSV grids section, plots section) as HTML."""
    from tasks.figures import curves, image_grid, lam_histograms

    grids = []
    if paths.dsv_parquet.is_file():
        t = read_dsv_parquet(paths.dsv_parquet)
        for init, ipc in sorted({(a, b) for a, b in zip(t.init, t.ipc)}):
            sel = [i for i, (a, b) in enumerate(zip(t.init, t.ipc)) if a == init and b == ipc]
            if sel and t.x.dim() == 4:
                fig = image_grid(t.x[sel], t.y[sel], classes, f"DSVs: {init}, IPC {ipc}")
                grids.append(f'<figure class="grid">{_png(fig, "DSV grid", scale)}<figcaption>{html.escape(init)}, IPC {ipc}: '
                             f"{len(sel)} DSVs</figcaption></figure>")
    plots = []
    if paths.pretrain_curve.is_file():
        c = read_json(paths.pretrain_curve)
        if c:
            plots.append(_png(curves({"loss": ([r["step"] for r in c], [r["loss"] for r in c])}, "step", "loss",
                                     "teacher training loss"), "loss curve", scale))
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
            plots.append(_png(curves(series, "step", "mean entropy (nats)", "candidate entropy"), "entropy", scale))
    if paths.lambdas_parquet.is_file():
        lt = read_lambdas_parquet(paths.lambdas_parquet)
        if lt.lam.numel():
            plots.append(_png(lam_histograms(lt.lam, lt.label, classes), "λ histograms", scale))
    return "".join(grids) or "<p>No DSVs on disk.</p>", "".join(plots) or "<p>No plots.</p>"


def _generation(paths: Paths, scale: float = 1.0) -> str:
    """The generate stage's pictures (embedded from artifacts/generate) and the judge's view of the samples and of
    every training set (artifacts/evaluate/judge.json)."""
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
            parts.append(f"<figure>{_png_bytes(f.read_bytes(), name, scale)}<figcaption>{caption}</figcaption></figure>")
    with contextlib.suppress(ArtifactError):
        judged = read_json(paths.judge_table)
        if judged:
            parts.append("<h3>The judge on every training set</h3>" + _table(
                ["set", "IPC", "images", "judge acc %", "judge conf", "Fréchet"],
                [[j["method"], j["ipc"], j["n"], f"{100 * j['judge_acc']:.1f}", f"{j['judge_conf']:.3f}",
                  f"{j['frechet']:.1f}"] for j in sorted(judged, key=lambda j: (j["ipc"], j["frechet"]))]))
    return "".join(parts) or "<p>No generation yet.</p>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}th{background:#f0f0f0}figure.grid{display:inline-block;margin:.5em}
img{max-width:100%}pre{background:#f7f7f7;padding:1em;overflow:auto}.muted{color:#777}p.lead{margin-top:0}
nav ol{columns:2}summary{cursor:pointer;color:#0645ad}code{font-size:.85em;color:#555}
"""

# (anchor, title, the one sentence that says what the section shows)
SECTIONS = (
    ("results", "Results", "Students trained on each method's images, ranked by test accuracy within each IPC "
     "(images per class); Δ is in percentage points against the best row and against random real images."),
    ("dsvs", "Deep support vectors", "The distilled images per class for each starting point, with how many the "
     "teacher's KKT conditions kept."),
    ("generation", "The classifier as a generator", "Images the teacher made from noise, between two classes and "
     "from real test images, scored by an independent judge."),
    ("teacher", "Teacher", "The trained classifier every set is distilled from: its accuracy and how close it is "
     "to a KKT point."),
    ("plots", "Training plots", "The teacher's training loss, the candidates' entropy during extraction and the "
     "fitted λ per class."),
    ("metrics", "All metrics", "Every scalar in metrics/<stage>.json, for reference."),
    ("params", "Params", "The resolved configuration this run used."),
)


def render(cfg: PipelineConfig, paths: Paths, run_url: str | None = None, scale: float = 1.0) -> str:
    """The report's HTML text (self-contained), its pictures ``scale`` times their size.

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
            per_class = "<h3>Accuracy per class</h3>" + _table(
                ["class", "test accuracy (%)"], [[c, f"{100 * a:.2f}"] for c, a in zip(classes, accs)], 1)
    grids, plots = _figures(paths, classes, scale) if classes else ("<p>No prepared data.</p>", "")
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
    link = (f' · <a href="{html.escape(run_url)}">MLflow run</a> (start <code>dsv ui</code>)' if run_url else "")
    body = {
        "results": _results(ev, scale) if ev else "<p>No evaluation yet.</p>",
        "dsvs": (_table(["init / IPC", "DSVs", "with λ = 0", *classes], kept, 1) if kept else "") + grids,
        "generation": _generation(paths, scale),
        "teacher": f"""<p>Test accuracy <b>{teacher}</b>. KKT certificate (relative stationarity residual at
uniform λ = 1/(nω); 0 = a KKT point, where DeepKKT's stationarity condition can hold): {html.escape(cert)}.
Computed on: {html.escape(", ".join(devices)) if devices else "n/a"}.</p>{per_class}""",
        "plots": plots or "<p>No plots.</p>",
        "metrics": f"<details><summary>show every metric</summary>{_metrics_tables(paths)}</details>",
        "params": f"<details><summary>show the params</summary><pre>{params}</pre></details>",
    }
    toc = "".join(f'<li><a href="#{key}">{html.escape(title)}</a></li>' for key, title, _ in SECTIONS)
    sections = "\n".join(f'<h2 id="{key}">{html.escape(title)}</h2>\n<p class="lead">{html.escape(sentence)}</p>\n'
                          f"{body[key]}" for key, title, sentence in SECTIONS)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>DSV report: {html.escape(dataset)}</title>
<style>{_CSS}</style></head><body>
<h1>Deep Support Vectors: {html.escape(dataset)}</h1>
<p class="muted">written {time.strftime("%Y-%m-%d %H:%M:%S")} from the artifacts of this output folder{link}</p>
<nav><ol>{toc}</ol></nav>
{sections}
</body></html>
"""


def write_report(cfg: PipelineConfig, root: Path, out: Path | None = None, run_url: str | None = None) -> Path:
    """Write the report atomically (default ``<output_dir>/report.html``) and return its path; over
    :data:`MAX_BYTES`, its pictures are redrawn smaller until it fits.

    Raises:
        ReportError: nothing to report, or the file cannot be written.
    """
    paths = Paths((Path(root) / cfg.runtime.output_dir).resolve())
    out = Path(out) if out is not None else paths.base / REPORT_NAME
    try:
        scale = 1.0
        text = render(cfg, paths, run_url, scale)
        while len(text.encode()) > MAX_BYTES and scale > 0.2:
            scale *= 0.7
            text = render(cfg, paths, run_url, scale)
        write_text(out, text)
    except (ReportError, OSError) as exc:
        raise ReportError(str(exc)) from exc
    return out
