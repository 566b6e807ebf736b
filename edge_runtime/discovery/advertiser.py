"""Publish an agent on the local network as a ``_ringtune._tcp.local.`` mDNS service."""
from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import replace

import ifaddr
from zeroconf import InterfaceChoice, ServiceInfo, Zeroconf

from edge_runtime.discovery.advert import SERVICE_TYPE, AgentAdvert
from edge_runtime.discovery.interfaces import ALL, Interfaces

log = logging.getLogger(__name__)
_LABEL_MAX = 63


class Advertiser:
    """Keeps one agent's advert published on the chosen interfaces until :meth:`close`.

    Registration probes the network for name conflicts first, so the constructor blocks for about
    a second. The instance name carries the agent id so two agents may share a display name.
    """

    def __init__(self, advert: AgentAdvert, *, interfaces: Interfaces) -> None:
        self.advert = advert
        self._closed = False
        self._info = ServiceInfo(SERVICE_TYPE, _instance_name(advert), port=advert.port,
                                 properties=advert.to_txt(), server=_host_name(advert),
                                 parsed_addresses=_addresses(advert, interfaces))
        self._zeroconf = Zeroconf(interfaces=InterfaceChoice.All if interfaces == ALL else list(interfaces))
        try:
            # A restarted agent may still be cached under its old name: take a new one, never fail.
            self._zeroconf.register_service(self._info, allow_name_change=True)
        except BaseException:
            self._zeroconf.close()
            raise
        log.info("advertising %s as %s on %s", advert.control_url, self._info.name, interfaces)

    def set_busy(self, lineage: str | None) -> None:
        """Re-announce the advert saying which run the agent serves now (None: none)."""
        if self._closed or (lineage or "") == self.advert.busy:
            return
        self.advert = replace(self.advert, busy=lineage or "")
        self._info = ServiceInfo(SERVICE_TYPE, self._info.name, port=self.advert.port, properties=self.advert.to_txt(),
                                 server=self._info.server, parsed_addresses=self._info.parsed_addresses())
        self._zeroconf.update_service(self._info)

    def close(self) -> None:
        """Say goodbye on the network (peers drop the agent at once) and release the sockets."""
        if self._closed:
            return
        self._closed = True
        try:
            self._zeroconf.unregister_service(self._info)
        finally:
            self._zeroconf.close()

    def __enter__(self) -> Advertiser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _instance_name(advert: AgentAdvert) -> str:
    # Dots would split the DNS label; the id suffix keeps names unique on a network.
    suffix = f" ({advert.agent_id[:8]})"
    base = advert.name.replace(".", "-")
    while len((base + suffix).encode()) > _LABEL_MAX:
        base = base[:-1]
    return f"{base}{suffix}.{SERVICE_TYPE}"


def _host_name(advert: AgentAdvert) -> str:
    label = re.sub(r"[^a-zA-Z0-9-]", "-", f"ringtune-{advert.agent_id}")[:_LABEL_MAX].strip("-")
    return f"{label}.local."


def _addresses(advert: AgentAdvert, interfaces: Interfaces) -> list[str]:
    """Addresses peers should use: the endpoint's IP, else (wildcard or host name) the interfaces'."""
    try:
        if not ipaddress.ip_address(advert.host).is_unspecified:
            return [advert.host]
    except ValueError:
        pass  # a host name: peers still need an address record
    if interfaces != ALL:
        return list(interfaces)
    ips = [ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if isinstance(ip.ip, str)]
    return [ip for ip in ips if not ip.startswith("127.")] or ips
