"""Preemption flag: SIGTERM/SIGUSR1 only set a flag; the trainer all-reduces it at each step boundary.

Deliberately imports nothing heavy: ``pretraining/run.py`` installs the handler before torch/DeepSpeed are imported,
so a signal that arrives during the (slow) setup is remembered instead of killing the rank. The flag is honoured at the
first step boundary (checkpoint + exit 75) and cleared when the trainer returns.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # signal numbers; the handler only appends (safe in a signal handler)


def _on_signal(signum, frame) -> None:
    _received.append(signum)


def install() -> dict:
    """Install the flag-setting handler for SIGTERM/SIGUSR1; returns the previous handlers (for restore())."""
    return {sig: signal.signal(sig, _on_signal) for sig in STOP_SIGNALS}


def restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def requested() -> bool:
    return bool(_received)


def received() -> list[int]:
    return list(_received)


def clear() -> None:
    _received.clear()
