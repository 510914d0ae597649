"""Atomic writes: all or nothing, no temp files left behind."""

from __future__ import annotations

import hashlib
import json
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
