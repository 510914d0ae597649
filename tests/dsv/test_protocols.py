"""Student protocols: recipes, budgets, the KD limit, students that learn, result rows."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dsv.kernel import soft_cross_entropy
from dsv.models import ModelConfig, build_seeded
from dsv.protocols import (
    DD_MODEL,
    METHOD_NAMES,
    PROTOCOLS,
    ProtocolConfig,
    ResultRow,
    student_fit_config,
    student_steps,
    train_students,
)
from dsv.train import KD, EvalResult, FitConfig, evaluate, fit


def test_dd_protocol_recipe() -> None:
    cfg = ProtocolConfig(name="dd", epochs=1000)
    f = student_fit_config(cfg, n_train=100)
    assert (f.optimizer, f.lr, f.momentum, f.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (f.schedule, f.augment, f.batch_size) == ("step", "dsa", 256)
    assert f.steps == 1000  # 100 images = one batch per epoch
    m = cfg.model
    assert (m.name, m.width, m.depth, m.norm, m.pool, m.activation) == ("convnet", 128, 3, "instance", "avg", "relu")


def test_paper_protocol_recipe() -> None:
    f = student_fit_config(ProtocolConfig(name="paper"), n_train=500)
    assert (f.optimizer, f.lr, f.weight_decay, f.schedule, f.augment) == ("adam", 1e-4, 0.0, "none", "dsa")
    assert ProtocolConfig(name="paper").model == DD_MODEL


@pytest.mark.parametrize("base", ["dd", "paper"])
def test_soft_protocol_extends_its_base(base: str) -> None:
    soft = ProtocolConfig(name="soft", base=base, kd_temperature=2.0, kd_alpha=0.7)
    f_soft, f_base = student_fit_config(soft, 100), student_fit_config(ProtocolConfig(name=base), 100)
    assert (f_soft.optimizer, f_soft.lr, f_soft.schedule) == (f_base.optimizer, f_base.lr, f_base.schedule)
    assert f_soft == f_base  # the KD term is the protocol's (train_students passes dsv.train.KD)
    assert soft.label_type == "soft" and ProtocolConfig(name=base).label_type == "hard"


def test_step_budget_epochs_and_minimum() -> None:
    cfg = ProtocolConfig(epochs=10, min_steps=0)
    assert student_steps(cfg, 10) == 10  # batch = n = 10: one step per epoch
    assert student_steps(cfg, 500) == 20  # ceil(500 / 256) = 2 steps per epoch, like the DD data loader
    assert student_steps(ProtocolConfig(epochs=10, min_steps=300), 10) == 300  # the minimum binds
    assert student_steps(ProtocolConfig(epochs=1000, min_steps=300), 10) == 1000


def test_protocol_config_checks() -> None:
    with pytest.raises(ValueError, match="name = 'ddd'"):
        ProtocolConfig(name="ddd")
    with pytest.raises(ValueError, match="base = 'soft'"):
        ProtocolConfig(name="soft", base="soft")
    with pytest.raises(ValueError, match="kd_alpha"):
        ProtocolConfig(kd_alpha=1.5)
    assert PROTOCOLS == ("dd", "paper", "soft")


def test_soft_targets_tend_to_hard_labels_as_temperature_goes_to_zero() -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(16, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(16, 5, generator=g, dtype=torch.float64) * 3
    hard = F.cross_entropy(student, teacher.argmax(dim=1))
    gaps = []
    for t in (1.0, 0.1, 1e-3):
        soft = soft_cross_entropy(student, F.softmax(teacher / t, dim=1)).mean()
        gaps.append(float((soft - hard).abs()))
    assert gaps[0] > 1e-2  # at T = 1 the soft targets really differ from one-hot
    assert gaps[1] < gaps[0]
    assert gaps[2] < 1e-9


def test_kd_with_alpha_zero_is_plain_training() -> None:
    # α = 0 removes the KD term: training with a teacher must equal training without one.
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g), torch.arange(3).repeat(4)
    teacher = build_seeded(ModelConfig(name="mlp_tiny"), (6,), 3, 9)
    cfg = student_fit_config(ProtocolConfig(name="soft", epochs=5, min_steps=0), 12)
    a, b = (build_seeded(ModelConfig(name="mlp_tiny"), (6,), 3, 1) for _ in range(2))
    fit(a, x, y, cfg, seed=0, kd=KD(teacher, alpha=0.0))
    fit(b, x, y, cfg, seed=0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _toy() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Separable 2-class images (N, 1, 8, 8): class c is bright in the left/right half."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(2).repeat(n // 2)
        x = torch.randn(n, 1, 8, 8, generator=g) * 0.3
        x[y == 0, :, :, :4] += 1.0
        x[y == 1, :, :, 4:] += 1.0
        return x, y

    x, y = make(10)
    xt, yt = make(40)
    return x, y, xt, yt


TINY = ModelConfig(name="convnet_tiny")


@pytest.mark.parametrize("name", ["dd", "soft"])
def test_train_students_learn_and_are_seeded(name: str) -> None:
    x, y, xt, yt = _toy()
    teacher = build_seeded(TINY, (1, 8, 8), 2, 7)
    fit(teacher, torch.cat([x, xt]), torch.cat([y, yt]), FitConfig(lr=1e-2, steps=30))
    cfg = ProtocolConfig(name=name, epochs=40, min_steps=0, model=TINY)
    res = train_students(x, y, xt, yt, teacher, cfg, (1, 8, 8), 2, seeds=[0, 1, 0])
    assert len(res) == 3 and all(isinstance(r, EvalResult) for r in res)
    assert res[0] == res[2]  # same seed, same student
    assert all(r.accuracy > 0.8 for r in res), [r.accuracy for r in res]


def test_train_students_hands_each_student_to_the_caller() -> None:
    x, y, xt, yt = _toy()
    cfg = ProtocolConfig(name="dd", epochs=5, min_steps=0, model=TINY)
    seen: list[tuple[int, float, float]] = []

    def on_student(seed: int, model: torch.nn.Module, test: EvalResult) -> None:
        again = evaluate(model, xt, yt, 2)  # the very student that was scored
        seen.append((seed, test.accuracy, again.accuracy))

    res = train_students(x, y, xt, yt, None, cfg, (1, 8, 8), 2, [3, 5], on_student=on_student)
    assert [s for s, _, _ in seen] == [3, 5]
    assert [a for _, a, _ in seen] == [r.accuracy for r in res] == [b for _, _, b in seen]


def test_soft_protocol_needs_teacher() -> None:
    x, y, xt, yt = _toy()
    with pytest.raises(ValueError, match="needs the teacher"):
        train_students(x, y, xt, yt, None, ProtocolConfig(name="soft", model=TINY), (1, 8, 8), 2, [0])


def test_result_row_carries_protocol() -> None:
    row = ResultRow.from_results("random", 10, 10, ProtocolConfig(name="paper"), [0.5, 0.7, 0.6], wall_s=3.0)
    d = row.to_dict()
    assert {"method", "ipc", "shots", "protocol", "acc_mean", "acc_std", "n_runs"} <= set(d)
    assert d["protocol"] == "paper" and d["label_type"] == "hard"
    assert d["acc_mean"] == pytest.approx(0.6)
    assert d["acc_std"] == pytest.approx((0.02 / 3) ** 0.5)  # population std
    assert d["n_runs"] == 3 and d["accs"] == [0.5, 0.7, 0.6]
    json.dumps(d)
    soft = ResultRow.from_results("dsv_nshot", 1, 1, "soft", [EvalResult(0.4, [0.4], 10)])
    assert soft.label_type == "soft" and soft.protocol == "soft"


def test_result_row_checks() -> None:
    with pytest.raises(ValueError, match="does not match protocol 'dd'"):
        ResultRow("random", 1, 1, "dd", "soft", 0.5, 0.0, 1)
    with pytest.raises(ValueError, match="row.method = 'coreset'"):
        ResultRow("coreset", 1, 1, "dd", "hard", 0.5, 0.0, 1)
    with pytest.raises(ValueError, match="n_runs"):
        ResultRow("random", 1, 1, "dd", "hard", 0.5, 0.0, 2, accs=(0.5,))
    assert "full" in METHOD_NAMES and "dm" in METHOD_NAMES
    assert ResultRow("margin", 1, 1, "dd", "hard", 0.5, 0.0, 1).method == "margin"


def test_label_robust_score_by_hand() -> None:
    """DD-Ranking's LRS on a case computed by hand: accs (0.6, 0.7), random (0.5, 0.5), real 0.9, w = 0.5.
    Seed 1: HLR 0.3, IOR 0.1, α = 0.05·1 − 0.15 = −0.1; seed 2: HLR 0.2, IOR 0.2, α = 0.1 − 0.1 = 0.
    LRS = (e^α − e^-1) / (e − e^-1) = (0.904837 − 0.367879) / 2.350402 = 0.228454 and 0.632121 / 2.350402 = 0.268941."""
    import math

    from dsv.protocols import label_robust_score

    s = label_robust_score([0.6, 0.7], [0.5, 0.5], 0.9)
    assert math.isclose(s.hlr_mean, 0.25) and math.isclose(s.hlr_std, 0.05)
    assert math.isclose(s.ior_mean, 0.15) and math.isclose(s.ior_std, 0.05)
    lrs = [(math.exp(a) - math.exp(-1)) / (math.exp(1) - math.exp(-1)) for a in (-0.1, 0.0)]
    assert abs(lrs[0] - 0.228454) < 1e-6 and abs(lrs[1] - 0.268941) < 1e-6
    assert math.isclose(s.lrs_mean, sum(lrs) / 2, rel_tol=1e-12)
    assert math.isclose(s.lrs_std, abs(lrs[1] - lrs[0]) / 2, rel_tol=1e-9)
    # the extremes of α map to 0 and 1
    assert math.isclose(label_robust_score([0.0], [1.0], 1.0).lrs_mean, 0.0, abs_tol=1e-12)
    assert math.isclose(label_robust_score([1.0], [0.0], 1.0, weight=1.0).lrs_mean, 1.0)
    with pytest.raises(ValueError, match="at least one paired accuracy"):
        label_robust_score([], [0.5], 0.9)


def test_dsv_method_names_cover_every_init_kind() -> None:
    from dsv.extract import INITS
    from dsv.protocols import DSV_METHODS

    assert sorted(DSV_METHODS.values()) == sorted(INITS)
    assert all(m == f"dsv_{i}" for m, i in DSV_METHODS.items())
