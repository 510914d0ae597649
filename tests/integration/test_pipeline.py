"""End to end: the Prefect flow with real caching, MLflow on SQLite, DVC in a git repo, a schedule.

The tests of this module share one tiny project and run in order: first run, unchanged re-run,
evaluation-param change, deleted artifact. The DVC/code-edit and schedule tests work on copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from tests.integration.conftest import ROOT, TINY_DSV_ROWS, TINY_TRAIN, copy_project

pytestmark = pytest.mark.slow

STAGES = ("prepare", "pretrain", "judge", "extract", "coreset", "distill", "generate", "evaluate")
DEVICE_STAGES = ("pretrain", "judge", "extract", "coreset", "distill", "generate")
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # runtime.device: auto


def _stage_of(task_run_name: str) -> str:
    return task_run_name.split("-")[0]


def task_states(flow_run_id: Any) -> list[tuple[str, str]]:
    """(task run name, state name) of every task run of a flow run, from the Prefect API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    def read() -> list[tuple[str, str]]:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return sorted((r.name, r.state.name if r.state else "?") for r in runs)

    # Task states reach the server as events, after the flow returned: read until two reads a second apart agree.
    last, deadline = read(), time.monotonic() + 15
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = read()
        if now == last:
            break
        last = now
    return last


def stages_by_state(states: list[tuple[str, str]]) -> dict[str, set[str]]:
    """stage -> set of state names of its task runs."""
    out: dict[str, set[str]] = {}
    for name, state in states:
        out.setdefault(_stage_of(name), set()).add(state)
    return out


def run_in_process(project: Path, overrides: tuple[str, ...] = ()) -> tuple[dict, list[tuple[str, str]]]:
    from flows.pipeline import pipeline

    state = pipeline(params_path="params.yaml", overrides=list(overrides), root=str(project), return_state=True)
    assert state.is_completed(), state.message
    return state.result(), task_states(state.state_details.flow_run_id)


def tree_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of the files under ``folder`` (DVC's own .gitignore files excluded)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".gitignore"
    }


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    project = copy_project(tmp_path_factory.mktemp("dvcrepo"))
    # the project's own .gitignore (local state, timings, dvc_plots/), and its DVC plots page (.dvc/config)
    (project / ".gitignore").write_text((ROOT / ".gitignore").read_text() + "/.dvc-site-cache/\n")
    env = _env(project, prefect_api)
    _sh(["git", "init", "-q"], project, env)
    _sh([sys.executable, "-m", "dvc", "init", "-q"], project, env)
    template = re.search(r"^\s*html_template\s*=\s*(\S+)", (ROOT / ".dvc/config").read_text(), re.M)
    assert template is not None, "the project's .dvc/config names no plots.html_template"
    shutil.copy(ROOT / ".dvc" / template.group(1), project / ".dvc" / template.group(1))
    _sh([sys.executable, "-m", "dvc", "config", "plots.html_template", template.group(1)], project, env)
    _sh(["git", "add", "-A"], project, env)
    _sh(["git", "commit", "-q", "-m", "tiny project"], project, env)
    return project



@pytest.fixture(scope="module")
def project(repo: Path) -> Path:
    """The in-process tests run in the same git+DVC repository the DVC tests use."""
    return repo


@pytest.fixture(scope="module")
def first(project: Path) -> dict:
    t0 = time.perf_counter()
    summary, states = run_in_process(project)
    return {"summary": summary, "states": states, "seconds": time.perf_counter() - t0}


def flow_run_of(summary_states: Any) -> Any:
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]


