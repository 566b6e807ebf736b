"""cgroup v1 CPU quota and memory limit per emulated device, and out-of-memory bookkeeping.

``/sys/fs/cgroup/cpu/ringtune-PREFIX-DEVICE`` caps CPU time (CFS quota) and
``/sys/fs/cgroup/memory/ringtune-PREFIX-DEVICE`` caps memory; the kernel's OOM killer then kills
an agent that needs more than its device has, and the group's ``oom_kill`` counter says so.
"""
from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "memory")
# A short period spreads a small quota over many slices, so a 0.1-core device runs 1 ms in every
# 10 ms instead of 10 ms in every 100 ms (closer to a slow CPU than to a fast one that stalls).
CFS_PERIOD_US = 10_000
MIN_QUOTA_US = 1_000  # the kernel's lower bound for cpu.cfs_quota_us


@dataclass(frozen=True, slots=True)
class CpuShares:
    quotas: tuple[float, ...]
    """CPU cores of this machine each device may use, in device order."""
    scale: float
    """1.0, or the factor every quota was shrunk by so that together they fit this machine."""


def cpu_quotas(device_gflops: list[float], core_gflops: float, cores: int) -> CpuShares:
    """Each device gets the cores of this machine that match its GFLOP/s (core_gflops per core);
    when the devices together would need more than this machine's cores, all shrink alike so
    their relative speeds stay right."""
    if core_gflops <= 0 or cores < 1:
        raise ValueError(f"this machine's per-core GFLOP/s ({core_gflops}) and cores ({cores}) must be positive")
    wanted = [gflops / core_gflops for gflops in device_gflops]
    scale = min(1.0, cores / sum(wanted)) if wanted else 1.0
    return CpuShares(tuple(max(q * scale, MIN_QUOTA_US / CFS_PERIOD_US) for q in wanted), scale)


def quota_us(cores: float) -> int:
    """cpu.cfs_quota_us for a share of `cores` cores at CFS_PERIOD_US."""
    return max(MIN_QUOTA_US, round(cores * CFS_PERIOD_US))


def threads_for(cores: float) -> int:
    """torch threads for an agent allowed `cores` cores: more threads than that only contend."""
    return max(1, math.ceil(cores - 1e-9))


def group_name(prefix: str, device: str) -> str:
    return f"ringtune-{prefix}-{device}"


def groups(prefix: str) -> list[str]:
    """Existing groups named ringtune-PREFIX-* under any of our controllers (crash leftovers too)."""
    found = set()
    for controller in CONTROLLERS:
        root = CGROUP_ROOT / controller
        if root.is_dir():
            found |= {p.name for p in root.glob(f"ringtune-{prefix}-*") if p.is_dir()}
    return sorted(found)


def available() -> bool:
    return all((CGROUP_ROOT / c / "cgroup.procs").exists() for c in CONTROLLERS) and os.geteuid() == 0


@dataclass(frozen=True, slots=True)
class Cgroup:
    name: str
    """Group name, the same under every controller."""

    def path(self, controller: str) -> Path:
        return CGROUP_ROOT / controller / self.name

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(str(self.path(c)) for c in CONTROLLERS)

    def create(self, cpu_cores: float, memory_bytes: int) -> None:
        for controller in CONTROLLERS:
            self.path(controller).mkdir(exist_ok=True)
        self._write("cpu", "cpu.cfs_period_us", CFS_PERIOD_US)
        self._write("cpu", "cpu.cfs_quota_us", quota_us(cpu_cores))
        self._write("memory", "memory.limit_in_bytes", memory_bytes)

    def join(self, pid: int = 0) -> None:
        """Move a process (0: the caller) into the group under every controller."""
        for controller in CONTROLLERS:
            self._write(controller, "cgroup.procs", pid)

    def pids(self) -> list[int]:
        found: set[int] = set()
        for controller in CONTROLLERS:
            procs = self.path(controller) / "cgroup.procs"
            if procs.exists():
                found |= {int(line) for line in procs.read_text().split()}
        return sorted(found)

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer killed in this group (0 if the group is gone)."""
        return int(self._read_stat("memory", "memory.oom_control").get("oom_kill", 0))

    def memory_peak(self) -> int:
        """Most memory the group has used (bytes), page cache included."""
        return self._read_int("memory", "memory.max_usage_in_bytes")

    def memory_limit(self) -> int:
        return self._read_int("memory", "memory.limit_in_bytes")

    def remove(self, grace: float = 5.0) -> None:
        """Kill what still runs in the group (TERM, then KILL), then delete it; idempotent."""
        kill_all(self.pids, grace)
        for controller in CONTROLLERS:
            path = self.path(controller)
            for _ in range(50):  # a killed task leaves the group a moment after it dies
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)

    def _write(self, controller: str, file: str, value: int) -> None:
        (self.path(controller) / file).write_text(str(value))

    def _read_int(self, controller: str, file: str) -> int:
        path = self.path(controller) / file
        return int(path.read_text()) if path.exists() else 0

    def _read_stat(self, controller: str, file: str) -> dict[str, str]:
        path = self.path(controller) / file
        if not path.exists():
            return {}
        return dict(line.split(maxsplit=1) for line in path.read_text().splitlines() if " " in line)


def kill_all(list_pids, grace: float) -> None:
    """SIGTERM the pids list_pids() returns, then SIGKILL whatever is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in list_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while list_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
