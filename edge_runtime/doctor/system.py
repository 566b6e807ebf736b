"""Checks of the device itself: memory, temperature and throttling, CPU governor, the token file.

Each takes the files it reads as paths (defaults: the live system) so tests can feed real files.
"""
from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
from pathlib import Path

from device_profiles.live import cgroup_memory
from edge_runtime.doctor.finding import Finding
from ringtune.security import TOKEN_FILE, TokenError, check_token

GB = 1e9
LOW_AVAILABLE_BYTES = 1e9
"""Below this, even a small model's slice and torch's own ~300 MB leave no room."""
WARM_CELSIUS, HOT_CELSIUS = 70.0, 80.0
"""A Pi 4 starts to throttle at 80 C (a Pi 5 at 85 C); sustained training heats a bare board past 70 C."""
THROTTLED_BITS = {0: "under-voltage", 1: "ARM frequency capped", 2: "throttled", 3: "soft temperature limit"}
"""Bits of the Pi firmware's get_throttled word; bit + 16 means 'has happened since boot'."""
SLOW_GOVERNORS = ("powersave", "conservative")
POWER_FIX = ("use the official power supply (Pi 5: 27 W USB-C PD, Pi 4: 15 W) and cool the board "
             "(heatsink and fan, or the Pi 5 Active Cooler)")


def memory_findings(meminfo: Path = Path("/proc/meminfo"), proc_cgroup: Path = Path("/proc/self/cgroup"),
                    cgroup_root: Path = Path("/sys/fs/cgroup")) -> list[Finding]:
    """Free RAM, swap, and a cgroup memory limit (a container, or an emulated device)."""
    info = meminfo_bytes(meminfo)
    total, available = info["MemTotal"], info["MemAvailable"]
    findings = []
    limit = cgroup_memory(proc_cgroup, cgroup_root)
    if limit is not None and limit[0] < total:
        cap, used = limit
        available = min(available, cap - used)
        findings.append(Finding("cgroup limit", "warn" if cap - used < LOW_AVAILABLE_BYTES else "info",
                                f"this process may use {cap / GB:.2f} GB (cgroup limit; {used / GB:.2f} GB used), "
                                f"less than the machine's {total / GB:.2f} GB: agents report the limit",
                                "" if cap - used >= LOW_AVAILABLE_BYTES else
                                "raise the container's memory limit, or give this device fewer blocks"))
    low = available < LOW_AVAILABLE_BYTES
    findings.append(Finding("memory", "warn" if low else "ok",
                            f"{available / GB:.2f} GB available of {total / GB:.2f} GB",
                            "stop other programs (a desktop session takes ~1 GB), or use a device with more RAM"
                            if low else ""))
    swap_total, swap_free = info.get("SwapTotal", 0), info.get("SwapFree", 0)
    if swap_total == 0:
        findings.append(Finding("swap", "warn", "no swap: a memory spike kills the agent instead of slowing it",
                                "add 1-2 GB of swap: Raspberry Pi OS `sudo dphys-swapfile swapoff; sudo sed -i "
                                "'s/^CONF_SWAPSIZE=.*/CONF_SWAPSIZE=2048/' /etc/dphys-swapfile; sudo dphys-swapfile "
                                "setup; sudo dphys-swapfile swapon` (or zram: `sudo apt install zram-tools`)"))
    else:
        findings.append(Finding("swap", "ok", f"{swap_total / GB:.2f} GB swap, {(swap_total - swap_free) / GB:.2f} GB used"))
    return findings


