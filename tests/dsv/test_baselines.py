"""Core-set selectors: counts per class, determinism, and hand-computed greedy choices."""

from __future__ import annotations

import pytest
import torch

from dsv.baselines import (
    SELECTORS,
    ProxyConfig,
    el2n_scores,
    forgetting_counts,
    forgetting_scores,
    herding,
    kcenter_greedy,
    select,
    uncertainty_scores,
)
from dsv.models import ModelConfig
from dsv.train import FitConfig

C = 3


def _data(n_per_class: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiny 3-class images (N, 1, 8, 8), labels, features (N, 5) and logits (N, 3)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(n_per_class)
    y = y[torch.randperm(y.numel(), generator=g)]  # classes interleaved, not sorted
    n = y.numel()
    x = torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
    feats = torch.randn(n, 5, generator=g)
    logits = torch.randn(n, C, generator=g)
    return x, y, feats, logits


TINY_PROXY = ProxyConfig(
    model=ModelConfig(name="mlp_tiny"),
    fit=FitConfig(optimizer="sgd", lr=0.05, epochs=3, batch_size=8),
    el2n_models=2,
    el2n_epochs=1,
)


def _run(method: str, seed: int, k: int = 4) -> torch.Tensor:
    x, y, feats, logits = _data()
    return select(method, y=y, k=k, num_classes=C, seed=seed, features=feats, logits=logits, x=x, proxy=TINY_PROXY)


@pytest.mark.parametrize("method", list(SELECTORS))
def test_k_per_class_grouped_and_deterministic(method: str) -> None:
    _, y, _, _ = _data()
    k = 4
    idx = _run(method, seed=1, k=k)
    assert idx.dtype == torch.int64
    assert idx.numel() == C * k
    assert idx.unique().numel() == C * k  # no duplicates
    # Grouped by class, class 0 first, exactly k each.
    assert y[idx].tolist() == [c for c in range(C) for _ in range(k)]
    assert torch.equal(idx, _run(method, seed=1, k=k))


def test_random_differs_across_seeds() -> None:
    assert not torch.equal(_run("random", seed=1), _run("random", seed=2))


@pytest.mark.parametrize("method", list(SELECTORS))
def test_class_too_small_names_the_class(method: str) -> None:
    x, y, feats, logits = _data(n_per_class=3)
    with pytest.raises(ValueError, match="class 0 has only 3"):
        select(method, y=y, k=4, num_classes=C, seed=0, features=feats, logits=logits, x=x, proxy=TINY_PROXY)


@pytest.mark.parametrize(
    ("method", "missing"),
    [("herding", "features"), ("kcenter", "features"), ("entropy", "logits"), ("margin", "logits"),
     ("forgetting", "x"), ("el2n", "x")],
)
def test_missing_input_is_named(method: str, missing: str) -> None:
    _, y, _, _ = _data()
    with pytest.raises(ValueError, match=f"needs {missing}="):
        select(method, y=y, k=2, num_classes=C, seed=0)


@pytest.mark.parametrize("method", list(SELECTORS))
def test_each_selector_runs_on_exactly_its_declared_inputs(method: str) -> None:
    from dsv.baselines import SELECTOR_INPUTS

    x, y, feats, logits = _data()
    available = {"features": feats, "logits": logits, "x": x}
    given = {name: available[name] for name in SELECTOR_INPUTS[method]}
    idx = select(method, y=y, k=2, num_classes=C, seed=0, proxy=TINY_PROXY, **given)
    assert idx.shape == (2 * C,)


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="'grand' is not one of"):
        select("grand", y=torch.zeros(4, dtype=torch.long), k=1, num_classes=1, seed=0)


def test_herding_hand_computed_1d() -> None:
    # One class, features 3, 1, 0, 1.1: mean μ = 5.1 / 4 = 1.275.
    # t=1: |μ - φ| -> 1.725, 0.275, 1.275, 0.175          -> pick 1.1 (index 3)
    # t=2: |μ - (1.1 + φ)/2| for 3, 1, 0 -> 0.775, 0.225, 0.725 -> pick 1 (index 1)
    # t=3: |μ - (2.1 + φ)/3| for 3, 0 -> 0.425, 0.575      -> pick 3 (index 0)
    # (picking the nearest-to-mean samples would take 0 third, not 3: herding balances the mean.)
    feats = torch.tensor([[3.0], [1.0], [0.0], [1.1]])
    y = torch.zeros(4, dtype=torch.long)
    assert herding(feats, y, 3, 1).tolist() == [3, 1, 0]


def test_herding_hand_computed_2d_two_classes() -> None:
    # Class 0 (indices 0..3): points (2,0), (-2,0), (0,1), (0,-0.5); mean (0, 0.125).
    # t=1 distances to the mean: 2.004, 2.004, 0.875, 0.625 -> index 3 (0,-0.5).
    # t=2: running-mean targets: (0,1) gives mean (0,0.25), error 0.125; (±2,0) give (±1,-0.25), error 1.07
    #      -> index 2.
    # Class 1 (indices 4, 5): both picked, the nearer to the mean (5,5),(7,5) first is a tie -> lowest index.
    feats = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -0.5], [5.0, 5.0], [7.0, 5.0]])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    assert herding(feats, y, 2, 2).tolist() == [3, 2, 4, 5]


