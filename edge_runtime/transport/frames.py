"""Data-plane frame contents: a small msgpack header and the tensor encoded with the frame's codec.

Sealing (MAC or encryption, replay counter) is ``ringtune.security.FrameAuthenticator``'s job;
this module turns a header and a tensor into the two byte strings it seals, and back, refusing
anything that is not exactly a well-formed header with a payload matching its codec and shape.
The header names the codec (``ringtune.wire``), so the MAC covers it like every other field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgpack
import torch

from edge_runtime.transport.codecs import decode, encode, encoded_bytes
from ringtune.wire import CODECS

FrameKind = Literal["activation", "gradient"]
MAX_HEADER_BYTES = 4096
DTYPE = "float32"
"""Every tensor on the ring is float32 once decoded; the codec says how its bytes travel."""


class FrameError(ValueError):
    """A frame that is refused (never applied): why, in words, and a reason to count it under."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class FrameHeader:
    run: str
    """Run id: frames of another run are refused."""
    step: int
    """Optimizer step the frame belongs to."""
    microbatch: int
    """Micro-batch index within the step."""
    kind: FrameKind
    """activation (forward) or gradient (backward)."""
    dtype: str
    """Dtype of the decoded tensor (float32)."""
    shape: tuple[int, ...]
    """Tensor shape."""
    codec: str = "fp32"
    """Payload encoding (ringtune.wire.CODECS): fp32 is the tensor's bytes as they are."""


def pack_frame(header: FrameHeader, tensor: torch.Tensor) -> tuple[bytes, bytes]:
    """(header bytes, payload bytes) for FrameAuthenticator.seal."""
    head = msgpack.packb([header.run, header.step, header.microbatch, header.kind, header.dtype,
                          list(header.shape), header.codec])
    return head, encode(header.codec, tensor)


def unpack_frame(head: bytes, payload: bytes | memoryview,
                 expect=lambda header: None) -> tuple[FrameHeader, torch.Tensor]:
    """Parse an opened frame; raise FrameError for anything not exactly right. ``expect(header)``
    raises FrameError for a well-formed header the receiver did not ask for, before any decoding."""
    if len(head) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(head)} bytes is too long")
    header = _parse_header(head)
    expect(header)
    expected = encoded_bytes(header.codec, header.shape)
    if len(payload) != expected:
        raise FrameError(f"payload has {len(payload)} bytes, header says {expected}")
    return header, decode(header.codec, payload, header.shape)


def _parse_header(raw: bytes) -> FrameHeader:
    try:
        fields = msgpack.unpackb(raw)
        run, step, microbatch, kind, dtype, shape, codec = fields
        header = FrameHeader(str(run), int(step), int(microbatch), kind, str(dtype),
                             tuple(int(n) for n in shape), str(codec))
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise FrameError(f"malformed header: {error}") from None
    if header.kind not in ("activation", "gradient") or header.dtype != DTYPE:
        raise FrameError(f"unknown kind {header.kind!r} or dtype {header.dtype!r}")
    if header.codec not in CODECS or not header.shape or any(n < 1 for n in header.shape) or len(header.shape) > 8:
        raise FrameError(f"unsupported codec {header.codec!r} or shape {header.shape}")
    return header
