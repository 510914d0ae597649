"""Stage ``evaluate``: summarise the students' runs into the results table.

Outputs (``artifacts/evaluate/``):

* ``results.json``: ``{"teacher_acc", "protocol", "rows": [...]}``, one row per (method, IPC): shots, protocol,
  label type, ``acc_mean``/``acc_std`` over the student seeds, ``accs``, ``val_acc_mean``, ``rank`` within its
  IPC (1 = best; rows of one IPC and label type compete), ``best``, DD-Ranking's label-robust score
  (``hlr_*``, ``ior_*``, ``lrs_*``, :func:`dsv.protocols.label_robust_score`) against the ``random`` row of the
  same IPC, and the second architecture's accuracy when ``distill.cross_model`` is set;
* ``results.md``: the table ranked within each IPC, the best marked;
* ``acc_vs_ipc.json``: accuracy per (method, IPC), a DVC plot;
* ``judge.json``: how the independent judge (stage ``judge``) sees every image training set (distilled or
  selected) and, per IPC, raw noise of the same size: accuracy on the intended class, mean confidence, and the
  Fréchet distance to as many real test images of the same classes (:func:`judge_sets`);
* ``metrics/accuracy.json``: every method's and the teacher's test accuracy in % (:func:`headline_metrics`), the
  one file DVC lists as metrics (``dvc metrics show``, ``dvc exp show``);
* ``metrics/evaluate.json``: flat scalars MLflow displays, ``acc.<method>_ipc<k>``,
  ``acc_std.<method>_ipc<k>``, ``lrs.<method>_ipc<k>``, ``judge_acc.<set>``, ``frechet.<set>``, ``teacher_acc``
  (:func:`flat_metrics`).

The label-robust score needs the accuracy of a model trained on all real data with hard labels: the
``full`` method's row when it ran, else the teacher's test accuracy (``lrs_reference`` says which).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from dsv.judge import judge_score, matched_real, nearest
from dsv.protocols import ResultRow, label_robust_score
from tasks.artifacts import load_model, load_split, load_tensors, read_data_meta, read_json
from tasks.atomic import write_json, write_text
from tasks.output import StageConfig, StageOutput, finish
from tasks.paths import Paths
from tasks.tracking import StageLog


def rows_from_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per cell: mean ± population std over the runs (never the max)."""
    rows = []
    for c in cells:
        if not c["runs"]:  # empty training set (see tasks.distill): no accuracy, said explicitly
            rows.append({"method": c["method"], "ipc": int(c["ipc"]), "shots": int(c["shots"]),
                         "protocol": c["protocol"], "label_type": c["label_type"], "acc_mean": None,
                         "acc_std": None, "n_runs": 0, "accs": [], "val_acc_mean": None, "n_train": 0,
                         "note": c.get("note", "")})
            continue
        row = ResultRow.from_results(
            c["method"], int(c["ipc"]), int(c["shots"]), c["protocol"], [r["test_acc"] for r in c["runs"]],
        ).to_dict()
        row.pop("wall_s", None)  # wall times live in timings/distill.json, never in a DVC-tracked file
        vals = [r["val_acc"] for r in c["runs"] if not math.isnan(r["val_acc"])]
        row["val_acc_mean"] = sum(vals) / len(vals) if vals else float("nan")
        row["n_train"] = int(c["n_train"])
        row["per_class"] = c.get("per_class")
        row["probe_acc"] = c.get("probe_acc")
        cross = [r["cross_acc"] for r in c["runs"] if r.get("cross_acc") is not None]
        if cross:
            row["cross_model"] = c.get("cross_model")
            row["cross_acc_mean"] = sum(cross) / len(cross)
            row["cross_acc_std"] = math.sqrt(sum((a - row["cross_acc_mean"]) ** 2 for a in cross) / len(cross))
        rows.append(row)
    return rows


