"""SIGTERM / SIGUSR1 as a request to checkpoint and stop at the next step boundary.

Installed as early as possible (``megawan.train.main`` does it before the heavy imports and the model
build), so a scheduler's signal during start-up is not lost: the trainer then stops at its first step
boundary with a checkpoint.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def install(self) -> "StopRequest":
        for s in STOP_SIGNALS:
            self._previous.setdefault(s, signal.signal(s, self._on_signal))
        return self

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
