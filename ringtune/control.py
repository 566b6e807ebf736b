"""Control-plane messages: msgpack maps over pynng Req/Rep, one request and one reply.

Request: ``{"cmd": NAME, ...}``. Reply: ``{"ok": true, ...}`` or ``{"ok": false, "error": TEXT}``.
Only ``hello``, ``pair_begin`` and ``pair_finish`` travel in the clear; after pairing (see
``ringtune.security``) every request is ``{"session": ID, "sealed": BYTES}`` and every reply
``{"sealed": BYTES}``, sealed by a SecureChannel.
"""
from __future__ import annotations

import msgpack

from ringtune.security import FrameAuthenticator, link_key

MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Largest command an agent accepts (weights ship in chunks of CHUNK_BYTES)."""
CHUNK_BYTES = 8 * 1024 * 1024
"""Slice upload chunk size."""
PUBLIC_COMMANDS = frozenset({"hello", "pair_begin", "pair_finish"})
"""Commands an agent answers without a paired session."""
MAX_REPLY_BYTES = 1024 * 1024 * 1024
"""Largest reply a coordinator accepts (LoRA tensors of a stage)."""
PROTOCOL_VERSION = 2


class ControlError(RuntimeError):
    """An agent refused or failed a command; the message is the agent's."""


class SessionLost(ControlError):
    """The agent no longer knows the session (it restarted, or another coordinator paired since)."""


def pack(message: dict) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict:
    message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(message, dict):
        raise ValueError("control message is not a map")
    return message


class SecureChannel:
    """Both directions of a paired control session: every message is sealed with its own counter.

    Bulk bytes (slice chunks) ride in the sealed payload, the msgpack message in the header.
    """

    def __init__(self, session_key: bytes, me: str, peer: str) -> None:
        self._sealer = FrameAuthenticator(link_key(session_key, me, peer))
        self._opener = FrameAuthenticator(link_key(session_key, peer, me))

    def seal(self, message: dict, blob: bytes = b"") -> bytes:
        return self._sealer.seal(pack(message), blob)

    def open(self, data: bytes) -> tuple[dict, bytes]:
        """Raises AuthError (ReplayError) for anything not sealed by the peer, once."""
        header, blob = self._opener.open(data)
        return unpack(header), bytes(blob)