def add_scores(rows: list[dict[str, Any]], teacher_acc: float) -> list[dict[str, Any]]:
    """Rank rows within each (IPC, label type), mark the best, and add the label-robust score."""
    full = next((r for r in rows if r["method"] == "full" and r["acc_mean"] is not None), None)
    real_acc, reference = (full["acc_mean"], "full") if full else (teacher_acc, "teacher")
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] != "full":
            groups.setdefault((r["ipc"], r["label_type"]), []).append(r)
    for r in rows:
        r["rank"], r["best"] = None, False
        for key in ("hlr_mean", "hlr_std", "ior_mean", "ior_std", "lrs_mean", "lrs_std"):
            r[key] = None
    for members in groups.values():
        scored = sorted((r for r in members if r["acc_mean"] is not None), key=lambda r: -r["acc_mean"])
        for i, r in enumerate(scored):
            r["rank"] = 1 + sum(1 for o in scored[:i] if o["acc_mean"] > r["acc_mean"])  # ties share a rank
            r["best"] = r["rank"] == 1
        random = next((r for r in members if r["method"] == "random" and r["accs"]), None)
        for r in scored:
            if random is None:
                continue
            s = label_robust_score(r["accs"], random["accs"], real_acc)
            r.update({"hlr_mean": s.hlr_mean, "hlr_std": s.hlr_std, "ior_mean": s.ior_mean, "ior_std": s.ior_std,
                      "lrs_mean": s.lrs_mean, "lrs_std": s.lrs_std, "lrs_reference": reference})
    return rows


def flat_metrics(teacher_acc: float, rows: list[dict[str, Any]], judged: list[dict[str, Any]] | None = None
                 ) -> dict[str, Any]:
    """The DVC/MLflow metrics: one level of nesting, scalars only (``dvc metrics show``/``dvc exp show``
    print ``acc.dsv_nshot_ipc10``...); rows without runs are left out. ``judged`` (:func:`judge_sets`) adds
    ``judge_acc.<set>`` and ``frechet.<set>``."""
    out: dict[str, Any] = {"teacher_acc": teacher_acc, "acc": {}, "acc_std": {}, "lrs": {}}
    for r in rows:
        if r["acc_mean"] is None:
            continue
        key = f"{r['method']}_ipc{r['ipc']}" + ("_soft" if r["label_type"] == "soft" else "")
        out["acc"][key] = r["acc_mean"]
        out["acc_std"][key] = r["acc_std"]
        if r.get("lrs_mean") is not None:
            out["lrs"][key] = r["lrs_mean"]
        if r.get("cross_acc_mean") is not None:
            out.setdefault("cross_acc", {})[key] = r["cross_acc_mean"]
    for j in judged or ():
        out.setdefault("judge_acc", {})[j["set"]] = j["judge_acc"]
        out.setdefault("frechet", {})[j["set"]] = j["frechet"]
        if not math.isnan(j["collapse"]):  # undefined at one image per class
            out.setdefault("collapse", {})[j["set"]] = j["collapse"]
    return {k: v for k, v in out.items() if v != {}}


def headline_metrics(teacher_acc: float, rows: list[dict[str, Any]]) -> dict[str, float]:
    """``metrics/accuracy.json``, the one file DVC lists as metrics: test accuracy in % (two decimals) per
    ``<method>_ipc<k>`` (the keys of :func:`flat_metrics`'s ``acc``), and ``teacher``. Flat and short, so the
    column names of ``dvc metrics show`` and ``dvc exp show`` stay narrow."""
    acc = flat_metrics(teacher_acc, rows).get("acc", {})
    return {**{k: round(100 * v, 2) for k, v in acc.items()}, "teacher": round(100 * teacher_acc, 2)}


