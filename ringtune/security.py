"""Pairing tokens, the challenge-response handshake, session keys and authenticated frames.

Transport-agnostic: everything here takes and returns bytes. The flow, per agent and run::

    coordinator                                      agent (holds the pairing token)
    ---- hello(run_id) --------------------------->  hs = AgentHandshake(token, agent_id, run_id)
    <--------------------------------- hs.nonce ---
    hs = CoordinatorHandshake(token, agent_id, run_id)
    nonce, proof = hs.answer(agent_nonce)
    ---- nonce, proof ---------------------------->  agent_proof, key = hs.verify(nonce, proof)
    <------------------------------ agent_proof ---  (or AuthError: refuse, keep serving others)
    key = hs.finish(agent_proof)  (or AuthError)

The token itself never crosses the wire, only HMACs over fresh nonces. The session key is unique
to (token, both nonces, agent, run). The coordinator then sends every agent the run's data-plane
key (``new_key()``) wrapped with :func:`wrap_key`; each direction of each link gets its own key
from :func:`link_key`, so a frame can be neither reflected back nor replayed on another link.
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import secrets
import stat
import struct
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

Buffer = bytes | bytearray | memoryview
"""Bytes-like input (collections.abc.Buffer needs Python 3.12)."""
TOKEN_FILE = "token"
MIN_TOKEN_CHARS = 16
NONCE_BYTES = 32
KEY_BYTES = 32
_PROTOCOL = b"ringtune/1"
_MAC_TAG_BYTES = 32
_AEAD_TAG_BYTES = 16
_WRAPPED_KEY_BYTES = KEY_BYTES + 8  # RFC 3394 adds one 64-bit block
_ENVELOPE = struct.Struct(">2sBBQI")  # magic, version, mode, counter, header length
_MAGIC = b"RT"
_VERSION = 1
_MODE_MAC, _MODE_AEAD = 0, 1
_MODE_NAMES = {_MODE_MAC: "MAC-only", _MODE_AEAD: "encrypted"}


class AuthError(ValueError):
    """A peer failed to prove the token, or a frame failed verification: drop it, count it."""


class ReplayError(AuthError):
    """A correctly authenticated frame that was already seen (or is older than one seen)."""


class TokenError(ValueError):
    """A pairing token that is missing, too weak, or stored unsafely."""


# --- pairing token ---------------------------------------------------------------------------

def generate_token() -> str:
    """A new random pairing token (256 bits, URL-safe text, easy to paste)."""
    return secrets.token_urlsafe(KEY_BYTES)


def check_token(token: str) -> str:
    """The token without surrounding whitespace; refuses short ones (they could be guessed)."""
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the pairing token must have at least {MIN_TOKEN_CHARS} characters: use the "
                         "one the agent printed at its first start (or omit --token to generate one)")
    return token


def load_or_create_token(state_dir: Path) -> tuple[str, bool]:
    """The agent's token from ``state_dir/token``, creating it (mode 0600) on first use.

    Returns ``(token, created)``: the caller prints the token once, when ``created`` is true.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / TOKEN_FILE
    token = generate_token()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_token(path), False
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token, True


def keep_token(state_dir: Path, token: str) -> Path:
    """Store a given token as the agent's token file (mode 0600), e.g. for a systemd unit to read; the
    file's path. Refuses to replace a different token already kept there."""
    token = check_token(token)
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if _read_token(path) != token:
            raise TokenError(f"{path} holds another token: delete it, or start the agent without --token "
                             f"to use the one it holds") from None
        return path
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return path


def _read_token(path: Path) -> str:
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise TokenError(f"{path} is readable by other users: run `chmod 600 {path}`")
    try:
        return check_token(path.read_text())
    except TokenError:
        raise TokenError(f"{path} does not hold a valid token: delete it to generate a new one") from None


# --- handshake -------------------------------------------------------------------------------

class AgentHandshake:
    """Agent side: send :attr:`nonce`, then :meth:`verify` the coordinator's answer."""

    def __init__(self, token: str, agent_id: str, run_id: str) -> None:
        self._key = check_token(token).encode()
        self._context = _fields(agent_id, run_id)
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        """The challenge to send to the coordinator."""

    def verify(self, coordinator_nonce: bytes, coordinator_proof: bytes) -> tuple[bytes, bytes]:
        """Check the coordinator knows the token; return ``(agent_proof, session_key)``.

        Send ``agent_proof`` back so the coordinator knows this agent holds the token too.
        """
        _check_nonce(coordinator_nonce)
        transcript = self._context + self.nonce + coordinator_nonce
        if not hmac.compare_digest(_proof(self._key, b"coordinator", transcript), coordinator_proof):
            raise AuthError("the coordinator does not know this agent's pairing token: give it the token "
                            "this agent printed at its first start (RINGTUNE_TOKEN, or --token)")
        return (_proof(self._key, b"agent", transcript),
                _session_key(self._key, self.nonce, coordinator_nonce, self._context))


