"""Edge: one end of a ring connection, carrying activations one way and gradients the other.

The base class owns what every transport must do the same way: seal and open frames (each
direction has its own key and replay counter), refuse and count bad ones, keep accepted frames
until the schedule asks for them, and time out. Subclasses only move bytes.
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass

import torch

from edge_runtime.transport.codecs import encoded_bytes
from edge_runtime.transport.frames import (DTYPE, MAX_HEADER_BYTES, FrameError, FrameHeader, FrameKind, pack_frame,
                                          unpack_frame)
from ringtune.security import AuthError, FrameAuthenticator, ReplayError, link_key
from ringtune.wire import WireSpec

log = logging.getLogger(__name__)


class EdgeTimeout(RuntimeError):
    """A neighbour did not send or receive in time."""


class EdgeClosed(RuntimeError):
    """The run was aborted while waiting on this edge."""


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    run: str
    """Run id every frame must carry."""
    send_key: bytes
    """Key of frames this end sends (see ringtune.security.link_key)."""
    recv_key: bytes
    """Key of frames this end receives."""
    shape: tuple[int, ...]
    """Shape of every hidden state / gradient on this edge: [B, T, d] (float32 once decoded)."""
    wire: WireSpec = WireSpec()
    """Codec of the hidden states and of the gradients on this edge (both ends use the run's)."""
    timeout: float = 120.0
    """Seconds to wait for a frame or for a send to complete."""
    peer: str = "peer"
    """Human name of the other end, for error messages."""
    encrypt: bool = False
    """Encrypt tensors on the wire (ChaCha20-Poly1305) instead of only authenticating them."""

    @staticmethod
    def for_link(run: str, run_key: bytes, stage: int, peer_stage: int, shape: tuple[int, ...],
                 timeout: float, encrypt: bool = False, wire: WireSpec = WireSpec()) -> "EdgeConfig":
        """The edge of ring stage ``stage`` towards ``peer_stage``; each direction has its own key."""
        me, peer = f"stage {stage}", f"stage {peer_stage}"
        return EdgeConfig(run=run, send_key=link_key(run_key, me, peer), recv_key=link_key(run_key, peer, me),
                          shape=shape, wire=wire, timeout=timeout, peer=peer, encrypt=encrypt)

    @property
    def max_frame_bytes(self) -> int:
        payload = max(encoded_bytes(codec, self.shape) for codec in (self.wire.activation, self.wire.gradient))
        return payload + MAX_HEADER_BYTES + 64  # payload, header, envelope + tag


class Edge(ABC):
    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.refused: Counter[str] = Counter()
        """Refused frames by reason: oversized, authentication, replay, malformed, unexpected."""
        self._sealer = FrameAuthenticator(config.send_key, encrypt=config.encrypt)
        self._opener = FrameAuthenticator(config.recv_key, encrypt=config.encrypt)
        self.bytes_sent = 0
        self._frames: dict[tuple[str, int, int], torch.Tensor] = {}
        self._seen: set[tuple[str, int, int]] = set()
        self._min_step = 0
        self._closed = False
        self._cond = threading.Condition()

    def send(self, kind: FrameKind, step: int, microbatch: int, tensor: torch.Tensor) -> None:
        header = FrameHeader(self.config.run, step, microbatch, kind, DTYPE, tuple(tensor.shape),
                             self.config.wire.codec(kind))
        data = self._sealer.seal(*pack_frame(header, tensor))
        self._transmit(data)
        self.bytes_sent += len(data)

    def recv(self, kind: FrameKind, step: int, microbatch: int) -> torch.Tensor:
        key = (kind, step, microbatch)
        deadline = time.monotonic() + self.config.timeout
        with self._cond:
            while key not in self._frames:
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise EdgeClosed(f"run stopped while waiting for {kind} from {self.config.peer}")
                if remaining <= 0:
                    raise EdgeTimeout(f"no {kind} for step {step} micro-batch {microbatch} from "
                                      f"{self.config.peer} within {self.config.timeout:g} s")
                self._cond.wait(min(remaining, 0.5))
            return self._frames.pop(key)

    def begin_step(self, step: int) -> None:
        """Frames of earlier steps are refused from now on (replays, stragglers)."""
        with self._cond:
            self._min_step = step
            for key in [k for k in self._frames if k[1] < step]:
                del self._frames[key]
            self._seen = {k for k in self._seen if k[1] >= step}

    def abort(self) -> None:
        """Wake every waiter with EdgeClosed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        self.abort()

    def _accept(self, data: bytes) -> None:
        """Called by the subclass for every message received: verify, then store or refuse."""
        try:
            if len(data) > self.config.max_frame_bytes:
                raise FrameError(f"frame of {len(data)} bytes exceeds the limit of {self.config.max_frame_bytes}",
                                 "oversized")
            header, tensor = unpack_frame(*self._opener.open(data), expect=self._check)
        except (FrameError, AuthError) as error:
            self._refuse(_reason(error), str(error))
            return
        with self._cond:
            key = (header.kind, header.step, header.microbatch)
            if header.step < self._min_step or key in self._seen:
                self._refuse("replay", f"{header.kind} of step {header.step} micro-batch {header.microbatch} "
                                       f"was already received or is stale")
                return
            self._seen.add(key)
            self._frames[key] = tensor
            self._cond.notify_all()

    def _refuse(self, reason: str, message: str) -> None:
        self.refused[reason] += 1
        log.error("refused a frame from %s (%s): %s", self.config.peer, reason, message)

    def _check(self, header: FrameHeader) -> None:
        if header.run != self.config.run:
            raise FrameError(f"frame of run {header.run!r}, expected {self.config.run!r}", "unexpected")
        codec = self.config.wire.codec(header.kind)
        if header.shape != self.config.shape or header.codec != codec:
            raise FrameError(f"{header.kind} frame {header.codec}{list(header.shape)} does not match the "
                             f"expected {codec}{list(self.config.shape)}", "unexpected")

    @abstractmethod
    def _transmit(self, data: bytes) -> None:
        """Deliver bytes to the peer or raise EdgeTimeout."""


def _reason(error: Exception) -> str:
    if isinstance(error, ReplayError):
        return "replay"
    return "authentication" if isinstance(error, AuthError) else error.reason
