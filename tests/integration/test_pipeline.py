"""End to end: the Prefect flow with real caching, MLflow on SQLite, DVC in a git repo, a schedule.

The tests of this module share one tiny project and run in order: first run, unchanged re-run,
evaluation-param change, deleted artifact. The DVC/code-edit and schedule tests work on copies.
"""

from __future__ import annotations

import hashlib
import json
import os
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

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted((r.name, r.state.name if r.state else "?") for r in runs)


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
    (project / ".gitignore").write_text("/.dsv/\n/mlflow.db\n/mlartifacts/\n/.dvc-site-cache/\n__pycache__/\n")
    env = _env(project, prefect_api)
    _sh(["git", "init", "-q"], project, env)
    _sh([sys.executable, "-m", "dvc", "init", "-q"], project, env)
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


def test_first_run_end_to_end(project: Path, first: dict) -> None:
    by_stage = stages_by_state(first["states"])
    assert set(by_stage) == set(STAGES)
    assert all(s == {"Completed"} for s in by_stage.values()), by_stage
    # extraction mapped over 3 inits x 1 IPC x 2 shards, distill over one cell per method, plus the merges
    from dsv.protocols import METHOD_NAMES

    names = [n for n, _ in first["states"]]
    assert sum(n.startswith("extract-") and not n.endswith("merge") for n in names) == 6
    assert sum(n.startswith("distill-") and not n.endswith("merge") for n in names) == len(METHOD_NAMES)

    dsv = pd.read_parquet(project / "artifacts/extract/dsv.parquet")
    ex = json.loads((project / "metrics/extract.json").read_text())
    assert len(dsv) == TINY_DSV_ROWS == ex["n_dsv"]  # IPC per class for every init: nothing dropped
    assert sorted(dsv["init"].unique()) == ["0shot", "noise", "nshot"]
    assert dsv.groupby(["init", "label"]).size().le(2).all() and (dsv["lam"] > 0).all()
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
    for stage in STAGES:
        assert "seconds" not in (project / f"metrics/{stage}.json").read_text()
        timings = json.loads((project / f"timings/{stage}.json").read_text())
        assert "wall_seconds" in timings
        assert timings["device"] == (_DEVICE if stage in DEVICE_STAGES else "cpu"), stage  # the resolved device
    assert (project / "artifacts/evaluate/results.md").read_text().count("| dd | hard |") == len(METHOD_NAMES)
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


