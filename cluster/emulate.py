"""Bring an emulated cluster up, report on it, and take it down (also after a crash)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cluster import cgroups
from cluster.hosts import Hosts
from cluster.loopback import WARNING, LoopbackHosts
from cluster.namespaces import NamespaceHosts
from cluster.state import ClusterState, DeviceRecord, default_state_path, load_state
from device_profiles import DeviceProfile, resolve_device
from edge_runtime.commands.agent import READY
from edge_runtime.memory import process_memory

AGENT_PORT = 7720
START_TIMEOUT = 300.0  # a 0.1-core device needs a while just to import torch
# No "-" in a prefix: namespaces are matched as PREFIX-*, so "rtc" must never match "rtc-x"'s.
PREFIX = re.compile(r"[a-z][a-z0-9]{0,11}")
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")


class ClusterError(RuntimeError):
    """The cluster could not be brought up; the message names the device and its log."""


def hosts_for(mode: str, prefix: str) -> Hosts:
    return {"netns": NamespaceHosts, "loopback": LoopbackHosts}[mode](prefix)


def device_records(specs: list[str | DeviceProfile], core_gflops: float | None, cores: int,
                   owner: bool) -> tuple[tuple[DeviceRecord, ...], float]:
    """Records (no place yet) for `PROFILE[:NAME]` specs or profiles, and the CPU scale factor.
    Unnamed devices are called PROFILE-1, PROFILE-2, ...; the first device is the owner (if
    `owner`). CPU quotas need this machine's per-core speed (core_gflops); None leaves them out."""
    profiles: list[tuple[str, DeviceProfile]] = []
    for index, spec in enumerate(specs):
        if isinstance(spec, DeviceProfile):
            profiles.append((spec.name, spec))
            continue
        profile_name, _, name = spec.partition(":")
        profiles.append((profile_name, resolve_device(f"{profile_name}:{name or f'{profile_name}-{index + 1}'}")))
    names = [device.name for _, device in profiles]
    bad = [name for name in names if not DEVICE_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"device names {bad} are not usable: letters, digits, '.', '_' and '-' (up to 40)")
    if len(set(names)) != len(names):
        raise ValueError(f"device names must be unique, got {names}: name them with --device PROFILE:NAME")
    # Without a per-core speed (loopback: nothing is capped) there are no quotas to compute.
    shares = cgroups.cpu_quotas([d.gflops for _, d in profiles], core_gflops, cores) if core_gflops else None
    quotas = shares.quotas if shares else (None,) * len(profiles)
    records = tuple(
        DeviceRecord(name=device.name, profile=profile, ip="", link_bytes_per_s=device.link_bytes_per_s,
                     cpu_cores=round(share, 4) if share else None, memory_bytes=device.ram_bytes,
                     threads=cgroups.threads_for(share) if share else 1, owner=owner and index == 0)
        for index, ((profile, device), share) in enumerate(zip(profiles, quotas)))
    return records, shares.scale if shares else 1.0


def measure_core_gflops() -> float:
    """fp32 matmul GFLOP/s of one core of this machine (the unit of the CPU quotas). The best of
    several short runs: on a busy machine an average measures the load, not the core."""
    import torch

    from device_profiles.live import matmul_gflops

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return round(max(matmul_gflops(seconds=0.2) for _ in range(5)), 2)
    finally:
        torch.set_num_threads(threads)


def up(devices: list[str | DeviceProfile], owner_data: Path | None = None, token: str | None = None, *,
       prefix: str = "rtc", loopback: bool | None = None, state_path: Path | None = None,
       core_gflops: float | None = None, start_agents: bool = True, agent_args: tuple[str, ...] = (),
       start_timeout: float = START_TIMEOUT, say: Callable[[str], None] = print) -> ClusterState:
    """Create the cluster and start an agent per device (the first holds owner_data, if given).
    loopback=None picks namespaces as root, loopback otherwise. On any failure everything
    created so far is removed again."""
    from ringtune.security import check_token, generate_token

    if not devices:
        raise ValueError("name at least one device (--device rpi4-4gb, ...)")
    check_prefix(prefix)
    if owner_data is not None and not Path(owner_data).is_file():
        raise ValueError(f"--owner-data {owner_data} is not a file: give the owner's JSONL data")
    state_path = Path(state_path or default_state_path(prefix))
    if state_path.exists() and load_state(state_path).devices:
        raise ValueError(f"a cluster {prefix!r} is already up ({state_path}): `ringtune cluster down` first")
    mode = "loopback" if (loopback if loopback is not None else not cgroups.available()) else "netns"
    if mode == "loopback":
        say(f"warning: {WARNING}")
        core_gflops = None  # nothing is capped
    elif core_gflops is None:
        core_gflops = measure_core_gflops()
    records, scale = device_records(devices, core_gflops, os.cpu_count() or 1, owner_data is not None)
    if scale < 1.0 and mode == "netns":
        say(f"warning: the devices together need more than this machine's {os.cpu_count()} cores: every "
            f"device runs at {scale:.0%} of its speed (relative speeds are kept)")
    hosts = hosts_for(mode, prefix)
    state = ClusterState(prefix=prefix, mode=mode, token=check_token(token) if token else generate_token(),
                         coordinator_ip="", core_gflops=core_gflops or 0.0, cpu_scale=scale, devices=records)
    state = hosts.plan(state).save(state_path)  # saved before anything exists: down() finds a half-built cluster
    try:
        hosts.build(state)
        if start_agents:
            state = _start_agents(state, owner_data, agent_args, start_timeout)
    except BaseException:
        down(state)
        raise
    return state