class CoordinatorHandshake:
    """Coordinator side: :meth:`answer` the agent's challenge, then :meth:`finish` with its proof."""

    def __init__(self, token: str, agent_id: str, run_id: str) -> None:
        self._key = check_token(token).encode()
        self._context = _fields(agent_id, run_id)
        self._agent_id = agent_id
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._agent_nonce: bytes | None = None

    def answer(self, agent_nonce: bytes) -> tuple[bytes, bytes]:
        """``(coordinator_nonce, coordinator_proof)`` to send to the agent."""
        _check_nonce(agent_nonce)
        self._agent_nonce = agent_nonce
        return self._nonce, _proof(self._key, b"coordinator", self._context + agent_nonce + self._nonce)

    def finish(self, agent_proof: bytes) -> bytes:
        """Check the agent knows the token too; return the session key."""
        if self._agent_nonce is None:
            raise AuthError("finish() before answer(): the handshake is out of order")
        transcript = self._context + self._agent_nonce + self._nonce
        if not hmac.compare_digest(_proof(self._key, b"agent", transcript), agent_proof):
            raise AuthError(f"agent {self._agent_id!r} could not prove the pairing token: it was started "
                            "with another token, or it is not the device you paired with")
        return _session_key(self._key, self._agent_nonce, self._nonce, self._context)


def _proof(key: bytes, role: bytes, transcript: bytes) -> bytes:
    # The role label stops one side's proof from being reflected as the other's.
    return hmac.digest(key, _PROTOCOL + b" proof " + role + transcript, hashlib.sha256)


def _session_key(key: bytes, agent_nonce: bytes, coordinator_nonce: bytes, context: bytes) -> bytes:
    return _hkdf(key, salt=agent_nonce + coordinator_nonce, info=_PROTOCOL + b" session" + context)


def _check_nonce(nonce: bytes) -> None:
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise AuthError(f"handshake nonce must be {NONCE_BYTES} bytes: the peer speaks another protocol")


# --- keys ------------------------------------------------------------------------------------

def new_key() -> bytes:
    """A fresh random key, e.g. a run's data-plane key (make a new one for every run or restart)."""
    return secrets.token_bytes(KEY_BYTES)


def link_key(key: bytes, sender: str, receiver: str) -> bytes:
    """The key for frames from ``sender`` to ``receiver`` (e.g. stage names, or coordinator/agent)."""
    return _hkdf(key, salt=b"", info=_PROTOCOL + b" link" + _fields(sender, receiver))


def wrap_key(session_key: bytes, key: bytes) -> bytes:
    """Encrypt and authenticate ``key`` for one agent, to send over its control connection (AES key
    wrap, RFC 3394, under a key derived from the session key)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"only {KEY_BYTES}-byte keys are wrapped, got {len(key)}: make it with new_key()")
    return aes_key_wrap(_wrapping_key(session_key), key)


def unwrap_key(session_key: bytes, wrapped: bytes) -> bytes:
    """The key from :func:`wrap_key`; raises AuthError if it was altered or wrapped for another session."""
    if len(wrapped) != _WRAPPED_KEY_BYTES:
        raise AuthError(f"a wrapped key has {_WRAPPED_KEY_BYTES} bytes, got {len(wrapped)}: the coordinator "
                        f"runs another ringtune version (before AES key wrap); install the same on both")
    try:
        return aes_key_unwrap(_wrapping_key(session_key), wrapped)
    except InvalidUnwrap:
        raise AuthError("the wrapped key fails verification: it was altered or is from another session") from None


def _wrapping_key(session_key: bytes) -> bytes:
    # The session key also keys the sealed control messages: wrap under a key of its own.
    return _hkdf(session_key, salt=b"", info=_PROTOCOL + b" wrap")


def _hkdf(key: bytes, *, salt: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869); an empty salt is HashLen zero bytes, as the RFC says."""
    return HKDF(algorithm=SHA256(), length=length, salt=salt or None, info=info).derive(key)


def _fields(*values: str) -> bytes:
    """Length-prefixed encoding, so that ("ab", "c") and ("a", "bc") never collide."""
    return b"".join(struct.pack(">I", len(raw)) + raw for raw in (v.encode() for v in values))


