"""Every emulated device on 127.0.0.1: works without root, but links, CPU and RAM are not emulated."""
from __future__ import annotations

from dataclasses import replace

from cluster.hosts import Hosts
from cluster.state import ClusterState

LOOPBACK = "127.0.0.1"
WARNING = ("not root: the agents run on loopback (127.0.0.1) with this machine's full network, CPU and RAM; "
           "links, compute and memory are NOT emulated (run as root for namespaces, tc and cgroups)")


class LoopbackHosts(Hosts):
    mode = "loopback"

    def plan(self, state: ClusterState) -> ClusterState:
        # Nothing is capped, and the state says so.
        devices = tuple(replace(d, ip=LOOPBACK, link_bytes_per_s=None, cpu_cores=None, memory_bytes=None)
                        for d in state.devices)
        return replace(state, coordinator_ip=LOOPBACK, devices=devices)

    def build(self, state: ClusterState) -> None:
        """Nothing to create: loopback is always there."""

    def teardown(self) -> list[str]:
        return []
