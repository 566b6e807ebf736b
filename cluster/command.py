"""``ringtune cluster up|down|status|exec``: an emulated cluster of devices on this machine."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

DEFAULT_PREFIX = "rtc"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cluster", help="emulate a cluster of devices on this machine (namespaces, tc, cgroups)",
        description="As root: one network namespace per device on a bridge, each link capped with tc tbf at "
                    "the profile's bandwidth, each agent in a cgroup whose CPU quota and memory limit emulate "
                    "the device. Without root: agents on 127.0.0.1 (nothing emulated).")
    actions = parser.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="create the cluster and start an agent per device")
    up.add_argument("--device", action="append", required=True, metavar="PROFILE[:NAME]",
                    help="a device to emulate (repeatable; the first one holds --owner-data), e.g. rpi4-4gb")
    up.add_argument("--owner-data", type=Path, help="the owner's private training data (JSONL)")
    up.add_argument("--token", help="the agents' pairing token (default: a new one, kept in the state file)")
    up.add_argument("--loopback", action="store_true", help="agents on 127.0.0.1 even as root (nothing emulated)")
    up.add_argument("--core-gflops", type=float,
                    help="this machine's fp32 GFLOP/s per core for the CPU quotas (default: measured now)")
    up.add_argument("--json", action="store_true", help="print the state as JSON")
    down = actions.add_parser("down", help="stop the agents and remove everything the cluster created")
    status = actions.add_parser("status", help="the devices, their limits, and whether their agents run")
    status.add_argument("--json", action="store_true", help="print state and status as JSON")
    run_in = actions.add_parser("exec", help="run a command as the coordinator (in its namespace), with "
                                             "RINGTUNE_TOKEN and RINGTUNE_CLUSTER_IP set",
                                usage="ringtune cluster exec [--device NAME] -- COMMAND ...")
    run_in.add_argument("--device", help="run it on this device instead (its namespace and cgroup)")
    run_in.add_argument("argv", nargs=argparse.REMAINDER, help="the command")
    for action in (up, down, status, run_in):
        action.add_argument("--prefix", default=DEFAULT_PREFIX,
                            help="names of everything created start with it (several clusters can coexist)")
        action.add_argument("--state", type=Path, help="state file (default: $RINGTUNE_CACHE/cluster/PREFIX.json)")
    parser.set_defaults(run=run)


def run(args) -> int:
    return {"up": _up, "down": _down, "status": _status, "exec": _exec}[args.action](args)


def _state_path(args) -> Path:
    from cluster import default_state_path

    return args.state or default_state_path(args.prefix)


def _up(args) -> int:
    import cluster

    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"bringing up {len(args.device)} device(s) ...")
    state = cluster.up(args.device, args.owner_data, args.token, prefix=args.prefix,
                       loopback=True if args.loopback else None, state_path=_state_path(args),
                       core_gflops=args.core_gflops, say=say)
    if args.json:
        print(state.to_json())
    else:
        _print_state(state)
    return 0


def _down(args) -> int:
    import cluster

    removed = cluster.down(_state_path(args), prefix=args.prefix)
    print("\n".join(f"removed {item}" for item in removed) or f"nothing of cluster {args.prefix!r} was left")
    return 0


def _status(args) -> int:
    import cluster

    state = cluster.load_state(_state_path(args))
    report = cluster.status(state)
    if args.json:
        print(json.dumps({"state": json.loads(state.to_json()), "status": [asdict(s) for s in report]}, indent=1))
        return 0
    _print_state(state)
    for item in report:
        memory = f", RSS {item.rss_bytes / 1e9:.2f} GB (peak {item.peak_rss_bytes / 1e9:.2f})" if item.rss_bytes else ""
        peak = f", cgroup peak {item.peak_bytes / 1e9:.2f} GB" if item.peak_bytes else ""
        print(f"  {item.name}: {item.state}{memory}{peak}")
    return 0 if all(item.state == "running" for item in report) else 1


def _exec(args) -> int:
    import cluster

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise ValueError("give the command after --, e.g. ringtune cluster exec -- ringtune devices")
    state = cluster.load_state(_state_path(args))
    env = {**os.environ, "RINGTUNE_TOKEN": state.token, "RINGTUNE_CLUSTER_IP": state.coordinator_ip,
           "RINGTUNE_CLUSTER_STATE": state.path}
    if args.device:
        return state.device(args.device).spawn(argv, env=env).wait()
    return subprocess.run(state.coordinator_command(argv), env=env).returncode


def _print_state(state) -> None:
    print(f"cluster {state.prefix!r} ({state.mode}), state {state.path}")
    if state.mode == "netns":
        print(f"  coordinator: namespace {state.coordinator_namespace}, {state.coordinator_ip}; "
              f"{state.core_gflops:g} GFLOP/s per core here, CPU scale {state.cpu_scale:.2f}")
    for device in state.devices:
        limits = (f"{device.cpu_cores:.2f} cores, {device.memory_bytes / 1e9:.1f} GB, "
                  f"{device.link_bytes_per_s * 8 / 1e6:.0f} Mbit/s" if device.cpu_cores else "not emulated")
        owner = ", owner" if device.owner else ""
        print(f"  {device.name} ({device.profile}{owner}): {device.control_url or device.ip}, {limits}")
    print(f"run the coordinator with: ringtune cluster exec{'' if state.prefix == DEFAULT_PREFIX else ' --prefix ' + state.prefix}"
          f" -- ringtune train --discover {len(state.devices)} --interface {state.coordinator_ip} ...")
