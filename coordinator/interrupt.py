"""Ctrl-C as a flag the coordinator checks where it is safe to stop.

Python raises KeyboardInterrupt wherever the main thread happens to be: inside pynng's own locks or
callbacks, between a request and its reply, half-way through writing metrics. Under load that
left the coordinator hanging after Ctrl-C. While :meth:`Interrupt.installed` is active, the first
SIGINT only sets a flag; the run loop checks it before every control command and while it waits
(:meth:`check`, :meth:`sleep`) and stops there with KeyboardInterrupt. Every command has a timeout,
so the flag is seen within one heartbeat timeout. A second Ctrl-C interrupts at once.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class Interrupt:
    def __init__(self) -> None:
        self._event = threading.Event()

    @contextlib.contextmanager
    def installed(self):
        """Route SIGINT to this flag (main thread only) until the block ends. A process started with SIGINT
        ignored (a background job of a non-interactive shell, nohup) keeps ignoring it, as Python does."""
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield self
            return

        def on_sigint(signum, frame) -> None:
            self._event.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """KeyboardInterrupt if Ctrl-C was pressed."""
        if self._event.is_set():
            raise KeyboardInterrupt

    def sleep(self, seconds: float) -> None:
        """Wait, waking at once for Ctrl-C."""
        self._event.wait(seconds)
        self.check()
