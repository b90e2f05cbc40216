"""SIGTERM as a preemption notice: the loop finishes its step, saves a checkpoint and exits cleanly."""

from __future__ import annotations

import signal


class Preemption:
    """Context manager: inside it, SIGTERM sets :attr:`requested` instead of killing the process."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)
