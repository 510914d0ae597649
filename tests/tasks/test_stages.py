"""The stage registry: code closures (cache keys, dvc.yaml deps), output verification, shards."""

from __future__ import annotations

from pathlib import Path

from dsv.extract import Shard
from tasks.config import parse_yaml
from tasks.output import StageOutput, hash_files
from tasks.paths import Paths
from tasks.stages import STAGES, code_files, code_hash, dvc_yaml, verify

ROOT = Path(__file__).resolve().parents[2]


def test_the_stage_table_holds_the_stage_modules() -> None:
    import tasks.distill
    import tasks.evaluate

    assert STAGES["distill"].module is tasks.distill and STAGES["evaluate"].module is tasks.evaluate
    assert {name for name, spec in STAGES.items() if spec.mapped} == {"extract", "distill"}
    assert all(spec.name == name and callable(spec.module.run) for name, spec in STAGES.items())


def test_dvc_lists_one_metrics_file_and_ignores_its_plots_page() -> None:
    stages = parse_yaml(dvc_yaml(ROOT))["stages"]
    listed = [m for s in stages.values() for entry in s.get("metrics", []) for m in entry]
    assert listed == ["metrics/accuracy.json"]  # the rest are plain outputs: `dvc exp show` leads with results
    assert all({f"metrics/{name}.json": {"cache": False}} in s["outs"] for name, s in stages.items())
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()


def test_no_stage_closure_holds_the_params_loader_or_the_registry() -> None:
    from tasks.stages import OUTSIDE_CLOSURES, code_modules

    for stage in STAGES:
        modules = code_modules(stage)
        assert not OUTSIDE_CLOSURES & set(modules), (stage, sorted(OUTSIDE_CLOSURES & set(modules)))
        assert {"tasks.output", "tasks.plain", f"tasks.{stage}"} <= set(modules), stage
    deps = parse_yaml(dvc_yaml(ROOT))["stages"]
    assert not any(d in ("tasks/config.py", "tasks/stages.py") for s in deps.values() for d in s["deps"])


def test_code_hash_ignores_type_only_imports_and_follows_real_ones(tmp_path: Path) -> None:
    # A copy of the code, so the edits below never touch the project.
    import shutil
    import subprocess
    import sys

    for pkg in ("tasks", "dsv"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import json; from tasks.stages import STAGES, code_hash; "
             "print(json.dumps({s: code_hash(s) for s in STAGES}))")

    def hashes() -> dict[str, str]:
        out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
        return dict(__import__("json").loads(out.stdout))

    before = hashes()
    config = tmp_path / "tasks/config.py"
    assert "not valid YAML" in config.read_text()
    config.write_text(config.read_text().replace("not valid YAML", "no YAML"))  # a loader message
    assert hashes() == before
    extract = tmp_path / "tasks/extract.py"
    extract.write_text(extract.read_text() + "\n# an edit\n")
    after = hashes()
    assert after["extract"] != before["extract"]
    assert {s for s in STAGES if after[s] != before[s]} == {"extract"}


def test_code_closures_follow_dsv_imports_of_the_stage_only() -> None:
    extract = set(code_files("extract", ROOT))
    assert {"tasks/extract.py", "dsv/extract.py", "dsv/kkt.py", "dsv/augment.py"} <= extract
    # tasks.config imports every component's config, but extract does not call DM; it starts from the
    # baselines' picks (init herding, kcenter, kkt_herding)
    assert "dsv/dm.py" not in extract and "dsv/baselines.py" in extract
    assert "dsv/kernel.py" in extract and "dsv/lam.py" not in extract  # NNLS and per-sample gradients: the kernel
    assert "tasks/tracking.py" not in extract  # logging-only modules never change artifacts
    distill = set(code_files("distill", ROOT))
    assert {"dsv/sets.py", "dsv/dm.py", "dsv/baselines.py", "dsv/protocols.py"} <= distill
    assert "dsv/extract.py" not in distill
    assert "dsv/lam.py" in set(code_files("coreset", ROOT))
    # generate writes its pictures as artifacts: the figure code is part of its key (of no other stage's)
    generate = set(code_files("generate", ROOT))
    assert {"tasks/generate.py", "dsv/generate.py", "dsv/judge.py", "tasks/figures.py"} <= generate
    assert "tasks/figures.py" not in extract


def test_code_hash_is_stable_and_per_stage() -> None:
    assert code_hash("extract") == code_hash("extract")
    assert code_hash("extract") != code_hash("distill")


def test_dvc_yaml_is_current_and_lists_each_stages_params() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    assert text == dvc_yaml(ROOT), "dvc.yaml is stale: regenerate it (see its header)"
    stages = parse_yaml(text)["stages"]
    assert list(stages) == list(STAGES)
    for name, spec in STAGES.items():
        assert stages[name]["cmd"] == f"dsv stage {name}"
        assert stages[name]["params"] == list(spec.sections)
        assert f"tasks/{name}.py" in stages[name]["deps"]
        assert stages[name]["outs"] == [{f"artifacts/{name}": {"persist": True}}, {f"metrics/{name}.json": {"cache": False}}]


def test_verify_detects_missing_and_changed_files(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    a, b = tmp_path / "artifacts" / "x.bin", tmp_path / "artifacts" / "y.bin"
    a.parent.mkdir(parents=True)
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    out = StageOutput("prepare", hash_files(paths, [a, b]), {})
    assert verify(paths, out) == []
    b.write_bytes(b"3")
    assert verify(paths, out) == ["artifacts/y.bin"]
    a.unlink()
    assert verify(paths, out) == ["artifacts/x.bin", "artifacts/y.bin"]


def test_shards_partition_the_ipc() -> None:
    for ipc in (1, 5, 10, 11):
        for shards in range(1, ipc + 1):
            jobs = [Shard("nshot", ipc, s, shards) for s in range(shards)]
            assert sum(j.per_class for j in jobs) == ipc
            assert all(j.per_class >= 1 for j in jobs)
            assert max(j.per_class for j in jobs) - min(j.per_class for j in jobs) <= 1
