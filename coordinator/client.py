"""The coordinator's side of one agent's control plane (pynng Req0, every call with a timeout).

``pair`` proves the token (challenge-response, the token never sent) and opens a sealed session;
every later call is sealed and its reply verified.
"""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pynng

from ringtune import control
from ringtune.security import AuthError, CoordinatorHandshake


class AgentUnreachable(RuntimeError):
    """An agent did not answer in time."""


class PairingFailed(RuntimeError):
    """The agent and the coordinator do not share the pairing token."""


class AgentClient:
    def __init__(self, url: str, timeout: float = 10.0, name: str | None = None) -> None:
        self.url = url
        self.name = name or url
        self.timeout = timeout
        self.session_key: bytes | None = None
        self._session: str | None = None
        self._channel: control.SecureChannel | None = None
        self._socket = pynng.Req0(send_timeout=int(timeout * 1000), recv_timeout=int(timeout * 1000),
                                  recv_max_size=control.MAX_REPLY_BYTES)
        self._socket.dial(url, block=False)

    def pair(self, token: str, run: str) -> None:
        self._channel = None  # pairing is in the clear, also when re-pairing an agent that restarted
        begin = self.call("pair_begin", run=run)
        handshake = CoordinatorHandshake(token, begin["agent_id"], run)
        nonce, proof = handshake.answer(begin["nonce"])
        try:
            finish = self.call("pair_finish", agent_nonce=begin["nonce"], nonce=nonce, proof=proof)
            self.session_key = handshake.finish(finish["proof"])
        except (control.ControlError, AuthError) as error:
            raise PairingFailed(f"agent {self.name} ({self.url}) refused pairing: {error}") from None
        self._session = finish["session"]
        self._channel = control.SecureChannel(self.session_key, "coordinator", "agent")

    def hello(self, reply_timeout: float | None = None) -> dict:
        """The agent's public profile, asked in the clear (the agent may have restarted since pairing)."""
        return self._checked(self._exchange(control.pack({"cmd": "hello"}), "hello", reply_timeout))

    def call(self, cmd: str, reply_timeout: float | None = None, blob: bytes = b"", **payload) -> dict:
        """Send a command; return the reply, or raise AgentUnreachable / ControlError."""
        message = {"cmd": cmd, **payload}
        if self._channel is not None:
            request = {"session": self._session, "sealed": self._channel.seal(message, blob)}
        else:
            request = message
        reply = self._exchange(control.pack(request), cmd, reply_timeout)
        if self._channel is not None and "sealed" in reply:
            reply, _ = self._channel.open(reply["sealed"])
        return self._checked(reply)

    def _checked(self, reply: dict) -> dict:
        if not reply.get("ok"):
            failure = control.SessionLost if reply.get("session_lost") else control.ControlError
            raise failure(f"agent {self.name}: {reply.get('error', 'unknown error')}")
        return reply

    def _exchange(self, data: bytes, cmd: str, reply_timeout: float | None) -> dict:
        if reply_timeout is not None:
            self._socket.recv_timeout = int(reply_timeout * 1000)
        try:
            self._socket.send(data)
            return control.unpack(self._socket.recv())
        except pynng.Timeout:
            raise AgentUnreachable(f"agent {self.name} at {self.url} did not answer {cmd!r} within "
                                   f"{reply_timeout or self.timeout:g} s (is it running and reachable?)") from None
        finally:
            if reply_timeout is not None:
                self._socket.recv_timeout = int(self.timeout * 1000)

    def upload(self, digest: str, blob: bytes | Path, on_chunk: Callable[[int], None] = lambda size: None) -> None:
        """Send a blob (bytes, or a file read a chunk at a time) in chunks unless the agent has it cached
        already; on_chunk(bytes) after each chunk the agent took."""
        if not self.call("have", digests=[digest])["missing"]:
            return
        with (io.BytesIO(blob) if isinstance(blob, bytes) else Path(blob).open("rb")) as source:
            total = source.seek(0, io.SEEK_END)
            source.seek(0)
            for offset in range(0, total, control.CHUNK_BYTES):
                chunk = source.read(control.CHUNK_BYTES)
                self.call("upload", sha256=digest, offset=offset, total=total, blob=chunk)
                on_chunk(len(chunk))

    def close(self) -> None:
        self._socket.close()
