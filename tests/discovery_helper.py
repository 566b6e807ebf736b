"""Discovery helpers for tests: an advertiser in another process (``python -m tests.discovery_helper``).

``advertise`` publishes one agent until stdin closes or SIGTERM, printing ``ready`` once
registered; ``discover`` waits for names and prints them as JSON. Both run inside network
namespaces too (``ip netns exec NS python -m tests.discovery_helper ...``).
"""
from __future__ import annotations

import argparse
import json
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from edge_runtime.discovery.advert import AgentAdvert

REPO = Path(__file__).resolve().parents[1]


def make_advert(name: str, *, ip: str = "127.0.0.1", port: int = 7800, has_data: bool = False) -> AgentAdvert:
    """A plausible advert whose id derives from the (test-unique) name."""
    return AgentAdvert(agent_id=f"id-{name}", name=name, version="0.1.0", control_url=f"tcp://{ip}:{port}",
                       cores=4, ram_bytes=8 << 30, gflops=12.5, runtime="torch", has_data=has_data)


def start_advertiser(name: str, ip: str, *, port: int = 7800, has_data: bool = False,
                     prefix: tuple[str, ...] = (), timeout: float = 20.0) -> subprocess.Popen[str]:
    """Start ``advertise`` in a subprocess (optionally under ``prefix``, e.g. ip netns exec); wait for ready."""
    command = [*prefix, sys.executable, "-m", "tests.discovery_helper", "advertise", "--name", name,
               "--ip", ip, "--port", str(port)] + (["--has-data"] if has_data else [])
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        ready = selector.select(timeout) and process.stdout.readline().strip() == "ready"
    if not ready:
        stop(process)
        raise RuntimeError(f"advertiser {name} did not start within {timeout} s: {process.stderr.read()}")
    return process


def stop(process: subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Ask a helper to unregister and exit; kill it if it does not in time."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _advertise(args: argparse.Namespace) -> None:
    from edge_runtime.discovery.advertiser import Advertiser

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that close() says goodbye
    advert = make_advert(args.name, ip=args.ip, port=args.port, has_data=args.has_data)
    with Advertiser(advert, interfaces=[args.ip]):
        print("ready", flush=True)
        sys.stdin.read()  # until the parent closes stdin or dies


def _discover(args: argparse.Namespace) -> None:
    from coordinator.discovery.mdns import MdnsDiscovery

    started = time.monotonic()
    with MdnsDiscovery(interfaces=[args.ip]) as discovery:
        agents = discovery.wait_for(args.names.split(","), args.timeout)
    print(json.dumps({"seconds": time.monotonic() - started,
                      "agents": [{"name": a.name, "control_url": a.control_url} for a in agents]}))


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    advertise = commands.add_parser("advertise")
    advertise.add_argument("--name", required=True)
    advertise.add_argument("--ip", required=True)
    advertise.add_argument("--port", type=int, default=7800)
    advertise.add_argument("--has-data", action="store_true")
    advertise.set_defaults(run=_advertise)
    discover = commands.add_parser("discover")
    discover.add_argument("--ip", required=True)
    discover.add_argument("--names", required=True)
    discover.add_argument("--timeout", type=float, default=10.0)
    discover.set_defaults(run=_discover)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