def test_first_run_end_to_end(project: Path, first: dict) -> None:
    from flows.pipeline import run_name
    from tasks.config import load_config

    # the flow run is named after the configuration (the MLflow pipeline run's name, URL-friendly)
    assert flow_run_of(first).name == run_name(load_config(project / "params.yaml")).replace(" · ", "-")
    assert flow_run_of(first).name.startswith("digits-")
    by_stage = stages_by_state(first["states"])
    assert set(by_stage) == set(STAGES)
    assert all(s == {"Completed"} for s in by_stage.values()), by_stage
    # extraction mapped over 6 inits x 1 IPC x 2 shards, distill over one cell per method, plus the merges
    from dsv.protocols import METHOD_NAMES

    names = [n for n, _ in first["states"]]
    assert sum(n.startswith("extract-") and not n.endswith("merge") for n in names) == 12
    assert sum(n.startswith("distill-") and not n.endswith("merge") for n in names) == len(METHOD_NAMES)

    dsv = pd.read_parquet(project / "artifacts/extract/dsv.parquet")
    ex = json.loads((project / "metrics/extract.json").read_text())
    assert len(dsv) == TINY_DSV_ROWS == ex["n_dsv"]  # IPC per class for every init: nothing dropped
    assert sorted(dsv["init"].unique()) == ["0shot", "herding", "kcenter", "kkt_herding", "noise", "nshot"]
    assert dsv.groupby(["init", "label"]).size().le(2).all() and (dsv["lam"] >= 0).all()
    # a candidate whose λ ended at 0 fills its class's place and is counted (metrics/extract.json)
    assert int((dsv["lam"] == 0).sum()) == sum(m["lambda_zero"] for m in ex.values() if isinstance(m, dict))
    assert {"support", "margin"} <= set(dsv.columns) and (dsv["support"] >= 0).all()
    lam = pd.read_parquet(project / "artifacts/coreset/lambdas.parquet")
    assert len(lam) == TINY_TRAIN and lam.groupby("label")["rank"].min().eq(0).all()

    ev = json.loads((project / "artifacts/evaluate/results.json").read_text())
    assert 0.0 < ev["teacher_acc"] <= 1.0

    assert sorted(r["method"] for r in ev["rows"]) == sorted(METHOD_NAMES)
    for r in ev["rows"]:
        assert {"method", "ipc", "shots", "protocol", "acc_mean", "acc_std", "n_runs", "rank", "lrs_mean"} <= set(r)
        assert r["n_runs"] == 2 and 0.0 <= r["acc_mean"] <= 1.0
        if r["method"] != "full":  # every set, DSVs included, trains on IPC images of every class
            assert r["n_train"] == 2 * 10 and r["per_class"] == [2] * 10, (r["method"], r["per_class"])
            assert 0.0 <= r["probe_acc"] <= 1.0
    # DVC-readable metrics: scalars one level deep, no wall times (they live in timings/)
    flat = json.loads((project / "metrics/evaluate.json").read_text())
    assert set(flat["acc"]) == {f"{r['method']}_ipc{r['ipc']}" for r in ev["rows"]}
    # the one file DVC lists as metrics: every method's accuracy in %, and the teacher's
    headline = json.loads((project / "metrics/accuracy.json").read_text())
    assert set(headline) == set(flat["acc"]) | {"teacher"}
    assert all(headline[k] == round(100 * v, 2) for k, v in flat["acc"].items())
    for stage in STAGES:
        assert "seconds" not in (project / f"metrics/{stage}.json").read_text()
        timings = json.loads((project / f"timings/{stage}.json").read_text())
        assert "wall_seconds" in timings
        assert timings["device"] == (_DEVICE if stage in DEVICE_STAGES else "cpu"), stage  # the resolved device
    table = (project / "artifacts/evaluate/results.md").read_text()
    assert "student protocol: dd (hard labels)" in table and all(f"| {m} | " in table for m in METHOD_NAMES)
    for stage in STAGES:
        assert (project / f"artifacts/{stage}/params.resolved.yaml").is_file()
    # the generate stage: samples, strips and edits in one table, pictures, the judge's scores
    gen = pd.read_parquet(project / "artifacts/generate/generated.parquet")
    assert gen["kind"].value_counts().to_dict() == {"sample": 10, "interpolation": 6, "edit": 3}
    strips = gen[gen["kind"] == "interpolation"]
    assert sorted(strips["delta"].unique()) == [0.0, 1.0] and (gen[gen["kind"] == "edit"]["source_index"] >= 0).all()
    assert all(abs(sum(p) - 1) < 1e-5 for p in gen["teacher_probs"]) and len(gen["judge_probs"][0]) == 10
    for name in ("samples", "interpolation", "edits"):
        assert (project / f"artifacts/generate/{name}.png").stat().st_size > 1000
    g = json.loads((project / "metrics/generate.json").read_text())
    assert {"samples_judge_acc", "samples_judge_frechet", "noise_judge_frechet", "real_judge_frechet",
            "edits_teacher_flip_rate", "strips_teacher_ends_acc"} <= set(g)
    judged = json.loads((project / "artifacts/evaluate/judge.json").read_text())
    assert {"random", "dsv_nshot", "real_test", "noise"} <= {j["method"] for j in judged}
    assert "judge_acc" in flat and "frechet" in flat


