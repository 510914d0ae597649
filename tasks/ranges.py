"""Every params value's checks: its type, its range, and the builder that applies them (:func:`build`).

The ranges: one entry per numeric key, checked when the params are loaded (:mod:`tasks.config`).

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

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

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

T = TypeVar("T")


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
                "min_steps": GE0, "batch_size": GE1},
    ConvergeConfig: {"max_iter": GE1, "target": GT0, "history": GE1},
    KKTConfig: {"beta_stat": GE0, "beta_primal": GE0, "beta_tv": GE0, "beta_norm": GE0, "beta_repel": GE0,
                "eta_stat": GE0, "eta_primal": GE0,
                "chunk_size": Range(0, note="0 = from memory_budget_mb"),
                "memory_budget_mb": Range(0, note="0 = unlimited")},
    ExtractConfig: {"steps": GE0, "lr_x": GT0, "lr_lam": GT0, "lam_init": GT0, "lam_every": GE1, "lam_steps": GE1,
                    "spare": GE0, "log_every": GE1, "repair_steps": Range(0, note="0 = no repair"),
                    "target_mix": Range(0, 0.5, high_open=True, note="< 0.5 keeps the class the argmax"),
                    "max_lam_ratio": Range(1, note="a multiple of λ's initial scale, which λ starts at")},
    LambdaConfig: {"batch_size": Range(2), "steps": GE1, "lr": GT0, "chunk": GE1, "max_bytes": GE1},
    DMConfig: {"iterations": GE1, "lr_img": GT0, "momentum": UNIT_OPEN_HIGH, "batch_real": GE1},
    ProxyConfig: {"el2n_models": GE1, "el2n_epochs": GE1},
    ProtocolConfig: {"epochs": GE1, "min_steps": GE0, "n_runs": GE1, "kd_temperature": GT0, "kd_alpha": UNIT,
                     "batch_size": GE1},
    GenerateConfig: {"steps": GE0, "levels": GE0, "min_side": GE1, "lr": GT0, "views": GE1, "beta_tv": GE0,
                     "beta_norm": GE0, "beta_bn": GE0, "beta_stat": GE0, "beta_repel": GE0, "lr_lam": GT0,
                     "log_every": GE1},
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


# ----------------------------------------------------------------------------- building a dataclass


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _adapter(hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in ``hint`` (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(arg, type):
                return arg
    return None


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def _describe(hint: Any) -> str:
    text = str(hint) if not isinstance(hint, type) else hint.__name__
    return text.replace("typing.", "").replace("NoneType", "null")


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _qualify(message: str, prefix: str, names: Sequence[str]) -> str:
    """A config class's message under its full key: the dsv configs name the field first, plainly ('width must be
    >= 1'), and ``prefix`` ('pretrain.model') makes it 'pretrain.model.width must be >= 1'; a message about the
    whole object gets 'pretrain.model: ...'."""
    first = message.split(" ", 1)[0].rstrip(":,").split(".")[0]
    if not prefix or f"'{prefix}." in message:
        return message
    return _join(prefix, message) if first in names else f"{prefix}: {message}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build(cls: type[T], raw: Any, prefix: str, errors: list[str], base: T | None = None,
          moved: Mapping[str, str] | None = None) -> T | None:
    """Build dataclass ``cls`` from plain data, appending problems to ``errors``.

    Unknown keys get a did-you-mean, values are checked against the field's type hint with pydantic (strict:
    ``"5"`` is not an int; YAML lists become tuples) and against their range (:func:`out_of_range`), and the
    dataclasses' own ``__post_init__`` checks are reported under their full dotted key.

    Args:
        cls: a (frozen) dataclass.
        raw: mapping of field name -> value; nested dataclasses take nested mappings.
        prefix: dotted key of ``raw`` for messages ("" at the top).
        errors: receives one message per problem.
        base: the instance whose values fill the keys ``raw`` leaves out (a nested field's default
            instance), so a partial override keeps the parent's defaults.
        moved: dotted keys that moved or went away -> what to write instead (reported as "is gone").

    Returns:
        The instance, or None when a problem was found.
    """
    where = prefix or "the top level"
    if not isinstance(raw, Mapping):
        errors.append(f"{where} must be a mapping of keys, got {type(raw).__name__} {raw!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    n_errors = len(errors)
    moved = moved or {}

    def gone(key: str) -> str | None:  # what replaced a key: by its dotted name, or "*.<name>" wherever it is
        return moved.get(_join(prefix, key)) or moved.get(f"*.{key}")

    for key in raw:
        if key not in fields and gone(str(key)):
            errors.append(f"{_join(prefix, str(key))!r} is gone: {gone(str(key))}")
        elif key not in fields:
            hint = _suggest(str(key), cls)
            extra = f" (did you mean {_join(prefix, hint)!r}?)" if hint else ""
            errors.append(f"unknown key {_join(prefix, str(key))!r}{extra}; allowed keys in {where}: "
                          f"{', '.join(fields)}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        current = getattr(base, name) if base is not None else _default_of(f)
        if name not in raw:
            if current is dataclasses.MISSING:
                errors.append(f"missing key {_join(prefix, name)!r}")
            else:
                values[name] = current
            continue
        value, hint, key = raw[name], hints[name], _join(prefix, name)
        sub = _dataclass_in(hint)
        if sub is None and isinstance(value, Mapping) and gone(name):  # a section that became one value
            errors.append(f"{key!r} is one value now: {gone(name)}")
            continue
        if sub is not None and isinstance(value, Mapping):
            sub_base = current if dataclasses.is_dataclass(current) else None
            values[name] = build(sub, value, key, errors, sub_base, moved)
            continue
        try:
            values[name] = _adapter(hint).validate_python(_tuplify(value), strict=True)
        except ValidationError as exc:
            allowed = _describe(hint) if sub is None else f"a mapping of {', '.join(_field_names(sub))}"
            problem = exc.errors()[0]["msg"]
            errors.append(f"{key} = {value!r}: {problem} (expected {allowed})")
            continue
        if not _finite(values[name]):
            errors.append(f"{key} = {value!r}: must be a finite number (NaN and inf are not allowed)")
            continue
        problem = out_of_range(cls, name, values[name], optional=type(None) in typing.get_args(hint))
        if problem:
            errors.append(f"{key} {problem}")
    if len(errors) > n_errors:
        return None
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        errors.append(_qualify(str(exc), prefix, list(fields)))
        return None


def _finite(value: Any) -> bool:
    """False when ``value`` is (or holds) a NaN or infinite float."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple | list):
        return all(_finite(v) for v in value)
    return True


