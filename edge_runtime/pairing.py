"""The agent's side of pairing: prove the token both ways, then hold the paired session.

The newest successful pairing replaces the previous session, so a coordinator that crashed can
be followed by a new one. A failed proof is refused and counted; the agent keeps serving. An
address whose pairings keep failing waits longer and longer before it may try again (1 s after
the first failure, doubling up to BACKOFF_MAX_SECONDS), so the token cannot be guessed quickly.
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from ringtune.control import SecureChannel
from ringtune.security import AgentHandshake, AuthError

log = logging.getLogger(__name__)
PENDING_LIMIT = 16
PENDING_SECONDS = 30.0
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
BACKOFF_FORGET_SECONDS = 3600.0
"""An address that has not failed for this long starts over."""


class PairingRefused(ValueError):
    """A coordinator that does not know the token (the message says how to fix it)."""


@dataclass
class _Failures:
    count: int
    """Failed pairings from the address in a row."""
    last: float
    """When the last one failed (monotonic seconds)."""

    def wait(self, now: float) -> float:
        """Seconds the address must still wait before it may pair again."""
        backoff = min(BACKOFF_FIRST_SECONDS * 2 ** (self.count - 1), BACKOFF_MAX_SECONDS)
        return max(0.0, self.last + backoff - now)


class Pairing:
    def __init__(self, token: str, agent_id: str) -> None:
        self._token = token
        self.agent_id = agent_id
        self._pending: dict[bytes, tuple[AgentHandshake, float, str]] = {}
        self._failures: dict[str, _Failures] = {}
        self.session_id: str | None = None
        self.session_key: bytes | None = None
        self.channel: SecureChannel | None = None
        self.refused = 0
        """Failed pairings and requests that failed verification."""
        self.backed_off = 0
        """Pairing attempts refused because their address failed too often recently."""

    def begin(self, run: str, peer: str = "") -> dict:
        """peer: the coordinator's address (failures are counted per address)."""
        self._expire()
        failures = self._failures.get(peer)
        wait = failures.wait(time.monotonic()) if failures else 0.0
        if wait > 0:
            self.backed_off += 1
            raise PairingRefused(f"{failures.count} failed pairing(s) from {peer or 'this address'}: try again "
                                 f"in {wait:.0f} s, with the token this agent printed at its first start")
        handshake = AgentHandshake(self._token, self.agent_id, run)
        self._pending[handshake.nonce] = (handshake, time.monotonic(), peer)
        return {"agent_id": self.agent_id, "nonce": handshake.nonce}

    def finish(self, agent_nonce: bytes, coordinator_nonce: bytes, proof: bytes) -> dict:
        entry = self._pending.pop(bytes(agent_nonce), None)
        if entry is None:
            raise PairingRefused("unknown or expired pairing attempt: pair again")
        handshake, _, peer = entry
        try:
            agent_proof, key = handshake.verify(bytes(coordinator_nonce), bytes(proof))
        except AuthError:
            self.refused += 1
            earlier = self._failures.get(peer)
            self._failures[peer] = _Failures((earlier.count if earlier else 0) + 1, time.monotonic())
            log.warning("refused a coordinator at %s that does not know the pairing token", peer or "?")
            raise PairingRefused("pairing refused: wrong token. Pass the token this agent printed at its "
                                 "first start (RINGTUNE_TOKEN=TOKEN ringtune train, or --token TOKEN)") from None
        self._failures.pop(peer, None)
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
        for nonce, (_, started, _) in list(self._pending.items()):
            if now - started > PENDING_SECONDS or len(self._pending) >= PENDING_LIMIT:
                del self._pending[nonce]
        for peer, failures in list(self._failures.items()):
            if now - failures.last > BACKOFF_FORGET_SECONDS:
                del self._failures[peer]
