"""Signals that arrive while ``ndde`` starts (imports, data generation, compilation), before
the training loop installs its own handlers: SIGUSR1 (Slurm's warning before preemption or
the time limit) and SIGTERM are recorded instead of killing the process, and the run stops
before its first step with exit 75 and no checkpoint (nothing was trained), which the batch
script reads as "requeue". ``main`` enters ``caught`` first thing."""

from __future__ import annotations

import contextlib
import signal

_received: list[str] = []


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum).name)


@contextlib.contextmanager
def caught():
    """Record SIGUSR1 and SIGTERM while the block runs (the training loop takes them over inside
    it); the handlers before it are put back after it."""
    _received.clear()
    old = {}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, _record)
        except ValueError:  # not the main thread (ndde called from a thread of another program)
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def received() -> str | None:
    """The first signal recorded since ``caught`` began, or None."""
    return _received[0] if _received else None
