"""Atomic writes: all or nothing, no temp files left behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tasks.atomic import atomic_path, file_sha256, write_bytes, write_json, write_text


def test_writes_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"b": 1, "a": [1.5, 2]})
    assert json.loads(target.read_text()) == {"a": [1.5, 2], "b": 1}
    write_text(tmp_path / "t.txt", "hé")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "hé"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.json", "t.txt"]


def test_failure_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    write_bytes(target, b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half-written")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_unwritable_folder_names_the_destination(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"cannot write .*file/out\.json"):
        write_json(blocker / "out.json", {})


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    p = write_bytes(tmp_path / "d", data)
    assert file_sha256(p, chunk=1000) == hashlib.sha256(data).hexdigest()


def test_stale_temp_files_of_dead_writers_are_swept(tmp_path: Path) -> None:
    """A killed writer's temp file (its pid in the name) is removed; a live writer's is kept."""
    import subprocess
    import sys

    from tasks.atomic import sweep_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / f".record.json.{dead_pid}.abc123.tmp"
    live = tmp_path / f".record.json.{os.getpid()}.def456.tmp"
    other = tmp_path / ".notes.tmp"  # not the writer's pattern
    for p in (stale, live, other):
        p.write_text("partial")
    assert sweep_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
