"""The one trainer (`fit`) and `evaluate`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsv.data import normalize
from dsv.data.registry import DataConfig, load_dataset
from dsv.kernel import soft_cross_entropy
from dsv.models import ModelConfig, build_seeded
from dsv.train import KD, FitConfig, TrainEvent, evaluate, fit


def _blobs() -> tuple[Tensor, Tensor]:
    ds = load_dataset(DataConfig(name="blobs", n_per_class=60))
    return normalize(ds.train_x, ds.mean, ds.std), ds.train_y


def _images(n: int = 48, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _full_loss(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float(soft_cross_entropy(model(x), y).mean())


def test_fit_reduces_loss_on_toy_set(device: str) -> None:
    x, y = _blobs()
    model = build_seeded(ModelConfig(name="mlp_tiny"), (2,), 3, seed=0).to(device)
    before = _full_loss(model, x.to(device), y.to(device))
    res = fit(model, x, y, FitConfig(lr=2e-2, epochs=15, batch_size=45), seed=0)
    after = _full_loss(model, x.to(device), y.to(device))
    assert after < 0.5 * before
    assert res.steps == 15 * (180 // 45) and len(res.losses) == 15
    assert evaluate(model, x, y, 3).accuracy > 0.75  # chance is 1/3; the blobs overlap
    assert not model.training  # fit leaves the model in eval mode


def _weights(model: nn.Module) -> list[Tensor]:
    return [t.detach().clone() for t in model.state_dict().values()]


def _fit_images(seed: int, fit_seed: int, augment: str = "flip_crop") -> list[Tensor]:
    x, y = _images()
    model = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 4, seed=seed)
    fit(model, x, y, FitConfig(steps=6, batch_size=16, augment=augment, schedule="cosine"), seed=fit_seed)
    return _weights(model)


def test_fit_is_deterministic_given_seed() -> None:
    a = _fit_images(0, 0)
    b = _fit_images(0, 0)
    assert all(torch.equal(p, q) for p, q in zip(a, b))  # bit-identical on CPU
    c = _fit_images(0, 1)  # same init, different batch order / augmentation
    assert any(not torch.equal(p, q) for p, q in zip(a, c))
    d = _fit_images(1, 0)  # different init
    assert any(not torch.equal(p, q) for p, q in zip(a, d))


def test_fit_does_not_touch_global_rng() -> None:
    torch.manual_seed(7)
    state = torch.get_rng_state()
    _fit_images(0, 0, augment="dsa")
    assert torch.equal(torch.get_rng_state(), state)


def test_soft_labels() -> None:
    x, y = _blobs()
    onehot = F.one_hot(y, 3).float()
    cfg = FitConfig(lr=1e-2, epochs=5, batch_size=32)
    hard = build_seeded(ModelConfig(name="mlp_tiny"), (2,), 3, seed=0)
    soft = build_seeded(ModelConfig(name="mlp_tiny"), (2,), 3, seed=0)
    fit(hard, x, y, cfg, seed=0)
    fit(soft, x, onehot, cfg, seed=0)
    # one-hot soft targets train exactly like hard labels (up to float rounding)
    for p, q in zip(hard.parameters(), soft.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    # genuinely soft targets: the soft cross-entropy goes down towards the targets' entropy
    smooth = 0.8 * onehot + 0.2 / 3
    model = build_seeded(ModelConfig(name="mlp_tiny"), (2,), 3, seed=0)
    before = _full_loss(model, x, smooth)
    fit(model, x, smooth, FitConfig(lr=1e-2, epochs=20, batch_size=32), seed=0)
    entropy = float(-(smooth * smooth.log()).sum(1).mean())
    assert _full_loss(model, x, smooth) < before and _full_loss(model, x, smooth) > entropy


def test_soft_cross_entropy_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    torch.testing.assert_close(soft_cross_entropy(logits, y), F.cross_entropy(logits, y, reduction="none"))
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(y, 5).float()), soft_cross_entropy(logits, y))


def test_fit_with_teacher_kd() -> None:
    x, y = _images()
    teacher = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 4, seed=5)
    student = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 4, seed=0)
    res = fit(student, x, y, FitConfig(steps=4, batch_size=16), seed=0, kd=KD(teacher, alpha=1.0))
    assert all(math.isfinite(v) for v in res.losses)
    assert not teacher.training


def test_steps_schedule_and_callback() -> None:
    x, y = _images()
    events: list[TrainEvent] = []
    model = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 4, seed=0)
    res = fit(model, x, y, FitConfig(lr=0.1, steps=20, batch_size=8, schedule="step"), seed=0, callback=events.append)
    assert res.steps == 20 and [e.step for e in events] == [2 * i for i in range(1, 11)]
    assert all(e.total_steps == 20 for e in events)
    # "step" schedule: lr x0.1 from half of the budget on
    assert events[0].lr == pytest.approx(0.1) and events[-1].lr == pytest.approx(0.01)
    cos: list[TrainEvent] = []
    fit(model, x, y, FitConfig(lr=0.1, steps=20, batch_size=8, schedule="cosine"), seed=0, callback=cos.append)
    lrs = [e.lr for e in cos]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.01



def test_min_steps_floors_an_epoch_budget() -> None:
    """48 images in batches of 8: 2 epochs are 12 steps; min_steps raises that, never lowers it, and an
    explicit steps budget ignores it."""
    x, y = _images()
    model = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 4, seed=0)
    assert fit(model, x, y, FitConfig(epochs=2, batch_size=8), seed=0).steps == 12
    assert fit(model, x, y, FitConfig(epochs=2, min_steps=30, batch_size=8), seed=0).steps == 30
    assert fit(model, x, y, FitConfig(epochs=2, min_steps=5, batch_size=8), seed=0).steps == 12
    assert fit(model, x, y, FitConfig(steps=7, min_steps=30, batch_size=8), seed=0).steps == 7
    with pytest.raises(ValueError, match="min_steps"):
        FitConfig(min_steps=-1)

class _Identity(nn.Module):
    """Logits = inputs, so predictions are chosen by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0 * self.dummy


def test_evaluate_per_class_by_hand() -> None:
    # predictions (argmax of each row): 0, 0, 1, 1, 0, 2, 3
    logits = torch.tensor(
        [[9, 0, 0, 0], [9, 0, 0, 0], [0, 9, 0, 0], [0, 9, 0, 0], [9, 0, 0, 0], [0, 0, 9, 0], [0, 0, 0, 9]],
        dtype=torch.float32,
    )
    y = torch.tensor([0, 0, 0, 1, 2, 2, 3])
    # class 0: 2/3 right, class 1: 1/1, class 2: 1/2, class 3: 1/1, class 4: no samples
    res = evaluate(_Identity(), logits, y, num_classes=5, batch_size=3)
    assert res.n == 7
    assert res.accuracy == pytest.approx(5 / 7)
    assert res.per_class[:4] == pytest.approx([2 / 3, 1.0, 0.5, 1.0])
    assert math.isnan(res.per_class[4])


def test_fit_config_errors() -> None:
    with pytest.raises(ValueError, match="optimizer = 'adamw' is not one of adam, sgd"):
        FitConfig(optimizer="adamw")
    with pytest.raises(ValueError, match="lr must be > 0"):
        FitConfig(lr=0)
    with pytest.raises(ValueError, match="augment = 'mixup'"):
        FitConfig(augment="mixup")
    x, y = _images()
    model = build_seeded(ModelConfig(name="convnet_tiny"), (1, 8, 8), 4, seed=0)
    with pytest.raises(ValueError, match="x has 48 samples but y has 47"):
        fit(model, x, y[:-1], FitConfig(steps=1))
