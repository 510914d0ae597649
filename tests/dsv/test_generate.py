"""The classifier as a generator and its independent judge, on scikit-learn's 8x8 digits (no download)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dsv.data.core import normalize
from dsv.data.registry import DataConfig, load_dataset
from dsv.generate import GenerateConfig, _BNStats, _sides, edit_images, generate_images, interpolate, sample
from dsv.judge import frechet_distance, judge_score, matched_real
from dsv.models import ModelConfig, build_seeded
from dsv.train import FitConfig, fit, predict_logits


@pytest.fixture(scope="module")
def digits() -> dict:
    data = load_dataset(DataConfig(name="digits"))
    x = normalize(data.train_x, data.mean, data.std)
    xt = normalize(data.test_x, data.mean, data.std)
    shape, c = tuple(data.input_shape), data.num_classes
    teacher = build_seeded(ModelConfig(name="convnet", width=16, depth=2), shape, c, seed=0)
    fit(teacher, x, data.train_y, FitConfig(lr=5e-3, steps=200, batch_size=128), seed=0)
    judge = build_seeded(ModelConfig(name="convnet", width=16, depth=2, norm="batch", pool="max"), shape, c, seed=1)
    fit(judge, x, data.train_y, FitConfig(lr=5e-3, steps=200, batch_size=128), seed=1)
    bounds = ((0 - data.mean) / data.std, (1 - data.mean) / data.std)
    return {"teacher": teacher.eval(), "judge": judge.eval(), "x": xt, "y": data.test_y, "shape": shape, "c": c,
            "bounds": bounds}


FAST = GenerateConfig(steps=60, views=2, levels=1, min_side=4, log_every=10)


def test_samples_from_noise_convince_the_independent_judge(digits: dict) -> None:
    """Generation with the shipped recipe must raise the judge's accuracy far above that of the noise it starts
    from (the pipeline's default: GenerateConfig() is generate.recipe, see test_config)."""
    d = digits
    gen = sample(d["teacher"], 3, d["c"], d["shape"], GenerateConfig(), seed=0, pixel_bounds=d["bounds"])
    noise = torch.randn(gen.x.shape, generator=torch.Generator().manual_seed(0))
    ref = d["x"][matched_real(gen.y, d["y"], torch.Generator().manual_seed(0))]
    s, s0 = judge_score(d["judge"], gen.x, gen.y, ref), judge_score(d["judge"], noise, gen.y, ref)
    assert float((gen.probs.argmax(1) == gen.y).float().mean()) >= 0.9  # the teacher sees its targets
    assert s.acc >= s0.acc + 0.3, (s, s0)
    assert s.frechet < s0.frechet
    lo, hi = d["bounds"]
    assert gen.x.min() >= float(lo.min()) - 1e-5 and gen.x.max() <= float(hi.max()) + 1e-5


def test_teacher_is_untouched_and_restored(digits: dict) -> None:
    t = digits["teacher"]
    t.train()
    before = {k: v.clone() for k, v in t.state_dict().items()}
    flags = [p.requires_grad for p in t.parameters()]
    generate_images(t, torch.randn(4, *digits["shape"]), torch.arange(4), replace(FAST, steps=3, beta_stat=1.0))
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
    assert t.training and [p.requires_grad for p in t.parameters()] == flags
    t.eval()


def test_interpolation_ends_are_the_two_classes(digits: dict) -> None:
    d = digits
    strip, pair, delta = interpolate(d["teacher"], [(3, 8), (0, 6)], [0.0, 0.5, 1.0], d["c"], d["shape"], FAST,
                                     seed=0, pixel_bounds=d["bounds"])
    pred = strip.probs.argmax(1)
    assert pair.tolist() == [0, 0, 0, 1, 1, 1] and delta.tolist() == [0.0, 0.5, 1.0] * 2
    assert pred[[0, 2, 3, 5]].tolist() == [3, 8, 0, 6]
    assert torch.allclose(strip.y[1], torch.tensor([0, 0, 0, 0.5, 0, 0, 0, 0, 0.5, 0]))


def test_edit_flips_the_teacher_and_stays_near_the_image(digits: dict) -> None:
    d = digits
    idx = torch.tensor([int((d["y"] == k).nonzero()[0]) for k in range(5)])
    to = (d["y"][idx] + 1) % d["c"]
    before = predict_logits(d["teacher"], d["x"][idx]).argmax(1)
    assert torch.equal(before, d["y"][idx])
    out = edit_images(d["teacher"], d["x"][idx], to, replace(FAST, levels=2), pixel_bounds=d["bounds"])
    assert torch.equal(out.probs.argmax(1), to)
    # an edit, not a new image: closer to its source than to the other sources
    dist = torch.cdist(out.x.flatten(1), d["x"][idx].flatten(1))
    assert torch.equal(dist.argmin(1), torch.arange(5))


def test_coarse_to_fine_grids() -> None:
    assert _sides((28, 28), 2) == [(7, 7), (14, 14), (28, 28)]
    assert _sides((8, 8), 3) == [(8, 8)]  # never below 7 px by default
    assert _sides((8, 8), 3, min_side=4) == [(4, 4), (8, 8)]
    assert _sides((32, 24), 2) == [(8, 6), (16, 12), (32, 24)][1:]  # 6 px would be too coarse
    assert _sides((32, 24), 0) == [(32, 24)]


def test_bn_prior_only_hooks_batchnorm_and_pulls_statistics(digits: dict) -> None:
    assert not _BNStats(digits["teacher"], on=True)  # InstanceNorm teacher: nothing to hook
    assert not _BNStats(digits["judge"], on=False)
    with _BNStats(digits["judge"], on=True) as bn:
        assert len(bn.handles) == 2
    assert not any(m._forward_hooks for m in digits["judge"].modules())  # removed on exit
    x0 = 3.0 * torch.randn(20, *digits["shape"], generator=torch.Generator().manual_seed(2))
    y = torch.arange(10).repeat(2)
    cfg = replace(FAST, steps=40, beta_bn=1.0, levels=0)
    on = generate_images(digits["judge"], x0, y, cfg)
    off = generate_images(digits["judge"], x0, y, replace(cfg, beta_bn=0.0))
    assert on.trace[-1]["bn"] < 0.5 * on.trace[0]["bn"]
    assert off.trace[-1]["bn"] == 0.0


def test_bad_inputs_are_named() -> None:
    model = build_seeded(ModelConfig(name="mlp_tiny"), (5,), 2, 0)
    with pytest.raises(ValueError, match="image inputs"):
        generate_images(model, torch.randn(3, 5), torch.zeros(3, dtype=torch.long), FAST)
    for key, val in (("steps", -1), ("views", 0), ("lr", 0.0), ("beta_tv", -1.0)):
        with pytest.raises(ValueError, match=key):
            GenerateConfig(**{key: val})


def test_nan_generation_names_the_step(digits: dict) -> None:
    x0 = torch.randn(2, *digits["shape"])
    x0[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 0"):
        generate_images(digits["teacher"], x0, torch.tensor([0, 1]), FAST)


def test_frechet_distance_matches_scipy_and_its_properties() -> None:
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(150, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64) + 1.0
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    mid = linalg.sqrtm(ca @ cb).real
    expected = float(((a.mean(0) - b.mean(0)) ** 2).sum()) + float(np.trace(ca + cb - 2 * mid))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)
    # equal covariances: the distance is the squared distance of the means
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * 6, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], b)


