"""The coordinator's side of one agent's control plane (pynng Req0, every call with a timeout).

``pair`` proves the token (challenge-response, the token never sent) and opens a sealed session;
every later request is sealed and its reply verified. Each request waits as long as its kind
needs (``Request.reply_seconds``): heartbeats stay short, uploads scale with their bytes.
"""
from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import pynng

from coordinator.pause_watch import PAUSE_SECONDS, pause_watch
from ringtune import control, protocol
from ringtune.protocol import (CHUNK_BYTES, ControlError, Have, Hello, HelloReply, PairBegin, PairFinish, Reply,
                               Request, Timeouts, Upload)
from ringtune.security import AuthError, CoordinatorHandshake


class AgentUnreachable(RuntimeError):
    """An agent did not answer in time."""


class DeadlineMissed(AgentUnreachable):
    """The deadline passed while the coordinator itself was not running (Ctrl-Z, a suspended laptop or VM): the
    agent may well have answered, and when the process runs again its timer fires before the reply is read (nng
    drops the request at the deadline). This says nothing about the agent. (A stop that ended well before the
    deadline leaves the reply time to be read: the agent, which kept running, is then blamed as usual.)"""


class PairingFailed(RuntimeError):
    """The agent and the coordinator do not share the pairing token."""


class AgentClient:
    def __init__(self, url: str, timeouts: Timeouts = Timeouts(), name: str | None = None) -> None:
        self.url = url
        self.name = name or url
        self.timeouts = timeouts
        self.session_key: bytes | None = None
        self._session: str | None = None
        self._channel: control.SecureChannel | None = None
        milliseconds = int(timeouts.heartbeat * 1000)
        self._socket = pynng.Req0(send_timeout=milliseconds, recv_timeout=milliseconds,
                                  recv_max_size=protocol.MAX_REPLY_BYTES)
        self._socket.dial(url, block=False)
        pause_watch()  # running before the first wait it judges

    def pair(self, token: str, run: str) -> None:
        self._channel = None  # pairing is in the clear, also when re-pairing an agent that restarted
        begin = self.request(PairBegin(run=run))
        handshake = CoordinatorHandshake(token, begin.agent_id, run)
        nonce, proof = handshake.answer(begin.nonce)
        try:
            finish = self.request(PairFinish(agent_nonce=begin.nonce, nonce=nonce, proof=proof))
            self.session_key = handshake.finish(finish.proof)
        except (ControlError, AuthError) as error:
            raise PairingFailed(f"agent {self.name} ({self.url}) refused pairing: {error}") from None
        self._session = finish.session
        self._channel = control.SecureChannel(self.session_key, "coordinator", "agent")

    def hello(self, timeout: float | None = None) -> HelloReply:
        """The agent's public profile, asked in the clear (the agent may have restarted since pairing);
        ProtocolMismatch when it speaks another protocol version."""
        return self.request(Hello(), timeout)

    def request(self, message: Request, timeout: float | None = None) -> Reply:
        """Send a command; its typed reply, or AgentUnreachable / ControlError (SessionLost)."""
        fields, blob = protocol.encode_request(message)
        if self._channel is not None and not message.PUBLIC:
            data = control.pack({"session": self._session, "sealed": self._channel.seal(fields, blob)})
        else:
            data = control.pack(fields)
        seconds = timeout if timeout is not None else message.reply_seconds(self.timeouts)
        reply = self._exchange(data, message.CMD, seconds)
        if "sealed" in reply and self._channel is not None:
            reply, _ = self._channel.open(reply["sealed"])
        return protocol.decode_reply(message, reply, f"agent {self.name}")

    def _exchange(self, data: bytes, cmd: str, seconds: float) -> dict:
        self._socket.recv_timeout = self._socket.send_timeout = max(1, int(seconds * 1000))
        started = time.monotonic()
        try:
            self._socket.send(data)
            return control.unpack(self._socket.recv())
        except pynng.Timeout:
            watch = pause_watch()
            if watch.paused_seconds(since=started + seconds - PAUSE_SECONDS):  # stopped at the deadline
                stopped = watch.paused_seconds(since=started)
                raise DeadlineMissed(f"the coordinator did not run for about {stopped:.0f} s while it waited "
                                     f"{seconds:g} s for agent {self.name}'s answer to {cmd!r} (was it suspended?)"
                                     ) from None
            raise AgentUnreachable(f"agent {self.name} at {self.url} did not answer {cmd!r} within "
                                   f"{seconds:g} s (is it running and reachable?)") from None

    def upload(self, digest: str, blob: bytes | Path, on_chunk: Callable[[int], None] = lambda size: None) -> None:
        """Send a blob (bytes, or a file read a chunk at a time) in chunks unless the agent has it cached
        already; on_chunk(bytes) after each chunk the agent took."""
        if not self.request(Have(digests=[digest])).missing:
            return
        with (io.BytesIO(blob) if isinstance(blob, bytes) else Path(blob).open("rb")) as source:
            total = source.seek(0, io.SEEK_END)
            source.seek(0)
            for offset in range(0, total, CHUNK_BYTES):
                chunk = source.read(CHUNK_BYTES)
                self.request(Upload(sha256=digest, offset=offset, total=total, data=chunk))
                on_chunk(len(chunk))

    def close(self) -> None:
        self._socket.close()