def test_mlflow_has_parent_nested_runs_metrics_and_images(project: Path, first: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dsv")
    assert exp is not None and exp.artifact_location.startswith("file://")
    parent_id = first["summary"]["mlflow_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["git.commit"]
    assert parent.info.run_name.startswith("digits · ") and len(parent.info.run_name) == len("digits · ") + 8
    assert "teacher_acc" in parent.data.metrics and "extract.solver.steps" in parent.data.params
    assert not any(k.endswith("acc_mean") for k in parent.data.metrics), "per-method metrics belong to result runs"
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    by_name = {r.info.run_name: r for r in children if r.data.tags.get("stage")}
    assert set(by_name) == set(STAGES)
    for stage, run in by_name.items():
        assert run.info.status == "FINISHED" and run.data.tags["cached"] == "false", stage
        assert run.data.tags["device"] == (_DEVICE if stage in DEVICE_STAGES else "cpu"), stage
        assert not any(k.startswith("sha256.") for k in run.data.tags), stage
        assert "artifact_hashes.json" in [f.path for f in client.list_artifacts(run.info.run_id)], stage
    # One run per result cell, with its own params and metrics: MLflow's table ranks the methods.
    from dsv.protocols import METHOD_NAMES

    results = [r for r in children if r.data.tags.get("dsv.kind") == "result"]
    assert sorted(r.data.params["method"] for r in results) == sorted(METHOD_NAMES)
    for r in results:
        assert r.info.run_name == f"{r.data.params['method']} · IPC {r.data.params['ipc']}"
        assert {"acc_mean", "acc_std"} <= set(r.data.metrics) and r.data.params["labels"] == "hard"
        assert ("rank" in r.data.metrics) == (r.data.params["method"] != "full")  # full is the reference, unranked
        assert set(r.data.params) == {"method", "ipc", "shots", "protocol", "labels", "n_train"}
    ranked = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                "tags.`dsv.kind` = 'result'", order_by=["metrics.acc_mean DESC"])
    accs = [r.data.metrics["acc_mean"] for r in ranked]
    assert accs == sorted(accs, reverse=True) and ranked[0].data.metrics["rank"] == 1
    nshot = next(r for r in results if r.data.params["method"] == "dsv_nshot")
    assert any(f.path.endswith(".png") for f in client.list_artifacts(nshot.info.run_id))
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


def test_unchanged_rerun_is_all_cache_hits(project: Path, first: dict) -> None:
    before = tree_hashes(project / "artifacts")
    t0 = time.perf_counter()
    summary, states = run_in_process(project)
    seconds = time.perf_counter() - t0
    assert all(state == "Cached" for _, state in states), states
    assert all(v["cached"] for v in summary["stages"].values())
    assert tree_hashes(project / "artifacts") == before
    print(f"first run {first['seconds']:.1f} s, cached re-run {seconds:.1f} s")
    # a cache hit still leaves a trace run, tagged cached
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    exp_id = client.get_experiment_by_name("dsv").experiment_id
    children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    stages = {r.info.run_name: r for r in children if r.data.tags.get("stage")}
    assert len(stages) == len(STAGES) and all(r.data.tags["cached"] == "true" for r in stages.values())
    # each restored stage run names the run that computed it, and shows that run's pictures
    first_children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{first['summary']['mlflow_run_id']}'")
    first_stages = {r.info.run_name: r.info.run_id for r in first_children if r.data.tags.get("stage")}
    for name, run in stages.items():
        assert run.data.tags["dsv.produced_by"] == first_stages[name], name
    extract_files = [f.path for f in client.list_artifacts(stages["extract"].info.run_id, "extract")]
    assert any("dsv_grid" in p and p.endswith(".png") for p in extract_files)
    assert sum(r.data.tags.get("dsv.kind") == "result" for r in children) > 0


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
    env = dict(os.environ)
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
    t0 = time.perf_counter()
    out = _sh([sys.executable, "-m", "dvc", "repro"], repo, env, timeout=600)
    repro_seconds = time.perf_counter() - t0
    for stage in STAGES:  # no dvc.lock yet, so DVC runs every stage; each reuses the flow's finished work
        assert f"Running stage '{stage}'" in out
        assert f"dsv: stage {stage} restored from cache" in out, out[-3000:]
    assert tree_hashes(repo / "artifacts") == flow_artifacts  # same code path, identical bytes
    print(f"dvc repro after the flow: {repro_seconds:.1f} s, every stage restored")
    out = _sh([sys.executable, "-m", "dvc", "repro"], repo, env)
    assert "Running stage" not in out
    assert "up to date" in out or "didn't change" in out
    assert len(pd.read_parquet(repo / "artifacts/extract/dsv.parquet")) == TINY_DSV_ROWS


def test_dvc_experiment_is_reused_by_the_flow_and_shown(repo: Path, prefect_api: str) -> None:
    """`dvc exp run -S` computes through `dsv stage`; `dvc exp show` prints the accuracies; the flow with the
    same override then restores every stage; `dsv run` leaves `dvc status` clean."""
    env = _env(repo, prefect_api)
    _sh([sys.executable, "-m", "dvc", "repro"], repo, env, timeout=600)
    _sh(["git", "add", "-A"], repo, env)
    _sh(["git", "commit", "-q", "-m", "baseline"], repo, env)
    out = _sh([sys.executable, "-m", "dvc", "exp", "run", "-S", "distill.protocol.n_runs=1"], repo, env, timeout=600)
    assert "Running stage 'distill'" in out and "Running stage 'extract'" not in out
    shown = _sh([sys.executable, "-m", "dvc", "exp", "show", "--no-pager", "--md", "--drop", ".*", "--keep",
                 "Experiment|acc.dsv_nshot_ipc2|acc.random_ipc2|distill.protocol.n_runs"], repo,
                {**env, "COLUMNS": "250"})
    row = next(line for line in shown.splitlines() if "workspace" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 4 and all(c not in ("!", "-", "") for c in cells[1:]), shown
    assert 0.0 <= float(cells[1]) <= 1.0 and cells[3] == "1"
    summary, states = run_in_process(repo, ("distill.protocol.n_runs=1",))
    assert all(state == "Cached" for _, state in states), states
    _sh([sys.executable, "-m", "flows.cli", "run", "-S", "distill.protocol.n_runs=1"], repo, env)
    assert "up to date" in _sh([sys.executable, "-m", "dvc", "status"], repo, env)


def test_editing_the_config_loader_reruns_no_stage(repo: Path, prefect_api: str) -> None:
    env = _env(repo, prefect_api)
    _sh([sys.executable, "-m", "flows.cli", "run"], repo, env)  # warm
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
