"""SIGTERM (cluster preemption) and SIGINT (Ctrl-C) end a run cleanly.

The first signal only sets a flag; the training loop shares it with every rank through its
per-step all-reduce, saves a checkpoint at the end of the step and stops. A second signal ends the
process at once, with the default action of that signal.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class StopSignals:
    """Context manager: catches SIGTERM and SIGINT while training (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.name is not None:  # the second signal: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.name = signal.Signals(signum).name
        print(f"\n{self.name} received: saving a checkpoint after this step (send it again to stop at once)", flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