def test_matched_real_mirrors_class_counts_and_excludes() -> None:
    real = torch.arange(3).repeat_interleave(4)
    y = torch.tensor([0, 0, 2])
    g = torch.Generator().manual_seed(0)
    idx = matched_real(y, real, g)
    assert sorted(real[idx].tolist()) == [0, 0, 2]
    taken = torch.zeros(12, dtype=torch.bool)
    taken[idx] = True
    again = matched_real(y, real, g, exclude=taken)
    assert not set(idx.tolist()) & set(again.tolist())
    with pytest.raises(ValueError, match="class 0 has"):
        matched_real(torch.zeros(5, dtype=torch.long), real, g)
    # a small test split: take what a class has (the generate stage then scores what it can)
    assert real[matched_real(torch.zeros(5, dtype=torch.long), real, g, strict=False)].tolist() == [0] * 4


def test_intra_class_cosine_is_one_for_copies_and_matches_a_hand_computation() -> None:
    from dsv.judge import intra_class_cosine

    copies = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 0.5], [3.0, 0.5]])
    assert abs(intra_class_cosine(copies, torch.tensor([0, 0, 1, 1])) - 1.0) < 1e-12
    # by hand: class 0 = {(1,0), (0,1), (1,1)}: cosines 0, 1/√2, 1/√2 -> mean √2/3; class 1 = {(1,0), (-1,0)}: -1
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1, 1])
    want = (2 ** 0.5 / 3 + -1.0) / 2
    assert abs(intra_class_cosine(f, y) - want) < 1e-12
    # centring moves the origin: around (0.5, 0.5) the class-0 points (1,0) and (0,1) are opposite
    assert abs(intra_class_cosine(f[:2], y[:2], torch.tensor([0.5, 0.5])) + 1.0) < 1e-12
    assert intra_class_cosine(f[:1], y[:1]) != intra_class_cosine(f[:1], y[:1])  # NaN: no class has two images


def test_nearest_finds_copies_and_their_index() -> None:
    from dsv.judge import nearest

    pool = torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = torch.cat([pool[[3, 47]], pool[[20]] + 0.5])
    d, idx = nearest(x, pool, chunk=16)  # chunks of 16: the nearest image is found across chunks
    assert d[:2].abs().max() < 1e-9 and abs(float(d[2]) - 0.5 * 4) < 1e-6
    assert idx.tolist() == [3, 47, 20]


def test_noise_starts_keep_their_std_at_the_coarsest_grid() -> None:
    import torch.nn.functional as F

    from dsv.generate import noise_start

    cfg = GenerateConfig(levels=2, min_side=7)
    x0 = noise_start(64, (1, 28, 28), cfg, torch.Generator().manual_seed(0))
    coarse = F.interpolate(x0, size=(7, 7), mode="area")  # what generate_images optimises first
    assert abs(float(coarse.std()) - 1.0) < 0.05
    # full-resolution white noise averaged down to the same grid would have a quarter of that std
    assert float(F.interpolate(torch.randn(64, 1, 28, 28), size=(7, 7), mode="area").std()) < 0.3
