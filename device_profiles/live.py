"""Measure this device: cores, RAM (psutil), sustained matmul GFLOP/s, link speed if the OS knows it.

Only the matmul measurements import torch: the RAM and cgroup readers (the doctor's memory checks)
need psutil and /proc alone.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil

from device_profiles.profile import DeviceProfile

# Free RAM kept back for the OS page cache and allocator slack when the run starts.
RAM_HEADROOM = 0.9
# Used when the OS reports no link speed (WiFi usually); `ringtune train` measures each agent's
# link before planning (coordinator/link_bandwidth.py).
UNKNOWN_LINK_BYTES_PER_S = 100e6 / 8
# A stage multiplies [tokens, hidden] activations by [hidden, 4 * hidden]-ish weights.
BENCH_TOKENS = 256
BENCH_HIDDEN = 1024


def matmul_gflops(tokens: int = BENCH_TOKENS, hidden: int = BENCH_HIDDEN, seconds: float = 1.0) -> float:
    """Sustained fp32 GFLOP/s of torch.matmul at a stage-like shape, after one warm-up call."""
    import torch

    x = torch.randn(tokens, hidden)
    w = torch.randn(hidden, 4 * hidden)
    flops_per_call = 2 * tokens * hidden * 4 * hidden
    torch.matmul(x, w)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        torch.matmul(x, w)
        calls += 1
    return calls * flops_per_call / elapsed / 1e9


def usable_ram() -> tuple[int, int]:
    """(total, available) bytes of RAM this process may use: the machine's, or less when a cgroup
    limits it (a container, or a device of an emulated cluster)."""
    machine = psutil.virtual_memory()
    limit = cgroup_memory()
    if limit is None or limit[0] >= machine.total:
        return machine.total, machine.available
    total, used = limit
    return total, max(0, min(machine.available, total - used))


def cgroup_memory(proc_cgroup: Path = Path("/proc/self/cgroup"),
                   root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, usage) of this process's memory cgroup (v1 or v2), or None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            files = (root / "memory" / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes")
        elif controllers == "":
            files = (root / path.lstrip("/"), "memory.max", "memory.current")
        else:
            continue
        try:
            limit = (files[0] / files[1]).read_text().strip()
            usage = (files[0] / files[2]).read_text().strip()
        except OSError:
            continue
        if limit != "max":
            return int(limit), int(usage)
    return None


def link_speed() -> tuple[float, str]:
    """Bytes/s of the fastest up, non-loopback interface the OS reports a speed for, and the source."""
    stats = {name: s for name, s in psutil.net_if_stats().items()
             if s.isup and s.speed > 0 and not name.startswith("lo")}
    if not stats:
        return UNKNOWN_LINK_BYTES_PER_S, "estimate: the OS reports no link speed (ringtune train measures each agent's link)"
    name, best = max(stats.items(), key=lambda item: item[1].speed)
    return best.speed * 1e6 / 8, f"psutil: {name} link speed {best.speed} Mbit/s (nominal)"


def measure(name: str | None = None, seconds: float = 1.0) -> DeviceProfile:
    """This device's profile, measured now."""
    import torch

    total, available = usable_ram()
    cores = torch.get_num_threads()
    link, link_source = link_speed()
    gflops = matmul_gflops(seconds=seconds)
    return DeviceProfile(
        name=name or socket.gethostname(), ram_bytes=int(available * RAM_HEADROOM), cores=cores,
        gflops=round(gflops, 2), link_bytes_per_s=link,
        sources={"ram_bytes": f"psutil and cgroup limit: {RAM_HEADROOM:.0%} of available RAM "
                              f"({available / 1e9:.2f} of {total / 1e9:.2f} GB total)",
                 "cores": f"torch.get_num_threads() (os.cpu_count() = {os.cpu_count()})",
                 "gflops": f"measured: torch.matmul [{BENCH_TOKENS}x{BENCH_HIDDEN}] @ "
                           f"[{BENCH_HIDDEN}x{4 * BENCH_HIDDEN}] fp32 for {seconds:g} s",
                 "link_bytes_per_s": link_source})