def test_kcenter_picks_farthest_point() -> None:
    # 1-D class: 0, 0.1, 0.2, 5, 0.15, -1; mean 0.741... -> first center 0.2 (index 2, nearest the mean).
    # Farthest from {0.2}: 5 (index 3). Farthest from {0.2, 5}: -1 (index 5, distance 1.2).
    feats = torch.tensor([[0.0], [0.1], [0.2], [5.0], [0.15], [-1.0]])
    y = torch.zeros(6, dtype=torch.long)
    assert kcenter_greedy(feats, y, 3, 1).tolist() == [2, 3, 5]


def test_uncertainty_picks_max_entropy_sample() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.1, 0.0, 0.05], [2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    y = torch.zeros(4, dtype=torch.long)
    for method in ("entropy", "least_confidence", "margin"):
        assert select(method, y=y, k=1, num_classes=1, seed=0, logits=logits).tolist() == [1]
    ent = uncertainty_scores(logits, "entropy")
    p = logits.double().softmax(1)
    assert torch.allclose(ent, -(p * p.log()).sum(1))
    assert ent.argmax() == 1


def test_margin_prefers_small_top2_gap() -> None:
    # Sample 0: top-2 probabilities tied (margin 0) but a third class keeps its entropy lower than sample 1.
    logits = torch.tensor([[2.0, 2.0, -10.0], [1.0, 0.0, 0.0]])
    ent = uncertainty_scores(logits, "entropy")
    margin = uncertainty_scores(logits, "margin")
    assert ent.argmax() == 1 and margin.argmax() == 0


def test_ties_broken_by_seed() -> None:
    logits = torch.zeros(20, 2)  # all equally uncertain
    y = torch.zeros(20, dtype=torch.long)
    picks = {tuple(select("entropy", y=y, k=3, num_classes=1, seed=s, logits=logits).tolist()) for s in range(5)}
    assert len(picks) > 1


def test_forgetting_counts_hand_made_history() -> None:
    # Rows = reports, columns = samples.
    correct = torch.tensor(
        [
            [1, 0, 1, 0, 1],
            [0, 1, 1, 0, 1],
            [1, 0, 0, 0, 1],
            [0, 1, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    # sample 0: 1->0 twice; 1: 1->0 once; 2: once; 3: never learned -> R + 1 = 5; 4: never forgotten.
    assert forgetting_counts(correct).tolist() == [2.0, 1.0, 1.0, 5.0, 0.0]


def test_forgetting_scores_one_report_per_epoch() -> None:
    x, y, _, _ = _data()
    proxy = ProxyConfig(model=ModelConfig(name="mlp_tiny"), fit=FitConfig(lr=1e-2, epochs=4, batch_size=8))
    seen = []
    score = forgetting_scores(x, y, C, proxy, torch.Generator().manual_seed(0), callback=seen.append)
    assert len(seen) == 4  # one correctness record per epoch
    assert score.shape == (y.numel(),)
    # Counts are integers in [0, 2] (at most 2 correct->incorrect moves in 4 reports) or 5 (never learned).
    assert all(v in (0.0, 1.0, 2.0, 5.0) for v in score.tolist())
    assert torch.equal(score, forgetting_scores(x, y, C, proxy, torch.Generator().manual_seed(0)))


def test_el2n_matches_definition_bounds() -> None:
    x, y, _, _ = _data()
    s = el2n_scores(x, y, C, TINY_PROXY, torch.Generator().manual_seed(0))
    assert s.shape == (y.numel(),)
    assert (s >= 0).all() and (s <= 2**0.5 + 1e-9).all()  # ‖p − e_y‖₂ ≤ √2
    s2 = el2n_scores(x, y, C, TINY_PROXY, torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)


def test_proxy_config_checks() -> None:
    with pytest.raises(ValueError, match="el2n_models"):
        ProxyConfig(el2n_models=0)


def test_kkt_herding_herds_among_the_low_support_samples() -> None:
    from dsv.baselines import herding, kkt_herding, uniform_support

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(60, 4, generator=g)
    y = torch.arange(2).repeat_interleave(30)
    logits = torch.randn(60, 2, generator=g) * 3
    support = uniform_support(feats, logits, y)
    # by hand for one sample: ‖softmax − onehot‖·‖(h, 1)‖
    p = logits[0].softmax(0).double()
    want = float((p - torch.tensor([1.0, 0.0], dtype=torch.float64)).norm() * (feats[0].double().norm() ** 2 + 1) ** 0.5)
    assert abs(float(support[0]) - want) < 1e-6  # float32 softmax in the caller's logits
    picks = kkt_herding(feats, logits, y, 5, 2, drop=0.2)
    assert picks.shape == (10,) and (y[picks] == torch.arange(2).repeat_interleave(5)).all()
    for c in range(2):
        members = (y == c).nonzero(as_tuple=True)[0]
        dropped = set(members[support[members].argsort(descending=True)[:6]].tolist())  # top 20% of 30
        assert not dropped & set(picks[y[picks] == c].tolist())
    assert torch.equal(kkt_herding(feats, logits, y, 5, 2, drop=0.0), herding(feats, y, 5, 2))
