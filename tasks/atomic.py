"""Crash-safe file writes: a temp file in the destination folder, fsync, then ``os.replace``.

A reader sees either the old file or the complete new one, never a half-written file, even if the
process is killed mid-write (the temp file, named ``.<name>.<pid>.<random>.tmp``, is left behind at worst,
ignored by every reader, and removed by the next run: :func:`sweep_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The process umask, read once (os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself; not every filesystem supports opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temps(*folders: Path) -> list[Path]:
    """Remove the temp files that a killed writer left under ``folders`` (``.<name>.<pid>.<random>.tmp``
    whose process no longer exists); a live process's temp file is never touched. Returns what was removed."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.rglob(".*.tmp"):
            parts = p.name[1 : -len(".tmp")].rsplit(".", 2)
            if len(parts) != 3 or not parts[1].isdigit() or pid_alive(int(parts[1])) or p.is_symlink():
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``dest``; on success it is fsynced and renamed onto ``dest``.

    Use this for writers that want a file name (safetensors, pyarrow, matplotlib)::

        with atomic_path(out) as tmp:
            save_file(tensors, tmp)

    Raises:
        OSError: with the destination named, when the folder cannot be created or written, or the
            disk is full (then with the free space left).
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise OSError(exc.errno, _describe(exc, dest)) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus the umask).
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.errno in _NAMED_ERRNOS and str(dest) not in str(exc):
            raise OSError(exc.errno, _describe(exc, dest)) from exc
        raise


# Write failures whose message must name the file (and, for a full disk, the free space left).
_NAMED_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EIO})


def _describe(exc: OSError, dest: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(dest.parent).free
            room = f"{free / 2**20:.1f} MiB free on {dest.parent}"
        except OSError:
            room = f"free space on {dest.parent} unknown"
        return f"disk full writing {dest}: {exc.strerror or exc} ({room}); free some space and rerun"
    return f"cannot write {dest}: {exc.strerror or exc}"


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically write ``data`` to ``dest``; returns ``dest`` as a Path."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_text(dest: str | os.PathLike[str], text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``dest``."""
    return write_bytes(dest, text.encode("utf-8"))


def write_json(dest: str | os.PathLike[str], obj: Any) -> Path:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable bytes for stable hashes)."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
