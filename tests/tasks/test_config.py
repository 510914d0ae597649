"""params.yaml validation: types, ranges, unknown keys, overrides, YAML 1.2 floats."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import (
    ConfigError,
    PipelineConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    parse_yaml,
)
from tasks.plain import dump_yaml, params_hash

ROOT = Path(__file__).resolve().parents[2]


def test_yaml12_floats_are_floats() -> None:
    data = parse_yaml("a: 5e-4\nb: 1E3\nc: 1.0e-3\nd: 7\ne: '5e-4'\nf: .5\n")
    assert data == {"a": 5e-4, "b": 1000.0, "c": 1e-3, "d": 7, "e": "5e-4", "f": 0.5}
    assert isinstance(data["a"], float) and isinstance(data["d"], int)


def test_float_in_scientific_notation_reaches_the_dataclass(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("pretrain:\n  fit: {lr: 5e-4, weight_decay: 1e-2}\n")
    cfg = load_config(p)
    assert cfg.pretrain.fit.lr == 5e-4 and cfg.pretrain.fit.weight_decay == 1e-2
    # untouched keys keep the section's defaults
    assert cfg.pretrain.fit.epochs == PipelineConfig().pretrain.fit.epochs


def test_shipped_params_files_are_valid() -> None:
    for name in ("params.yaml", "params.smoke.yaml"):
        cfg = load_config(ROOT / name)
        assert cfg.prepare.data.name == "fashion_mnist"
    smoke = load_config(ROOT / "params.smoke.yaml")
    from dsv.protocols import METHOD_NAMES

    assert set(smoke.distill.methods) == set(METHOD_NAMES)  # every method


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("extract.stpes=3", r"unknown key 'extract\.stpes' \(did you mean 'extract\.solver\.steps'\?\); allowed"),
        ("extract.solver.stpes=3", r"unknown key 'extract\.solver\.stpes' \(did you mean 'extract\.solver\.steps'\?\)"),
        ("pretrain.model.width=0", r"pretrain\.model\.width must be >= 1, got 0"),
        ("pretrain.model.width=abc", r"pretrain\.model\.width = 'abc'.*expected int"),
        ("pretrain.fit.lr=-1", r"pretrain\.fit\.lr must be > 0"),
        ("pretrain.fit.lr=true", r"pretrain\.fit\.lr = True.*expected float"),
        ("pretrain.model.name=convnett", r"pretrain\.model\.name = 'convnett' is not one of .*did you mean 'convnet'"),
        ("extract.ipcs=[0]", r"extract\.ipcs must all be >= 1"),
        ("extract.ipcs=5", r"extract\.ipcs = 5.*expected tuple"),
        ("extract.inits=[nshot, zeroshot]", r"extract\.inits = 'zeroshot' is not one of nshot, 0shot, noise, herding"),
        ("extract.solver.kkt.distance=l3", r"extract\.solver\.kkt\.distance = 'l3' is not one of l1, l2"),
        ("extract.solver.dual=relu", r"extract\.solver\.dual = 'relu' is not one of drop, clamp, softplus"),
        ("distill.methods=[random, herdin]", r"distill\.methods = 'herdin'.*did you mean 'herding'"),
        ("distill.protocol.n_runs=0", r"distill\.protocol\.n_runs must be >= 1"),
        ("prepare.data.name=cifar11", r"prepare\.data\.name = 'cifar11'.*did you mean 'cifar10'|'cifar100'"),
        ("runtime.device=tpu", r"runtime\.device = 'tpu' is not one of cpu, cuda, auto"),
        ("nosuchsection.key=1", r"unknown key 'nosuchsection'; allowed keys in the top level: prepare"),
        ("pretrain=3", r"pretrain = 3.*expected a mapping"),
        ("extract.shards=20", r"extract\.shards = 20 exceeds the smallest IPC"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_all_problems_in_one_message() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["pretrain.model.width=0", "extract.stpes=1", "coreset.lam.lr=-1"])
    msg = str(info.value)
    assert "pretrain.model.width" in msg and "extract.stpes" in msg and "coreset.lam.lr" in msg


def test_cross_section_checks() -> None:
    with pytest.raises(ConfigError, match=r"distill\.ipcs \[20\] are not in extract\.ipcs = \[10\]"):
        load_config(None, ["distill.ipcs=[20]"])
    with pytest.raises(ConfigError, match=r"exceed the 10 training images per class"):
        load_config(None, ["prepare.data.n_per_class=20", "prepare.val_per_class=10", "extract.ipcs=[50]",
                           "distill.ipcs=[50]"])
    with pytest.raises(ConfigError, match=r"distill\.methods lists \['dsv_noise'\]"):
        load_config(None, ["extract.inits=[nshot]", "distill.methods=[dsv_noise]"])
    # a 0-shot pool drawn from the task's own data would leak real images into "0-shot"
    with pytest.raises(ConfigError, match=r"prepare\.init_pool\.dataset = 'digits' is the task's own dataset"):
        load_config(None, ["prepare.data.name=digits", "prepare.init_pool.dataset=digits"])
    load_config(None, ["prepare.data.name=digits", "prepare.init_pool.dataset=photos"])
    load_config(None, ["prepare.data.name=digits", "prepare.init_pool.dataset=digits", "extract.inits=[nshot]",
                       "distill.methods=[dsv_nshot,random]"])  # no pool is used


def test_generate_and_judge_sections() -> None:
    from dsv.generate import class_pairs
    from tasks.judge import judge_model

    cfg = load_config(None, [])
    assert class_pairs(cfg.generate.pairs, 10) == [(0, 1), (2, 3), (4, 5)] and class_pairs(None, 2) == [(0, 1)]
    assert class_pairs(((3, 1),), 10) == [(3, 1)]
    assert judge_model(cfg.judge, (1, 28, 28)).norm == "batch" and judge_model(cfg.judge, (13,)).name == "mlp"
    for override, match in (("generate.deltas=[0.5,1.5]", "generate.deltas"), ("generate.init=data", "generate.init"),
                            ("generate.pairs=[[1,1]]", "generate.pairs"), ("generate.recipe.views=0", "views"),
                            ("generate.recipe.stepz=3", "did you mean 'generate.recipe.steps'")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [override])


def test_overrides_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        apply_overrides({}, ["extract"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_yaml_on_off_booleans_are_accepted_for_progress() -> None:
    # YAML 1.1 (and so `-S runtime.progress=off`) reads unquoted on/off as booleans.
    assert load_config(None, ["runtime.progress=off"]).runtime.progress == "off"
    assert load_config(None, ["runtime.progress=on"]).runtime.progress == "on"
    assert load_config(None, ["runtime.progress='auto'"]).runtime.progress == "auto"
    with pytest.raises(ConfigError, match="runtime.progress"):
        load_config(None, ["runtime.progress=sometimes"])


def test_partial_nested_override_keeps_the_parent_default() -> None:
    # ProxyConfig's default fit is SGD lr 0.01; overriding only its epochs must keep SGD.
    cfg = load_config(None, ["distill.proxy.fit.epochs=3"])
    assert cfg.distill.proxy.fit.epochs == 3
    assert cfg.distill.proxy.fit.optimizer == "sgd" and cfg.distill.proxy.fit.lr == 0.01


def test_roundtrip_dump_and_hash_are_stable() -> None:
    cfg = load_config(None, ["extract.ipcs=[1, 2]", "distill.ipcs=[1]"])
    assert isinstance(cfg.extract.ipcs, tuple) and cfg.extract.ipcs == (1, 2)
    again = config_from_dict(parse_yaml(dump_yaml(cfg.to_dict())))
    assert again == cfg
    assert params_hash(cfg.section_dict("extract")) == params_hash(again.section_dict("extract"))
    assert params_hash(cfg.section_dict("extract")) != params_hash(PipelineConfig().section_dict("extract"))


def test_restricted_view_resets_other_sections() -> None:
    cfg = load_config(None, ["pretrain.seed=7", "extract.seed=3"])
    view = cfg.restricted(["extract"])
    assert view.extract.seed == 3 and view.pretrain.seed == 0 and view.runtime == cfg.runtime


def test_data_checks_name_the_key() -> None:
    from tasks.config import data_checks, load_config

    cfg = load_config(None, ["extract.ipcs=[10]", "distill.ipcs=[10]"])
    assert data_checks(cfg, ["a", "b"], [50, 50], [5, 5], [1, 8, 8]) == []
    errs = data_checks(cfg, ["a", "b"], [50, 7], [5, 0], [1, 8, 8])
    assert any("extract.ipcs [10] exceed the 7 training images" in e for e in errs)
    assert any("distill.ipcs [10] exceed" in e for e in errs)
    assert any("['b'] have no test images" in e for e in errs)
    assert any("at least two" in e for e in data_checks(cfg, ["a"], [50], [5], [1, 8, 8]))
    small = load_config(None, ["coreset.lam.max_bytes=1000"])
    assert any(e.startswith("coreset.lam.batch_size = 1000") for e in data_checks(small, ["a", "b"], [500, 500],
                                                                                  [5, 5], [1, 28, 28]))


def test_bring_your_own_keys_are_checked(tmp_path) -> None:  # noqa: ANN001
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="pretrain.checkpoint = 'nope.pt': file not found"):
        load_config(None, ["pretrain.checkpoint=nope.pt"])
    with pytest.raises(ConfigError, match="prepare.normalize.mean and std must be set together"):
        load_config(None, ["prepare.normalize.mean=[0.5]"])
    with pytest.raises(ConfigError, match="prepare.normalize.std must all be > 0"):
        load_config(None, ["prepare.normalize={mean: [0.5], std: [0.0]}"])
    with pytest.raises(ConfigError, match="did you mean 'torchvision:resnet18'"):
        load_config(None, ["pretrain.model.name=torchvision:resnet81"])
    ok = load_config(None, ["pretrain.model.name=timm:resnet10t", "prepare.data.image_size=[16, 24]",
                            "prepare.data.name=imagefolder"])
    assert ok.prepare.data.image_hw == (16, 24)


def test_tabular_models_and_inits_are_checked_after_prepare() -> None:
    from tasks.config import data_checks, load_config

    cfg = load_config(None, [])
    errors = data_checks(cfg, ["a", "b"], [50, 50], [10, 10], [30])
    assert any(e.startswith("pretrain.model: model 'convnet' needs (C, H, W) image inputs") for e in errors)
    assert any(e.startswith("extract.inits: '0shot' starts from images") for e in errors)
    fine = load_config(None, ["pretrain.model.name=mlp", "distill.protocol.model.name=mlp",
                              "distill.dm.model.name=mlp", "distill.proxy.model.name=mlp", "extract.inits=[nshot,noise]",
                              "distill.methods=[dsv_nshot,dsv_noise,random,dm,el2n]"])
    assert data_checks(fine, ["a", "b"], [50, 50], [10, 10], [30]) == []


def test_moved_keys_say_where_they_went() -> None:
    with pytest.raises(ConfigError, match=r"'evaluate' is gone: .*distill\.protocol"):
        config_from_dict({"evaluate": {"protocol": {"n_runs": 1}}})
    with pytest.raises(ConfigError, match=r"'runtime\.task_runner' is gone: runtime\.workers > 1"):
        load_config(None, ["runtime.task_runner=dask"])
    assert load_config(None, ["distill.protocol.n_runs=1"]).distill.protocol.n_runs == 1


def test_params_are_parsed_once_per_text(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text("extract: {solver: {steps: 7}}\n")
    first = load_config(p, ["distill.seed=3"])
    assert load_config(p, ["distill.seed=3"]) is first  # the flow's second ask: the same frozen object
    assert load_config(p, ["distill.seed=4"]) is not first
    p.write_text("extract: {solver: {steps: 8}}\n")  # keyed on the text: an edit is seen
    assert load_config(p, ["distill.seed=3"]).extract.solver.steps == 8


def test_the_stage_merges_by_init_as_the_loader_validated_it() -> None:
    from dsv.extract import ExtractConfig
    from tasks.config import build
    from tasks.extract import solver_for

    by_init = {"nshot": {"lam_solver": "nnls", "spare": 1.0, "kkt": {"distance": "l2"}}}
    cfg = load_config(None, [f"extract.by_init={by_init}".replace("'", "")])
    merged = solver_for(cfg.extract, "nshot")
    errors: list[str] = []
    assert merged == build(ExtractConfig, by_init["nshot"], "", errors, base=cfg.extract.solver) and not errors
    assert merged.kkt.distance == "l2" and merged.kkt.param_subset == cfg.extract.solver.kkt.param_subset
    assert solver_for(cfg.extract, "noise") == cfg.extract.solver


def test_params_yaml_spells_out_the_section_defaults() -> None:
    # One place for the pipeline's defaults: the section dataclasses. params.yaml writes every one of them out
    # (the main job) and must not drift from them; the dsv components keep their own (the field's protocols).
    assert load_config(ROOT / "params.yaml") == PipelineConfig()


def test_device_auto_is_the_default_and_resolves_to_cpu_without_cuda() -> None:
    import torch

    from tasks.output import device_of, graphs_of, resolve_device

    cfg = load_config(ROOT / "params.yaml")
    assert cfg.runtime.device == "auto" and cfg.runtime.cuda_graphs == "auto"
    assert cfg.distill.protocol.batched == "auto"
    if torch.cuda.is_available():
        assert device_of(cfg) == "cuda" and graphs_of(cfg)
    else:
        assert device_of(cfg) == resolve_device("auto") == "cpu"
        assert not graphs_of(cfg)  # auto: graphs only on cuda
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"runtime\.cuda_graphs = 'maybe' is not one of auto, on, off"):
        load_config(ROOT / "params.yaml", ["runtime.cuda_graphs=maybe"])
    with pytest.raises(ConfigError, match=r"distill\.protocol\.batched"):
        load_config(ROOT / "params.yaml", ["distill.protocol.batched=sometimes"])


def test_every_numeric_key_has_a_documented_range() -> None:
    from tasks.ranges import numeric_keys, range_of

    keys = numeric_keys(PipelineConfig)
    assert len(keys) > 100
    missing = [key for key, cls, name, _ in keys if range_of(cls, name) is None]
    assert not missing, f"numeric keys without a range in tasks/ranges.py (or tasks/config.py): {missing}"
    negative = [key for key, cls, name, _ in keys if range_of(cls, name).admits(-1)]  # type: ignore[union-attr]
    assert negative == ["prepare.normalize.mean"], negative
    assert "may be negative" in range_of(*keys[[k for k, *_ in keys].index(negative[0])][1:3]).describe()  # type: ignore[union-attr,misc]
