"""Distribution Matching: it reduces the class-mean embedding gap, shares augmentations, is seeded."""

from __future__ import annotations

import pytest
import torch

from dsv.dm import DMConfig, distribution_matching
from dsv.models import ModelConfig, build_seeded

TINY = ModelConfig(name="convnet_tiny")


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(6)
    x = torch.randn(18, 1, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float()
    y_init = torch.arange(3).repeat(2)
    x_init = torch.randn(6, 1, 8, 8, generator=g)  # noise: far from the real class means
    return x, y, x_init, y_init


def _fixed_objective(x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor) -> float:
    """Σ_c ‖mean ψ(real_c) − mean ψ(syn_c)‖² averaged over 8 fixed random nets, no augmentation."""
    total = 0.0
    for s in range(8):
        net = build_seeded(TINY, (1, 8, 8), 3, 1000 + s)
        with torch.no_grad():
            er, es = net.embed(x_real), net.embed(x_syn)
        for c in range(3):
            total += float(((er[y_real == c].mean(0) - es[y_syn == c].mean(0)) ** 2).sum())
    return total / 8


def test_dm_reduces_matching_loss() -> None:
    x, y, xi, yi = _problem()
    cfg = DMConfig(iterations=40, model=TINY)
    events = []
    res = distribution_matching(x, y, xi, yi, cfg, seed=0, callback=events.append, report_every=10)
    assert len(res.losses) == 40
    assert [e.iteration for e in events] == [10, 20, 30, 40]
    assert res.x.shape == xi.shape and torch.equal(res.y, yi)
    before = _fixed_objective(x, y, xi, yi)
    after = _fixed_objective(x, y, res.x, res.y)
    assert after < 0.5 * before, (before, after)
    assert sum(res.losses[-5:]) < 0.5 * sum(res.losses[:5])


def test_dm_deterministic_given_seed() -> None:
    x, y, xi, yi = _problem()
    cfg = DMConfig(iterations=3, model=TINY)
    a = distribution_matching(x, y, xi, yi, cfg, seed=5)
    b = distribution_matching(x, y, xi, yi, cfg, seed=5)
    c = distribution_matching(x, y, xi, yi, cfg, seed=6)
    assert torch.equal(a.x, b.x) and a.losses == b.losses
    assert not torch.equal(a.x, c.x)


def test_same_augmentation_on_real_and_synthetic() -> None:
    # Synthetic set = the whole real pool: with identical per-class augmentations the class means coincide,
    # so the loss is zero and the images never move. Per-sample or unshared augmentation would break this.
    x, y, _, _ = _problem()
    res = distribution_matching(x, y, x, y, DMConfig(iterations=5, model=TINY, batch_real=64), seed=0)
    assert max(res.losses) < 1e-8
    assert torch.allclose(res.x, x, atol=1e-6)  # only float rounding of the permuted real batch


def test_dm_input_checks() -> None:
    x, y, xi, yi = _problem()
    with pytest.raises(ValueError, match="class 2 has synthetic images but no real images"):
        distribution_matching(x[y < 2], y[y < 2], xi, yi, DMConfig(iterations=1, model=TINY), seed=0)
    with pytest.raises(ValueError, match="draws per image"):
        DMConfig(augment="color|crop_pad|cutout=0.5|flip|scale|rotate")
    assert DMConfig(augment="batch:flip|scale").augment == "batch:flip|scale"
    with pytest.raises(ValueError, match="iterations"):
        DMConfig(iterations=0)
