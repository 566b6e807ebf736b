"""Control-plane messages: msgpack maps over pynng Req/Rep, one request and one reply.

Request: ``{"cmd": NAME, ...}``. Reply: ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``.
"""
from __future__ import annotations

import msgpack

MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Largest command an agent accepts (assignments are small; weights ship in chunks later)."""
MAX_REPLY_BYTES = 1024 * 1024 * 1024
"""Largest reply a coordinator accepts (LoRA tensors of a stage)."""
PROTOCOL_VERSION = 1


class ControlError(RuntimeError):
    """An agent refused or failed a command; the message is the agent's."""


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict:
    message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(message, dict):
        raise ValueError("control message is not a map")
    return message