def _suggest(key: str, cls: type) -> str | None:
    """Closest field name to ``key``; also looks one level down ("steps" -> "solver.steps")."""
    own = _field_names(cls)
    hint = difflib.get_close_matches(key, own, n=1, cutoff=0.75)
    if hint:
        return hint[0]
    nested: dict[str, str] = {}
    for name, hint_type in _hints(cls).items():
        sub = _dataclass_in(hint_type)
        if sub is not None:
            for leaf in _field_names(sub):
                nested.setdefault(leaf, f"{name}.{leaf}")
    deep = difflib.get_close_matches(key, list(nested), n=1, cutoff=0.75)
    if deep:
        return nested[deep[0]]
    loose = difflib.get_close_matches(key, own, n=1)
    return loose[0] if loose else None


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]


def _numeric(hint: Any) -> bool:
    """Whether a field's type hint holds numbers (int, float, or tuples of them; bool is not a number here)."""
    if hint in (int, float):
        return True
    return any(_numeric(a) for a in typing.get_args(hint) if a is not Ellipsis)


def settable_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a params file can set under dataclass ``cls``: the leaves of its nested dataclasses, dotted."""
    out: list[str] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        sub = _dataclass_in(_hints(cls)[f.name])
        out.extend(settable_keys(sub, _join(prefix, f.name)) if sub is not None else [_join(prefix, f.name)])
    return out


def numeric_keys(cls: type, prefix: str = "") -> list[tuple[str, type, str, Any]]:
    """Every numeric key under ``cls``: (dotted key, its dataclass, field name, type hint), in field order
    (``extract.by_init`` holds ``extract.solver``'s keys and is not listed again)."""
    out: list[tuple[str, type, str, Any]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = _hints(cls)[f.name]
        key = _join(prefix, f.name)
        sub = _dataclass_in(hint)
        if sub is not None:
            out.extend(numeric_keys(sub, key))
        elif _numeric(hint):
            out.append((key, cls, f.name, hint))
    return out
