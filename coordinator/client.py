"""The coordinator's side of one agent's control plane (pynng Req0, every call with a timeout)."""
from __future__ import annotations

import pynng

from ringtune import control


class AgentUnreachable(RuntimeError):
    """An agent did not answer in time."""


class AgentClient:
    def __init__(self, url: str, timeout: float = 10.0, name: str | None = None) -> None:
        self.url = url
        self.name = name or url
        self.timeout = timeout
        self._socket = pynng.Req0(send_timeout=int(timeout * 1000), recv_timeout=int(timeout * 1000),
                                  recv_max_size=control.MAX_REPLY_BYTES)
        self._socket.dial(url, block=False)

    def call(self, cmd: str, reply_timeout: float | None = None, **payload) -> dict:
        """Send a command; return the reply, or raise AgentUnreachable / ControlError."""
        if reply_timeout is not None:
            self._socket.recv_timeout = int(reply_timeout * 1000)
        try:
            self._socket.send(control.pack({"cmd": cmd, **payload}))
            reply = control.unpack(self._socket.recv())
        except pynng.Timeout:
            raise AgentUnreachable(f"agent {self.name} at {self.url} did not answer {cmd!r} within "
                                   f"{reply_timeout or self.timeout:.0f} s (is it running and reachable?)") from None
        finally:
            if reply_timeout is not None:
                self._socket.recv_timeout = int(self.timeout * 1000)
        if not reply.get("ok"):
            raise control.ControlError(f"agent {self.name}: {reply.get('error', 'unknown error')}")
        return reply

    def close(self) -> None:
        self._socket.close()
