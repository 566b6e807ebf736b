"""``ringtune profile``: measure this device (cores, RAM, matmul GFLOP/s, link) for the planner."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser("profile", help="measure this device for the planner",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--name", help="device name in the profile (default: the host name)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the matmul benchmark")
    parser.add_argument("--json", action="store_true",
                        help="print the profile as JSON (a device file for 'ringtune plan --device-file')")
    parser.set_defaults(run=run)


def run(args) -> int:
    from dataclasses import replace

    from device_profiles.live import measure
    from edge_runtime.calibration import runtime_baseline
    from edge_runtime.memory import configure_allocator

    if args.seconds <= 0:
        raise ValueError("--seconds must be > 0")
    configure_allocator()  # as the agent does, so the baseline is the agent's
    profile = measure(args.name, args.seconds)
    profile = replace(profile, baseline_bytes=runtime_baseline(), sources={
        **profile.sources, "baseline_bytes": "measured: this process with the training runtime warmed up"})
    if args.json:
        print(json.dumps(profile.to_dict(), indent=1))
        return 0
    print(f"device  {profile.name}\n"
          f"ram     {profile.ram_bytes / 1e9:.2f} GB usable   ({profile.sources['ram_bytes']})\n"
          f"cores   {profile.cores}   ({profile.sources['cores']})\n"
          f"matmul  {profile.gflops:.1f} GFLOP/s   ({profile.sources['gflops']})\n"
          f"link    {profile.link_bytes_per_s * 8 / 1e6:.0f} Mbit/s   ({profile.sources['link_bytes_per_s']})\n"
          f"runtime {profile.baseline_bytes / 1e9:.2f} GB resident before any run   "
          f"({profile.sources['baseline_bytes']})")
    return 0
