"""Which network interfaces mDNS may use: the ``--interface`` values of ``agent`` and ``devices``.

Binding explicitly matters: tests and emulated clusters must never multicast on the machine's
real network, so the choice is always spelled out, never an implicit default in the library.
IPv4 only: every device ringtune targets has it, and it keeps zeroconf's socket setup simple.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import ifaddr

ALL: Literal["all"] = "all"
Interfaces = list[str] | Literal["all"]
"""IPv4 addresses of this host to bind mDNS to, or ``"all"`` for every interface."""


class InterfaceError(ValueError):
    """An ``--interface`` value that is not an IPv4 address or interface of this machine."""


def parse_interfaces(values: Sequence[str] | None) -> Interfaces:
    """Turn ``--interface`` values (IPv4 addresses, or interface names like eth0) into addresses.

    No values means every interface, which is what a user on a home network wants.
    """
    if not values:
        return ALL
    local = local_ipv4()
    known = {ip for ips in local.values() for ip in ips}
    addresses: list[str] = []
    for value in values:
        found = [value] if value in known else local.get(value, [])
        if not found:
            choices = ", ".join(f"{name} ({' '.join(ips)})" for name, ips in local.items() if ips)
            raise InterfaceError(f"--interface {value!r} is neither an IPv4 address nor an interface of "
                                 f"this machine; choose one of: {choices}")
        addresses.extend(ip for ip in found if ip not in addresses)
    return addresses


def local_ipv4() -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses (ifaddr gives IPv6 as tuples, which are skipped)."""
    return {adapter.nice_name: [ip.ip for ip in adapter.ips if isinstance(ip.ip, str)]
            for adapter in ifaddr.get_adapters()}
