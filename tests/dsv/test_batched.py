"""Students trained together (dsv.batched) against the same students trained one after another (dsv.train.fit)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from dsv.batched import can_batch, fit_batched
from dsv.models import ModelConfig, build_seeded
from dsv.protocols import ProtocolConfig, student_fit_config, train_students, uses_batched
from dsv.train import KD, FitConfig, TrainEvent, evaluate, fit

SHAPE = (1, 12, 12)
CLASSES = 4
MODEL = ModelConfig(name="convnet", width=8, depth=2)


def _data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    # class-dependent means, so that students learn something a test split can measure
    x = torch.randn(n, *SHAPE, generator=g) * 0.8 + y.view(-1, 1, 1, 1).float().sub(1.5) * 0.5
    return x, y


@pytest.mark.parametrize("protocol", ["dd", "paper", "soft"])
def test_batched_students_equal_looped_students(protocol: str) -> None:
    x, y = _data(40, 0)
    x_test, y_test = _data(200, 1)
    kd = KD(build_seeded(MODEL, SHAPE, CLASSES, 99).eval()) if protocol == "soft" else None
    cfg = student_fit_config(ProtocolConfig(name=protocol, epochs=60, min_steps=60, model=MODEL), 40)
    seeds = [0, 1, 2]
    looped, looped_losses = [], []
    for s in seeds:
        m = build_seeded(MODEL, SHAPE, CLASSES, s)
        looped_losses.append(fit(m, x, y, cfg, seed=s, kd=kd).losses)
        looped.append(m)
    together = [build_seeded(MODEL, SHAPE, CLASSES, s) for s in seeds]
    events: list[tuple[int, TrainEvent]] = []
    results = fit_batched(together, x, y, cfg, seeds, callback=lambda i, e: events.append((i, e)), kd=kd)
    for a, b, la, res in zip(looped, together, looped_losses, results):
        assert len(res.losses) == len(la) == 10 and res.steps == cfg.steps
        assert max(abs(p - q) for p, q in zip(la, res.losses)) < 1e-4
        right_a = evaluate(a, x_test, y_test, CLASSES).accuracy * 200
        right_b = evaluate(b, x_test, y_test, CLASSES).accuracy * 200
        assert abs(right_a - right_b) <= 1.0 + 1e-6
        assert not b.training
    # one event per student per report, in student order, with the looped run's losses
    assert [i for i, _ in events[:3]] == [0, 1, 2] and len(events) == 3 * 10
    assert events[-1][1].step == cfg.steps


def test_students_keep_their_own_seed() -> None:
    """A student trained together with others equals the one trained alone with the same seed: no coupling."""
    x, y = _data(40, 0)
    cfg = FitConfig(optimizer="sgd", lr=0.01, steps=30, batch_size=16, augment="dsa")
    alone = build_seeded(MODEL, SHAPE, CLASSES, 5)
    fit_batched([alone], x, y, cfg, [5])
    pair = [build_seeded(MODEL, SHAPE, CLASSES, 4), build_seeded(MODEL, SHAPE, CLASSES, 5)]
    fit_batched(pair, x, y, cfg, [4, 5])
    for p, q in zip(alone.parameters(), pair[1].parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(pair[0].classifier.weight, pair[1].classifier.weight)


def test_train_students_batched_on_and_off_agree() -> None:
    x, y = _data(40, 2)
    x_test, y_test = _data(120, 3)
    base = ProtocolConfig(name="dd", epochs=40, min_steps=40, n_runs=2, model=MODEL)
    seen: dict[str, list[int]] = {}
    accs = {}
    for mode in ("off", "on"):
        cfg = dataclasses.replace(base, batched=mode)
        seen[mode] = []
        res = train_students(x, y, x_test, y_test, None, cfg, SHAPE, CLASSES, [0, 1],
                             on_student=lambda s, m, r, k=mode: seen[k].append(s))
        accs[mode] = [r.accuracy * 120 for r in res]
    assert seen["off"] == seen["on"] == [0, 1]
    assert all(abs(a - b) <= 1.0 + 1e-6 for a, b in zip(accs["off"], accs["on"]))


def test_batching_is_a_device_choice_and_needs_a_plain_architecture() -> None:
    cfg = ProtocolConfig(model=MODEL)
    assert not uses_batched(cfg, "cpu", SHAPE, CLASSES)  # auto: the per-student loop on the CPU
    assert uses_batched(dataclasses.replace(cfg, batched="on"), "cpu", SHAPE, CLASSES)
    assert not uses_batched(dataclasses.replace(cfg, batched="off"), "cpu", SHAPE, CLASSES)
    bn = dataclasses.replace(MODEL, norm="batch")
    assert not uses_batched(dataclasses.replace(cfg, batched="on", model=bn), "cpu", SHAPE, CLASSES)
    assert not can_batch(build_seeded(bn, SHAPE, CLASSES, 0))
    with pytest.raises(ValueError, match="batched"):
        ProtocolConfig(batched="yes")
    with pytest.raises(ValueError, match="buffers or dropout"):
        fit_batched([build_seeded(bn, SHAPE, CLASSES, 0)], *_data(8, 0), FitConfig(steps=1), [0])
    with pytest.raises(ValueError, match="one seed per model"):
        fit_batched([build_seeded(MODEL, SHAPE, CLASSES, 0)], *_data(8, 0), FitConfig(steps=1), [0, 1])


def test_fit_batched_leaves_the_global_rng_and_rejects_nan() -> None:
    x, y = _data(16, 0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    fit_batched([build_seeded(MODEL, SHAPE, CLASSES, s) for s in (0, 1)], x, y,
                FitConfig(steps=4, batch_size=8, augment="dsa"), [0, 1])
    assert torch.equal(torch.get_rng_state(), state)
    x[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        fit_batched([build_seeded(MODEL, SHAPE, CLASSES, 0)], x, y, FitConfig(steps=4, batch_size=16), [0])


def test_graphs_flag_changes_nothing_on_the_cpu() -> None:
    x, y = _data(32, 0)
    cfg = FitConfig(steps=8, batch_size=8, augment="dsa")
    a, b = build_seeded(MODEL, SHAPE, CLASSES, 0), build_seeded(MODEL, SHAPE, CLASSES, 0)
    ra = fit(a, x, y, cfg, seed=1)
    rb = fit(b, x, y, cfg, seed=1, graphs=True)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not rb.graphed and rb.graph_error is None and ra.losses == rb.losses
