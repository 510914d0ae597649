"""Bad params: every case ends with ONE line ``dsv: error: ...`` naming the key, exit 2, nothing written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.cli import main
from tests.faults.conftest import FAULT_PARAMS

CASES = [
    # (command, override, regex the message must match: it names the key)
    ("run", "extract.solver.stpes=5", r"unknown key 'extract\.solver\.stpes' \(did you mean 'extract\.solver\.steps'\?\)"),
    ("run", "pretrain.fti.lr=1", r"unknown key 'pretrain\.fti' \(did you mean 'pretrain\.fit'\?\)"),
    ("run", "nosection.x=1", r"unknown key 'nosection'"),
    ("run", "extract.ipcs=[-1]", r"extract\.ipcs must all be >= 1"),
    ("run", "pretrain.fit.lr=0", r"pretrain\.fit\.lr must be > 0, got 0"),
    ("run", "pretrain.fit.lr=-1e-3", r"pretrain\.fit\.lr must be > 0, got -0\.001"),
    ("run", "extract.solver.lr_x=-1", r"extract\.solver\.lr_x must be > 0"),
    ("run", "extract.solver.lr_lam=0", r"extract\.solver\.lr_lam must be > 0"),
    ("run", "distill.ipcs=[50]", r"distill\.ipcs \[50\] exceed the 35 training images per class"),
    ("run", "distill.ipcs=[3]", r"distill\.ipcs \[3\] are not in extract\.ipcs"),
    ("run", "prepare.data.n_per_class=-3", r"prepare\.data\.n_per_class must be >= 1"),
    ("run", "prepare.val_per_class=100", r"prepare\.val_per_class = 100 leaves no training images"),
    ("run", "extract.solver.steps=abc", r"extract\.solver\.steps = 'abc'.*expected int"),
    ("run", "pretrain.fit.epochs=1.5", r"pretrain\.fit\.epochs = 1\.5.*expected int"),
    ("run", "extract.solver.dual=relu", r"extract\.solver\.dual = 'relu' is not one of drop, clamp, softplus"),
    ("run", "distill.methods=[herdin]", r"distill\.methods = 'herdin'.*did you mean 'herding'"),
    ("run", "pretrain.model.name=resnet", r"pretrain\.model\.name = 'resnet'.*did you mean 'resnet18'"),
    ("run", "extract.solver.kkt.beta_tv=-1", r"extract\.solver\.kkt\.beta_tv must be >= 0"),
    ("run", "distill.protocol.n_runs=0", r"distill\.protocol\.n_runs must be >= 1"),
    ("run", "runtime.workers=0", r"runtime\.workers must be >= 1"),
    ("run", "runtime.progress=maybe", r"runtime\.progress = 'maybe' is not one of auto, on, off"),
    ("run", "extract", r"override 'extract' is not of the form section\.key=value"),
    ("stage extract", "extract.shards=0", r"extract\.shards must be >= 1"),
    ("stage pretrain", "pretrain.fit.batch_size=0", r"pretrain\.fit\.batch_size must be >= 1"),
    ("stage coreset", "coreset.lam.steps=-1", r"coreset\.lam\.steps must be >= 1"),
    ("run", "pretrain.fit.lr=.nan", r"pretrain\.fit\.lr = nan: must be a finite number"),
    ("run", "extract.solver.kkt.eta_stat=.inf", r"extract\.solver\.kkt\.eta_stat = inf: must be a finite number"),
    ("run", "extract.solver.max_lam_ratio=-.inf", r"extract\.solver\.max_lam_ratio = -inf: must be a finite"),
    ("run", "pretrain.converge.scope=everything", r"pretrain\.converge\.scope = 'everything' is not one of"),
    ("run", "extract.solver.lam_solver=lbfgs", r"extract\.solver\.lam_solver = 'lbfgs' is not one of adam, nnls"),
    ("run", "extract.by_init.nois.steps=5", r"extract\.by_init has \['nois'\]; its keys are init kinds"),
    ("run", "extract.by_init.nshot.stpes=5", r"unknown key 'extract\.by_init\.nshot\.stpes' \(did you mean"),
    ("run", "extract.by_init.noise.kkt.eta_stat=-1", r"extract\.by_init\.noise.*eta_stat must be >= 0"),
    ("run", "extract.solver.kkt.eta=5", r"'extract\.solver\.kkt\.eta' is gone: the paper's η is split in two"),
    ("run", "extract.solver.max_lam_ratio=-1", r"extract\.solver\.max_lam_ratio must be >= 1, got -1"),
    ("run", "distill.dm.augment=batch:flip|scale=0.5", r"distill\.dm\.augment = 'batch:flip\|scale=0\.5': scale must be >= 1"),
    ("run", "distill.dm.augment=flip|scale", r"distill\.dm\.augment = 'flip\|scale' draws per image"),
    ("run", "extract.solver.kkt.augment=translate|mixup", r"extract\.solver\.kkt\.augment = .*unknown op 'mixup'"),
    ("run", "distill.dm.augment.scale=2", r"'distill\.dm\.augment' is one value now: an augmentation is one string"),
    ("run", "judge.fit.kd_alpha=0.5", r"'judge\.fit\.kd_alpha' is gone: .*distill\.protocol\.kd_alpha"),
    ("run", "distill.dm_real=full", r"'distill\.dm_real' is gone"),
    ("run", "generate.recipe.target_mix=0.3", r"'generate\.recipe\.target_mix' is gone: moved to generate\.target_mix"),
    ("run", "coreset.lam.max_bytes=-1", r"coreset\.lam\.max_bytes must be >= 1, got -1"),
    ("run", "distill.proxy.fit.momentum=-1", r"distill\.proxy\.fit\.momentum must be in \[0, 1\), got -1"),
    ("run", "pretrain.fit.epochs=-1", r"pretrain\.fit\.epochs must be >= 0, got -1"),
    ("run", "prepare.data.seed=-1", r"prepare\.data\.seed must be >= 0, got -1"),
]


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "params.yaml").write_text(FAULT_PARAMS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("command", "override", "match"), CASES, ids=[c[1] for c in CASES])
def test_bad_param_is_one_line_and_writes_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], command: str, override: str, match: str
) -> None:
    before = _snapshot(project)
    with pytest.raises(SystemExit) as exit_info:
        main([*command.split(), "-S", override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv: error: "), err
    import re

    assert re.search(match, lines[0]), lines[0]
    assert _snapshot(project) == before  # nothing written: no artifacts, no .dsv, no mlflow.db, no lock


def _minus_one(hint: object) -> str:
    """-1 written as the key's type: a number, a list of numbers, or a list of pairs."""
    text = str(hint)
    if text.startswith("tuple[tuple"):
        return "[[0, -1]]"
    return "[-1]" if text.startswith("tuple") else "-1"


