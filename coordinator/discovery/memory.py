"""In-memory discovery for fast tests: advertisers and discoveries share one registry object."""
from __future__ import annotations

from coordinator.discovery.base import AgentTable, Discovery
from edge_runtime.discovery.advert import AgentAdvert


class MemoryRegistry(AgentTable):
    """The stand-in for the network: what :class:`MemoryAdvertiser` publishes, discoveries see."""


class MemoryAdvertiser:
    """Publishes one advert in a registry until :meth:`close` (mirrors the mDNS Advertiser)."""

    def __init__(self, registry: MemoryRegistry, advert: AgentAdvert) -> None:
        self.advert = advert
        self._registry = registry
        registry.put(advert.agent_id, advert)

    def close(self) -> None:
        self._registry.remove(self.advert.agent_id)

    def __enter__(self) -> MemoryAdvertiser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class MemoryDiscovery(Discovery):
    """Sees whatever is in the registry, immediately."""

    def __init__(self, registry: MemoryRegistry) -> None:
        self._registry = registry

    @property
    def table(self) -> AgentTable:
        return self._registry

    def close(self) -> None:
        """Nothing to release: the registry belongs to the caller."""
