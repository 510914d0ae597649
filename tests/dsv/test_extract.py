"""DSV synthesis: teacher untouched, dual rules, trimming, soft targets, generation, NaN guard."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dsv.extract import ExtractConfig, extract, init_candidates
from dsv.generate import soft_targets
from dsv.kkt import KKTConfig
from dsv.models import ModelConfig, build_seeded
from dsv.train import FitConfig, fit

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(90, *SHAPE, generator=g)
    y = torch.arange(3).repeat_interleave(30)
    x[y == 1, :, :4] += 2.0
    x[y == 2, :, 4:] += 2.0
    model = build_seeded(ModelConfig(name="convnet_tiny"), SHAPE, 3, seed=0)
    fit(model, x, y, FitConfig(epochs=20, batch_size=30, weight_decay=5e-3, lr=1e-2), seed=0)
    return model.eval()


def _cands(per_class: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return init_candidates("noise", per_class, 3, SHAPE, torch.Generator().manual_seed(1))


def test_teacher_parameters_are_bit_identical(teacher: torch.nn.Module) -> None:
    teacher.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    flags = [p.requires_grad for p in teacher.parameters()]
    x0, y0 = _cands()
    extract(teacher, x0, y0, ExtractConfig(steps=5, dual="clamp"), seed=0)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert all(p.grad is None for p in teacher.parameters())


def test_drop_rule_reports_and_every_class_stays_full(teacher: torch.nn.Module) -> None:
    x0, y0 = _cands(4)
    # A huge λ learning rate makes some λ overshoot below zero within a few steps.
    res = extract(teacher, x0, y0, ExtractConfig(steps=15, dual="drop", lr_lam=5.0, kkt=KKTConfig(param_subset="all")), seed=0)
    assert res.dropped > 0
    assert res.trace[-1]["survivors"] == 12 - res.dropped
    # the dropped candidates fill their classes' places (λ = 0): nothing is lost
    assert res.per_class == [4, 4, 4] and res.x.shape[0] == 12
    assert (res.lam >= 0).all() and res.lambda_zero >= res.dropped
    soft = extract(teacher, x0, y0, ExtractConfig(steps=5, dual="softplus", lr_lam=5.0), seed=0)
    assert (soft.lam > 0).all() and soft.x.shape[0] == 12


def test_a_class_is_never_emptied_by_zero_lambdas(teacher: torch.nn.Module) -> None:
    # clamp with a huge λ step drives many λ to exactly 0; the earlier rule returned only λ > 0 candidates
    x0, y0 = _cands(4)
    cfg = ExtractConfig(steps=15, dual="clamp", lr_lam=5.0, kkt=KKTConfig(param_subset="all"))
    res = extract(teacher, x0, y0, cfg, seed=0, keep_per_class=3)
    full = extract(teacher, x0, y0, cfg, seed=0)
    assert int((full.lam == 0).sum()) >= 3  # the case under test happens
    assert res.per_class == [3, 3, 3] and res.x.shape[0] == 9
    for c in range(3):
        members = (full.y == c).nonzero(as_tuple=True)[0]
        positive = members[full.lam[members] > 0]
        kept = set(res.source_index[res.y == c].tolist())
        # candidates with λ > 0 come first; λ = 0 ones only fill what is left
        assert set(full.source_index[positive].tolist()) <= kept or len(kept & set(
            full.source_index[positive].tolist())) == 3


def test_returned_dsvs_are_primal_feasible(teacher: torch.nn.Module) -> None:
    x0, y0 = _cands(4)
    with torch.no_grad():
        start_wrong = int((teacher(x0).argmax(1) != y0).sum())
    assert start_wrong > 0  # noise starts: several candidates begin in another class
    res = extract(teacher, x0, y0, ExtractConfig(steps=0), seed=0, keep_per_class=4)
    assert res.repaired == start_wrong and res.infeasible == 0
    assert (res.probs.argmax(1) == res.y).all()
    with torch.no_grad():
        assert (teacher(res.x).argmax(1) == res.y).all()
    raw = extract(teacher, x0, y0, ExtractConfig(steps=0, repair_steps=0), seed=0, keep_per_class=4)
    assert raw.repaired == 0 and raw.infeasible == start_wrong and raw.per_class == [4, 4, 4]


def test_deterministic_and_pixel_bounds(teacher: torch.nn.Module) -> None:
    x0, y0 = _cands()
    lo, hi = torch.tensor([-0.5]), torch.tensor([0.5])
    a = extract(teacher, x0, y0, ExtractConfig(steps=4, dual="clamp"), seed=3, pixel_bounds=(lo, hi))
    b = extract(teacher, x0, y0, ExtractConfig(steps=4, dual="clamp"), seed=3, pixel_bounds=(lo, hi))
    assert torch.equal(a.x, b.x) and torch.equal(a.lam, b.lam)
    assert a.x.min() >= -0.5 and a.x.max() <= 0.5


def test_primal_drives_candidates_to_their_targets(teacher: torch.nn.Module) -> None:
    x0, y0 = _cands(3)
    cfg = ExtractConfig(steps=60, dual="clamp", lr_x=0.05, clamp_pixels=False, kkt=KKTConfig(beta_primal=1.0))
    res = extract(teacher, x0, y0, cfg, seed=0)
    assert res.trace[-1]["acc_target"] == 1.0
    assert res.trace[-1]["acc_target"] >= res.trace[0]["acc_target"]
    assert set(res.trace[0]) >= {"loss", "stat", "primal", "entropy", "acc_target", "survivors", "residual_l2"}


def test_soft_targets() -> None:
    y = soft_targets(0, 2, 0.6, 3)
    assert torch.allclose(y, torch.tensor([0.4, 0.0, 0.6]))
    with pytest.raises(ValueError, match="delta"):
        soft_targets(0, 1, 1.5, 3)


def test_nan_is_reported_with_step(teacher: torch.nn.Module) -> None:
    x0, y0 = _cands()
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite DeepKKT loss .* at step 0; no finite loss was logged"):
        extract(teacher, x0, y0, ExtractConfig(steps=3), seed=0)


def test_init_kinds_and_errors() -> None:
    g = torch.Generator().manual_seed(0)
    real_x, real_y = torch.randn(30, *SHAPE), torch.arange(3).repeat(10)
    x, y = init_candidates("nshot", 2, 3, SHAPE, g, real_x=real_x, real_y=real_y)
    assert x.shape == (6, *SHAPE) and y.tolist() == [0, 0, 1, 1, 2, 2]
    assert all(any(torch.equal(xi, r) for r in real_x) for xi in x)
    other = torch.randn(5, *SHAPE)
    x, y = init_candidates("0shot", 2, 3, SHAPE, g, other_x=other)
    assert x.shape == (6, *SHAPE) and y.tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="not one of"):
        init_candidates("bogus", 1, 3, SHAPE, g)
    with pytest.raises(ValueError, match="0-shot images have shape"):
        init_candidates("0shot", 1, 3, SHAPE, g, other_x=torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="dual"):
        ExtractConfig(dual="nope")
    with pytest.raises(ValueError, match="lr_x"):
        ExtractConfig(lr_x=0)


def test_keep_per_class_ranks_positive_lambdas_by_support(teacher: torch.nn.Module) -> None:
    x0, y0 = _cands(3)
    cfg = ExtractConfig(steps=3, dual="clamp", keep_by="support", lr_lam=0.01)
    res = extract(teacher, x0, y0, cfg, seed=0, keep_per_class=2)
    full = extract(teacher, x0, y0, cfg, seed=0)
    assert (full.lam > 0).all()  # a plain ranking case: every candidate supports
    for c in range(3):
        kept = set(res.source_index[res.y == c].tolist())
        members = (full.y == c).nonzero(as_tuple=True)[0]
        best = set(full.source_index[members[full.support[members].argsort(descending=True)[:2]]].tolist())
        assert kept == best


def test_nnls_lambda_solver_solves_the_nonnegative_least_squares_problem(teacher: torch.nn.Module) -> None:
    optimize = pytest.importorskip("scipy.optimize")
    from dsv.kernel import per_sample_grads, stationarity_params

    x0, y0 = _cands(30)
    cfg = ExtractConfig(steps=0, lam_solver="nnls", lam_steps=5000, kkt=KKTConfig(param_subset="last", distance="l2"))
    res = extract(teacher, x0, y0, cfg, seed=0)
    assert (res.lam >= 0).all() and res.dual == "nnls"
    # step 0's λ is the NNLS solution for the initial candidates: compare with scipy's active-set solver
    gm = per_sample_grads(teacher, x0, y0, "last").double()
    theta = torch.cat([p.detach().flatten() for p in stationarity_params(teacher, "last")]).double()
    ref, _ = optimize.nnls(gm.t().numpy(), -theta.numpy())
    r_ours = (theta + gm.t() @ res.lam.double()).norm() / theta.norm()
    r_ref = (theta + gm.t() @ torch.from_numpy(ref)).norm() / theta.norm()
    s = gm.sum(0)
    uniform = -(theta @ s) / (s @ s)
    r_uniform = (theta + uniform * s).norm() / theta.norm()
    # float32 gradients: scipy's float64 optimum to 1e-5, well below the best uniform λ's residual
    assert abs(float(r_ours) - float(r_ref)) < 1e-5 and float(r_ref) < float(r_uniform) - 0.1, (
        float(r_ours), float(r_ref), float(r_uniform))
    assert abs(res.trace[0]["residual_l2"] - float(r_ours)) < 1e-4


def test_nnls_solve_interval_is_read(teacher: torch.nn.Module) -> None:
    # lam_every acts only with the NNLS λ step, and there it acts: re-solving every 4th step instead of every step
    # leaves other λ (and so other candidates). (lam_steps, the first-order budget before NNLS's exact active-set
    # finish, changes λ only when that finish runs out of its own budget: test_nnls_lambda_solver above.)
    x0, y0 = _cands(30)
    base = ExtractConfig(steps=6, lam_solver="nnls", kkt=KKTConfig(param_subset="last", distance="l2"))
    ref, res = (extract(teacher, x0, y0, c, seed=0) for c in (base, replace(base, lam_every=4)))
    assert not torch.equal(res.lam, ref.lam) and not torch.equal(res.x, ref.x)
