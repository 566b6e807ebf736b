"""The state file of an emulated cluster: plain data (JSON) naming everything ``up`` created.

It is written before anything is created and updated as things appear, so ``down`` can remove a
half-built cluster too (and anything else named with the prefix, should the file be lost).
"""
from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cluster.cgroups import Cgroup
from cluster.netns import in_namespace

STATE_VERSION = 1


def default_state_path(prefix: str) -> Path:
    """$RINGTUNE_CACHE/cluster/PREFIX.json (the cache defaults to ~/.cache/ringtune)."""
    cache = Path(os.environ.get("RINGTUNE_CACHE", Path.home() / ".cache" / "ringtune"))
    return cache / "cluster" / f"{prefix}.json"


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    name: str
    """Agent name (what `ringtune devices` lists and plans name)."""
    profile: str
    """The device profile it emulates (e.g. rpi4-4gb)."""
    ip: str
    """Its address: on the bridge, or 127.0.0.1 on loopback."""
    namespace: str | None = None
    """Its network namespace (None on loopback)."""
    cgroup: str | None = None
    """Its cgroup name under /sys/fs/cgroup/{cpu,memory} (None on loopback)."""
    link_bytes_per_s: float | None = None
    """The tbf rate of its link, each direction (None: not capped)."""
    cpu_cores: float | None = None
    """Cores of this machine its CPU quota allows (None: not capped)."""
    memory_bytes: int | None = None
    """Its memory limit (None: not capped)."""
    threads: int = 1
    """torch threads of its agent."""
    owner: bool = False
    """Whether its agent holds the owner's data."""
    control_url: str = ""
    """Its agent's control endpoint (empty until the agent is up)."""
    pid: int = 0
    """Its agent's process id (0 until started)."""
    log: str = ""
    """Its agent's log file."""

    @property
    def cgroup_paths(self) -> tuple[str, ...]:
        return Cgroup(self.cgroup).paths if self.cgroup else ()

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this device's namespace (as is on loopback)."""
        return in_namespace(self.namespace, argv) if self.namespace else list(argv)

    def spawn(self, argv: list[str], env: dict[str, str] | None = None, **popen) -> subprocess.Popen:
        """Start argv on this device: in its namespace and cgroup, so with its link, CPU and RAM."""
        cgroup = Cgroup(self.cgroup) if self.cgroup else None
        # preexec_fn only writes our own pid to two files: safe even though it runs after fork().
        return subprocess.Popen(self.command(argv), env=env, preexec_fn=cgroup.join if cgroup else None, **popen)

    def running(self) -> bool:
        """Whether its agent process still runs (not merely a zombie or a reused pid)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return self.pid > 0 and stat.rsplit(")", 1)[1].split()[0] != "Z" and self.name.encode() in cmdline

    def exit_status(self) -> str | None:
        """None while its agent runs; else why it is gone, out-of-memory kills named as such."""
        if self.running():
            return None
        if self.cgroup and Cgroup(self.cgroup).oom_kills():
            return f"was killed: out of memory (limit {self.memory_bytes / 1e9:.1f} GB of a {self.profile})"
        return "is not running"

    @property
    def log_path(self) -> Path:
        return Path(self.log)

    def log_tail(self, lines: int = 5) -> str:
        path = self.log_path
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) if path.is_file() else ""


@dataclass(frozen=True, slots=True)
class ClusterState:
    prefix: str
    """Every namespace is PREFIX-*, every cgroup ringtune-PREFIX-*."""
    mode: str
    """"netns" (namespaces, tc, cgroups) or "loopback" (agents on 127.0.0.1, nothing emulated)."""
    token: str
    """The agents' pairing token."""
    coordinator_ip: str
    """Where the coordinator listens for mDNS: its bridge address, or 127.0.0.1."""
    coordinator_namespace: str | None = None
    """The coordinator's namespace on the bridge (None on loopback)."""
    bridge_namespace: str | None = None
    """The namespace holding the bridge (None on loopback)."""
    core_gflops: float = 0.0
    """This machine's measured fp32 matmul GFLOP/s per core, the unit of the CPU quotas."""
    cpu_scale: float = 1.0
    """1.0, or how much every CPU quota was shrunk to fit this machine's cores."""
    devices: tuple[DeviceRecord, ...] = ()
    """The emulated devices, the owner first."""
    path: str = field(default="", compare=False)
    """The state file this was read from or saved to."""

    def device(self, name: str) -> DeviceRecord:
        for device in self.devices:
            if device.name == name:
                return device
        raise ValueError(f"the cluster has no device {name!r}; its devices are {[d.name for d in self.devices]}")

    def with_device(self, record: DeviceRecord) -> "ClusterState":
        others = [d for d in self.devices if d.name != record.name]
        index = next((i for i, d in enumerate(self.devices) if d.name == record.name), len(self.devices))
        return replace(self, devices=tuple(others[:index] + [record] + others[index:]))

    def coordinator_command(self, argv: list[str]) -> list[str]:
        """argv run where the coordinator belongs: its namespace on the bridge (as is on loopback)."""
        return in_namespace(self.coordinator_namespace, argv) if self.coordinator_namespace else list(argv)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps({"version": STATE_VERSION, **data}, indent=1)

    @classmethod
    def from_json(cls, text: str, path: str = "") -> "ClusterState":
        data = json.loads(text)
        if data.pop("version", None) != STATE_VERSION:
            raise ValueError(f"cluster state {path or ''} is from another ringtune version: run `ringtune "
                             f"cluster down` with that version, or delete the file and run `ringtune cluster down`")
        devices = tuple(DeviceRecord(**device) for device in data.pop("devices"))
        return cls(**data, devices=devices, path=path)

    def save(self, path: Path | None = None) -> "ClusterState":
        path = Path(path or self.path or default_state_path(self.prefix))
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        # The token is a secret: the file is private to its owner.
        temporary.write_text("")
        temporary.chmod(0o600)
        temporary.write_text(self.to_json())
        temporary.replace(path)
        return replace(self, path=str(path))


def load_state(path: Path) -> ClusterState:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ValueError(f"no cluster state at {path}: bring one up with `ringtune cluster up`") from None
    return ClusterState.from_json(text, str(path))


def cluster_devices(control_urls: list[str]) -> list[DeviceRecord]:
    """The devices among control_urls of the cluster `ringtune cluster exec` runs us in
    ($RINGTUNE_CLUSTER_STATE), so the coordinator can say why one of them died (e.g. out of memory)."""
    path = os.environ.get("RINGTUNE_CLUSTER_STATE")
    if not path or not Path(path).is_file():
        return []
    return [device for device in load_state(Path(path)).devices if device.control_url in control_urls]