def test_minus_one_is_refused_for_every_key_that_must_not_be_negative(project: Path) -> None:
    """Walks every numeric key of the config (tasks.ranges.numeric_keys): -1 is refused at load with one line
    naming the key, unless the key's documented range says it may be negative (the CLI turns that line into
    ``dsv: error: ...`` and exit 2: the cases above)."""
    from tasks.config import ConfigError, PipelineConfig, load_config
    from tasks.ranges import numeric_keys, range_of

    keys = numeric_keys(PipelineConfig)
    assert len(keys) > 100
    accepted, unnamed = [], []
    for key, cls, name, hint in keys:
        r = range_of(cls, name)
        assert r is not None, key
        if r.admits(-1):
            assert "may be negative" in r.describe(), key
            continue
        try:
            load_config("params.yaml", [f"{key}={_minus_one(hint)}"])
        except ConfigError as exc:
            if "\n" in str(exc) or not str(exc).startswith(f"params.yaml: {key} "):
                unnamed.append(f"{key}: {str(exc)[:300]}")
        else:
            accepted.append(key)
    assert not accepted, f"-1 accepted for {accepted}"
    assert not unnamed, unnamed


_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))

BAD_FILES = [
    ("extract: {solver: {steps: [1, 2}\n", r"not valid YAML"),
    ("extract:\n  solver:\n    stpes: 5\n", r"unknown key 'extract\.solver\.stpes'"),
    ("- just\n- a list\n", r"params"),
    ("extract:\n  seed: 1\n  seed: 2\n", r"not valid YAML: .*duplicate key"),
    ("extract:\n  seed: 1\nextract:\n  seed: 2\n", r"not valid YAML: .*duplicate key"),
    (b"extract:\n  seed: \xff\xfe1\n", r"not UTF-8 text"),
    (_BOMB, r"anchors and aliases .* are not allowed"),
    ("x" * (2 << 20), r"a params file may have at most"),
    ("pretrain:\n  fit:\n    lr: .NaN\n", r"pretrain\.fit\.lr = nan: must be a finite number"),
]


@pytest.mark.parametrize(("text", "match"), BAD_FILES, ids=["invalid-yaml", "unknown-key-in-file", "not-a-mapping",
                                                           "duplicate-key", "duplicate-section", "not-utf8",
                                                           "alias-bomb", "oversized", "nan-in-file"])
def test_bad_params_file_is_one_line_and_writes_nothing(
    project: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, match: str
) -> None:
    if isinstance(text, bytes):
        (project / "params.yaml").write_bytes(text)
    else:
        (project / "params.yaml").write_text(text)
    before = _snapshot(project)
    with pytest.raises(SystemExit) as exit_info:
        main(["run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dsv: error: params.yaml"), err
    import re

    assert re.search(match, err), err
    assert _snapshot(project) == before


def test_missing_params_file(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.remove(project / "params.yaml")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "-p", "nope.yaml"])
    assert exit_info.value.code == 2
    assert "params file 'nope.yaml' not found" in capsys.readouterr().err
    assert list(project.iterdir()) == []


@pytest.mark.slow
def test_data_dependent_error_after_prepare_names_the_key_and_fails_the_run(tmp_path: Path, prefect_api: str) -> None:
    import sqlite3

    from tests.faults.conftest import copy_project, dsv

    project = copy_project(tmp_path / "p", FAULT_PARAMS)
    out = dsv(project, "run", "-S", "coreset.lam.max_bytes=1000", api_url=prefect_api)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("dsv: error: coreset.lam.batch_size = ") and "max_bytes" in last, last
    assert not (project / "artifacts" / "pretrain").exists()  # nothing past prepare ran
    with sqlite3.connect(project / "mlflow.db") as db:
        statuses = {name: status for name, status in db.execute("select name, status from runs")}
    parents = [status for name, status in statuses.items() if name.startswith("digits · ")]
    assert parents == ["FAILED"], statuses
