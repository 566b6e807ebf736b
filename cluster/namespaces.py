"""A namespace per device on a bridge, tbf-capped links and cgroup CPU/RAM limits (root only)."""
from __future__ import annotations

from dataclasses import replace

from cluster import cgroups, netns
from cluster.hosts import Hosts
from cluster.state import ClusterState

# Addresses are private to the cluster's bridge, so every cluster can use the same subnet.
SUBNET = "10.77.0"
COORDINATOR_HOST = 1
FIRST_DEVICE_HOST = 11


class NamespaceHosts(Hosts):
    mode = "netns"

    def plan(self, state: ClusterState) -> ClusterState:
        records = tuple(replace(device, ip=f"{SUBNET}.{FIRST_DEVICE_HOST + index}", namespace=f"{self.prefix}-d{index}",
                                cgroup=cgroups.group_name(self.prefix, device.name))
                        for index, device in enumerate(state.devices))
        return replace(state, coordinator_ip=f"{SUBNET}.{COORDINATOR_HOST}",
                       coordinator_namespace=f"{self.prefix}-coord", bridge_namespace=f"{self.prefix}-br",
                       devices=records)

    def build(self, state: ClusterState) -> None:
        hosts = netns.add_bridged_hosts(state.bridge_namespace, [
            (state.coordinator_namespace, state.coordinator_ip),
            *((device.namespace, device.ip) for device in state.devices)])
        # The coordinator (a laptop) keeps an uncapped link; each device gets its profile's.
        for host, device in zip(hosts[1:], state.devices):
            netns.cap_link(state.bridge_namespace, host, device.link_bytes_per_s)
            cgroups.Cgroup(device.cgroup).create(device.cpu_cores, device.memory_bytes)

    def teardown(self) -> list[str]:
        removed = []
        for name in cgroups.groups(self.prefix):
            cgroups.Cgroup(name).remove()
            removed.append(f"cgroup {name}")
        for namespace in netns.namespaces(self.prefix):
            cgroups.kill_all(lambda: netns.namespace_pids(namespace), grace=5.0)
            netns.delete_namespace(namespace)
            removed.append(f"namespace {namespace}")
        return removed
