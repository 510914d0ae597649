"""Differentiable, generator-seeded augmentations."""

from __future__ import annotations

import pytest
import torch

from dsv.augment import (
    ALL_OPS,
    DSA_OPS,
    KKT_OPS,
    AugmentConfig,
    apply_op,
    augment,
    augment_groups,
    parse_augment,
)


def _x(device: str, c: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, c, 12, 12, generator=g).to(device)


@pytest.mark.parametrize("op", ALL_OPS)
def test_op_keeps_shape_and_is_differentiable(op: str, device: str) -> None:
    x = _x(device).requires_grad_(True)
    out = apply_op(op, x, AugmentConfig(flip=1.0), torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    (out * torch.linspace(0, 1, out.numel(), device=device).view_as(out)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("op", ALL_OPS)
def test_op_is_deterministic_given_generator(op: str) -> None:
    x = _x("cpu")
    cfg = AugmentConfig()
    a = apply_op(op, x, cfg, torch.Generator().manual_seed(3))
    b = apply_op(op, x, cfg, torch.Generator().manual_seed(3))
    c = apply_op(op, x, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_is_deterministic_and_leaves_global_rng() -> None:
    x = _x("cpu")
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for cfg in (AugmentConfig(), parse_augment("dsa"), AugmentConfig(ops=("flip", "crop_pad"), one_per_call=False)):
        outs = [augment(x, cfg, torch.Generator().manual_seed(9)) for _ in range(2)]
        assert torch.equal(outs[0], outs[1])
    assert torch.equal(torch.get_rng_state(), state)


def test_flip_probability_one_and_zero() -> None:
    x = _x("cpu")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(x, AugmentConfig(ops=("flip",), flip=1.0), g), x.flip(-1))
    assert torch.equal(augment(x, AugmentConfig(ops=("flip",), flip=0.0), g), x)


def test_zero_strength_warps_are_identity() -> None:
    x = _x("cpu")
    g = torch.Generator().manual_seed(0)
    cfg = AugmentConfig(translate=0.0, crop=0.0, crop_pad=0.0, noise=0.0)
    for op in ("translate", "crop", "crop_pad", "noise"):
        torch.testing.assert_close(apply_op(op, x, cfg, g), x, atol=1e-5, rtol=0)


def test_noise_strength() -> None:
    x = torch.zeros(64, 1, 16, 16)
    out = apply_op("noise", x, AugmentConfig(noise=0.5), torch.Generator().manual_seed(0))
    assert float(out.std()) == pytest.approx(0.5, rel=0.05)


def test_siamese_mode_shares_parameters() -> None:
    """per_sample=False (DSA) applies one draw to the whole batch: equal inputs stay equal."""
    x = _x("cpu")[:1].expand(5, -1, -1, -1)
    cfg = parse_augment("dsa")
    for op in DSA_OPS:
        out = apply_op(op, x, cfg, torch.Generator().manual_seed(1))
        assert torch.allclose(out, out[:1].expand_as(out)), op


def test_tabular_input_is_untouched_and_errors() -> None:
    x = torch.randn(5, 2)
    assert augment(x, AugmentConfig(), torch.Generator().manual_seed(0)) is x
    with pytest.raises(ValueError, match="unknown op"):
        AugmentConfig(ops=("flip", "solarize"))
    with pytest.raises(ValueError, match=r"flip must be in \[0, 1\]"):
        AugmentConfig(flip=1.5)
    assert set(KKT_OPS) | set(DSA_OPS) <= set(ALL_OPS)


@pytest.mark.parametrize("cfg", [parse_augment("dsa"), AugmentConfig(), AugmentConfig(ops=("flip", "crop_pad"), one_per_call=False)],
                         ids=["dsa", "kkt", "flip_crop"])
def test_augment_groups_equals_one_augment_per_block(cfg: AugmentConfig) -> None:
    """Blocks augmented together get exactly the images (and leave each generator in the state) that one
    augment call per block with its own generator gives."""
    x = torch.rand(4 * 6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    together = [torch.Generator().manual_seed(s) for s in range(4)]
    alone = [torch.Generator().manual_seed(s) for s in range(4)]
    for _ in range(12):
        out = augment_groups(x, cfg, together)
        ref = torch.cat([augment(x[i * 6 : (i + 1) * 6], cfg, alone[i]) for i in range(4)])
        assert torch.equal(out, ref)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(together, alone))
    with pytest.raises(ValueError, match="equal blocks"):
        augment_groups(x[:5], cfg, together)


def test_op_per_sample_gives_each_candidate_its_own_draw() -> None:
    import pytest

    from dsv.augment import AugmentConfig, augment

    x = torch.ones(1, 1, 8, 8).repeat(32, 1, 1, 1) * torch.linspace(0, 1, 64).view(1, 1, 8, 8)  # identical images
    shared = AugmentConfig(ops=("translate", "flip", "noise"), noise=0.1)
    own = AugmentConfig(ops=("translate", "flip", "noise"), noise=0.1, op_per_sample=True)
    out_own = augment(x, own, torch.Generator().manual_seed(0))
    # each image drew its own op: translated, flipped and noised copies all appear in one call
    noised = [(o - x[0]).abs().max() > 0 and not torch.allclose(o, x[0].flip(-1)) for o in out_own]
    assert 0 < sum(bool(n) for n in noised) < 32
    assert len({tuple(o.flatten()[:8].round(decimals=4).tolist()) for o in out_own}) > 8
    # the shared draw applies one op to the whole batch
    shared_out = augment(x, shared, torch.Generator().manual_seed(0))
    assert shared_out.requires_grad is False and shared_out.shape == x.shape
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(augment(xg, own, torch.Generator().manual_seed(1)).sum(), [xg])
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # differentiable through the scatter
    with pytest.raises(ValueError, match="op_per_sample"):
        AugmentConfig(op_per_sample=True, per_sample=False)


def test_one_vocabulary_names_every_augmentation() -> None:
    # the presets are the configurations the pipeline used before the vocabulary existed
    assert parse_augment("kkt") == AugmentConfig()
    assert parse_augment("dsa") == AugmentConfig(ops=DSA_OPS, cutout=0.5, per_sample=False)
    assert parse_augment("flip_crop") == AugmentConfig(ops=("flip", "crop_pad"), one_per_call=False)
    assert parse_augment("generate") == AugmentConfig(ops=("translate", "cutout", "noise"), one_per_call=False)
    assert parse_augment("none").ops == ()
    # explicit ops: '|' one per call, '+' all, strengths, modes
    each = parse_augment("each:translate=0.2|flip")
    assert (each.ops, each.translate, each.one_per_call, each.op_per_sample) == (("translate", "flip"), 0.2, True, True)
    assert not parse_augment("batch:flip+scale=1.5").per_sample and parse_augment("batch:flip+scale=1.5").scale == 1.5
    x = _x("cpu")
    assert torch.equal(augment(x, "kkt", torch.Generator().manual_seed(3)),
                       augment(x, AugmentConfig(), torch.Generator().manual_seed(3)))
    for bad, match in (("flip|mixup", "unknown op 'mixup'"), ("flip|crop+noise", "not both"),
                       ("later:flip", "mode"), ("flip=2", "flip must be in"), ("scale=0.5", "scale must be >= 1"),
                       ("color=1", "color takes no strength"), ("translate=a", "is a number"),
                       ("each:flip+noise", "joined by '|'")):
        with pytest.raises(ValueError, match=match):
            parse_augment(bad)