# --- frames ----------------------------------------------------------------------------------

class FrameAuthenticator:
    """Seals and opens the frames of one direction of one link, refusing replays.

    Frame: ``"RT" | version u8 | mode u8 | counter u64 | header length u32 | header | payload |
    tag``. The tag is HMAC-SHA256 over everything before it (32 bytes) or, with ``encrypt``,
    ChaCha20-Poly1305's (16 bytes; the payload is encrypted, the header is authenticated only).
    Each sealed frame takes the next counter; :meth:`open` accepts only counters above the last
    one accepted (links are ordered, lost frames just leave gaps). A key must be sealed with by
    one authenticator only: a second one would reuse counters (and, encrypted, nonces).
    """

    def __init__(self, key: bytes, *, encrypt: bool = False) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a frame key has {KEY_BYTES} bytes, got {len(key)}: derive it with link_key()")
        self._mode = _MODE_AEAD if encrypt else _MODE_MAC
        self._tag_bytes = _AEAD_TAG_BYTES if encrypt else _MAC_TAG_BYTES
        subkey = _hkdf(key, salt=b"", info=_PROTOCOL + b" frame " + _MODE_NAMES[self._mode].encode())
        self._aead = ChaCha20Poly1305(subkey) if encrypt else None
        self._mac = hmac.new(subkey, digestmod=hashlib.sha256)  # copied per frame: keying once
        self._next = itertools.count(1)  # next() on a count is atomic under the GIL
        self._last_opened = 0
        self._open_lock = threading.Lock()
        self.overhead = _ENVELOPE.size + self._tag_bytes
        """Bytes a sealed frame adds to header + payload (for size limits)."""

    def seal(self, header: bytes, payload: Buffer) -> bytes:
        """The frame carrying ``header`` (e.g. msgpack) and ``payload`` (e.g. tensor bytes)."""
        envelope = _ENVELOPE.pack(_MAGIC, _VERSION, self._mode, next(self._next), len(header))
        if self._aead is not None:
            counter = envelope[4:12]
            return b"".join((envelope, header, self._aead.encrypt(bytes(4) + counter, payload,
                                                                  envelope + header)))
        mac = self._mac.copy()
        for part in (envelope, header, payload):
            mac.update(part)
        return b"".join((envelope, header, payload, mac.digest()))

    def open(self, frame: Buffer) -> tuple[bytes, memoryview]:
        """``(header, payload)`` of a genuine, fresh frame; raises AuthError (ReplayError) otherwise."""
        view = memoryview(frame).cast("B")
        if view.nbytes < _ENVELOPE.size:
            raise AuthError(f"frame of {view.nbytes} bytes is shorter than the {self.overhead}-byte minimum")
        magic, version, mode, counter, header_len = _ENVELOPE.unpack_from(view)
        if magic != _MAGIC or version != _VERSION:
            raise AuthError(f"not a ringtune v{_VERSION} frame (magic {magic!r}, version {version})")
        if mode != self._mode:
            raise AuthError(f"frame is {_MODE_NAMES.get(mode, f'mode {mode}')} but this link is "
                            f"{_MODE_NAMES[self._mode]}: both ends must agree on encryption")
        if view.nbytes < self.overhead:
            raise AuthError(f"frame of {view.nbytes} bytes is shorter than the {self.overhead}-byte minimum")
        body_end = view.nbytes - self._tag_bytes
        header_end = _ENVELOPE.size + header_len
        if header_end > body_end:
            raise AuthError(f"header length {header_len} exceeds the frame")
        payload = self._verified_payload(view, header_end, body_end)
        with self._open_lock:
            if counter <= self._last_opened:
                raise ReplayError(f"frame #{counter} is a replay (last accepted #{self._last_opened})")
            self._last_opened = counter
        return bytes(view[_ENVELOPE.size:header_end]), payload

    def _verified_payload(self, view: memoryview, header_end: int, body_end: int) -> memoryview:
        if self._aead is not None:
            nonce = bytes(4) + bytes(view[4:12])
            try:
                return memoryview(self._aead.decrypt(nonce, view[header_end:], view[:header_end]))
            except InvalidTag:
                raise AuthError("frame fails decryption (wrong key or tampered frame)") from None
        mac = self._mac.copy()
        mac.update(view[:body_end])
        if not hmac.compare_digest(mac.digest(), view[body_end:]):
            raise AuthError("frame has a bad MAC (wrong key or tampered frame)")
        return view[header_end:body_end]
