"""One writer per output folder: an advisory ``fcntl.flock`` on ``<output>/.dsv/output.lock``.

``dsv run`` and ``dsv stage`` hold the lock for their whole run, so two of them in the same output
folder never interleave writes: the second one refuses at once (naming the holder's pid) or, with
``--wait SECONDS``, waits for the first to finish. The kernel releases a ``flock`` when its holder
dies (SIGKILL included), so a *stale* lock file (its recorded pid dead) is simply taken over.

It is taken once per run: by the CLI before Prefect starts (a refused run leaves no trace), or by the flow
itself when nobody holds it for it (a scheduled run, a test calling the flow). A second acquire, even in
the same process, is refused like any other.

:func:`OutputLock.acquire` also removes the temp files a killed writer left behind in the folder
(:func:`tasks.atomic.sweep_stale_temps`: only those whose writing process is gone).

:func:`init_lock` is the other lock: a short blocking one around a first-run initialisation that
processes in different output folders share (MLflow's store, the temporary Prefect server's database).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from tasks.atomic import sweep_stale_temps

LOCK_NAME = ".dsv/output.lock"


class LockError(RuntimeError):
    """The output folder is in use by another dsv process (or cannot be locked)."""


def _holder(path: Path) -> dict[str, object]:
    """What the lock file says about its holder (best effort: the file may be mid-rewrite)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


class OutputLock:
    """Exclusive lock on an output folder.

    Args:
        base: the output folder (created if missing).
        command: what holds the lock (recorded in the lock file for the refusal message).
        wait: seconds to wait for a busy lock; 0 refuses at once.
    """

    def __init__(self, base: Path, command: str = "dsv", wait: float = 0.0) -> None:
        self.base = Path(base)
        self.path = self.base / LOCK_NAME
        self.command = command
        self.wait = wait
        self._fd: int | None = None
        self.swept: list[Path] = []

    def acquire(self) -> OutputLock:
        """Take the lock (waiting up to ``wait`` seconds).

        Raises:
            LockError: the folder is locked by another process (its pid and command named).
            OSError: the folder cannot be created or the lock file written (the path named).
        """
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.parent.is_symlink():
                raise LockError(f"refusing to lock {self.base}: {self.path.parent} is a symbolic link")
            # O_NOFOLLOW: a symlink planted at the lock path is refused, never followed (and the file
            # it points to never truncated).
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LockError(f"refusing to lock {self.base}: the lock file {self.path} is a symbolic link; "
                                "remove it") from None
            raise OSError(exc.errno, f"cannot write to the output folder {self.base}: {exc.strerror}") from exc
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            os.close(fd)
            raise LockError(f"refusing to lock {self.base}: the lock file {self.path} is not a plain file of this "
                            "user (a hard link, a device or another user's file); remove it")
        deadline = time.monotonic() + max(0.0, self.wait)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    h = _holder(self.path)
                    who = f"pid {h.get('pid', '?')}" + (f" ({h['command']})" if h.get("command") else "")
                    waited = f" after waiting {self.wait:g} s" if self.wait > 0 else ""
                    raise LockError(
                        f"output folder {self.base} is locked by {who} on {h.get('host', '?')} "
                        f"(lock file {self.path}){waited}; wait for it to finish or pass --wait SECONDS"
                    ) from None
                time.sleep(0.2)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # The previous holder's record (a dead pid at worst: its flock died with it) is overwritten.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        self.swept = sweep_stale_temps(*(self.base / d for d in ("artifacts", "metrics", "timings")))
        return self

    def release(self) -> None:
        """Release the lock (the lock file stays; its content is only informative)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


@contextlib.contextmanager
def init_lock(path: Path, what: str, timeout: float = 600.0) -> Iterator[None]:
    """Serialise a first-run initialisation across processes: a blocking ``fcntl.flock`` on ``path``.

    Creating a store's schema (MLflow's SQLite tables, the temporary Prefect server's database) is not safe
    when two processes do it at once (alembic: ``Online migration expected to match one row``); inside this
    lock the first process creates it and the others find it made. Held only for the initialisation itself
    (seconds), never for a run; the kernel releases it when its holder dies.

    Args:
        path: the lock file (created with its folder; its content is never read).
        what: what is being initialised (for the timeout message).
        timeout: seconds to wait for another process's initialisation.

    Raises:
        LockError: the lock was not free within ``timeout`` seconds.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockError(f"{what}: another process held {path} for more than {timeout:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