def _pct(v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def judge_markdown(judged: list[dict[str, Any]]) -> str:
    """The judge table (empty when nothing was judged)."""
    if not judged:
        return ""
    lines = ["", "Independent judge (stage `judge`, never the teacher) on each training set: accuracy on the intended",
             "class, mean confidence, Fréchet distance of its features to as many real test images of the same classes",
             "(lower = closer to real; `real_test` is a second real draw, the floor at this size; `noise` the ceiling);",
             "cos: the mean within-class cosine of its judge features (1 = each class is copies of one image; `real`: the",
             "same for real images of those classes); collapse: that cosine around the real class mean (real images ≈ 0,",
             "copies 1: one mode per class); nearest: mean pixel distance (normalised units) to the nearest training",
             "image (a copy of one has 0); 1-NN acc: a judge of another family, the label of that nearest training image.",
             "", "| set | IPC | images | judge acc (%) | 1-NN acc (%) | judge conf | Fréchet | cos | real cos | collapse "
             "| nearest |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for j in sorted(judged, key=lambda j: (j["ipc"], j["frechet"])):
        lines.append(f"| {j['method']} | {j['ipc']} | {j['n']} | {100 * j['judge_acc']:.1f} | {100 * j['knn_acc']:.1f} | "
                     f"{j['judge_conf']:.3f} | "
                     f"{j['frechet']:.1f} | {j['intra_class_cos']:.3f} | {j['real_intra_class_cos']:.3f} | "
                     f"{j['collapse']:.3f} | {j['nearest_train']:.2f} |")
    return "\n".join(lines) + "\n"


def _images(r: dict[str, Any]) -> str:
    """``n_train`` with the per-class counts when they are not all equal."""
    per = r.get("per_class") or []
    if not per or min(per) == max(per):
        return str(r["n_train"])
    return f"{r['n_train']} ({min(per)}-{max(per)} per class)"


def markdown(teacher_acc: float, rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table (accuracies in %), ranked within each IPC, the best in bold."""
    cross = any(r.get("cross_acc_mean") is not None for r in rows)
    protocols = sorted({f"{r['protocol']} ({r['label_type']} labels)" for r in rows})
    head = "| rank | method | IPC | images | shots | test acc (%) | probe (%) | LRS (%) | runs | val acc (%) |"
    sep = "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if cross:
        head, sep = head + " second architecture (%) |", sep + "---:|"
    lines = [f"Teacher test accuracy: {100 * teacher_acc:.2f}%; student protocol: {', '.join(protocols)}", "",
             head, sep]
    ordered = sorted(rows, key=lambda r: (r["method"] == "full", r["label_type"], r["ipc"],
                                          r["rank"] if r.get("rank") is not None else 1 << 30))
    for r in ordered:
        if r["n_runs"] == 0:
            acc = f"n/a ({r.get('note', 'no runs')})"
        else:
            acc = _pct(r["acc_mean"], r["acc_std"])
            acc = f"**{acc}**" if r.get("best") else acc
        rank = "" if r.get("rank") is None else str(r["rank"])
        line = (f"| {rank} | {r['method']} | {r['ipc']} | {_images(r)} | {r['shots']} | {acc} | "
                f"{_pct(r.get('probe_acc'))} | {_pct(r.get('lrs_mean'), r.get('lrs_std'))} | {r['n_runs']} | "
                f"{_pct(r.get('val_acc_mean'))} |")
        if cross:
            line += f" {_pct(r.get('cross_acc_mean'), r.get('cross_acc_std'))} |"
        lines.append(line)
    ref = next((r.get("lrs_reference") for r in rows if r.get("lrs_reference")), None)
    lines += ["", "Mean ± population std over the student seeds; rank within each IPC (1 = best, in bold). images: the "
              "training set's size (IPC × classes). shots: real training images per class the method saw. probe: "
              "the teacher's final layer refitted on the set's teacher features (a linear probe). LRS: "
              "DD-Ranking's label-robust score against the random row of the same IPC and seeds (higher is better; "
              "26.89 = no gain over random and no gap to real data; real-data accuracy from "
              f"{'the full method' if ref == 'full' else 'the teacher'}). Wall times per cell: timings/distill.json."]
    return "\n".join(lines) + "\n"


def judge_sets(paths: Paths, rows: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The judge's view of every image set the students were trained on (one per (method, IPC) with a hard-label
    set of images), plus raw noise of the IPC's size: ``{"set", "method", "ipc", "n", "judge_acc", "judge_conf",
    "frechet"}``. Each set's reference is a seeded draw of real test images with the set's class counts; the
    ``real_test`` row per IPC is a second, disjoint draw: the Fréchet floor at that size."""
    meta = read_data_meta(paths.data_meta)
    if len(meta.input_shape) != 3:
        return []
    judge = load_model(paths.judge, paths.judge_spec)
    x_test, y_test = load_split(paths.test, meta)
    x_train, y_train = load_split(paths.train, meta)
    lo, hi = (b.view(1, -1, 1, 1) for b in meta.bounds())
    out: list[dict[str, Any]] = []
    for ipc in sorted({int(r["ipc"]) for r in rows}):
        g = torch.Generator().manual_seed(seed + ipc)
        y_ref = torch.arange(meta.num_classes).repeat_interleave(ipc)
        sets: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []
        for r in rows:
            f = paths.distill_set(r["method"], r["ipc"])
            if r["ipc"] != ipc or r["label_type"] != "hard" or not f.is_file():
                continue
            t = load_tensors(f, ("x", "y"))
            if t["y"].dim() == 1 and t["y"].numel() >= 2:
                sets.append((f"{r['method']}_ipc{ipc}", r["method"], t["x"], t["y"]))
        if not sets:
            continue
        try:
            ref = matched_real(y_ref, y_test, g)
            taken = torch.zeros_like(y_test, dtype=torch.bool)
            taken[ref] = True
            second = matched_real(y_ref, y_test, g, exclude=taken)
        except ValueError:  # too few test images per class for two disjoint draws of this size
            continue
        sets.append((f"real_test_ipc{ipc}", "real_test", x_test[second], y_ref))
        sets.append((f"noise_ipc{ipc}", "noise", torch.randn((y_ref.numel(), *meta.input_shape), generator=g)
                     .clamp(lo, hi), y_ref))
        for name, method, x, y in sets:
            reference = x_test[matched_real(y, y_test, torch.Generator().manual_seed(seed + ipc))]
            s = judge_score(judge, x, y, reference)
            dist, idx = nearest(x, x_train)
            hard = y.argmax(1) if y.dim() == 2 else y
            out.append({"set": name, "method": method, "ipc": ipc, "n": s.n, "judge_acc": s.acc,
                        "judge_conf": s.conf, "frechet": s.frechet, "intra_class_cos": s.intra_class_cos,
                        "real_intra_class_cos": s.real_intra_class_cos, "collapse": s.collapse,
                        "nearest_train": float(dist.mean()),
                        "knn_acc": float((y_train[idx] == hard).double().mean())})
    return out


def run(cfg: StageConfig, paths: Paths, log: StageLog) -> StageOutput:
    """Build the table; see the module docstring."""
    started = time.perf_counter()
    teacher_acc = float(read_json(paths.metrics("pretrain"))["test_acc"])
    cells = read_json(paths.distill_runs)
    rows = add_scores(rows_from_cells(cells), teacher_acc)
    judged = judge_sets(paths, rows)
    write_json(paths.judge_table, judged)
    write_text(paths.results_table, markdown(teacher_acc, rows) + judge_markdown(judged))
    write_json(paths.results_json, {"teacher_acc": teacher_acc, "protocol": next((c["protocol"] for c in cells), None),
                                    "rows": rows})
    write_json(paths.results_plot, [{"method": r["method"], "ipc": r["ipc"], "acc": r["acc_mean"]}
                                    for r in rows if r["acc_mean"] is not None and r["method"] != "full"])
    metrics = flat_metrics(teacher_acc, rows, judged)
    write_json(paths.headline, headline_metrics(teacher_acc, rows))
    log.metric("teacher_acc", teacher_acc)
    log.artifact(paths.results_table)
    return finish("evaluate", cfg, paths, [paths.results_table, paths.results_json, paths.results_plot,
                                           paths.judge_table, paths.headline], metrics, started)