def check_prefix(prefix: str) -> str:
    if not PREFIX.fullmatch(prefix):
        raise ValueError(f"cluster prefix {prefix!r} must be a lower-case letter then up to 11 letters or digits "
                         f"(no '-': names are matched as PREFIX-*)")
    return prefix


def agent_dir(state: ClusterState) -> Path:
    """Logs and per-device agent state (tokens, slice caches) live next to the state file."""
    return Path(state.path).with_suffix("")


def agent_argv(state: ClusterState, device: DeviceRecord, owner_data: Path | None, extra: tuple[str, ...]) -> list[str]:
    port = AGENT_PORT if device.namespace else 0
    argv = [sys.executable, "-m", "ringtune.cli", "agent", "--name", device.name,
            "--listen", f"tcp://{device.ip}:{port}", "--interface", device.ip, "--threads", str(device.threads),
            "--state-dir", str(agent_dir(state) / device.name), *extra]
    return argv + ["--data", str(Path(owner_data).resolve())] if device.owner else argv


def _start_agents(state: ClusterState, owner_data: Path | None, extra: tuple[str, ...], timeout: float) -> ClusterState:
    agent_dir(state).mkdir(parents=True, exist_ok=True)
    started = []
    for device in state.devices:
        log = agent_dir(state) / f"{device.name}.log"
        env = {**os.environ, "RINGTUNE_AGENT_TOKEN": state.token, "PYTHONUNBUFFERED": "1"}
        with log.open("w") as out:
            # Its own session: the agent outlives `ringtune cluster up` and ignores the terminal's Ctrl-C.
            process = device.spawn(agent_argv(state, device, owner_data, extra), env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        device = replace(device, pid=process.pid, log=str(log))
        state = state.with_device(device).save()
        started.append((device, process))
    for device, process in started:  # started together: their imports overlap
        state = state.with_device(replace(device, control_url=_wait_ready(device, process, timeout))).save()
    return state


def _wait_ready(device: DeviceRecord, process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(Path(device.log).read_text(errors="replace"))
        if match:
            return match.group(2)
        if process.poll() is not None:
            raise ClusterError(f"agent {device.name} {device.exit_status()}; its log ({device.log}):\n{device.log_tail()}")
        time.sleep(0.2)
    raise ClusterError(f"agent {device.name} did not start within {timeout:.0f} s; its log ({device.log}):\n"
                       f"{device.log_tail()}")


def down(state_or_path: ClusterState | Path | None = None, prefix: str | None = None) -> list[str]:
    """Stop every agent and remove every namespace and cgroup of the cluster, and anything else
    named with its prefix (a crashed `up`); idempotent. What was removed, one line each."""
    if isinstance(state_or_path, ClusterState):
        state = state_or_path
    else:
        path = Path(state_or_path or default_state_path(check_prefix(prefix or "rtc")))
        state = load_state(path) if path.exists() else None
        if state is None and prefix is None:
            raise ValueError(f"no cluster state at {path}: pass --prefix to remove leftovers by name")
        state = state or ClusterState(prefix=prefix, mode="netns", token="", coordinator_ip="",
                                      path=str(path))
    removed = []
    agents = [d for d in state.devices if d.pid and d.running()]
    cgroups.kill_all(lambda: [d.pid for d in agents if d.running()], grace=10.0)
    removed += [f"agent {d.name} (pid {d.pid})" for d in agents]
    removed += _kill_strays(state)
    if cgroups.available():  # namespaces and cgroups can only exist (and be removed) as root
        removed += NamespaceHosts(state.prefix).teardown()
    if state.path:
        Path(state.path).unlink(missing_ok=True)
    return removed


def _kill_strays(state: ClusterState) -> list[str]:
    """Agents of this cluster that the state file does not name (a crash between start and save)."""
    marker = str(agent_dir(state)) + "/"
    strays = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    strays.append(int(proc.name))
            except OSError:
                continue
    cgroups.kill_all(lambda: [pid for pid in strays if Path(f"/proc/{pid}").exists()
                              and not _zombie(pid)], grace=5.0)
    return [f"stray agent pid {pid}" for pid in strays]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    name: str
    """Device (agent) name."""
    state: str
    """"running", or why it is not (e.g. "was killed: out of memory (limit 3.0 GB of a rpi4-4gb)")."""
    rss_bytes: int
    """Its agent's resident memory now (0 when not running)."""
    peak_rss_bytes: int
    """Its agent's peak resident memory (VmHWM; 0 when not running)."""
    peak_bytes: int
    """Most memory its cgroup has used, page cache included (0 on loopback)."""
    oom_kills: int
    """Processes the kernel killed in its cgroup for lack of memory."""


def status(state: ClusterState) -> list[DeviceStatus]:
    report = []
    for device in state.devices:
        group = cgroups.Cgroup(device.cgroup) if device.cgroup else None
        memory = process_memory(device.pid) if device.running() else {}
        report.append(DeviceStatus(
            name=device.name, state="running" if memory else device.exit_status(),
            rss_bytes=memory.get("VmRSS", 0), peak_rss_bytes=memory.get("VmHWM", 0),
            peak_bytes=group.memory_peak() if group else 0, oom_kills=group.oom_kills() if group else 0))
    return report
