"""Finding agents: the interface the coordinator uses, whatever the mechanism (mDNS, in memory)."""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

from edge_runtime.discovery.advert import AgentAdvert

_HINT = ("check that those agents are running without --no-advertise and share a network with this "
         "machine (see --interface), raise --timeout, or give their addresses with --agents")


class DiscoveryTimeout(ValueError):
    """Not every wanted agent showed up in time; the message names who is missing."""

    def __init__(self, missing: Sequence[str], missing_count: int, found: Sequence[AgentAdvert],
                 timeout: float) -> None:
        self.missing = tuple(missing)
        """Names (or ids) asked for and not seen; empty when a count was asked for."""
        self.missing_count = missing_count
        """How many agents are missing."""
        self.found = tuple(found)
        """Agents that were seen."""
        seen = ", ".join(a.name + (" (busy with another run)" if a.busy else "") for a in found) or "none"
        if self.missing:
            what = f"agent(s) not found within {timeout:g} s: {', '.join(self.missing)} (found: {seen})"
        else:
            free = len(_free(list(found)))
            what = (f"found {free} of {free + missing_count} free agents within {timeout:g} s "
                    f"(found: {seen}); {missing_count} missing")
        super().__init__(f"{what}; {_HINT}")


class AmbiguousAgent(ValueError):
    """Two agents answer to the same name."""


class AgentTable:
    """Thread-safe set of agents seen now, keyed by where each came from; wakes waiters on change.

    Keys are mechanism-specific (an mDNS instance name, say). One agent may briefly appear under
    two keys (restarted under a new mDNS name): :meth:`agents` keeps the latest per agent id.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._entries: dict[str, AgentAdvert] = {}
        self._version = 0

    def put(self, key: str, advert: AgentAdvert) -> None:
        """Add or replace the advert seen under ``key``."""
        with self._changed:
            self._entries.pop(key, None)  # re-insert so that dict order means "latest"
            self._entries[key] = advert
            self._bump()

    def remove(self, key: str) -> None:
        """Forget whatever was seen under ``key`` (no error if nothing was)."""
        with self._changed:
            if self._entries.pop(key, None) is not None:
                self._bump()

    def seen(self) -> tuple[int, list[AgentAdvert]]:
        """(version, agents sorted by name): pass the version to :meth:`wait_changed`."""
        with self._changed:
            latest = {advert.agent_id: advert for advert in self._entries.values()}
            return self._version, sorted(latest.values(), key=lambda a: (a.name, a.agent_id))

    def wait_changed(self, version: int, timeout: float) -> None:
        """Block until the table differs from ``version`` or ``timeout`` seconds pass."""
        with self._changed:
            self._changed.wait_for(lambda: self._version != version, timeout=max(timeout, 0.0))

    def _bump(self) -> None:
        self._version += 1
        self._changed.notify_all()


class Discovery(ABC):
    """Finds agents on the network. Close it (or use ``with``) to stop listening."""

    @property
    @abstractmethod
    def table(self) -> AgentTable:
        """Agents seen so far, kept current by the implementation."""

    @abstractmethod
    def close(self) -> None:
        """Stop listening and release sockets."""

    def snapshot(self, timeout: float) -> list[AgentAdvert]:
        """Every agent seen after listening for ``timeout`` seconds, sorted by name."""
        time.sleep(max(timeout, 0.0))  # mDNS cannot tell "no more answers": listen the whole time
        return self.table.seen()[1]

    def wait_for(self, wanted: int | str | Sequence[str], timeout: float, lineage: str = "") -> list[AgentAdvert]:
        """Wait until ``wanted`` agents are seen: a count, or names/ids (matched against both).

        Returns the named agents in the order asked, or, for a count, every agent not busy with a
        run (other than ``lineage``, the run being resumed) seen once at least that many are (sorted
        by name; more may be returned). Raises :class:`DiscoveryTimeout`
        naming who is missing, or :class:`AmbiguousAgent` if a name matches two agents.
        """
        names = [wanted] if isinstance(wanted, str) else wanted
        if (names < 1) if isinstance(names, int) else not names:
            raise ValueError(f"wait for at least one agent, not {wanted!r}")
        deadline = time.monotonic() + timeout
        while True:
            version, agents = self.table.seen()
            missing = _missing(names, agents, lineage)
            if not missing[1]:
                return _free(agents, lineage) if isinstance(names, int) else [_pick(n, agents) for n in names]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DiscoveryTimeout(*missing, found=agents, timeout=timeout)
            self.table.wait_changed(version, remaining)

    def __enter__(self) -> Discovery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _missing(wanted: int | Sequence[str], agents: list[AgentAdvert], lineage: str = "") -> tuple[list[str], int]:
    """(missing names, missing count) for the wanted agents among those seen."""
    if isinstance(wanted, int):
        return [], max(wanted - len(_free(agents, lineage)), 0)
    names = [name for name in wanted if not _matches(name, agents)]
    return names, len(names)


def _free(agents: list[AgentAdvert], lineage: str = "") -> list[AgentAdvert]:
    """Agents not busy with a run (or busy with the run of this lineage)."""
    return [a for a in agents if a.busy in ("", lineage)]


def _matches(name: str, agents: list[AgentAdvert]) -> list[AgentAdvert]:
    return [a for a in agents if name in (a.name, a.agent_id)]


def _pick(name: str, agents: list[AgentAdvert]) -> AgentAdvert:
    matches = _matches(name, agents)
    if len(matches) > 1:
        ids = ", ".join(a.agent_id for a in matches)
        raise AmbiguousAgent(f"{len(matches)} agents are named {name!r} (ids {ids}): ask for one by id, "
                             "or give one a different --name")
    return matches[0]
