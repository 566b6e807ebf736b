"""Link bandwidth, measured by a short timed transfer (like the block calibration) instead of assumed.

One end serves a :class:`ProbeSink`; the other runs :func:`measure_link` against it: it streams
fixed-size chunks for about ``seconds``, then asks the sink what it saw. The sink times the
chunks as they arrive, so the rate excludes the sender's buffering and connection set-up: bytes
after the first chunk over the time from the first chunk's arrival to the last's (a shaper's
initial burst lands in the first chunks, which a transfer of many chunks outweighs).

Messages on one pynng Pair0 socket: ``b"D" + bytes`` (data), ``b"E"`` (end: the sink answers with
``">dQ"`` = its measured bytes/s and the bytes it counted). Every receive has a timeout; the
sink takes at most ``MAX_CHUNK_BYTES`` per message.

Every agent serves a sink (its port in hello); the coordinator measures to each agent before
planning (``coordinator/link_bandwidth.py``).
"""
from __future__ import annotations

import argparse
import struct
import sys
import threading
import time
from dataclasses import dataclass

import pynng

CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 1024 * 1024
TIMEOUT_MS = 5000
_RESULT = struct.Struct(">dQ")


@dataclass(frozen=True, slots=True)
class LinkMeasurement:
    bytes_per_s: float
    """Payload rate the sink saw."""
    bytes: int
    """Payload bytes it counted."""
    seconds: float
    """Wall time the sender spent, the final answer included."""

    @property
    def mbit_per_s(self) -> float:
        return self.bytes_per_s * 8 / 1e6


class ProbeSink:
    """Receives probe transfers on ``url`` in a thread until closed; one sender at a time."""

    def __init__(self, url: str) -> None:
        self._socket = pynng.Pair0(listen=url, recv_timeout=200, send_timeout=TIMEOUT_MS,
                                   recv_max_size=MAX_CHUNK_BYTES + 1)
        self.url = self._socket.listeners[0].url if url.endswith(":0") else url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="link-probe-sink", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        first = last = None
        counted = 0
        while not self._stop.is_set():
            try:
                message = self._socket.recv()
            except pynng.Timeout:
                continue
            except (pynng.NNGException, pynng.exceptions.Closed):
                return
            now = time.perf_counter()
            if message[:1] == b"D":
                if first is None:
                    first = now  # the first chunk starts the clock: its own bytes are not counted
                else:
                    counted += len(message) - 1
                last = now
            elif message[:1] == b"E":
                rate = counted / (last - first) if first is not None and last > first else 0.0
                try:
                    self._socket.send(_RESULT.pack(rate, counted))
                except pynng.NNGException:
                    pass
                first = last = None
                counted = 0

    def close(self) -> None:
        self._stop.set()
        self._socket.close()
        self._thread.join(5)

    def __enter__(self) -> ProbeSink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def measure_link(url: str, seconds: float = 1.0, chunk_bytes: int = CHUNK_BYTES) -> LinkMeasurement:
    """Stream chunks to the sink at ``url`` for about ``seconds``; the rate the sink saw."""
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}], got {chunk_bytes}")
    payload = b"D" + bytes(chunk_bytes)
    with pynng.Pair0(dial=url, send_timeout=TIMEOUT_MS, recv_timeout=TIMEOUT_MS, recv_max_size=64) as socket_:
        start = time.perf_counter()
        sent = 0
        while sent < 3 or time.perf_counter() - start < seconds:
            socket_.send(payload)
            sent += 1
        socket_.send(b"E")
        rate, counted = _RESULT.unpack(socket_.recv())
    return LinkMeasurement(rate, counted, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_runtime.transport.link_probe serve URL | measure URL`` (tests, benchmarks)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("serve", "measure"))
    parser.add_argument("url")
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.action == "serve":
        with ProbeSink(args.url) as sink:
            print(f"link probe sink on {sink.url}", flush=True)
            try:
                sys.stdin.read()  # until stdin closes
            except KeyboardInterrupt:
                pass
        return 0
    result = measure_link(args.url, args.seconds)
    print(f"{result.mbit_per_s:.1f} Mbit/s ({result.bytes} bytes in {result.seconds:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
