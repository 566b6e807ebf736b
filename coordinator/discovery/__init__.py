"""Coordinator side of discovery: find agents by count or name, over mDNS or in memory."""
from coordinator.discovery.base import AgentTable, AmbiguousAgent, Discovery, DiscoveryTimeout
from coordinator.discovery.mdns import MdnsDiscovery
from coordinator.discovery.memory import MemoryAdvertiser, MemoryDiscovery, MemoryRegistry

__all__ = ["AgentTable", "AmbiguousAgent", "Discovery", "DiscoveryTimeout", "MdnsDiscovery",
           "MemoryAdvertiser", "MemoryDiscovery", "MemoryRegistry"]
