"""The user's view: the end-of-run summary, ``dsv report`` (self-contained HTML logged to MLflow and
rendered headless by Chromium), progress bars quiet off a terminal."""

from __future__ import annotations

import shutil
import signal
import subprocess
from html import escape
from pathlib import Path

import pytest

from tasks.progress import Bar, enabled


def test_progress_is_quiet_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert not enabled("auto")  # pytest captures stderr: not a TTY
    assert not enabled("off") and enabled("on")
    with Bar("auto", 10, "x") as bar:
        bar.to(5, loss=1.0)
        assert not bar.active
    with Bar("on", 10, "shown") as bar:
        bar.to(10)
    assert "shown" in capsys.readouterr().err


@pytest.mark.slow
def test_summary_and_report(completed_project: tuple[Path, dict], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main, run_summary
    from tasks.config import load_config
    from tasks.report import MAX_BYTES, METHOD_LABELS, SECTIONS

    project, summary = completed_project
    cfg = load_config(project / "params.yaml")
    text = run_summary(summary, cfg, project, 1.0)
    assert "teacher test accuracy: " in text and "teacher KKT certificate" in text
    assert "DSVs nshot_ipc2: 20 (2 2 2 2 2 2 2 2 2 2 per class" in text
    assert "| dsv_nshot | 2 |" in text and f"artifacts: {project / 'artifacts'}" in text
    link = f"#/experiments/{summary['mlflow_experiment_id']}/runs/{summary['mlflow_run_id']}"
    assert f"{link}?workflowType=machine_learning" in text  # the run's page in MLflow's model-training view

    monkeypatch.chdir(project)
    out = tmp_path / "report.html"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["report", "-o", str(out)]) == 0
    finally:
        signal.signal(signal.SIGTERM, handler)  # main installs dsv's own
    assert f"logged to MLflow run {summary['mlflow_run_id']}" in capsys.readouterr().out  # the pipeline run
    html = out.read_text()
    assert out.stat().st_size <= MAX_BYTES
    # results first, a table of contents, one sentence per section, the long parts folded
    order = [html.index(f'<h2 id="{key}">') for key, _, _ in SECTIONS]
    assert order == sorted(order) and SECTIONS[0][0] == "results"
    assert all(f'<a href="#{key}">' in html and html.count(escape(sentence)) == 1 for key, _, sentence in SECTIONS)
    params = html.index('<h2 id="params">')
    assert "<details><summary>" in html[params:] and "&quot;prepare&quot;: {" in html[params:]
    results = html[html.index('<h2 id="results">'):html.index('<h2 id="dsvs">')]
    assert f"{METHOD_LABELS['dsv_nshot']} <code>dsv_nshot</code>" in results and "Δ random" in results
    assert html.count('src="data:image/png;base64,') >= 4 and "DSVs: nshot, IPC 2" not in html  # grids are images
    assert "http" not in html.replace(f"http://127.0.0.1:5000/{link}?workflowType=machine_learning", "")
    # over the size budget the pictures are redrawn smaller: every section is still there
    import tasks.report

    budget = int(0.8 * out.stat().st_size)
    monkeypatch.setattr(tasks.report, "MAX_BYTES", budget)
    small = tasks.report.write_report(cfg, project, tmp_path / "small.html")
    assert small.stat().st_size <= budget and small.read_text().count('<h2 id="') == len(SECTIONS)
    assert small.read_text().count('src="data:image/png;base64,') == html.count('src="data:image/png;base64,')
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    assert [f.path for f in client.list_artifacts(summary["mlflow_run_id"], "report")] == ["report/report.html"]
    assert not [r for r in client.search_runs([summary["mlflow_experiment_id"]]) if r.info.run_name == "report"]

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    out.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file()
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not blank
    assert len(set(img.resize((120, 200)).getdata())) > 20  # text, tables and images, not a flat page
