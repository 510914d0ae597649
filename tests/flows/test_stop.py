"""The cooperative stop (flows.stop): every long loop of the library, running on a worker thread as the
flow's units do, leaves at its next step once a stop is requested from the main thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from dsv.dm import DMConfig, distribution_matching
from dsv.extract import ExtractConfig, extract, init_candidates
from dsv.generate import GenerateConfig, generate_images
from dsv.lam import LambdaConfig, fit_lambdas
from dsv.models import ModelConfig, build_seeded
from dsv.train import FitConfig, fit
from flows import stop

SHAPE = (1, 8, 8)
TINY = ModelConfig(name="convnet_tiny")
FOREVER = 10**7  # steps: hours, so only a stop ends the loop within the test's seconds


@pytest.fixture(autouse=True)
def _withdrawn() -> Iterator[None]:
    stop.clear()
    yield
    stop.clear()


def _data(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(3).repeat(n // 3)


def _model() -> torch.nn.Module:
    return build_seeded(TINY, SHAPE, 3, seed=0)


def _fit() -> None:
    x, y = _data()
    fit(_model(), x, y, FitConfig(steps=FOREVER, batch_size=8), seed=0)


def _extract() -> None:
    x0, y0 = init_candidates("noise", 2, 3, SHAPE, torch.Generator().manual_seed(1))
    extract(_model().eval(), x0, y0, ExtractConfig(steps=FOREVER, log_every=FOREVER, dual="clamp"), seed=0)


def _lambdas() -> None:
    x, y = _data(3000)  # 1,500 batches of 2: one stationarity problem after another
    fit_lambdas(_model(), x, y, LambdaConfig(batch_size=2, steps=1))


def _generate() -> None:
    y = torch.arange(3)
    x0 = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    generate_images(_model().eval(), x0, y, GenerateConfig(steps=FOREVER, levels=0, log_every=FOREVER), seed=0)


def _dm() -> None:
    x, y = _data()
    distribution_matching(x, y, x[:6].clone(), y[:6].clone(), DMConfig(iterations=FOREVER, model=TINY), seed=0)


LOOPS: dict[str, Callable[[], None]] = {"fit": _fit, "extract": _extract, "fit_lambdas": _lambdas,
                                        "generate": _generate, "distribution_matching": _dm}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_long_loop_on_a_worker_thread_stops_at_its_next_step(loop: str) -> None:
    outcome: list[BaseException | None] = []

    def work() -> None:
        try:
            LOOPS[loop]()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - what the thread ended with
            outcome.append(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    time.sleep(1.0)  # well inside the loop
    assert thread.is_alive() and not outcome, outcome
    stop.request()
    thread.join(timeout=10)
    assert not thread.is_alive(), f"{loop} did not stop within 10 s"
    assert len(outcome) == 1 and isinstance(outcome[0], stop.Stopped), outcome


def test_nothing_is_stopped_until_requested_and_after_clear() -> None:
    model, x = _model(), _data()[0]
    model(x)
    stop.request()
    assert stop.requested()
    with pytest.raises(stop.Stopped, match="interrupted"):
        model(x)
    stop.clear()
    assert not stop.requested()
    model(x)
