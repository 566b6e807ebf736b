"""All checks against the live system, in the order a user reads them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_runtime.doctor import compute, network, system
from edge_runtime.doctor.finding import Finding


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    state_dir: Path
    """The agent's state directory (token file)."""
    listen: str = "tcp://0.0.0.0:7720"
    """The address the agent listens on (its port is checked)."""
    interfaces: list[str] | None = None
    """IPv4 addresses to check multicast and mDNS on (None: every non-loopback interface that is up)."""
    profile: str | None = None
    """Built-in profile to compare the speed with (None: the one matching this board, if any)."""
    coordinator: str | None = None
    """``tcp://HOST:PORT`` of a ``ringtune doctor --serve-clock`` to measure clock skew against."""
    threads: int | None = None
    """Threads for the matmul benchmark (None: torch's default, every core)."""
    seconds: float = 1.0
    """Length of the matmul benchmark."""


def run_checks(options: DoctorOptions, progress=lambda check: None) -> list[Finding]:
    """Every check; ``progress(name)`` is called before each slow one."""
    findings: list[Finding] = []
    progress("torch")
    findings += _torch(options)
    findings += system.memory_findings()
    findings += system.thermal_findings(throttled=system.pi_throttled())
    findings += system.governor_findings()
    progress("matmul speed")
    findings += _speed(options)
    progress("network")
    addresses = _addresses(options.interfaces)
    for name, address in addresses:
        findings += network.multicast_findings(name, address, network.interface_flags(name))
        findings += network.mdns_findings(name, address, network.mdns_round_trip(address))
    findings += network.port_findings(options.listen, [address for _, address in addresses])
    findings += system.token_findings(options.state_dir)
    if options.coordinator:
        try:
            skew, round_trip = network.clock_skew(options.coordinator)
            findings += network.clock_findings(options.coordinator, skew, round_trip)
        except Exception as error:  # pynng raises its own hierarchy; any failure is the finding
            findings += network.clock_findings(options.coordinator, None, None, f"{type(error).__name__}: {error}")
    return findings


def _torch(options: DoctorOptions) -> list[Finding]:
    import torch

    return (compute.torch_build_findings(torch.__version__, torch.version.cuda, compute.installed_distributions())
            + compute.import_time_findings(compute.torch_import_seconds()))


def _speed(options: DoctorOptions) -> list[Finding]:
    import torch

    from device_profiles import BUILTIN_PROFILES, ProfileError
    from device_profiles.live import matmul_gflops

    if options.threads:
        torch.set_num_threads(options.threads)
    if options.profile is not None:
        if options.profile not in BUILTIN_PROFILES:
            raise ProfileError(f"unknown profile {options.profile!r}: use one of {', '.join(BUILTIN_PROFILES)}")
        profile, how = BUILTIN_PROFILES[options.profile], "--profile"
    else:
        model = compute.board_model()
        total = system.meminfo_bytes()["MemTotal"]
        profile = compute.matching_profile(model, total)
        how = f"board: {model}" if profile else f"no built-in profile for this board ({model or 'not a Pi'})"
    measured = matmul_gflops(seconds=options.seconds)
    return compute.gflops_findings(measured, torch.get_num_threads(), profile, how)


def _addresses(interfaces: list[str] | None) -> list[tuple[str, str]]:
    """(interface name, IPv4 address) pairs to check."""
    from edge_runtime.discovery.interfaces import local_ipv4

    local = local_ipv4()
    if interfaces:
        return [(next((name for name, ips in local.items() if address in ips), address), address)
                for address in interfaces]
    return [(name, ip) for name, ips in local.items() for ip in ips
            if not ip.startswith("127.") and (network.interface_flags(name) or network.IFF_UP) & network.IFF_UP]
