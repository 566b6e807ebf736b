"""Network namespaces joined by a bridge that lives in its own namespace, and ``tc tbf`` link caps.

Both ends of every veth pair are created inside namespaces (``ip -n NS link add ... netns BRIDGE``),
so the host's own links are never touched and several clusters (or test runs) with different
prefixes can exist side by side: addresses only have to be unique within one bridge.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass

BRIDGE = "br0"
DEVICE_LINK = "eth0"
# Queueing a tbf allows beyond the burst: enough for TCP to fill the link, short enough that a
# capped link still feels like the device's own NIC rather than a deep buffer.
TBF_LATENCY_MS = 50
# tbf needs at least one timer tick's worth of tokens (rate / HZ) to reach its rate; 10 ms of
# traffic (125 KB at 100 Mbit/s, 1.25 MB at 1 Gbit/s) covers any HZ and TSO/GSO super-packets.
TBF_BURST_SECONDS = 0.01
TBF_MIN_BURST_BYTES = 64 * 1024


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed; the message carries the command and its error output."""


@dataclass(frozen=True, slots=True)
class Host:
    namespace: str
    """The host's network namespace (created by add_bridged_hosts)."""
    ip: str
    """Its IPv4 address on the bridge (on DEVICE_LINK inside the namespace)."""
    port: str
    """The veth end on the bridge that leads to this host."""


def run(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result.stdout


def in_namespace(namespace: str, argv: list[str]) -> list[str]:
    """argv run in the namespace's network only: unlike `ip netns exec`, nsenter does not remount
    /sys, so /sys/fs/cgroup (an agent's memory limit, the cluster's OOM counters) stays visible."""
    return ["nsenter", f"--net=/var/run/netns/{namespace}", "--", *argv]


def namespaces(prefix: str) -> list[str]:
    """The existing namespaces named PREFIX-*."""
    listed = run("ip", "netns", "list", check=False).split("\n")
    return [line.split()[0] for line in listed if line.strip() and line.split()[0].startswith(f"{prefix}-")]


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in run("ip", "netns", "pids", namespace, check=False).split()]


def delete_namespace(namespace: str) -> None:
    """Idempotent; the veth pairs in it go with it (deleting one end deletes the pair)."""
    run("ip", "netns", "del", namespace, check=False)


def add_bridged_hosts(bridge_namespace: str, hosts: list[tuple[str, str]], prefix_len: int = 24) -> list[Host]:
    """Create the bridge namespace and, for each (namespace, ip), a namespace linked to the bridge.

    Every namespace is created before anything is put in it, so a failure half-way leaves only
    namespaces a caller can delete by name.
    """
    for namespace in (bridge_namespace, *(namespace for namespace, _ in hosts)):
        run("ip", "netns", "add", namespace)
    run("ip", "-n", bridge_namespace, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0")
    run("ip", "-n", bridge_namespace, "link", "set", BRIDGE, "up")
    created = []
    for index, (namespace, ip) in enumerate(hosts):
        port = f"p{index}"
        run("ip", "-n", namespace, "link", "add", DEVICE_LINK, "type", "veth", "peer", "name", port,
            "netns", bridge_namespace)
        run("ip", "-n", bridge_namespace, "link", "set", port, "master", BRIDGE, "up")
        run("ip", "-n", namespace, "addr", "add", f"{ip}/{prefix_len}", "dev", DEVICE_LINK)
        run("ip", "-n", namespace, "link", "set", DEVICE_LINK, "up")
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        created.append(Host(namespace, ip, port))
    return created


def tbf_args(rate_bytes_per_s: float) -> list[str]:
    """``tc qdisc`` arguments of a token bucket capping egress at rate_bytes_per_s."""
    if rate_bytes_per_s <= 0:
        raise ValueError(f"a link rate must be positive, got {rate_bytes_per_s} bytes/s")
    burst = max(TBF_MIN_BURST_BYTES, int(rate_bytes_per_s * TBF_BURST_SECONDS))
    return ["tbf", "rate", f"{int(rate_bytes_per_s * 8)}bit", "burst", str(burst), "latency", f"{TBF_LATENCY_MS}ms"]


def cap_link(bridge_namespace: str, host: Host, rate_bytes_per_s: float) -> None:
    """Cap both directions of the host's link: egress of its eth0 (uplink) and of its bridge port
    (downlink), since tbf only shapes what leaves an interface."""
    for namespace, link in ((host.namespace, DEVICE_LINK), (bridge_namespace, host.port)):
        run("tc", "-n", namespace, "qdisc", "replace", "dev", link, "root", *tbf_args(rate_bytes_per_s))


def link_qdisc(namespace: str, link: str = DEVICE_LINK) -> str:
    """``tc qdisc show`` of one link (to check a cap is in place)."""
    return run("tc", "-n", namespace, "qdisc", "show", "dev", link).strip()
