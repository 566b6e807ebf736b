"""``ringtune agent``: run the agent on this device until stopped."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading
from pathlib import Path

from edge_runtime.discovery.advert import RUNTIMES

DEFAULT_STATE = Path(os.environ.get("RINGTUNE_STATE", Path.home() / ".local" / "state" / "ringtune"))
READY = re.compile(r"ringtune agent (\S+) listening on (\S+)")
"""The line an agent prints once it listens (its name, its control URL): what starters of agents wait for."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("agent", help="run the ringtune agent on this device",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--name", required=True, help="this device's name in plans and progress")
    parser.add_argument("--listen", default="tcp://0.0.0.0:7720",
                        help="control endpoint; port 0 picks a free port (printed on start)")
    parser.add_argument("--data", help="private training data (JSONL) on this device: makes it the data owner")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--token", default=os.environ.get("RINGTUNE_AGENT_TOKEN"),
                        help="pairing token (default: generated once, printed, kept in the state directory)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="run stages in eager PyTorch, or through ExecuTorch programs (pip install "
                             "'ringtune[executorch]'); the coordinator exports and ships them")
    parser.add_argument("--export-dir", type=Path,
                        help="with --runtime executorch: a local `ringtune export` directory to run instead of "
                             "shipped programs (checked against its manifest hashes and the run's shape)")
    parser.add_argument("--max-memory", type=float, metavar="GB",
                        help="memory this agent may use for a run, its own runtime included (default: the "
                             "machine's, or its cgroup's); the planner gives it no more")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help="token and slice cache")
    parser.add_argument("--interface", action="append", metavar="IP|IFACE",
                        help="advertise over mDNS only on these interfaces (repeatable; default: all)")
    parser.add_argument("--no-advertise", action="store_true",
                        help="do not advertise over mDNS (the coordinator then needs --agents URL)")
    parser.add_argument("--print-systemd-unit", action="store_true",
                        help="print a systemd unit that runs this agent at boot, and exit")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.print_systemd_unit:
        print(systemd_unit(args, sys.argv[sys.argv.index("agent") + 1:] if "agent" in sys.argv else []))
        return 0
    from edge_runtime.memory import configure_allocator

    configure_allocator()  # before the imports below allocate
    from edge_runtime.agent import Agent
    from ringtune.security import check_token, load_or_create_token

    if args.token:
        token = check_token(args.token)
    else:
        token, created = load_or_create_token(args.state_dir)
        if created:
            print(f"pairing token (give it to the coordinator: RINGTUNE_TOKEN=... ringtune train): {token}", flush=True)
    if args.export_dir and args.runtime != "executorch":
        raise ValueError("--export-dir holds ExecuTorch programs: use it with --runtime executorch")
    if args.max_memory is not None and args.max_memory <= 0:
        raise ValueError("--max-memory must be > 0 (GB)")
    agent = Agent(args.name, args.listen, token, args.state_dir, data_path=args.data, threads=args.threads,
                  runtime=args.runtime, export_dir=args.export_dir,
                  max_memory=None if args.max_memory is None else int(args.max_memory * 1e9))
    agent.measure()  # before it answers: hello must be quick
    advertiser = None if args.no_advertise else _advertise(agent, args)
    if advertiser is not None:  # say busy/free on the network, off the control loop (mDNS takes a moment)
        agent.on_busy = lambda lineage: threading.Thread(target=advertiser.set_busy, args=(lineage,), daemon=True).start()
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"ringtune agent {args.name} listening on {agent.url}", flush=True)
    try:
        agent.serve()
    except KeyboardInterrupt:
        print(f"ringtune agent {args.name} stopped", file=sys.stderr)
    finally:
        if advertiser is not None:
            advertiser.close()
    return 0


def _advertise(agent, args):
    import psutil
    import ringtune
    from edge_runtime.discovery.advert import AgentAdvert
    from edge_runtime.discovery.advertiser import Advertiser
    from edge_runtime.discovery.interfaces import parse_interfaces

    advert = AgentAdvert(agent_id=agent.pairing.agent_id, name=agent.name, version=ringtune.__version__,
                         control_url=agent.url, cores=psutil.cpu_count() or 1,
                         ram_bytes=agent.ram()[0], gflops=round(agent.gflops, 1),
                         runtime=agent.runtime, has_data=agent.records is not None)
    return Advertiser(advert, interfaces=parse_interfaces(args.interface))


def systemd_unit(args, argv: list[str]) -> str:
    """A unit for /etc/systemd/system/ringtune-agent.service that runs this agent command (argv: its options).

    The token never goes into the unit: a --token given here is kept in the state directory's token file
    (mode 0600, where the agent reads it at start), and the unit names that directory explicitly (the
    service may run as another user, with another home)."""
    from ringtune.security import keep_token

    state_dir = args.state_dir.expanduser().resolve()
    if args.token:
        path = keep_token(state_dir, args.token)
        print(f"the token is kept in {path} (mode 0600) for the unit to read", file=sys.stderr)
    options = _without(argv, {"--print-systemd-unit"}, {"--token", "--state-dir"})
    command = shlex.join([sys.executable, "-m", "ringtune.cli", "agent", *options, "--state-dir", str(state_dir)])
    return f"""[Unit]
Description=ringtune agent {args.name}
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={command}
Restart=on-failure
RestartSec=5
Environment=PYTHONUNBUFFERED=1

[Install]
WantedBy=multi-user.target
"""


def _without(argv: list[str], flags: set[str], options: set[str]) -> list[str]:
    """argv without these flags and these options (with their values, as OPTION VALUE or OPTION=VALUE)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg not in flags and arg.split("=", 1)[0] not in options:
            kept.append(arg)
    return kept


def _interrupt(signum, frame) -> None:
    """SIGTERM stops the agent like Ctrl-C (the control loop polls, so it is seen at once)."""
    raise KeyboardInterrupt