def _mlflow(project: Path) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def test_mlflow_has_parent_nested_runs_metrics_and_images(project: Path, first: dict) -> None:
    client = _mlflow(project)
    exp = client.get_experiment_by_name("dsv")
    assert exp is not None and exp.artifact_location == (project / "mlartifacts").as_uri()
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's model-training view
    parent_id = first["summary"]["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["git.commit"]
    assert parent.info.run_name.startswith("digits · ") and len(parent.info.run_name) == len("digits · ") + 8
    assert "teacher_acc_pct" in parent.data.metrics and "extract.solver.steps" in parent.data.params
    assert not any(k.startswith("acc") for k in parent.data.metrics), "per-method metrics belong to result runs"
    # no absolute path of the project in any tag or param (a copied or moved project keeps making sense)
    for r in client.search_runs([exp.experiment_id]):
        values = [*r.data.tags.values(), *r.data.params.values()]
        assert not [v for v in values if str(project) in v], r.info.run_name
    assert parent.data.tags["output_dir"] == "." and parent.data.tags["params_file"] == "params.yaml"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {r.info.run_name: r for r in children if r.data.tags.get("stage")}
    assert set(by_name) == set(STAGES)
    for stage, run in by_name.items():
        assert run.info.status == "FINISHED" and run.data.tags["cached"] == "false", stage
        assert run.data.tags["device"] == (_DEVICE if stage in DEVICE_STAGES else "cpu"), stage
        assert not any(k.startswith("sha256.") for k in run.data.tags), stage
        assert "artifact_hashes.json" in [f.path for f in client.list_artifacts(run.info.run_id)], stage
    # One run per result cell, with its own params and metrics in percent: MLflow's table ranks the methods.
    from dsv.protocols import METHOD_NAMES
    from tasks.report import METHOD_LABELS

    results = [r for r in children if r.data.tags.get("dsv.kind") == "result"]
    assert sorted(r.data.params["method"] for r in results) == sorted(METHOD_NAMES)
    ev = {r["method"]: r for r in json.loads((project / "artifacts/evaluate/results.json").read_text())["rows"]}
    random_acc = ev["random"]["acc_mean"]
    for r in results:
        method = r.data.params["method"]
        assert r.info.run_name == f"{method} · IPC {r.data.params['ipc']}"
        assert r.data.params["method_name"] == METHOD_LABELS[method]
        assert r.data.metrics["acc_pct"] == pytest.approx(100 * ev[method]["acc_mean"], abs=1e-3)
        assert {"acc_std_pct", "n_runs"} <= set(r.data.metrics), method
        assert not any(k in r.data.metrics for k in ("acc_mean", "acc_std")), "fractions are logged as percent"
        assert r.data.params["labels"] == "hard"
        assert ("rank" in r.data.metrics) == (method != "full")  # full is the reference, unranked
        if method != "full":  # the reference: no rank, no Δ
            assert r.data.metrics["delta_best_pct"] <= 0
            assert r.data.metrics["delta_random_pct"] == pytest.approx(100 * (ev[method]["acc_mean"] - random_acc),
                                                                       abs=1e-3)
            # one picture name in every result run: Compare shows the sets side by side
            assert [f.path for f in client.list_artifacts(r.info.run_id)] == ["training_set.png"], method
        assert set(r.data.params) == {"method", "method_name", "ipc", "shots", "protocol", "labels", "n_train"}
    ranked = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                "tags.`dsv.kind` = 'result'", order_by=["metrics.acc_pct DESC"])
    accs = [r.data.metrics["acc_pct"] for r in ranked]
    assert accs == sorted(accs, reverse=True) and ranked[0].data.metrics["rank"] == 1
    # the pipeline run's description is the ranked table, best first, in percent, with readable names
    note = parent.data.tags["mlflow.note.content"]
    table = [line for line in note.splitlines() if line.startswith("| ") and "(`" in line]
    assert len(table) == len(METHOD_NAMES)
    best = max((r for r in ev.values() if r["method"] != "full"), key=lambda r: r["acc_mean"])
    assert f"{100 * best['acc_mean']:.2f}" in table[0] and table[0].startswith("| 1 |")
    assert f"{METHOD_LABELS['dsv_herding']} (`dsv_herding`)" in note
    assert len(client.get_metric_history(by_name["pretrain"].info.run_id, "train_loss")) >= 2
    assert any(k.endswith("/entropy") for k in by_name["extract"].data.metrics)
    extract_files = [f.path for f in client.list_artifacts(by_name["extract"].info.run_id, "extract")]
    assert any(p.endswith(".png") and "dsv_grid" in p for p in extract_files)
    coreset_files = [f.path for f in client.list_artifacts(by_name["coreset"].info.run_id, "coreset")]
    assert {"coreset/lambda_hist.png", "coreset/sum_lambda_vs_acc.png"} <= set(coreset_files)
    assert "params.resolved.yaml" in [f.path for f in client.list_artifacts(by_name["distill"].info.run_id)]
    # Each cell's first-seed student is an artifact (logged to MLflow by the merge step when log_models).
    students = sorted(p.stem for p in (project / "artifacts" / "distill" / "students").glob("*.safetensors"))
    assert students and all((project / "artifacts" / "distill" / "students" / f"{s}.json").exists() for s in students)


