"""Progress bars (tqdm) for the long loops, fed by the library's callbacks.

``dsv`` reports progress only through callbacks; the stages turn those events into bars here. Bars
go to stderr and are shown per ``runtime.progress``: ``"auto"`` only when stderr is a terminal (so
CI logs stay clean), ``"on"`` always, ``"off"`` never. Logging only: no artifact depends on this
module (it is in :data:`tasks.stages.LOGGING_ONLY`).
"""

from __future__ import annotations

import sys
from typing import Any


def enabled(mode: str) -> bool:
    """Whether bars are shown for ``runtime.progress`` = ``mode`` ("auto", "on", "off")."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Bar:
    """A tqdm bar driven by absolute positions (what the callbacks report), or a silent stand-in.

    Args:
        mode: ``runtime.progress``.
        total: the position at which the loop is done (steps, cells, ...).
        desc: the bar's label.
        unit: the unit name shown after the count.
    """

    def __init__(self, mode: str, total: int, desc: str, unit: str = "it") -> None:
        self._bar: Any = None
        if enabled(mode):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def to(self, position: int, **postfix: float) -> None:
        """Move the bar to ``position`` (never backwards) and show ``postfix`` values."""
        if self._bar is None:
            return
        delta = int(position) - int(self._bar.n)
        if delta > 0:
            self._bar.update(delta)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def total(self, total: int) -> None:
        """Set the end position once it is known (e.g. from the first callback event)."""
        if self._bar is not None and self._bar.total != total:
            self._bar.total = int(total)
            self._bar.refresh()

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
