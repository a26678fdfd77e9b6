"""Installing and restoring signal handlers as a pair (the trainer's preemption handler, bench/quality.py's
stop requests). No torch import: bench scripts use it before any model code loads."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable


def install_handlers(signals: Iterable[signal.Signals], handler: Callable) -> dict:
    """Install `handler` for each of `signals`; returns the handlers it replaced, for `restore_handlers`."""
    return {sig: signal.signal(sig, handler) for sig in signals}


def restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
