"""The range of every numeric params key, checked when the params are loaded (:mod:`tasks.config`).

One entry per numeric field of every config dataclass the params file reaches, keyed by the dataclass, so a
range holds wherever the class is used (``FitConfig`` is ``pretrain.fit``, ``judge.fit`` and
``distill.proxy.fit``). A value outside its range is refused at load with the full key
(``extract.solver.max_lam_ratio must be >= 1, got -1``), before anything runs; for a list the range holds for
every element. The dataclasses' own ``__post_init__`` checks stay (for people who call the library directly)
and add the checks that span keys (``epochs >= 1 or steps >= 1``, ``mean`` and ``std`` set together).

A key that may be negative says so here (:data:`ANY`). tests/tasks/test_config.py checks that every numeric
key has an entry, and the fault suite that -1 is refused, naming the key, wherever the range excludes it: a
new numeric key needs a line here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsv.augment import AugmentConfig
from dsv.baselines import ProxyConfig
from dsv.certificate import ConvergeConfig
from dsv.data.registry import DataConfig
from dsv.dm import DMConfig
from dsv.extract import ExtractConfig
from dsv.generate import GenerateConfig
from dsv.kkt import KKTConfig
from dsv.lam import LambdaConfig
from dsv.models import ModelConfig
from dsv.protocols import ProtocolConfig
from dsv.train import FitConfig


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; None = unbounded on that side.

    Attributes:
        low, high: the bounds.
        low_open, high_open: exclude the bound (``> low``, ``< high``).
        note: what the key means at its bounds, for the reader of this table.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        """``> 0``, ``>= 1``, ``in [0, 1)``, or ``any finite value (may be negative)``."""
        if self.low is None and self.high is None:
            return "any finite value (may be negative)"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                f"{')' if self.high_open else ']'}")


def _num(v: float | None) -> str:
    return f"{v:g}"


GT0 = Range(0, low_open=True)
GE0 = Range(0)
GE1 = Range(1)
UNIT = Range(0, 1)  # a probability or a mixing weight
UNIT_OPEN_HIGH = Range(0, 1, high_open=True)
SEED = Range(0, note="a seed")
ANY = Range(note="may be negative")

RANGES: dict[type, dict[str, Range]] = {
    DataConfig: {"n_per_class": GE1, "test_per_class": GE1, "seed": SEED, "image_size": GE1,
                 "channels": Range(1, 3, note="1 or 3"), "max_per_class": GE1,
                 "test_fraction": Range(0, 1, low_open=True, high_open=True)},
    ModelConfig: {"width": GE1, "depth": GE1},
    FitConfig: {"lr": GT0, "momentum": UNIT_OPEN_HIGH, "weight_decay": GE0,
                "epochs": Range(0, note="0 only with steps > 0"), "steps": Range(0, note="0 = use epochs"),
                "min_steps": GE0, "batch_size": GE1, "kd_temperature": GT0, "kd_alpha": UNIT},
    ConvergeConfig: {"max_iter": GE1, "target": GT0, "history": GE1},
    KKTConfig: {"beta_stat": GE0, "beta_primal": GE0, "beta_tv": GE0, "beta_norm": GE0, "beta_repel": GE0,
                "eta_stat": GE0, "eta_primal": GE0,
                "chunk_size": Range(0, note="0 = from memory_budget_mb"),
                "memory_budget_mb": Range(0, note="0 = unlimited")},
    AugmentConfig: {"translate": GE0, "crop": UNIT_OPEN_HIGH, "crop_pad": GE0, "cutout": UNIT, "flip": UNIT,
                    "noise": GE0, "scale": Range(1, note="sizes drawn in [1/scale, scale]; 1 = none"),
                    "rotate": GE0, "brightness": GE0, "saturation": GE0, "contrast": GE0},
    ExtractConfig: {"steps": GE0, "lr_x": GT0, "lr_lam": GT0, "lam_init": GT0, "lam_every": GE1, "lam_steps": GE1,
                    "spare": GE0, "log_every": GE1, "repair_steps": Range(0, note="0 = no repair"),
                    "target_mix": Range(0, 0.5, high_open=True, note="< 0.5 keeps the class the argmax"),
                    "max_lam_ratio": Range(1, note="a multiple of λ's initial scale, which λ starts at")},
    LambdaConfig: {"batch_size": Range(2), "steps": GE1, "lr": GT0, "chunk": GE1, "max_bytes": GE1},
    DMConfig: {"iterations": GE1, "lr_img": GT0, "momentum": UNIT_OPEN_HIGH, "batch_real": GE1, "report_every": GE1},
    ProxyConfig: {"el2n_models": GE1, "el2n_epochs": GE1},
    ProtocolConfig: {"epochs": GE1, "min_steps": GE0, "n_runs": GE1, "kd_temperature": GT0, "kd_alpha": UNIT,
                     "batch_size": GE1, "eval_batch_size": GE1},
    GenerateConfig: {"steps": GE0, "levels": GE0, "min_side": GE1, "lr": GT0, "views": GE1, "beta_tv": GE0,
                     "beta_norm": GE0, "beta_bn": GE0, "beta_stat": GE0, "beta_repel": GE0,
                     "target_mix": Range(0, 0.5, high_open=True, note="< 0.5 keeps the class the argmax"),
                     "lr_lam": GT0, "log_every": GE1},
}


def register(cls: type, ranges: dict[str, Range]) -> None:
    """Add the ranges of a config class defined elsewhere (the pipeline's own sections, :mod:`tasks.config`)."""
    RANGES.setdefault(cls, {}).update(ranges)


def range_of(cls: type, name: str) -> Range | None:
    return RANGES.get(cls, {}).get(name)


def _numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [value]
    if isinstance(value, tuple | list):
        return [v for item in value for v in _numbers(item)]
    return []


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def out_of_range(cls: type, name: str, value: Any, optional: bool = False) -> str | None:
    """The problem with ``value`` for field ``name`` of ``cls`` ("must be >= 1, got -1"), or None.

    Args:
        optional: the field may be null (said in the message).
    """
    r = range_of(cls, name)
    if r is None or value is None:
        return None
    numbers = _numbers(value)
    if all(r.admits(v) for v in numbers if not (isinstance(v, float) and math.isnan(v))):
        return None
    shown = _plain(value)
    if isinstance(value, tuple | list):
        return f"must all be {r.describe()}, got {shown}"
    return f"must be {r.describe()}{' or null' if optional else ''}, got {shown}"
