"""The fast and memory-bounded DeepKKT paths give the reference path's loss and gradients exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from dsv.kernel import stationarity_params
from dsv.kkt import (
    KKTConfig,
    estimate_bytes_per_candidate,
    group_norm_primitive,
    kkt_objective,
    primitive_norm_view,
    resolve_chunk_size,
)
from dsv.models import ModelConfig, build_seeded

SHAPE = (2, 8, 8)


def _setup(norm: str = "instance") -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = build_seeded(ModelConfig(name="convnet_tiny", norm=norm), SHAPE, 3, seed=0).double().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, *SHAPE, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    lam = torch.rand(7, generator=g, dtype=torch.float64) + 0.1
    return model, x, y, lam


def _grads(model: nn.Module, x0: torch.Tensor, y: torch.Tensor, lam0: torch.Tensor, cfg: KKTConfig):
    x = x0.clone().requires_grad_(True)
    u = lam0.clone().requires_grad_(True)
    # λ and x enter as non-leaf functions of leaves, as in extract (lam = scale·u, xs = x[idx]).
    params = stationarity_params(model, cfg.param_subset)
    total, terms = kkt_objective(model, params, x * 1.0, y, 2.0 * u, cfg, torch.Generator().manual_seed(11))
    gx, gu = torch.autograd.grad(total, [x, u])
    return total.detach(), terms, gx, gu


@pytest.mark.parametrize("subset", ["all", "last"])
@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("etas", [(0.0, 0.0), (5.0, 5.0), (0.0, 5.0)])
def test_fast_and_chunked_match_reference(subset: str, distance: str, etas: tuple[float, float]) -> None:
    model, x, y, lam = _setup()
    base = KKTConfig(distance=distance, param_subset=subset, eta_stat=etas[0], eta_primal=etas[1], beta_primal=0.3,
                     primal="ungated",
                     beta_tv=0.1, beta_norm=1e-3, impl="reference")
    ref_total, ref_terms, ref_gx, ref_gu = _grads(model, x, y, lam, base)
    assert ref_gx.abs().sum() > 0 and ref_gu.abs().sum() > 0
    for cfg in (replace(base, impl="fast"), replace(base, impl="fast", chunk_size=3),
                replace(base, impl="reference", chunk_size=2), replace(base, impl="fast", chunk_size=7)):
        total, terms, gx, gu = _grads(model, x, y, lam, cfg)
        assert torch.allclose(total, ref_total, rtol=1e-10, atol=1e-12), cfg
        assert torch.allclose(terms.stat_aug, ref_terms.stat_aug, rtol=1e-10, atol=1e-12)
        assert torch.allclose(terms.logits, ref_terms.logits, rtol=1e-10, atol=1e-12)
        assert torch.allclose(gx, ref_gx, rtol=1e-8, atol=1e-12), (cfg, (gx - ref_gx).abs().max())
        assert torch.allclose(gu, ref_gu, rtol=1e-8, atol=1e-12), (cfg, (gu - ref_gu).abs().max())


def test_chunked_gated_primal_matches_reference() -> None:
    model, x, y, lam = _setup("group")
    base = KKTConfig(primal="gated", beta_primal=0.5, impl="reference")
    ref = _grads(model, x, y, lam, base)
    assert ref[1].primal > 0  # some candidates are misclassified, so the gate lets CE through
    got = _grads(model, x, y, lam, replace(base, impl="fast", chunk_size=4))
    assert torch.allclose(got[0], ref[0], rtol=1e-10)
    assert torch.allclose(got[2], ref[2], rtol=1e-8, atol=1e-12)
    assert torch.allclose(got[3], ref[3], rtol=1e-8, atol=1e-12)


def test_a_wrong_direction_would_be_caught() -> None:
    # The equivalence test above can fail: dropping the augmented copy changes the gradient.
    model, x, y, lam = _setup()
    ref = _grads(model, x, y, lam, KKTConfig(impl="reference"))
    other = _grads(model, x, y, lam, KKTConfig(impl="fast", chunk_size=3, eta_stat=4.0, eta_primal=4.0))
    assert not torch.allclose(other[2], ref[2], rtol=1e-8)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm_primitive_matches_torch(groups: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    want = nn.functional.group_norm(x, groups, w, b, 1e-5)
    assert torch.allclose(group_norm_primitive(x, groups, w, b, 1e-5), want, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda a, c, d: group_norm_primitive(a, groups, c, d, 1e-5), (x, w, b))


def test_view_shares_parameters_and_leaves_model_untouched() -> None:
    model = build_seeded(ModelConfig(name="convnet_tiny"), SHAPE, 3, seed=0).eval()
    mods_before = list(model.modules())
    view = primitive_norm_view(model)
    assert view is not model
    assert list(model.modules()) == mods_before
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in view.parameters()} == ids
    x = torch.randn(4, *SHAPE)
    assert torch.allclose(view(x), model(x), atol=1e-5)
    mlp = build_seeded(ModelConfig(name="mlp_tiny"), (5,), 3, seed=0)
    assert primitive_norm_view(mlp) is mlp  # nothing to replace: the model itself


def test_chunk_size_from_memory_budget() -> None:
    model = build_seeded(ModelConfig(name="convnet_tiny"), SHAPE, 3, seed=0).eval()
    x = torch.zeros(50, *SHAPE)
    per = estimate_bytes_per_candidate(model, x)
    assert per > 0
    assert resolve_chunk_size(model, x, KKTConfig()) == 50
    assert resolve_chunk_size(model, x, KKTConfig(chunk_size=8)) == 8
    budget = (10 * per + per // 2) / 2**20
    assert resolve_chunk_size(model, x, KKTConfig(memory_budget_mb=budget, impl="fast")) == 10
    assert resolve_chunk_size(model, x, KKTConfig(memory_budget_mb=1e-9)) == 1


def test_new_config_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="impl"):
        KKTConfig(impl="turbo")
    with pytest.raises(ValueError, match="chunk_size"):
        KKTConfig(chunk_size=-1)
    with pytest.raises(ValueError, match="memory_budget_mb"):
        KKTConfig(memory_budget_mb=-1.0)