def _store_size(project: Path) -> tuple[int, int]:
    """(runs in the MLflow store, bytes under mlartifacts/)."""
    import sqlite3

    with sqlite3.connect(project / "mlflow.db") as db:
        runs = db.execute("select count(*) from runs").fetchone()[0]
    return runs, sum(p.stat().st_size for p in (project / "mlartifacts").rglob("*") if p.is_file())


def test_unchanged_rerun_is_all_cache_hits(project: Path, first: dict) -> None:
    before = tree_hashes(project / "artifacts")
    store_before = _store_size(project)
    t0 = time.perf_counter()
    summary, states = run_in_process(project)
    seconds = time.perf_counter() - t0
    assert all(state == "Cached" for _, state in states), states
    assert all(v["cached"] for v in summary["stages"].values())
    assert tree_hashes(project / "artifacts") == before
    print(f"first run {first['seconds']:.1f} s, cached re-run {seconds:.1f} s")
    # nothing new in MLflow: no run, no upload; the summary names the pipeline run that computed the results
    assert _store_size(project) == store_before
    assert summary["mlflow_run_id"] == first["summary"]["mlflow_run_id"] and not summary["mlflow_new_run"]


def test_copied_project_reports_and_serves_its_own_store(project: Path, prefect_api: str, tmp_path: Path) -> None:
    """`cp -r` of a finished project: `dsv report` and `dsv ui` work in the copy, which writes only into itself."""
    import urllib.request

    before = tree_hashes(project)
    copy = tmp_path / "elsewhere" / "copy"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(project), str(copy)], check=True)
    env = _env(copy, prefect_api)
    out = _sh([sys.executable, "-m", "flows.cli", "report"], copy, env)
    exp = _mlflow(copy).get_experiment_by_name("dsv")
    assert exp is not None and exp.artifact_location == (copy / "mlartifacts").as_uri()
    summary_run = out.split("logged to MLflow run ")[1].split(":")[0]
    assert (copy / "mlartifacts" / summary_run / "artifacts" / "report" / "report.html").is_file()
    assert (copy / "report.html").is_file()
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=copy, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []  # the server's own log lines come first
        while ui.stdout and not (lines and lines[-1].startswith("dsv: ")):
            lines.append(ui.stdout.readline())
            assert lines[-1], "".join(lines)  # EOF: it exited
        assert lines[-1].startswith(f"dsv: MLflow UI on http://127.0.0.1:{port}"), "".join(lines)
        base = f"http://127.0.0.1:{port}"
        assert b"<html" in urllib.request.urlopen(base + "/", timeout=30).read().lower()
        run = json.loads(urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={summary_run}",
                                                timeout=30).read())["run"]
        assert run["info"]["artifact_uri"].startswith((copy / "mlartifacts").as_uri())
        report = urllib.request.urlopen(f"{base}/get-artifact?path=report/report.html&run_uuid={summary_run}",
                                        timeout=30).read()
        assert report == (copy / "report.html").read_bytes()  # served from the copy's own artifacts
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        rc = ui.wait(timeout=30)
    assert rc == 130
    assert tree_hashes(project) == before  # the original folder is untouched


