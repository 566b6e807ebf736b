"""Built-in profiles of devices people own, and ``PROFILE[:NAME]`` device specs.

Every number says where it comes from. "estimate" means no published PyTorch measurement for
that device was at hand: the value is derived from the core type, clock and SIMD width (peak
FLOPs) times a sustained-matmul efficiency, or from the typical usable share of RAM and the
typical real throughput of the link. Replace estimates with ``ringtune profile --json`` run on
the device itself.
"""
from __future__ import annotations

from device_profiles.profile import BASELINE_SOURCE, GB, DeviceProfile, ProfileError

GIGABIT_ETHERNET = 940e6 / 8  # iperf3 payload rate typically seen on gigabit Ethernet
GIGABIT_SOURCE = "estimate: gigabit Ethernet, ~940 Mbit/s typical iperf3 payload rate"


def _profile(name: str, ram_gb: float, cores: int, gflops: float, link_bytes_per_s: float,
             ram: str, compute: str, link: str) -> DeviceProfile:
    return DeviceProfile(name, int(ram_gb * GB), cores, gflops, link_bytes_per_s,
                         {"ram_bytes": ram, "cores": "spec sheet", "gflops": compute,
                          "link_bytes_per_s": link, "baseline_bytes": BASELINE_SOURCE})


BUILTIN_PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    _profile("rpi4-4gb", 3.0, 4, 10.0, GIGABIT_ETHERNET,
             ram="estimate: 4 GB minus ~1 GB for a headless OS and its page cache",
             compute="estimate: 4x Cortex-A72 at 1.5 GHz, 48 GFLOP/s fp32 NEON peak, ~20% sustained in torch",
             link=GIGABIT_SOURCE),
    _profile("rpi4-8gb", 7.0, 4, 10.0, GIGABIT_ETHERNET,
             ram="estimate: 8 GB minus ~1 GB for a headless OS and its page cache",
             compute="estimate: same SoC as rpi4-4gb",
             link=GIGABIT_SOURCE),
    _profile("rpi5-8gb", 7.0, 4, 30.0, GIGABIT_ETHERNET,
             ram="estimate: 8 GB minus ~1 GB for a headless OS and its page cache",
             compute="estimate: 4x Cortex-A76 at 2.4 GHz, ~2.5-3x a Pi 4 in published CPU benchmarks",
             link=GIGABIT_SOURCE),
    _profile("rpi-zero2w", 0.3, 4, 2.0, 40e6 / 8,
             ram="estimate: 512 MB minus the OS",
             compute="estimate: 4x Cortex-A53 at 1 GHz, 32 GFLOP/s peak, memory-bound in practice",
             link="estimate: 2.4 GHz WiFi 4 (802.11n, one stream), ~40 Mbit/s real"),
    _profile("phone-mid", 2.5, 8, 20.0, 300e6 / 8,
             ram="estimate: 6 GB phone; Android lets one app use ~2.5 GB before killing it",
             compute="estimate: 2x Cortex-A78 + 6x A55 class SoC under Termux torch",
             link="estimate: WiFi 5 (802.11ac, 2 streams), ~300 Mbit/s real"),
    _profile("phone-flagship", 5.0, 8, 60.0, 600e6 / 8,
             ram="estimate: 12 GB phone; ~5 GB usable by one app",
             compute="estimate: Cortex-X3 + A715 class SoC under Termux torch",
             link="estimate: WiFi 6 (802.11ax, 2 streams), ~600 Mbit/s real"),
    _profile("jetson-orin-nano", 6.0, 6, 40.0, GIGABIT_ETHERNET,
             ram="estimate: 8 GB shared CPU/GPU memory minus the OS",
             compute="estimate: 6x Cortex-A78AE at 1.5 GHz, CPU path only (no CUDA)",
             link=GIGABIT_SOURCE),
    _profile("laptop", 10.0, 8, 200.0, 400e6 / 8,
             ram="estimate: 16 GB laptop with a desktop session running",
             compute="estimate: 8-core x86 with AVX2 FMA, ~25-30% of peak in torch sgemm",
             link="estimate: WiFi 5 (802.11ac), ~400 Mbit/s real"),
)}


def resolve_device(spec: str, known: dict[str, DeviceProfile] | None = None) -> DeviceProfile:
    """The device for ``PROFILE[:NAME]``; PROFILE is built in or in ``known`` (from profile files)."""
    profile_name, _, device_name = spec.partition(":")
    table = {**BUILTIN_PROFILES, **(known or {})}
    if profile_name not in table:
        raise ProfileError(f"unknown device profile {profile_name!r}: use one of {', '.join(table)}, "
                           f"or describe the device in a file given with --device-file")
    profile = table[profile_name]
    return profile.renamed(device_name) if device_name else profile
