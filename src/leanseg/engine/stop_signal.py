"""Stop a training loop cleanly on SIGINT / SIGTERM: a signal only sets a flag.

Inside :class:`StopOnSignal` a Ctrl-C (or a scheduler's SIGTERM) never raises in the middle of
an optimizer step or a checkpoint write. The loop asks :attr:`StopOnSignal.requested` at each
iteration boundary, saves a consistent state and returns. Further signals while it finishes
are reported and ignored; ``kill -9`` stays safe because checkpoint writes are atomic.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager: replaces the SIGINT / SIGTERM handlers with a flag while active.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, message: str = "stopping at the end of this iteration") -> None:
        self.message = message
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            print(f"leanseg: {name} again: still finishing, please wait", file=sys.stderr)
            return
        self.requested, self.signal_name = True, name
        print(f"leanseg: {name}: {self.message}", file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