def test_student_protocol_change_reruns_only_distill_and_evaluate(project: Path, first: dict) -> None:
    summary, states = run_in_process(project, ("distill.protocol.n_runs=1",))
    by_stage = stages_by_state(states)
    for stage in ("prepare", "pretrain", "extract", "coreset"):
        assert by_stage[stage] == {"Cached"}, (stage, by_stage)
    for stage in ("distill", "evaluate"):
        assert by_stage[stage] == {"Completed"}, (stage, by_stage)
    ev = json.loads((project / "artifacts/evaluate/results.json").read_text())
    assert {r["n_runs"] for r in ev["rows"]} == {1}


def test_generate_param_change_reruns_only_generate(project: Path, first: dict) -> None:
    run_in_process(project)  # back to the default params (an earlier test changed the students')
    before = tree_hashes(project / "artifacts/generate")
    summary, states = run_in_process(project, ("generate.recipe.steps=4",))
    by_stage = stages_by_state(states)
    assert by_stage["generate"] == {"Completed"}, by_stage
    assert all(by_stage[s] == {"Cached"} for s in STAGES if s != "generate"), by_stage
    assert tree_hashes(project / "artifacts/generate") != before
    summary, states = run_in_process(project, ("generate.recipe.steps=4",))
    assert stages_by_state(states)["generate"] == {"Cached"}


def test_deleted_or_corrupted_artifact_is_rebuilt(project: Path, first: dict) -> None:
    teacher = project / "artifacts/pretrain/teacher.safetensors"
    digest = hashlib.sha256(teacher.read_bytes()).hexdigest()
    teacher.unlink()
    shard = project / "artifacts/extract/shards/noise_ipc2_shard1.safetensors"
    shard_digest = hashlib.sha256(shard.read_bytes()).hexdigest()
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    summary, states = run_in_process(project)
    by_name: dict[str, set[str]] = {}
    for name, state in states:
        by_name.setdefault(name, set()).add(state)
    assert by_name["pretrain"] == {"Completed"}  # record found, artifact verified as missing: recomputed
    assert by_name["extract-noise_2_1_2"] == {"Completed"}
    assert hashlib.sha256(teacher.read_bytes()).hexdigest() == digest  # deterministic rebuild
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == shard_digest
    assert by_name["coreset"] == {"Cached"}  # its inputs (the teacher's hash) did not change
    assert not summary["stages"]["pretrain"]["cached"]


# ------------------------------------------------------------------------------- DVC + code edit


def _env(project: Path, api_url: str) -> dict[str, str]:
    # not this process's MLFLOW_TRACKING_URI (mlflow.set_tracking_uri sets it for the last store opened here):
    # a `dsv` in `project` uses the project's own store
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({
        "PYTHONPATH": str(project),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(project / ".dsv/prefect"),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(project / ".dvc-site-cache"),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
    })
    return env


def _sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def _latest_flow_run_states(api_url: str) -> list[tuple[str, str]]:
    from prefect import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    return task_states(runs[0].id)


def test_dvc_repro_matches_the_flow_and_skips_when_unchanged(repo: Path, prefect_api: str, first: dict) -> None:
    env = _env(repo, prefect_api)
    run_in_process(repo)  # the flow's artifacts for the default params (cache hits, verified)
    flow_artifacts = tree_hashes(repo / "artifacts")
    assert len(flow_artifacts) > 20
    store = _store_size(repo)
    t0 = time.perf_counter()
    out = _sh([sys.executable, "-m", "dvc", "repro"], repo, env, timeout=600)
    repro_seconds = time.perf_counter() - t0
    for stage in STAGES:  # no dvc.lock yet, so DVC runs every stage; each reuses the flow's finished work
        assert f"Running stage '{stage}'" in out
        assert f"dsv: stage {stage} restored from cache" in out, out[-3000:]
    assert tree_hashes(repo / "artifacts") == flow_artifacts  # same code path, identical bytes
    assert _store_size(repo) == store  # restored stages whose runs are in the store log nothing
    print(f"dvc repro after the flow: {repro_seconds:.1f} s, every stage restored")
    out = _sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage" not in out
    assert "up to date" in out or "didn't change" in out
    assert len(pd.read_parquet(repo / "artifacts/extract/dsv.parquet")) == TINY_DSV_ROWS


