"""Where emulated devices live: one small interface, two implementations.

``NamespaceHosts`` (root): a namespace per device on a bridge, tbf-capped links, cgroup CPU/RAM.
``LoopbackHosts`` (anyone): every device on 127.0.0.1, nothing capped.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from cluster.state import ClusterState


class Hosts(ABC):
    mode: str
    """The ClusterState.mode this implementation builds."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    @abstractmethod
    def plan(self, state: ClusterState) -> ClusterState:
        """The state with the coordinator's and every device's place (address, namespace, cgroup)
        filled in; creates nothing, so it can be saved first and a crash half-way through build()
        is still cleaned up by name."""

    @abstractmethod
    def build(self, state: ClusterState) -> None:
        """Create the places plan() named."""

    @abstractmethod
    def teardown(self) -> list[str]:
        """Remove everything named with the prefix (idempotent); what was removed."""
