"""Stopping the units that compute on worker threads when the run is interrupted.

Ctrl-C and SIGTERM reach only the main thread (Python runs signal handlers there): the flow unwinds,
but the mapped units (extract shards, distill cells) run on the flow's thread pool, and leaving the flow
waits for the unit that is computing. Threads cannot be killed, so the stop is cooperative, and the
``dsv`` library stays free of signals and global state: :func:`request` (called by the flow as soon as
an interrupt reaches it while units run, :func:`flows.pipeline.run_stage`) registers a global forward
pre-hook on torch modules that raises :class:`Stopped`. Every long loop of the library calls a module at
every optimizer step (training, DeepKKT extraction, generation, distribution matching) or batch (the λ fit;
tests/flows/test_stop.py runs each on a worker thread), so the unit's thread leaves at its next step,
through the same ``finally`` blocks as any error:
a unit writes its files only once it has finished, so nothing half-done is written, and a unit that
did not finish has no cache record, so the next run recomputes exactly it. Queued units never start
(the pool cancels them).

Nothing is registered until a stop is requested, so the hook costs nothing in a run that is not
interrupted.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_HANDLE: Any = None


class Stopped(KeyboardInterrupt):
    """Raised at the next torch module call of any thread once a stop was requested.

    A ``KeyboardInterrupt``: no ``except Exception`` in the library or in Prefect's retry logic catches it,
    and MLflow runs it unwinds through are marked KILLED, like Ctrl-C's.
    """


def _raise(module: Any, args: Any) -> None:
    raise Stopped("the run was interrupted: this unit stopped at its next step and wrote nothing")


def request() -> None:
    """Make every thread stop at its next torch module call (idempotent)."""
    global _HANDLE
    from torch.nn.modules.module import register_module_forward_pre_hook

    with _LOCK:
        if _HANDLE is None:
            _HANDLE = register_module_forward_pre_hook(_raise)


def requested() -> bool:
    """Whether a stop is in force."""
    return _HANDLE is not None


def clear() -> None:
    """Withdraw the stop (a new run in the same process)."""
    global _HANDLE
    with _LOCK:
        if _HANDLE is not None:
            _HANDLE.remove()
            _HANDLE = None
