"""Network namespaces joined by a bridge, for tests that need several hosts (root only)."""
from __future__ import annotations

import os
import uuid

import pytest

from cluster import netns


@pytest.fixture
def bridged_namespaces():
    """Namespaces a, b, c (10.R.R.1-3/24) joined by a bridge in a fourth; all deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces (run the tests as root, e.g. in CI)")
    prefix = f"rtd{uuid.uuid4().hex[:6]}"
    subnet = f"10.{200 + int(prefix[-2:], 16) % 50}.{int(prefix[-4:-2], 16)}"
    hosts = [(f"{prefix}-{c}", f"{subnet}.{index + 1}") for index, c in enumerate("abc")]
    try:
        yield {host.namespace: host.ip for host in netns.add_bridged_hosts(f"{prefix}-br", hosts)}
    finally:
        for namespace in netns.namespaces(prefix):
            netns.delete_namespace(namespace)
        assert not netns.namespaces(prefix), f"namespaces left behind: {netns.namespaces(prefix)}"