# The README's view of the experiments: what changed, and every method's accuracy (metrics/accuracy.json).
EXP_SHOW = ["exp", "show", "--no-pager", "--only-changed", "--drop", "Created|artifacts/", "--keep", ".*_ipc|teacher"]


def test_dvc_experiment_from_a_committed_baseline(repo: Path, prefect_api: str, tmp_path: Path) -> None:
    """The README's baseline (`git add dvc.lock metrics && git commit`), then `dvc exp run -S` computes through
    `dsv stage` from it; `dvc exp show` reads (every method's accuracy in at most 20 columns); `dvc plots show`
    renders offline; the flow with the same override then restores every stage; `dsv run` leaves `dvc status`
    clean."""
    env = _env(repo, prefect_api)
    _sh([sys.executable, "-m", "dvc", "repro"], repo, env, timeout=600)
    _sh(["git", "add", "dvc.lock", "metrics"], repo, env)
    _sh(["git", "commit", "-q", "-m", "baseline"], repo, env)
    out = _sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "distill.protocol.n_runs=1"], repo, env, timeout=600)
    assert "Running stage 'distill'" in out and "Running stage 'extract'" not in out
    assert "Running stage 'prepare'" not in out
    # `dsv stage evaluate` computed: its run (top-level, runner dvc) holds the result runs and the ranked table
    client = _mlflow(repo)
    evaluate = client.search_runs([client.get_experiment_by_name("dsv").experiment_id],
                                  "tags.runner = 'dvc' and tags.stage = 'evaluate'")
    assert len(evaluate) == 1 and "| 1 |" in evaluate[0].data.tags["mlflow.note.content"]
    results = client.search_runs([evaluate[0].info.experiment_id],
                                 f"tags.mlflow.parentRunId = '{evaluate[0].info.run_id}'")
    assert len(results) == len(json.loads((repo / "metrics/accuracy.json").read_text())) - 1  # minus the teacher
    assert all(r.data.params["n_train"] for r in results)
    shown = _sh([sys.executable, "-m", "dvc", *EXP_SHOW, "--md"], repo, env)
    lines = [line for line in shown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    methods = json.loads((repo / "metrics/accuracy.json").read_text())
    assert len(header) <= 20 and set(methods) <= set(header), header
    assert "distill.protocol.n_runs" in header  # the param that changed
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    baseline = next(k for k in rows if k in ("master", "main"))
    experiment = next(k for k in rows if k.startswith("└──"))
    for row in (baseline, experiment):  # numbers everywhere: the baseline is committed (no "!")
        assert all(float(rows[row][header.index(m)]) >= 0 for m in methods), rows[row]
    assert rows[experiment][header.index("distill.protocol.n_runs")] == "1"
    # dvc plots show: a page that carries Vega itself and draws every plot without a network
    _sh([sys.executable, "-m", "dvc", "plots", "show"], repo, env)
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "vegaEmbed(" in page and not re.search(r"<script[^>]+src=", page) and "cdn." not in page
    assert "dvc_plots/" not in _sh(["git", "status", "--porcelain"], repo, env)  # ignored
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is not None:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--no-first-run", f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=15000",
                              "--dump-dom", (repo / "dvc_plots" / "index.html").as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        assert dom.count('class="marks"') == len(re.findall(r"vegaEmbed\(", page)) >= 5, dom[-2000:]
    summary, states = run_in_process(repo, ("distill.protocol.n_runs=1",))
    assert all(state == "Cached" for _, state in states), states
    _sh([sys.executable, "-m", "flows.cli", "run", "-S", "distill.protocol.n_runs=1"], repo, env)
    assert "up to date" in _sh([sys.executable, "-m", "dvc", "status"], repo, env)


def test_editing_the_config_loader_reruns_no_stage(repo: Path, prefect_api: str) -> None:
    env = _env(repo, prefect_api)
    _sh([sys.executable, "-m", "flows.cli", "run"], repo, env)  # warm
    # `dsv run` hands the flow paths relative to the project (its flow runs hold no absolute path)
    assert flow_run_of(None).parameters["root"] == "." and flow_run_of(None).parameters["params_path"] == "params.yaml"
    target = repo / "tasks/config.py"
    src = target.read_text()
    old = "not valid YAML"
    assert old in src, "the YAML message of tasks.config changed; update this test's edit"
    target.write_text(src.replace(old, "not YAML"))
    try:
        _sh([sys.executable, "-m", "flows.cli", "run"], repo, env)
        by_stage = stages_by_state(_latest_flow_run_states(prefect_api))
        assert set(by_stage) == set(STAGES) and all(v == {"Cached"} for v in by_stage.values()), by_stage
        # ...and DVC agrees: the loader is in no stage's deps
        assert "tasks/config.py" not in (repo / "dvc.yaml").read_text()
    finally:
        target.write_text(src)


def test_editing_a_dsv_function_reruns_extract_and_dependants(repo: Path, prefect_api: str) -> None:
    env = _env(repo, prefect_api)
    _sh([sys.executable, "-m", "flows.cli", "run"], repo, env)  # warm (cache hits or not)
    before = pd.read_parquet(repo / "artifacts/extract/dsv.parquet")["entropy"].to_numpy()
    runs_before = hashlib.sha256((repo / "artifacts/distill/runs.json").read_bytes()).hexdigest()
    target = repo / "dsv/extract.py"
    src = target.read_text()
    old = "entropy=entropy(logits).cpu(),"
    assert old in src, "dsv.extract.extract's entropy column changed; update this test's edit"
    # A real change of behaviour: the recorded entropies change, so dsv.parquet's bytes change.
    target.write_text(src.replace(old, "entropy=entropy(logits).cpu() * 1.5,"))
    _sh([sys.executable, "-m", "flows.cli", "run"], repo, env)
    by_stage = stages_by_state(_latest_flow_run_states(prefect_api))
    for stage in ("prepare", "pretrain", "coreset"):
        assert by_stage[stage] == {"Cached"}, (stage, by_stage)
    for stage in ("extract", "distill"):
        assert "Completed" in by_stage[stage] and "Cached" not in by_stage[stage], (stage, by_stage)
    # evaluate reads only distill's runs.json: content-addressed inputs rerun it exactly when the
    # students' results changed (an entropy edit does not change the DSV images they train on).
    runs_changed = hashlib.sha256((repo / "artifacts/distill/runs.json").read_bytes()).hexdigest() != runs_before
    assert by_stage["evaluate"] == ({"Completed"} if runs_changed else {"Cached"}), by_stage
    after = pd.read_parquet(repo / "artifacts/extract/dsv.parquet")["entropy"].to_numpy()
    assert (after != before).any()  # the edited function's values reached the artifact
    assert "cpu() * 1.5" not in ROOT.joinpath("dsv/extract.py").read_text()  # only the copy was edited


# ----------------------------------------------------------------------------------- schedule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_served_flow_fires_on_schedule(repo: Path, tmp_path: Path) -> None:
    import urllib.request

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(repo, api)
    server_env = {**env, "PREFECT_HOME": str(tmp_path / "server-home"),
                  "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    served = None
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "prefect server did not start"
                time.sleep(1)
        served = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--interval", "5", "--name", "it"],
            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}, "limit": 5}).encode()
        deadline = time.monotonic() + 180
        completed: list[dict] = []
        while not completed:
            assert served.poll() is None, "dsv serve exited"
            assert time.monotonic() < deadline, "no scheduled flow run completed within 180 s"
            time.sleep(3)
            req = urllib.request.Request(f"{api}/flow_runs/filter", data=body,
                                         headers={"Content-Type": "application/json"})
            completed = [r for r in json.loads(urllib.request.urlopen(req, timeout=10).read())
                         if r.get("deployment_id")]
        assert completed[0]["state"]["type"] == "COMPLETED"
    finally:
        for proc in (served, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
