"""Preemption: a signal (SIGTERM from torchrun/Slurm, SIGUSR1) becomes a flag the training loop polls.

A handler only sets the flag; ``check()`` agrees on it over all ranks (a collective, so every rank must call it at the
same points) and raises ``Preempted`` when any rank was signalled. The loop calls it between the phases of a step,
before any optimizer update of that step, so the unfinished step can be abandoned exactly: the session saves the
state as of the last finished step (with the data position before the abandoned step) and a requeued run redoes the
step identically (its sampling seeds derive from the step number).
"""
from __future__ import annotations

import signal
from typing import Any

from megatron_vlmr1.parallel import any_rank

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by ``PreemptionGuard.check`` on every rank once any rank has received a preemption signal."""


class PreemptionGuard:
    """Owns the preemption signal handlers of one training session (installed by ``install``, undone by ``restore``)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None   # the first signal this rank saw
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        """Take over the signals; after the session is built, so no engine start-up replaces the handlers."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    @property
    def name(self) -> str:
        """The received signal's name (e.g. ``SIGTERM``), for the log line of the save."""
        return self.received.name if self.received is not None else "preemption"

    def requested(self) -> bool:
        """True on every rank when any rank has received a signal (collective)."""
        return any_rank(self.received is not None)

    def check(self) -> None:
        """Raise ``Preempted`` on every rank when any rank has received a signal (collective)."""
        if self.requested():
            raise Preempted(self.name)
