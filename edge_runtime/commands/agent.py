"""``ringtune agent``: run the agent on this device until stopped."""
from __future__ import annotations

import argparse
import signal
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("agent", help="run the ringtune agent on this device",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--name", required=True, help="this device's name in plans and progress")
    parser.add_argument("--listen", default="tcp://0.0.0.0:7720",
                        help="control endpoint; port 0 picks a free port (printed on start)")
    parser.add_argument("--data", help="private training data (JSONL) on this device: makes it the data owner")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from edge_runtime.agent import Agent

    agent = Agent(args.name, args.listen, data_path=args.data, threads=args.threads)
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"ringtune agent {args.name} listening on {agent.url}", flush=True)
    try:
        agent.serve()
    except KeyboardInterrupt:
        print(f"ringtune agent {args.name} stopped", file=sys.stderr)
    return 0


def _interrupt(signum, frame) -> None:
    """SIGTERM stops the agent like Ctrl-C (the control loop polls, so it is seen at once)."""
    raise KeyboardInterrupt
