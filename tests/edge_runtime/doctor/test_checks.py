"""Doctor checks fed with real files in a temporary directory (the layouts of /proc and /sys)."""
from __future__ import annotations

import os
import threading

import pytest

from device_profiles import BUILTIN_PROFILES
from edge_runtime.doctor import Finding, worst
from edge_runtime.doctor import compute, network, system
from ringtune.security import generate_token

GiB = 2**30


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def meminfo(tmp_path, total_kb, available_kb, swap_kb, swap_free_kb=None):
    return write(tmp_path / "meminfo", f"MemTotal:       {total_kb} kB\nMemFree:         1000 kB\n"
                                       f"MemAvailable:   {available_kb} kB\nSwapTotal:      {swap_kb} kB\n"
                                       f"SwapFree:       {swap_kb if swap_free_kb is None else swap_free_kb} kB\n")


def by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


def test_memory_without_swap_or_a_cgroup(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/\n")
    found = by_check(system.memory_findings(meminfo(tmp_path, 8_000_000, 6_000_000, 0), proc, tmp_path / "fs"))
    assert found["memory"].status == "ok" and "6.14 GB available of 8.19 GB" in found["memory"].detail
    assert found["swap"].status == "warn" and "dphys-swapfile" in found["swap"].fix
    assert "cgroup limit" not in found


def test_low_memory_and_swap_in_use(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/\n")
    found = by_check(system.memory_findings(meminfo(tmp_path, 4_000_000, 500_000, 2_000_000, 1_500_000),
                                            proc, tmp_path / "fs"))
    assert found["memory"].status == "warn" and found["memory"].fix
    assert found["swap"].status == "ok" and "0.51 GB used" in found["swap"].detail


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_cgroup_limit_is_what_the_agent_gets(tmp_path, version):
    root = tmp_path / "fs"
    if version == "v1":
        proc = write(tmp_path / "cgroup", "12:memory:/ringtune-rtc-pi\n0::/\n")
        write(root / "memory" / "ringtune-rtc-pi" / "memory.limit_in_bytes", "3000000000\n")
        write(root / "memory" / "ringtune-rtc-pi" / "memory.usage_in_bytes", "500000000\n")
    else:
        proc = write(tmp_path / "cgroup", "0::/pi\n")
        write(root / "pi" / "memory.max", "3000000000\n")
        write(root / "pi" / "memory.current", "500000000\n")
    found = by_check(system.memory_findings(meminfo(tmp_path, 25_000_000, 20_000_000, 0), proc, root))
    assert found["cgroup limit"].status == "info" and "3.00 GB (cgroup limit" in found["cgroup limit"].detail
    assert "2.50 GB available" in found["memory"].detail


@pytest.mark.parametrize("millidegrees, status", [(45000, "ok"), (72500, "warn"), (83000, "fail")])
def test_the_hottest_zone_decides(tmp_path, millidegrees, status):
    write(tmp_path / "thermal_zone0" / "type", "cpu-thermal\n")
    write(tmp_path / "thermal_zone0" / "temp", f"{millidegrees}\n")
    write(tmp_path / "thermal_zone1" / "type", "gpu\n")
    write(tmp_path / "thermal_zone1" / "temp", "40000\n")
    [finding] = system.thermal_findings(tmp_path)
    assert finding.status == status and f"{millidegrees / 1000:.1f} C (thermal_zone0 (cpu-thermal))" in finding.detail
    assert bool(finding.fix) == (status != "ok")


@pytest.mark.parametrize("word, status, text", [(0x0, "ok", "never"), (0x50000, "warn", "since boot: under-voltage, throttled"),
                                                (0x50005, "fail", "now: under-voltage, throttled")])
def test_pi_throttling_flags(tmp_path, word, status, text):
    firmware = write(tmp_path / "get_throttled", f"{word:x}\n")
    found = by_check(system.thermal_findings(tmp_path / "none", throttled=system.pi_throttled(firmware)))
    assert found["temperature"].status == "info"  # no zones
    assert found["throttling"].status == status and text in found["throttling"].detail


def test_no_throttling_word_off_a_pi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no vcgencmd either
    assert system.pi_throttled(tmp_path / "absent") is None
    assert "throttling" not in by_check(system.thermal_findings(tmp_path, throttled=None))


def test_governors(tmp_path):
    for cpu, governor in enumerate(["ondemand", "ondemand", "powersave"]):
        write(tmp_path / f"cpu{cpu}" / "cpufreq" / "scaling_governor", governor + "\n")
    [finding] = system.governor_findings(tmp_path)
    assert finding.status == "warn" and "ondemand on 2 core(s); powersave on 1 core(s)" == finding.detail
    assert "performance" in finding.fix
    write(tmp_path / "cpu2" / "cpufreq" / "scaling_governor", "performance\n")
    assert system.governor_findings(tmp_path)[0].status == "ok"
    assert system.governor_findings(tmp_path / "none")[0].status == "info"


def test_token_file(tmp_path):
    state = tmp_path / "state"
    assert system.token_findings(state)[0].status == "info"
    state.mkdir(mode=0o700)
    token = write(state / "token", generate_token() + "\n")
    token.chmod(0o600)
    assert system.token_findings(state)[0].status == "ok"
    token.chmod(0o644)
    [finding] = system.token_findings(state)
    assert finding.status == "fail" and finding.fix == f"chmod 600 {token}"
    token.chmod(0o600)
    state.chmod(0o755)
    assert system.token_findings(state)[0].fix == f"chmod 700 {state}"
    state.chmod(0o700)
    token.write_text("short\n")
    assert system.token_findings(state)[0].status == "fail"


def test_torch_build():
    assert compute.torch_build_findings("2.13.0+cpu", None, ["torch", "numpy"])[0].status == "ok"
    [cuda] = compute.torch_build_findings("2.13.0", "13.0", ["torch", "nvidia-cudnn-cu13", "triton", "numpy"])
    assert cuda.status == "warn" and "CUDA 13.0 build" in cuda.detail and "nvidia-cudnn-cu13" in cuda.detail
    assert "--index-url https://download.pytorch.org/whl/cpu" in cuda.fix
    assert compute.import_time_findings(2.0)[0].status == "ok"
    assert compute.import_time_findings(30.0)[0].status == "warn"


def test_the_board_picks_its_profile(tmp_path):
    model = write(tmp_path / "model", "Raspberry Pi 5 Model B Rev 1.0\x00")
    assert compute.board_model(model) == "Raspberry Pi 5 Model B Rev 1.0"
    assert compute.matching_profile(compute.board_model(model), 8 * GiB - 200_000_000).name == "rpi5-8gb"
    assert compute.matching_profile("Raspberry Pi 4 Model B Rev 1.4", 4 * GiB - 300_000_000).name == "rpi4-4gb"
    assert compute.matching_profile("Raspberry Pi 4 Model B Rev 1.4", 8 * GiB).name == "rpi4-8gb"
    assert compute.matching_profile("", 8 * GiB) is None and compute.board_model(tmp_path / "absent") == ""


def test_speed_against_the_profile():
    pi5 = BUILTIN_PROFILES["rpi5-8gb"]
    assert compute.gflops_findings(27.0, 4, pi5, "board")[0].status == "ok"
    slow = compute.gflops_findings(12.0, 4, pi5, "board")[0]
    assert slow.status == "warn" and "40% of the rpi5-8gb profile's 30" in slow.detail
    assert compute.gflops_findings(12.0, 4, None, "not a Pi")[0].status == "info"


def test_interface_flags(tmp_path):
    write(tmp_path / "eth0" / "flags", "0x1003\n")
    write(tmp_path / "wlan0" / "flags", "0x3\n")
    write(tmp_path / "eth1" / "flags", "0x1002\n")
    assert network.multicast_findings("eth0", "10.0.0.2", network.interface_flags("eth0", tmp_path))[0].status == "ok"
    off = network.multicast_findings("wlan0", "10.0.0.3", network.interface_flags("wlan0", tmp_path))[0]
    assert off.status == "fail" and "multicast on" in off.fix
    assert network.multicast_findings("eth1", "10.0.0.4", network.interface_flags("eth1", tmp_path))[0].fix == \
        "sudo ip link set eth1 up"


def test_mdns_round_trip_on_loopback():
    seconds = network.mdns_round_trip("127.0.0.1")
    assert seconds is not None and network.mdns_findings("lo", "127.0.0.1", seconds)[0].status == "ok"
    assert network.mdns_findings("lo", "127.0.0.1", None)[0].status == "fail"


def test_port_free_busy_and_reachable():
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert network.port_findings(f"tcp://127.0.0.1:{port}", ["127.0.0.1"])[0].status == "info"
    [free] = network.port_findings(f"tcp://127.0.0.1:{port}", ["127.0.0.1"])
    assert free.status == "ok" and free.detail == "free and reachable on 127.0.0.1"
    assert network.port_findings("tcp://0.0.0.0:0", [])[0].status == "info"


def test_clock_skew_against_a_clock_server():
    stop, ready = threading.Event(), threading.Event()
    url = f"tcp://127.0.0.1:{_free_port()}"
    thread = threading.Thread(target=network.serve_clock, args=(url, stop, ready))
    thread.start()
    try:
        assert ready.wait(10)
        skew, round_trip = network.clock_skew(url)
    finally:
        stop.set()
        thread.join()
    assert abs(skew) <= round_trip and network.clock_findings(url, skew, round_trip)[0].status == "ok"
    assert network.clock_findings(url, 7.0, 0.001)[0].status == "fail"
    assert network.clock_findings(url, -1.0, 0.001)[0].status == "warn"
    assert "timedatectl set-ntp true" in network.clock_findings(url, -1.0, 0.001)[0].fix


def test_worst():
    assert worst([]) == "ok"
    assert worst([Finding("a", "info", ""), Finding("b", "warn", ""), Finding("c", "ok", "")]) == "warn"


def _free_port() -> int:
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
