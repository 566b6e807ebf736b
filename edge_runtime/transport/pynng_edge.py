"""Ring edges over nanomsg: one pynng Pair0 socket per edge, used in both directions.

A background thread drains the socket into the base class's frame store, so a blocking send on
one side never waits for the schedule of the other side to reach its matching receive.
"""
from __future__ import annotations

import logging
import threading

import pynng

from edge_runtime.transport.base import Edge, EdgeConfig, EdgeTimeout

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


class PynngEdge(Edge):
    def __init__(self, config: EdgeConfig, *, listen: str | None = None, dial: str | None = None) -> None:
        super().__init__(config)
        assert (listen is None) != (dial is None), "an edge either listens or dials"
        timeout_ms = int(config.timeout * 1000)
        # Twice the largest valid frame: bigger ones are dropped by nng itself, the rest are
        # checked (and counted when refused) by the base class.
        self._socket = pynng.Pair0(recv_timeout=int(POLL_SECONDS * 1000), send_timeout=timeout_ms,
                                   recv_max_size=2 * config.max_frame_bytes)
        if listen is not None:
            self.url = self._socket.listen(listen).url
        else:
            self.url = dial
            self._socket.dial(dial, block=False)
        self._receiver = threading.Thread(target=self._receive_loop, name=f"edge-{config.peer}", daemon=True)
        self._receiver.start()

    def _transmit(self, data: bytes) -> None:
        try:
            self._socket.send(data)
        except pynng.Timeout:
            raise EdgeTimeout(f"could not send to {self.config.peer} at {self.url} within "
                              f"{self.config.timeout:g} s (is it running and reachable?)") from None

    def _receive_loop(self) -> None:
        while not self._closed:
            try:
                data = self._socket.recv()
            except pynng.Timeout:
                continue
            except pynng.Closed:
                return
            except pynng.NNGException:
                raise
            except Exception:  # pynng fails on some messages (e.g. empty ones)
                data = b""
            self._accept(data)

    def close(self) -> None:
        super().close()
        self._socket.close()
        self._receiver.join(timeout=2 * POLL_SECONDS + 1)
