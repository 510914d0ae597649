"""Full disk and unwritable output folders: a clear error naming the path; old files intact, no temp
files left, and no retry of a fault that a retry cannot fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flows.cli import main
from tasks import artifacts
from tasks.atomic import atomic_path, write_json
from tests.faults.conftest import FAULT_PARAMS, tmp_leftovers


def test_disk_full_names_the_file_and_free_space(tmp_path: Path) -> None:
    dest = tmp_path / "metrics" / "extract.json"
    write_json(dest, {"old": 1})
    full = r"disk full writing .*extract\.json: No space left on device \(.* MiB free on "
    with pytest.raises(OSError, match=full), atomic_path(dest) as tmp:
        tmp.write_bytes(b"{\"new\": ")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert dest.read_text().strip().startswith("{") and '"old": 1' in dest.read_text()
    assert tmp_leftovers(tmp_path) == []


def test_disk_full_inside_a_library_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "artifacts" / "extract" / "shards" / "nshot_ipc2_shard0.safetensors"
    artifacts.save_tensors(dest, {"x": torch.ones(3)})
    good = dest.read_bytes()

    def half_then_full(data: dict, path: str, metadata: object = None) -> None:
        Path(path).write_bytes(b"\x00" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts, "save_file", half_then_full)
    with pytest.raises(OSError, match=r"disk full writing .*nshot_ipc2_shard0\.safetensors") as info:
        artifacts.save_tensors(dest, {"x": torch.zeros(3)})
    assert info.value.errno == errno.ENOSPC
    assert dest.read_bytes() == good and tmp_leftovers(tmp_path) == []


def test_output_folder_under_a_file_is_reported_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "params.yaml").write_text(FAULT_PARAMS)
    (tmp_path / "blocker").write_text("a file, not a folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-S", "runtime.output_dir=blocker/out"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"dsv: error: cannot write to the output folder {tmp_path / 'blocker' / 'out'}: Not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "params.yaml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_folder_is_reported_by_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "params.yaml").write_text(FAULT_PARAMS)
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["run", "-S", "runtime.output_dir=ro"])
    finally:
        out.chmod(0o755)
    assert exit_info.value.code == 1
    assert f"cannot write to the output folder {out}: Permission denied" in capsys.readouterr().err


@pytest.mark.parametrize(("code", "retried"), [(errno.ENOSPC, False), (errno.EACCES, False), (errno.EROFS, False),
                                               (errno.EIO, True), (errno.ETIMEDOUT, True)])
def test_io_retries_skip_faults_a_retry_cannot_fix(code: int, retried: bool) -> None:
    from flows.pipeline import retry_on_io

    def result() -> None:
        raise OSError(code, os.strerror(code))

    assert retry_on_io(None, None, SimpleNamespace(result=result)) is retried
