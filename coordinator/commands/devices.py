"""``ringtune devices``: list the agents advertising on the local network."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from coordinator.discovery.mdns import MdnsDiscovery
from edge_runtime.discovery.advert import AgentAdvert
from edge_runtime.discovery.interfaces import parse_interfaces
from ringtune.console import print_table

COLUMNS = ("name", "address", "cores", "RAM", "GFLOPS", "runtime", "owner")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "devices", help="list the agents found on the network",
        description="Listen for ringtune agents over mDNS and list them with their profiles.")
    parser.add_argument("--timeout", type=float, default=3.0, metavar="S",
                        help="seconds to listen (default: 3; agents usually answer within 1-2 s)")
    parser.add_argument("--interface", action="append", metavar="IP",
                        help="listen only on this IPv4 address or interface name (repeatable; "
                             "default: every interface)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    interfaces = parse_interfaces(args.interface)
    with MdnsDiscovery(interfaces=interfaces) as discovery:
        agents = discovery.snapshot(args.timeout)
    if args.json:
        print(json.dumps([to_json(agent) for agent in agents], indent=2))
    elif not agents:
        print(f"no agents found within {args.timeout:g} s: start `ringtune agent` on your devices, "
              "check they are on this network (see --interface), or raise --timeout", file=sys.stderr)
    else:
        print_table(COLUMNS, [_row(agent) for agent in agents], title=f"{len(agents)} ringtune agent(s)",
                    right=("cores", "RAM", "GFLOPS"))
    return 0


def to_json(agent: AgentAdvert) -> dict[str, object]:
    """The advert's fields plus ``address`` (host:port), as printed by ``--json``."""
    return {**dataclasses.asdict(agent), "address": agent.address}


def _row(agent: AgentAdvert) -> tuple[str, ...]:
    return (agent.name, agent.address, str(agent.cores), f"{agent.ram_bytes / 2**30:.1f} GiB",
            f"{agent.gflops:.1f}", agent.runtime, "yes" if agent.has_data else "-")
