"""The agent's side of pairing: prove the token both ways, then hold the paired session.

The newest successful pairing replaces the previous session, so a coordinator that crashed can
be followed by a new one. A failed proof is refused and counted; the agent keeps serving.
"""
from __future__ import annotations

import logging
import secrets
import time

from ringtune.control import SecureChannel
from ringtune.security import AgentHandshake, AuthError

log = logging.getLogger(__name__)
PENDING_LIMIT = 16
PENDING_SECONDS = 30.0


class PairingRefused(ValueError):
    """A coordinator that does not know the token (the message says how to fix it)."""


class Pairing:
    def __init__(self, token: str, agent_id: str) -> None:
        self._token = token
        self.agent_id = agent_id
        self._pending: dict[bytes, tuple[AgentHandshake, float]] = {}
        self.session_id: str | None = None
        self.session_key: bytes | None = None
        self.channel: SecureChannel | None = None
        self.refused = 0
        """Failed pairings and requests that failed verification."""

    def begin(self, run: str) -> dict:
        self._expire()
        handshake = AgentHandshake(self._token, self.agent_id, run)
        self._pending[handshake.nonce] = (handshake, time.monotonic())
        return {"agent_id": self.agent_id, "nonce": handshake.nonce}

    def finish(self, agent_nonce: bytes, coordinator_nonce: bytes, proof: bytes) -> dict:
        entry = self._pending.pop(bytes(agent_nonce), None)
        if entry is None:
            raise PairingRefused("unknown or expired pairing attempt: pair again")
        try:
            agent_proof, key = entry[0].verify(bytes(coordinator_nonce), bytes(proof))
        except AuthError:
            self.refused += 1
            log.warning("refused a coordinator that does not know the pairing token")
            raise PairingRefused("pairing refused: wrong token. Pass the token this agent printed at its "
                                 "first start (ringtune train --token TOKEN or RINGTUNE_TOKEN)") from None
        self.session_id, self.session_key = secrets.token_hex(8), key
        self.channel = SecureChannel(key, "agent", "coordinator")
        return {"proof": agent_proof, "session": self.session_id}

    def open(self, session: str, sealed: bytes) -> tuple[dict, bytes]:
        """The verified request of the current session; AuthError otherwise (counted)."""
        if self.channel is None or session != self.session_id:
            self.refused += 1
            raise AuthError("not paired (or paired by another coordinator since): pair again")
        try:
            return self.channel.open(sealed)
        except AuthError:
            self.refused += 1
            raise

    def _expire(self) -> None:
        now = time.monotonic()
        for nonce, (_, started) in list(self._pending.items()):
            if now - started > PENDING_SECONDS or len(self._pending) >= PENDING_LIMIT:
                del self._pending[nonce]
