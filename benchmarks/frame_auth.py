"""Cost of authenticating data-plane frames: frames/s and MB/s with no MAC, HMAC-SHA256 and AEAD.

Each case seals and opens frames in one process (the CPU a link spends per frame, both ends),
for ~``--seconds`` each. "none" is the bare framing (length prefix + header + payload, sliced on
receipt), so the difference to it is what authentication adds. AEAD (ChaCha20-Poly1305) runs only
if the optional ``cryptography`` package is importable. Writes benchmarks/results/frame_auth.json.

    python benchmarks/frame_auth.py [--seconds 1.0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Protocol

from ringtune.security import FrameAuthenticator, link_key, new_key

RESULTS = Path(__file__).resolve().parent / "results" / "frame_auth.json"
SIZES = {"1MiB": 1 << 20, "64KiB": 64 << 10}
HEADER = b"\x97\xa5run-1\x03\x01\xaaactivation\xa7float32\x93\x01\x80\xcd\x04\x00\xa3raw"  # msgpack-sized
_LENGTH = struct.Struct(">I")
POOL_BYTES = 32 << 20  # frames sealed ahead for the open measurement: keeps memory bounded


class Sealer(Protocol):
    def seal(self, header: bytes, payload: memoryview) -> bytes: ...
    def open(self, frame: bytes) -> tuple[bytes, memoryview]: ...


class PlainFraming:
    """The frame without authentication: the baseline."""

    def seal(self, header: bytes, payload: memoryview) -> bytes:
        return b"".join((_LENGTH.pack(len(header)), header, payload))

    def open(self, frame: bytes) -> tuple[bytes, memoryview]:
        view = memoryview(frame)
        (length,) = _LENGTH.unpack_from(view)
        return bytes(view[4:4 + length]), view[4 + length:]


def measure_seal(sender: Sealer, payload: memoryview, seconds: float) -> float:
    """Frames sealed per second, timing batches until ``seconds`` have passed."""
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(8):
            sender.seal(HEADER, payload)
        count += 8
    return count / elapsed


def measure_open(make: Callable[[], Sealer], frames: list[bytes], seconds: float) -> float:
    """Frames opened per second; a fresh receiver per pass, since a receiver refuses replays."""
    count, spent = 0, 0.0
    while spent < seconds:
        receiver = make()
        started = time.perf_counter()
        for frame in frames:
            receiver.open(frame)
        spent += time.perf_counter() - started
        count += len(frames)
    return count / spent


def bench(mode: str, size: int, seconds: float) -> dict[str, float | int | str]:
    key = link_key(new_key(), "stage0", "stage1")
    make: Callable[[], Sealer] = (PlainFraming if mode == "none"
                                  else lambda: FrameAuthenticator(key, encrypt=mode == "aead"))
    sender = make()
    payload = memoryview(os.urandom(size))
    frames = [sender.seal(HEADER, payload) for _ in range(max(8, POOL_BYTES // size))]
    seal_fps = measure_seal(sender, payload, seconds)
    open_fps = measure_open(make, frames, seconds)
    both = 1 / (1 / seal_fps + 1 / open_fps)
    return {"mode": mode, "frame": next(n for n, s in SIZES.items() if s == size), "payload_bytes": size,
            "seal_frames_per_s": round(seal_fps, 1), "open_frames_per_s": round(open_fps, 1),
            "frames_per_s": round(both, 1), "MB_per_s": round(both * size / 1e6, 1),
            "overhead_bytes": len(frames[0]) - size - len(HEADER)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement (default 1)")
    args = parser.parse_args()
    modes = ["none", "hmac-sha256", "aead"]
    rows = [bench(mode, size, args.seconds) for size in SIZES.values() for mode in modes]
    report = {"what": "seal+open of one frame in one process (both ends of a link), CPU only",
              "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "aead": f"ChaCha20-Poly1305, cryptography {metadata.version('cryptography')}",
              "results": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    for row in rows:
        print(f"{row['frame']:>6} {row['mode']:<12} {row['frames_per_s']:>10.1f} frames/s "
              f"{row['MB_per_s']:>9.1f} MB/s  (seal {row['seal_frames_per_s']:.0f}/s, "
              f"open {row['open_frames_per_s']:.0f}/s)")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
