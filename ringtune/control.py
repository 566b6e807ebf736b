"""How control messages travel: msgpack maps over pynng Req/Rep, one request and one reply.

The messages themselves are typed in ``ringtune.protocol``. Only hello, pair_begin and
pair_finish travel in the clear; after pairing (see ``ringtune.security``) every request is
``{"session": ID, "sealed": BYTES}`` and every reply ``{"sealed": BYTES}``, sealed by a
SecureChannel.
"""
from __future__ import annotations

import msgpack

from ringtune.security import FrameAuthenticator, link_key


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
