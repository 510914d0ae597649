"""Screenshots of what a user looks at after a run, taken by headless Chromium driven over its DevTools protocol:

* ``mlflow-pipeline-run.png``: the MLflow UI (``dsv ui``) on the link ``dsv run`` prints: the pipeline run's page
  in MLflow's model-training view, its description (the ranked results table) unfolded;
* ``report-screenshot.png``: the top of ``dsv report``'s HTML file;
* ``dvc-plots-offline.png``: ``dvc plots show``'s page (its own Vega, no network), for a DVC repository.

    python benchmarks/screenshots.py --project DIR [-p params.smoke.yaml] [--dvc DIR] [--out benchmarks/results]

``--project``: a finished project (e.g. after ``dsv run -p params.smoke.yaml``); ``--dvc``: a DVC repository whose
default output folder holds a finished run (the plots dvc.yaml names live there). Chromium: ``apt-get install
chromium``. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# Unfold the run's description and close MLflow's assistant side panel, so the ranked table is in view.
UNFOLD_MLFLOW = """(() => {
  const more = document.querySelector('[aria-label="Expand description"]');
  if (more) more.click();
  const close = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();
  return Boolean(more);
})()"""
# Then bring the description (the ranked table) to the top of the run page's scrolling pane.
SCROLL_MLFLOW = """(() => {
  const edit = document.querySelector('[aria-label="Edit description"]');
  if (edit) edit.scrollIntoView({block: 'start'});
  return Boolean(edit);
})()"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _shoot(url: str, out: Path, width: int, height: int, wait_js: str, actions: tuple[str, ...] = (),
                 timeout: float = 90.0) -> None:
    """Open ``url`` in headless Chromium, wait until ``wait_js`` is true, run each of ``actions`` (a second
    apart), save a PNG."""
    import websockets

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found (apt-get install -y chromium)")
    port = _free_port()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            pages: list[dict[str, Any]] = []
            while not pages:
                with contextlib.suppress(OSError):
                    listing = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                    pages = [p for p in listing if p.get("type") == "page"]
                if time.monotonic() > deadline:
                    raise RuntimeError("chromium's DevTools endpoint did not answer")
                await asyncio.sleep(0.2)
            async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
                ids = iter(range(1, 1 << 30))

                async def call(method: str, **params: Any) -> dict[str, Any]:
                    i = next(ids)
                    await ws.send(json.dumps({"id": i, "method": method, "params": params}))
                    while True:
                        msg = json.loads(await ws.recv())
                        if msg.get("id") == i:
                            if "error" in msg:
                                raise RuntimeError(f"{method}: {msg['error']}")
                            return dict(msg.get("result", {}))

                async def evaluate(js: str) -> Any:
                    r = await call("Runtime.evaluate", expression=js, returnByValue=True)
                    return r.get("result", {}).get("value")

                await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                           mobile=False)
                await call("Page.enable")
                await call("Page.navigate", url=url)
                deadline = time.monotonic() + timeout
                while not await evaluate(f"document.readyState === 'complete' && Boolean({wait_js})"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{url}: the page never showed what was waited for ({wait_js})")
                    await asyncio.sleep(0.5)
                for js in actions:
                    await evaluate(js)
                    await asyncio.sleep(1.0)
                await asyncio.sleep(2.0)  # let the page settle (fonts, charts, unfolded text)
                shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def _dsv(project: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"dsv {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def mlflow_and_report(project: Path, params: str, out: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(project)
    printed = _dsv(project, "report", "-p", params, env=env)  # names the pipeline run and its link
    if "logged to MLflow run " not in printed:
        raise SystemExit(f"the report names no MLflow run: {printed}")
    link = printed.rsplit(": ", 1)[1].strip()
    report = Path(printed.split("report written to ", 1)[1].split(" and logged", 1)[0])
    asyncio.run(_shoot(report.as_uri(), out / "report-screenshot.png", 1200, 1800,
                       "document.querySelector('h2#results') !== null"))
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--port", str(port)], cwd=project, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert ui.stdout is not None
        line = ""
        while not line.startswith("dsv: "):
            line = ui.stdout.readline()
            if not line:
                raise SystemExit("dsv ui exited before it served")
        url = link.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        asyncio.run(_shoot(url, out / "mlflow-pipeline-run.png", 1400, 1250,
                           "document.body.innerText.includes('Best training set')", (UNFOLD_MLFLOW, SCROLL_MLFLOW)))
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(30)


def dvc_plots(repo: Path, out: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=repo, capture_output=True, text=True,
                          timeout=300, check=False, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"dvc plots show failed: {done.stderr[-2000:]}")
    page = repo / "dvc_plots" / "index.html"
    asyncio.run(_shoot(page.as_uri(), out / "dvc-plots-offline.png", 1400, 1100,
                       "document.querySelectorAll('canvas.marks').length > 0"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, help="a finished project (MLflow page and report)")
    ap.add_argument("-p", "--params", default="params.yaml", help="its params file (locates the output folder)")
    ap.add_argument("--dvc", type=Path, help="a DVC repository with a finished run in its default output folder")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.project:
        mlflow_and_report(args.project.resolve(), args.params, args.out)
    if args.dvc:
        dvc_plots(args.dvc.resolve(), args.out)


if __name__ == "__main__":
    main()
