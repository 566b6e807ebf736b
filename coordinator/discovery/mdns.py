"""Discovery over mDNS (python-zeroconf): browse ``_ringtune._tcp.local.`` and resolve each agent."""
from __future__ import annotations

import logging

from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceStateChange, Zeroconf

from coordinator.discovery.base import AgentTable, Discovery
from edge_runtime.discovery.advert import SERVICE_TYPE, AdvertError, AgentAdvert
from edge_runtime.discovery.interfaces import ALL, Interfaces

log = logging.getLogger(__name__)


class MdnsDiscovery(Discovery):
    """Browses from construction until :meth:`close`; agents usually show up within 1-2 s.

    A killed agent stays listed until its records expire (about two minutes): liveness comes
    from control-plane heartbeats, not from here. An agent that closes cleanly leaves at once.
    """

    def __init__(self, *, interfaces: Interfaces, resolve_timeout: float = 3.0) -> None:
        self._table = AgentTable()
        self._resolve_ms = int(resolve_timeout * 1000)
        self._zeroconf = Zeroconf(interfaces=InterfaceChoice.All if interfaces == ALL else list(interfaces))
        self._browser = ServiceBrowser(self._zeroconf, SERVICE_TYPE, handlers=[self._on_change])

    @property
    def table(self) -> AgentTable:
        return self._table

    def close(self) -> None:
        try:
            self._browser.cancel()
        finally:
            self._zeroconf.close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        # Runs on the browser's own thread, so resolving synchronously here blocks nobody else.
        if state_change is ServiceStateChange.Removed:
            self._table.remove(name)
            return
        info = zeroconf.get_service_info(service_type, name, timeout=self._resolve_ms)
        if info is None:
            log.debug("could not resolve %s within %d ms", name, self._resolve_ms)
            return
        try:
            advert = AgentAdvert.from_txt(info.properties)
        except AdvertError as error:
            log.warning("ignoring %s: %s", name, error)
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if advert.has_wildcard_host and addresses:
            advert = advert.with_host(addresses[0])  # it listens everywhere: reach it where mDNS says
        self._table.put(name, advert)
