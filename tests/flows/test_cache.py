"""The JSON stage cache: keys, malformed records as misses, hash-verified hits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cache import cache_key, external_inputs, load_record, lookup, source_hash, store
from tasks.atomic import file_sha256
from tasks.paths import Paths


def _fn(a: int) -> int:
    return a


def test_key_depends_on_every_input() -> None:
    base = cache_key("stage", "src", "pretrain", params={"a": 1}, upstream={"x": "1"})
    assert base == cache_key("stage", "src", "pretrain", params={"a": 1}, upstream={"x": "1"})
    assert base != cache_key("stage", "src", "pretrain", params={"a": 2}, upstream={"x": "1"})
    assert base != cache_key("stage", "src", "pretrain", params={"a": 1}, upstream={"x": "2"})
    assert base != cache_key("unit", "src", "pretrain", params={"a": 1}, upstream={"x": "1"})
    assert base != cache_key("stage", "src", "coreset", params={"a": 1}, upstream={"x": "1"})
    assert base != cache_key("stage", source_hash(_fn), "pretrain", params={"a": 1}, upstream={"x": "1"})


def test_malformed_records_are_misses(tmp_path: Path) -> None:
    for i, blob in enumerate([b"\x80\x04K\x01.", b"not json", b"[1, 2]", b'{"files": [1]}', b'{"files": {"a": 1}}',
                              b"\xff\xfe"]):
        p = tmp_path / f"{i}.json"
        p.write_bytes(blob)
        assert load_record(p) is None, blob


def test_hit_only_when_artifacts_match(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "out")
    art = paths.base / "artifacts/x.bin"
    art.parent.mkdir(parents=True)
    art.write_bytes(b"abc")
    store(tmp_path, "prepare", "k1", {"files": {"artifacts/x.bin": file_sha256(art)}, "n": 1.5})
    assert lookup(tmp_path, "prepare", "k1", paths) == {"files": {"artifacts/x.bin": file_sha256(art)}, "n": 1.5}
    assert json.loads((tmp_path / ".dsv/cache/prepare/k1.json").read_text())["n"] == 1.5
    art.write_bytes(b"abd")
    assert lookup(tmp_path, "prepare", "k1", paths) is None
    art.unlink()
    assert lookup(tmp_path, "prepare", "k1", paths) is None
    assert lookup(tmp_path, "prepare", "missing", paths) is None


def test_external_inputs_follow_the_users_files(tmp_path: Path) -> None:
    """A new checkpoint at the same path, or a changed data folder, changes the stage's key inputs."""
    import os

    from tasks.config import load_config

    ckpt = tmp_path / "teacher.pt"
    ckpt.write_bytes(b"one")
    folder = tmp_path / "folder"
    (folder / "train" / "a").mkdir(parents=True)
    (folder / "train" / "a" / "0.png").write_bytes(b"png")
    cfg = load_config(None, [f"pretrain.checkpoint={ckpt}", "prepare.data.name=imagefolder",
                             f"prepare.data.root={folder}"])
    first = {s: external_inputs(cfg, s) for s in ("prepare", "pretrain", "extract")}
    assert first["extract"] == {} and set(first["pretrain"]) == {"external:pretrain.checkpoint"}
    ckpt.write_bytes(b"two")
    assert external_inputs(cfg, "pretrain") != first["pretrain"]
    assert external_inputs(cfg, "prepare") == first["prepare"]
    (folder / "train" / "a" / "1.png").write_bytes(b"png")
    assert external_inputs(cfg, "prepare") != first["prepare"]
    assert external_inputs(load_config(None, []), "pretrain") == {}
    assert os.path.exists(ckpt)


def test_compute_stages_key_on_the_resolved_device() -> None:
    """A result computed on one device never stands in for a run on another: the stages that compute on
    runtime.device (exactly those whose module resolves it) carry the resolved device type in their key."""
    import dataclasses

    import torch

    from flows.pipeline import _inputs
    from tasks.config import PipelineConfig
    from tasks.stages import DEVICE_STAGES, STAGES

    root = Path(__file__).resolve().parents[2]
    resolving = {s for s in STAGES if "device_of(cfg)" in (root / "tasks" / f"{s}.py").read_text()}
    assert resolving == DEVICE_STAGES
    cfg = PipelineConfig()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, device="cpu"))
    for stage in STAGES:
        if stage in DEVICE_STAGES:
            assert _inputs(stage, cfg, {})["device"] == expected  # auto: cuda when there is one
            assert _inputs(stage, on_cpu, {})["device"] == "cpu"
        else:
            assert "device" not in _inputs(stage, cfg, {})
        assert _inputs(stage, cfg, {})["params"] == cfg.sections(STAGES[stage].sections)
    a = cache_key("stage", "src", "pretrain", **_inputs("pretrain", on_cpu, {}))
    b = cache_key("stage", "src", "pretrain", **{**_inputs("pretrain", on_cpu, {}), "device": "cuda"})
    assert a != b


def test_a_record_edited_by_hand_or_moved_is_a_miss_with_a_warning(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    paths = Paths(tmp_path / "out")
    store(tmp_path, "evaluate", "k1", {"files": {}, "metrics": {"teacher_acc": 0.5}})
    assert lookup(tmp_path, "evaluate", "k1", paths) == {"files": {}, "metrics": {"teacher_acc": 0.5}}
    record = tmp_path / ".dsv/cache/evaluate/k1.json"
    data = json.loads(record.read_text())
    assert set(data) == {"files", "metrics", "record_sha256"}
    moved = record.with_name("k2.json")  # a record copied under another key does not match there
    moved.write_text(record.read_text())
    assert lookup(tmp_path, "evaluate", "k2", paths) is None
    data["metrics"]["teacher_acc"] = 0.999
    record.write_text(json.dumps(data))
    assert lookup(tmp_path, "evaluate", "k1", paths) is None
    del data["record_sha256"]
    record.write_text(json.dumps(data))
    assert lookup(tmp_path, "evaluate", "k1", paths) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("dsv: warning: cache record ") for line in err), err
    assert "k2.json does not match its integrity digest" in err[0] and "has no integrity digest" in err[2]
