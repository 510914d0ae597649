"""The config checks' one message format: the field first, plainly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from dsv.checks import at_least, one_of, positive


@dataclass
class _Cfg:
    steps: int = 5
    width: int = 2
    lr: float = 0.1


def test_at_least_names_the_first_bad_field() -> None:
    at_least(_Cfg(), 1, "steps", "width")
    with pytest.raises(ValueError, match=r"^width must be >= 3, got 2$"):
        at_least(_Cfg(), 3, "width", "steps")


def test_positive_refuses_zero_and_nan() -> None:
    positive(_Cfg(), "lr")
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=r"^lr must be > 0, got"):
            positive(_Cfg(lr=bad), "lr")


def test_one_of_suggests_the_closest() -> None:
    one_of("optimizer", "adam", ("adam", "sgd"))
    with pytest.raises(ValueError, match=r"^optimizer = 'adm' is not one of adam, sgd \(did you mean 'adam'\?\)$"):
        one_of("optimizer", "adm", ("adam", "sgd"))
