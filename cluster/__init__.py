"""An emulated cluster of edge devices on this one machine (see ``ringtune cluster -h``).

API (stable; benchmarks build on it):

- ``up(devices, owner_data=None, token=None, *, prefix="rtc", loopback=None, state_path=None,
  core_gflops=None, start_agents=True, agent_args=(), ...) -> ClusterState``: devices are
  ``"PROFILE[:NAME]"`` specs (``rpi4-4gb``, ``rpi5-8gb:pi-b``) or ``DeviceProfile``s; the first
  device holds ``owner_data``. As root (``loopback=None``): one namespace per device on a bridge,
  ``tc tbf`` on both directions of each link, a cgroup per device with a CPU quota
  (``device GFLOP/s / core_gflops`` cores, shrunk alike to fit this machine: ``cpu_scale``) and a
  memory limit (the profile's RAM). Otherwise agents on 127.0.0.1, nothing emulated.
- ``down(state or state file path, prefix=None) -> list[str]``: stops the agents, removes every
  namespace ``PREFIX-*`` and cgroup ``ringtune-PREFIX-*`` (crash leftovers too) and the state file.
- ``status(state) -> list[DeviceStatus]``: running or why not (OOM kills named), RSS, cgroup peak.
- ``load_state(path)``, ``default_state_path(prefix)`` ($RINGTUNE_CACHE/cluster/PREFIX.json).
- ``ClusterState``: prefix, mode ("netns"|"loopback"), token, coordinator_ip,
  coordinator_namespace, bridge_namespace, core_gflops, cpu_scale, devices;
  ``state.device(name)``, ``state.coordinator_command(argv)`` (argv run in the coordinator's
  namespace: uncapped, on the bridge; mDNS discovery works there with ``--interface coordinator_ip``).
- ``DeviceRecord``: name, profile, ip, namespace, cgroup (``cgroup_paths``), link_bytes_per_s,
  cpu_cores, memory_bytes, threads, owner, control_url, pid, log; ``device.spawn(argv, env, **popen)``
  starts any command in that device's namespace and cgroup (same link, CPU and RAM caps);
  ``device.command(argv)`` only the namespace part; ``device.exit_status()``.
"""
from cluster.emulate import ClusterError, DeviceStatus, down, status, up
from cluster.state import ClusterState, DeviceRecord, default_state_path, load_state

__all__ = ["ClusterError", "ClusterState", "DeviceRecord", "DeviceStatus", "default_state_path", "down",
           "load_state", "status", "up"]
