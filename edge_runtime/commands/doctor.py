"""``ringtune doctor``: check this device for what goes wrong on Pis and phones, each with a fix."""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

from edge_runtime.commands.agent import DEFAULT_STATE

STATUS_STYLE = {"ok": "[green]ok[/]", "info": "[blue]info[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor", help="check this device (torch build, memory, heat, network, token, clock)",
        description="Check this device for what slows down or breaks a ringtune agent, each with a fix. "
                    "Exits 1 if a check fails.")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE, help="the agent's state directory")
    parser.add_argument("--listen", default="tcp://0.0.0.0:7720", help="the agent's --listen address (port check)")
    parser.add_argument("--interface", action="append", metavar="IP|IFACE",
                        help="check multicast and mDNS only here (repeatable; default: every interface that is up)")
    parser.add_argument("--profile", help="built-in profile to compare the matmul speed with "
                                          "(default: the one matching this board)")
    parser.add_argument("--coordinator", metavar="tcp://HOST:PORT",
                        help="measure clock skew against `ringtune doctor --serve-clock` there")
    parser.add_argument("--threads", type=int, help="threads for the matmul benchmark (default: every core)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of the matmul benchmark")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--serve-clock", metavar="tcp://HOST:PORT",
                        help="instead of checking: answer devices' clock checks here until Ctrl-C "
                             "(run it on the coordinator's machine)")
    parser.set_defaults(run=run)


def run(args) -> int:
    if args.serve_clock:
        return _serve_clock(args.serve_clock)
    from edge_runtime.discovery.interfaces import ALL, parse_interfaces
    from edge_runtime.doctor import worst
    from edge_runtime.doctor.run import DoctorOptions, run_checks

    if args.seconds <= 0:
        raise ValueError("--seconds must be > 0")
    interfaces = parse_interfaces(args.interface)
    options = DoctorOptions(args.state_dir, args.listen, None if interfaces == ALL else interfaces, args.profile,
                            args.coordinator, args.threads, args.seconds)
    quiet = args.json or not sys.stderr.isatty()
    findings = run_checks(options, progress=lambda name: quiet or print(f"checking {name}...", file=sys.stderr))
    if args.json:
        print(json.dumps([finding.to_dict() for finding in findings], indent=1))
    else:
        _print(findings)
    return 1 if worst(findings) == "fail" else 0


def _print(findings) -> None:
    from ringtune.console import print_table

    terminal = sys.stdout.isatty()
    rows = [(f.check, STATUS_STYLE[f.status] if terminal else f.status, f.detail, f.fix) for f in findings]
    print_table(("check", "status", "measured", "fix"), rows, title="ringtune doctor")


def _serve_clock(url: str) -> int:
    from edge_runtime.doctor.network import serve_clock

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=serve_clock, args=(url, stop, ready), daemon=True)
    thread.start()
    ready.wait(10)
    print(f"ringtune doctor: serving the time on {url} (Ctrl-C stops)", flush=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
    finally:
        stop.set()
    return 0