def meminfo_bytes(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """/proc/meminfo in bytes."""
    values = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def thermal_findings(thermal_root: Path = Path("/sys/class/thermal"), throttled: int | None = None) -> list[Finding]:
    """The hottest thermal zone, and the Pi firmware's throttling flags (``throttled``: its word, if known)."""
    temps = {}
    for zone in sorted(thermal_root.glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip()
            temps[f"{zone.name} ({kind})"] = int((zone / "temp").read_text().strip()) / 1000
        except (OSError, ValueError):
            continue
    findings = []
    if not temps:
        findings.append(Finding("temperature", "info", "no thermal sensors visible (a VM or container)"))
    else:
        zone, celsius = max(temps.items(), key=lambda item: item[1])
        status = "fail" if celsius >= HOT_CELSIUS else "warn" if celsius >= WARM_CELSIUS else "ok"
        findings.append(Finding("temperature", status, f"{celsius:.1f} C ({zone})",
                                "" if status == "ok" else f"the CPU slows down when hot: {POWER_FIX}"))
    if throttled is not None:
        now = [text for bit, text in THROTTLED_BITS.items() if throttled & (1 << bit)]
        since_boot = [text for bit, text in THROTTLED_BITS.items() if throttled & (1 << (bit + 16))]
        if now:
            findings.append(Finding("throttling", "fail", f"now: {', '.join(now)} (get_throttled={throttled:#x})",
                                    POWER_FIX))
        elif since_boot:
            findings.append(Finding("throttling", "warn", f"since boot: {', '.join(since_boot)} "
                                                          f"(get_throttled={throttled:#x})", POWER_FIX))
        else:
            findings.append(Finding("throttling", "ok", "never throttled since boot (get_throttled=0x0)"))
    return findings


def pi_throttled(firmware: Path = Path("/sys/devices/platform/soc/soc:firmware/get_throttled")) -> int | None:
    """The Pi firmware's throttling word: from sysfs, else ``vcgencmd get_throttled``; None elsewhere."""
    try:
        return int(firmware.read_text().strip(), 16)
    except (OSError, ValueError):
        pass
    if shutil.which("vcgencmd") is None:
        return None
    try:
        out = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=5).stdout
        return int(out.strip().split("=")[1], 16)
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return None


def governor_findings(cpu_root: Path = Path("/sys/devices/system/cpu")) -> list[Finding]:
    """The CPU frequency governor of every core."""
    governors = {}
    for path in sorted(glob.glob(str(cpu_root / "cpu[0-9]*" / "cpufreq" / "scaling_governor"))):
        governors.setdefault(Path(path).read_text().strip(), []).append(Path(path).parts[-3])
    if not governors:
        return [Finding("governor", "info", "no CPU frequency scaling visible (a VM or container)")]
    detail = "; ".join(f"{name} on {len(cpus)} core(s)" for name, cpus in governors.items())
    slow = [name for name in governors if name in SLOW_GOVERNORS]
    if slow:
        return [Finding("governor", "warn", detail,
                        "let the cores run at full clock while training: "
                        "`echo performance | sudo tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor`")]
    return [Finding("governor", "ok", detail)]


def token_findings(state_dir: Path) -> list[Finding]:
    """The agent's pairing token file: present, private (0600, ours), well-formed."""
    path = state_dir / TOKEN_FILE
    if not path.exists():
        return [Finding("token file", "info", f"{path} does not exist yet",
                        "the first `ringtune agent` start creates it (mode 0600) and prints the token once")]
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077:
        return [Finding("token file", "fail", f"{path} has mode {stat.S_IMODE(info.st_mode):04o}: other users can "
                        "read the pairing token", f"chmod 600 {path}")]
    if info.st_uid != os.geteuid():
        return [Finding("token file", "warn", f"{path} belongs to uid {info.st_uid}, not this user ({os.geteuid()})",
                        f"run the agent as the file's owner, or `sudo chown {os.geteuid()} {path}`")]
    try:
        check_token(path.read_text())
    except (TokenError, OSError) as error:
        return [Finding("token file", "fail", f"{path}: {error}", f"delete {path}; the next agent start makes a new one")]
    directory_mode = stat.S_IMODE(state_dir.stat().st_mode)
    if directory_mode & 0o077:
        return [Finding("token file", "warn", f"{path} is 0600 but its folder has mode {directory_mode:04o}",
                        f"chmod 700 {state_dir}")]
    return [Finding("token file", "ok", f"{path} is 0600 and holds a valid token")]
