"""Checks of the network: multicast and mDNS on each interface, the agent's port, clock skew.

``serve_clock`` is the other end of the clock check: ``ringtune doctor --serve-clock`` on the
coordinator's machine answers the time to devices that run ``ringtune doctor --coordinator``.
"""
from __future__ import annotations

import errno
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import pynng
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from edge_runtime.doctor.finding import Finding

IFF_UP, IFF_LOOPBACK, IFF_MULTICAST = 0x1, 0x8, 0x1000
"""Bits of /sys/class/net/IFACE/flags (linux/if.h)."""
PROBE_TYPE = "_ringtune-doctor._tcp.local."
"""Service type of the mDNS self-test (not the agents' type: `ringtune devices` never lists it)."""
MDNS_SECONDS = 5.0
CLOCK_SAMPLES = 8
CLOCK_TIMEOUT_MS = 3000
SMALL_SKEW, LARGE_SKEW = 0.5, 5.0
"""Seconds: logs and metrics of devices stop lining up beyond the first; a Pi without NTP is minutes off."""
NTP_FIX = ("turn on time sync: `sudo timedatectl set-ntp true` (a Pi before the Pi 5 has no clock battery: "
           "its time is wrong after every boot until NTP answers)")
_TIME = struct.Struct(">d")


def interface_flags(name: str, net_root: Path = Path("/sys/class/net")) -> int | None:
    try:
        return int((net_root / name / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def multicast_findings(name: str, address: str, flags: int | None) -> list[Finding]:
    """Whether the interface is up and allows multicast (mDNS needs both)."""
    label = f"multicast {name}"
    if flags is None:
        return [Finding(label, "info", f"{address}: interface flags not visible")]
    if not flags & IFF_UP:
        return [Finding(label, "fail", f"{address}: interface is down", f"sudo ip link set {name} up")]
    if flags & IFF_LOOPBACK:
        return [Finding(label, "info", f"{address}: loopback, reaches agents on this machine only")]
    if not flags & IFF_MULTICAST:
        return [Finding(label, "fail", f"{address}: multicast is off on {name}: agents cannot be discovered",
                        f"sudo ip link set {name} multicast on (or give the coordinator --agents URLs)")]
    return [Finding(label, "ok", f"{address}: up, multicast on")]


def mdns_round_trip(address: str, timeout: float = MDNS_SECONDS) -> float | None:
    """Seconds for an mDNS service announced on ``address`` to be browsed and resolved there by a
    second responder (its own sockets), or None if it never is. Both use only that address."""
    name = f"doctor-{secrets.token_hex(4)}.{PROBE_TYPE}"
    info = ServiceInfo(PROBE_TYPE, name, port=9, addresses=[socket.inet_aton(address)], properties={})
    found = threading.Event()

    def changed(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if name == info.name and state_change is ServiceStateChange.Added:
            found.set()

    announcer = Zeroconf(interfaces=[address])
    listener = Zeroconf(interfaces=[address])
    try:
        start = time.monotonic()
        browser = ServiceBrowser(listener, PROBE_TYPE, handlers=[changed])
        announcer.register_service(info, allow_name_change=True)
        resolved = found.wait(timeout) and listener.get_service_info(
            PROBE_TYPE, info.name, timeout=int(max(0.1, timeout - (time.monotonic() - start)) * 1000))
        browser.cancel()
        return time.monotonic() - start if resolved else None
    finally:
        announcer.close()
        listener.close()


def mdns_findings(name: str, address: str, seconds: float | None) -> list[Finding]:
    label = f"mDNS {name}"
    if seconds is None:
        return [Finding(label, "fail", f"{address}: an mDNS announcement was not heard back within {MDNS_SECONDS:g} s",
                        "allow UDP port 5353 (e.g. `sudo ufw allow 5353/udp`) and multicast on this network "
                        "(some WiFi access points block it: turn off 'client isolation'), or give the coordinator "
                        "--agents URLs")]
    return [Finding(label, "ok", f"{address}: announced and resolved in {seconds:.2f} s")]


def port_findings(listen_url: str, addresses: Iterable[str]) -> list[Finding]:
    """Whether the agent's port is free to listen on and reachable on each address (or already served)."""
    parsed = urlparse(listen_url)
    host, port = parsed.hostname or "0.0.0.0", parsed.port
    label = f"port {port}"
    if port is None or port == 0:
        return [Finding(label, "info", f"{listen_url}: the agent picks a free port at start")]
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind((host, port))
    except OSError as error:
        server.close()
        if error.errno == errno.EADDRINUSE:
            return [Finding(label, "info", f"{host}:{port} is in use (an agent already running?)",
                            "`ringtune devices` lists running agents; otherwise give the agent another --listen")]
        return [Finding(label, "fail", f"cannot listen on {host}:{port}: {error.strerror}",
                        "give the agent a --listen address of this machine")]
    with server:
        server.listen()
        reached, refused = [], []
        for address in addresses:
            try:
                socket.create_connection((address, port), timeout=2).close()
                reached.append(address)
            except OSError:
                refused.append(address)
    if refused:
        return [Finding(label, "fail", f"free, but not reachable on {', '.join(refused)}",
                        f"allow TCP port {port} in the firewall (e.g. `sudo ufw allow {port}/tcp`)")]
    return [Finding(label, "ok", f"free and reachable on {', '.join(reached) or host}")]


def serve_clock(url: str, stop: threading.Event, ready: threading.Event | None = None) -> None:
    """Answer every request on ``url`` with this machine's wall-clock time, until ``stop`` is set."""
    with pynng.Rep0(listen=url, recv_timeout=200, send_timeout=1000) as socket_:
        if ready is not None:
            ready.set()
        while not stop.is_set():
            try:
                socket_.recv()
            except pynng.Timeout:
                continue
            except pynng.NNGException:
                continue
            socket_.send(_TIME.pack(time.time()))


def clock_skew(url: str, samples: int = CLOCK_SAMPLES) -> tuple[float, float]:
    """(skew in seconds: the coordinator's clock minus ours, round trip of the best sample)."""
    results = []
    with pynng.Req0(dial=url, recv_timeout=CLOCK_TIMEOUT_MS, send_timeout=CLOCK_TIMEOUT_MS,
                    recv_max_size=64) as socket_:
        for _ in range(samples):
            sent = time.time()
            socket_.send(b"time")
            (remote,) = _TIME.unpack(socket_.recv())
            received = time.time()
            results.append((received - sent, remote - (sent + received) / 2))
    round_trip, skew = min(results)  # the quickest exchange bounds the error best
    return skew, round_trip


def clock_findings(url: str, skew: float | None, round_trip: float | None, error: str = "") -> list[Finding]:
    if skew is None:
        return [Finding("clock", "fail", f"no time from {url}: {error}",
                        "run `ringtune doctor --serve-clock` on the coordinator's machine, and check the address")]
    detail = f"{skew:+.3f} s against {url} (round trip {round_trip * 1e3:.1f} ms)"
    if abs(skew) >= LARGE_SKEW:
        return [Finding("clock", "fail", detail, NTP_FIX)]
    if abs(skew) >= SMALL_SKEW:
        return [Finding("clock", "warn", detail, NTP_FIX)]
    return [Finding("clock", "ok", detail)]
