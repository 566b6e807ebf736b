"""Network namespaces joined by a bridge, for tests that need several hosts (root only)."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest


def run_ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def bridged_namespaces():
    """Namespaces a, b, c (10.R.R.1-3/24) joined by a bridge in a fourth; all deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (run the tests as root, e.g. in CI)")
    prefix = f"rtd{uuid.uuid4().hex[:6]}"
    subnet = f"10.{200 + int(prefix[-2:], 16) % 50}.{int(prefix[-4:-2], 16)}"
    bridge, hosts = f"{prefix}-br", [f"{prefix}-{c}" for c in "abc"]
    created: list[str] = []
    try:
        for namespace in (bridge, *hosts):
            run_ip("netns", "add", namespace)
            created.append(namespace)
        run_ip("-n", bridge, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        run_ip("-n", bridge, "link", "set", "br0", "up")
        ips = {}
        for index, namespace in enumerate(hosts):
            # Both veth ends are created inside namespaces: the host's own links are never touched.
            run_ip("-n", namespace, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{index}",
                   "netns", bridge)
            run_ip("-n", bridge, "link", "set", f"p{index}", "master", "br0", "up")
            ips[namespace] = f"{subnet}.{index + 1}"
            run_ip("-n", namespace, "addr", "add", f"{ips[namespace]}/24", "dev", "eth0")
            run_ip("-n", namespace, "link", "set", "eth0", "up")
            run_ip("-n", namespace, "link", "set", "lo", "up")
        yield ips
    finally:
        for namespace in created:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        assert prefix not in leftover, f"namespaces left behind: {leftover}"
