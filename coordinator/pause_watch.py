"""Whether the coordinator itself was running: a wait that ran out while this process was stopped (Ctrl-Z, SIGSTOP,
a suspended laptop or VM) says nothing about the agent it waited for.

A daemon thread ticks every ``TICK_SECONDS``; a tick that comes ``PAUSE_SECONDS`` late or more marks a pause (the
whole process was not running, or was starved as long). Comparing the timer of a wait with its own clock is not
enough: a process continued after a stop of between one and two timeouts finds its timer fires at once, not late.
"""
from __future__ import annotations

import threading
import time
from collections import deque

TICK_SECONDS = 0.2
"""How often the watch ticks."""
PAUSE_SECONDS = 1.0
"""A gap between ticks this long is a pause, not scheduling noise on a busy machine."""


class PauseWatch:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_tick = time.monotonic()
        self._pauses: deque[tuple[float, float]] = deque(maxlen=256)  # (start, end) in time.monotonic()
        threading.Thread(target=self._tick, name="pause-watch", daemon=True).start()

    def _tick(self) -> None:
        while True:
            time.sleep(TICK_SECONDS)
            now = time.monotonic()
            with self._lock:
                if now - self._last_tick >= PAUSE_SECONDS:
                    self._pauses.append((self._last_tick, now))
                self._last_tick = now

    def paused_seconds(self, since: float) -> float:
        """How long this process was paused between `since` (time.monotonic()) and now, counting a pause that is
        only ending now (the ticker may not have run yet since the process was continued)."""
        now = time.monotonic()
        with self._lock:
            spans = [*self._pauses, (self._last_tick, now)]
        return sum(max(0.0, end - max(start, since)) for start, end in spans if end - start >= PAUSE_SECONDS)


_watch: PauseWatch | None = None
_watch_lock = threading.Lock()


def pause_watch() -> PauseWatch:
    """The process's one watch, started on first use (before the first wait it judges)."""
    global _watch
    with _watch_lock:
        if _watch is None:
            _watch = PauseWatch()
        return _watch
