"""Who is in a run: one record per agent ever paired (in, or left and why, and when it last answered).

Admission is decided here and only here: an agent must speak our protocol version, have a name no
other member has, not be busy with another run (its hello says which run it serves), and, when the
user named the devices (``--discover NAMES``), be one of them. When new agents may be taken in at
all (while paused, or at a checkpoint with --rebalance) is the recovery policy's call.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coordinator.client import AgentClient, AgentUnreachable, PairingFailed
from ringtune.protocol import ControlError, HelloReply, ProtocolError, ProtocolMismatch, Timeouts


class RunFailed(RuntimeError):
    """The run stopped; the message names the agent and what happened."""


class AgentGone(RunFailed):
    """An agent stopped answering, lost its session (restarted) or its process ended (the run can go on
    without it)."""

    def __init__(self, agent: str, message: str) -> None:
        super().__init__(message)
        self.agent = agent


@dataclass
class Member:
    client: AgentClient
    """Its control connection (paired)."""
    hello: HelloReply
    """Its profile, as it last said hello."""
    present: bool = True
    """In the run now (False: it left, see left_because)."""
    left_because: str = ""
    """Why it left (the error that declared it gone)."""
    last_answer: float = 0.0
    """When it last answered a command (time.monotonic())."""
    owned: bool = False
    """Its client was opened by the membership (closed with it)."""


class Membership:
    def __init__(self, token: str, run_id: str, lineage: str, timeouts: Timeouts,
                 names: frozenset[str] | None = None,
                 check_alive: Callable[[Iterable[str]], None] = lambda names: None) -> None:
        """names: the only agents ever taken in (None: any). check_alive(names) raises AgentGone when it knows
        one of these agents is gone (e.g. a local process exited)."""
        self._token = token
        self.run_id = run_id
        self.lineage = lineage
        self.timeouts = timeouts
        self.names = names
        self.check_alive = check_alive
        self.members: dict[str, Member] = {}

    # --- who is in ------------------------------------------------------------------------
    def present(self) -> list[str]:
        """The agents in the run, in the order they first joined: one that comes back keeps its place, so the ring
        it left is rebuilt (the same plan, whose slices the agents still hold) and a plan depends on who is in,
        not on who left when."""
        return [name for name, member in self.members.items() if member.present]

    def departed(self) -> list[str]:
        return sorted(name for name, member in self.members.items() if not member.present)

    def client(self, name: str) -> AgentClient:
        return self.members[name].client

    def hello(self, name: str) -> HelloReply:
        return self.members[name].hello

    def why_gone(self, name: str) -> str:
        member = self.members.get(name)
        return member.left_because if member else "it never joined"

    def heard(self, name: str) -> None:
        self.members[name].last_answer = time.monotonic()

    def silent_seconds(self, name: str, now: float) -> float:
        member = self.members.get(name)
        return now - member.last_answer if member and member.last_answer else 0.0

    # --- joining and leaving --------------------------------------------------------------
    def join_all(self, clients: list[AgentClient], owner: str) -> None:
        """The run's first agents: each must be admitted, else the run does not start."""
        for client in clients:
            hello = self._hello(client)
            refusal = self._refusal(hello, client)
            if refusal:
                raise RunFailed(refusal)
            self._pair(client, hello, owned=False)
        if owner not in self.members:
            raise RunFailed(f"the owner {owner!r} is not among the agents {sorted(self.members)}")

    def leave(self, name: str, reason: str) -> None:
        member = self.members[name]
        member.present, member.left_because = False, reason

    def rejoin(self, name: str) -> bool:
        """Take a departed agent back if it answers and pairs at its address again."""
        client = self.members[name].client
        try:
            hello = client.hello(timeout=min(self.timeouts.heartbeat, 1.0))
            if hello.name != name or self._refusal(hello, client):
                return False
            self._pair(client, hello, owned=self.members[name].owned)
        except (AgentUnreachable, ControlError, PairingFailed, ProtocolError):
            return False
        return True

    def take_in(self, urls: Iterable[str]) -> list[str]:
        """Pair the agents at these URLs that are not in the run there yet and may join; their names."""
        known = {member.client.url for member in self.members.values() if member.present}
        joined = []
        for url in urls:
            if url in known:
                continue
            client = AgentClient(url, self.timeouts)
            try:
                hello = client.hello(timeout=min(self.timeouts.heartbeat, 1.0))
                refusal = self._refusal(hello, client)
                if refusal:
                    raise PairingFailed(refusal)
                self._pair(client, hello, owned=True)
            except (AgentUnreachable, ControlError, PairingFailed, ProtocolError):
                client.close()
                continue
            joined.append(hello.name)
        return joined

    def close(self) -> None:
        for member in self.members.values():
            if member.owned:
                member.client.close()

    def _hello(self, client: AgentClient) -> HelloReply:
        try:
            return client.hello()
        except ProtocolMismatch as error:
            raise RunFailed(f"{error}") from None

    def _refusal(self, hello: HelloReply, client: AgentClient) -> str:
        """Why this agent may not join (empty: it may)."""
        if self.names is not None and hello.name not in self.names:
            return f"agent {hello.name} ({client.url}) is not one of the devices asked for ({', '.join(sorted(self.names))})"
        if hello.busy is not None and hello.busy != self.lineage:
            return (f"agent {hello.name} ({client.url}) is busy with another run ({hello.busy}): stop that run "
                    f"or choose other devices")
        other = self.members.get(hello.name)
        if other is not None and other.present and other.client is not client:
            return (f"two agents are named {hello.name!r} ({other.client.url}, {client.url}); give each a unique "
                    f"--name")
        return ""

    def _pair(self, client: AgentClient, hello: HelloReply, owned: bool) -> None:
        client.name = hello.name
        client.pair(self._token, self.run_id)
        previous = self.members.get(hello.name)
        if previous is not None and previous.client is not client and previous.owned:
            previous.client.close()  # the same agent, back at a new address
        self.members[hello.name] = Member(client, hello, owned=owned, last_answer=time.monotonic())
