"""KKT certificate, convergence phase, θ subsets, the NNLS λ solver and support scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsv.certificate import ConvergeConfig, converge
from dsv.extract import ExtractConfig, extract
from dsv.kernel import (
    kkt_certificate,
    relative_residual,
    scale_invariant_names,
    solve_nnls,
    stationarity_params,
)
from dsv.kkt import KKTConfig, stationarity_residual
from dsv.lam import LambdaConfig, fit_lambdas, solve_lambdas
from dsv.models import ModelConfig, build_seeded, final_linear


def _mlp64(seed: int = 0) -> nn.Module:
    return build_seeded(ModelConfig(name="mlp", width=8, depth=1, activation="tanh"), (4,), 3, seed).double()


def _data(n: int = 60, d: int = 4, c: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(c, (n,), generator=g)


def test_certificate_tiny_at_a_converged_teacher_and_large_when_perturbed() -> None:
    x, y = _data()
    model = _mlp64()
    omega = 1e-2
    params = list(model.parameters())
    before = kkt_certificate(model, x, y, omega, params).relative
    res = converge(model, x, y, omega, ConvergeConfig(scope="all", max_iter=2000, target=1e-9))
    cert = kkt_certificate(model, x, y, omega, params)
    assert cert.relative < 1e-4, (cert, res.iterations)
    assert before > 100 * cert.relative
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    assert kkt_certificate(model, x, y, omega, params).relative > 0.05


def test_converge_last_layer_certifies_the_last_layer_only() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(3, (40,), generator=g)
    model = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 3, 0).double()
    feats_before = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("classifier")}
    converge(model, x, y, 5e-3, ConvergeConfig(scope="last", max_iter=500, target=1e-10))
    last = kkt_certificate(model, x, y, 5e-3, stationarity_params(model, "last"), "last").relative
    assert last < 1e-4
    for n, p in model.named_parameters():
        if n in feats_before:
            assert torch.equal(p, feats_before[n]), n  # features untouched
    with pytest.raises(ValueError, match="weight decay"):
        kkt_certificate(model, x, y, 0.0, stationarity_params(model, "last"))


def test_nnls_started_at_an_exact_solution_stays_there() -> None:
    g = torch.Generator().manual_seed(0)
    gm = torch.randn(20, 50, generator=g, dtype=torch.float64)
    lam_star = torch.rand(20, generator=g, dtype=torch.float64)
    lam_star[::4] = 0.0  # some multipliers exactly at the bound
    theta = -(gm.t() @ lam_star)
    lam = solve_nnls(gm, theta, steps=1000, lam0=lam_star)
    assert float(relative_residual([theta], [gm.t() @ lam])) < 1e-6
    # uniform exact solution (a KKT point's λ = 1/(nω)): the solver's own warm start keeps it
    theta_u = -(0.3 * gm.sum(0))
    lam_u, rel = solve_lambdas(gm, theta_u, "l1", steps=1000, solver="nnls")
    assert rel < 1e-3 and torch.allclose(lam_u, torch.full_like(lam_u, 0.3), atol=1e-6)
    # from zero it finds an exact non-negative solution too
    lam0 = solve_nnls(gm, theta, steps=3000)
    assert (lam0 >= 0).all() and float(relative_residual([theta], [gm.t() @ lam0])) < 1e-4


def test_support_score_puts_svc_support_vectors_first() -> None:
    svm = pytest.importorskip("sklearn.svm")
    g = torch.Generator().manual_seed(0)
    n, omega = 100, 1e-3
    x = torch.cat([torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.7 + torch.tensor([2.0, 0.5]),
                   torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.7 - torch.tensor([2.0, 0.5])])
    y = torch.cat([torch.zeros(n), torch.ones(n)]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2)).double()
    converge(model, x, y, omega, ConvergeConfig(scope="all", max_iter=2000, target=1e-10))
    res = fit_lambdas(model, x, y, LambdaConfig(batch_size=10**6, steps=2000, solver="nnls"), n_train=2 * n)
    svc = svm.SVC(kernel="linear", C=1.0 / (2 * n * omega)).fit(x.numpy(), y.numpy())
    sv = set(svc.support_.tolist())
    assert res.support is not None and res.margin is not None
    top = set(res.support.argsort(descending=True)[: len(sv)].tolist())
    assert len(top & sv) / len(sv) >= 0.9
    assert res.support_rank is not None and res.topk(1, by="support").numel() == 2


def test_fit_lambdas_in_float64_and_on_the_training_set_scale() -> None:
    # At a KKT point of mean CE + (ω/2)‖θ‖² over n samples, λ = 1/(nω) for every sample: the absolute scale.
    x, y = _data(40)
    model = _mlp64()
    omega = 1e-2
    converge(model, x, y, omega, ConvergeConfig(scope="all", max_iter=2000, target=1e-9))
    res = fit_lambdas(model, x, y, LambdaConfig(batch_size=40, steps=2000, solver="nnls", param_subset="last"))
    assert res.lam.dtype == torch.float64 and torch.isfinite(res.lam).all()
    assert torch.allclose(res.lam, torch.full_like(res.lam, 1 / (40 * omega)), rtol=1e-3), res.lam[:4]
    # the same images as a subsample of a 80-image training split: λ is reported on that split's scale
    res2 = fit_lambdas(model, x, y, LambdaConfig(batch_size=40, steps=2000, solver="nnls", param_subset="last"),
                       n_train=80)
    assert torch.allclose(res2.lam, torch.full_like(res2.lam, 1 / (80 * omega)), rtol=1e-3)


def test_lambda_memory_guard_checks_the_real_batch_size() -> None:
    x, y = _data(14)
    model = _mlp64()
    p_total = sum(p.numel() for p in model.parameters())
    # batch_size 10 over 14 samples gives one batch of 14: a guard on 10 would let it through
    cfg = LambdaConfig(batch_size=10, steps=5, max_bytes=12 * p_total * 8)
    with pytest.raises(MemoryError, match="batch of 14"):
        fit_lambdas(model, x, y, cfg)


def test_batchnorm_teacher_untouched_by_residual_and_extraction() -> None:
    model = build_seeded(ModelConfig(name="convnet", width=8, depth=2, norm="batch"), (1, 8, 8), 3, 0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.arange(3).repeat(2)
    stationarity_residual(model, x, y, torch.ones(6), subset="last")
    extract(model, x, y, ExtractConfig(steps=2, kkt=KKTConfig(param_subset="last")), seed=0)
    extract(model, x, y, ExtractConfig(steps=2, lam_solver="nnls"), seed=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


def test_last_layer_is_found_by_structure() -> None:
    tv = pytest.importorskip("torchvision.models")
    net = tv.resnet18(num_classes=3)
    assert final_linear(net)[0] == "fc"
    assert stationarity_params(net, "last") == [net.fc.weight, net.fc.bias]
    with pytest.raises(ValueError, match="no nn.Linear"):
        final_linear(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_scale_invariant_parameters_of_a_normalised_network() -> None:
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inorm = build_seeded(ModelConfig(name="convnet", width=8, depth=2, norm="instance"), (1, 8, 8), 3, 0)
    names = scale_invariant_names(inorm, x)
    assert {"features.0.weight", "features.0.bias", "features.4.weight", "features.4.bias"} <= set(names)
    assert not any(n.startswith("classifier") for n in names)
    free = stationarity_params(inorm, "free", x)
    assert len(free) == len(list(inorm.parameters())) - len(names)
    plain = build_seeded(ModelConfig(name="convnet", width=8, depth=2, norm="none", pool="max"), (1, 8, 8), 3, 0)
    assert scale_invariant_names(plain, x) == []
    with pytest.warns(UserWarning, match="scale-invariant"):
        extract(inorm, x[:3], torch.arange(3), ExtractConfig(steps=1, kkt=KKTConfig(param_subset="all")), seed=0)
