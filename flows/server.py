"""The temporary Prefect API server of one ``dsv`` process: started by us, so an interrupt cannot orphan it.

Without ``PREFECT_API_URL`` Prefect starts a temporary server itself, as a child in the caller's
process group: Ctrl-C in a terminal (SIGINT to the whole group) kills it together with ``dsv``, and
``dsv`` then retries the dead API for minutes before failing. Instead, :func:`start` launches the
server (SQLite under PREFECT_HOME, UI off, 127.0.0.1, a free port) in its own session, so a terminal's
Ctrl-C reaches only ``dsv``, which then reports the interrupted run to a live API, closes its MLflow
runs and stops the server (:func:`stop`, also registered with ``atexit``). The child asks the kernel
for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so a SIGKILLed ``dsv`` does not leave it
behind either.

Two kinds: ``dsv run`` gets what Prefect itself starts for a flow without a server (uvicorn with
Prefect's app factory in ephemeral mode: the API only, no background services); ``dsv serve`` gets a
real ``prefect server start`` with its background services, the scheduler among them: an ephemeral
server never turns a deployment's schedule into flow runs, so a schedule served on one would never run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tasks.lock import init_lock

_PROC: subprocess.Popen[bytes] | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start(timeout: float = 90.0, scheduler: bool = False) -> str:
    """Start the temporary server unless ``PREFECT_API_URL`` is set; set it; return the API URL.

    Call after :func:`flows.environment.configure` and before ``import prefect``.

    Args:
        timeout: seconds to wait for the server to answer.
        scheduler: start ``prefect server start`` with its services (the scheduler forced on) instead of
            the API-only ephemeral server.

    Raises:
        RuntimeError: the server did not answer within ``timeout`` seconds (its exit code named).
    """
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise RuntimeError("prefect is not installed")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT__SERVER_")}
    env.update({"PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_UI_ENABLED": "0"})
    if scheduler:
        env.update({"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "true", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"})
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    else:
        env.update({"PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent), "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
    home = Path(os.environ.get("PREFECT_HOME", "."))
    log = home / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # The server creates (migrates) its SQLite database in PREFECT_HOME before it answers; two dsv processes
    # of one project (in different output folders) must not do that at once.
    with init_lock(home / "server-start.lock", "starting the temporary Prefect server", timeout + 30):
        return _launch(cmd, env, port, log, timeout)


def _launch(cmd: list[str], env: dict[str, str], port: int, log: Path, timeout: float) -> str:
    global _PROC
    with open(log, "ab") as out:
        _PROC = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
    atexit.register(stop)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _PROC.poll() is not None:
            raise RuntimeError(f"the temporary Prefect server exited with code {_PROC.returncode} (log: {log})")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:  # noqa: S310
            if r.status == 200:
                os.environ["PREFECT_API_URL"] = url
                return url
        time.sleep(0.2)
    stop()
    raise RuntimeError(f"the temporary Prefect server did not answer on {url} within {timeout:g} s (log: {log})")


def stop(grace: float = 5.0) -> None:
    """Stop the temporary server (SIGTERM, then SIGKILL after ``grace`` seconds); idempotent."""
    global _PROC
    proc, _PROC = _PROC, None
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def pid() -> int | None:
    """The server's pid while it runs (tests)."""
    return _PROC.pid if _PROC is not None and _PROC.poll() is None else None
