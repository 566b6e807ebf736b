"""The ``ringtune`` command: each subcommand lives in its own module with ``register(subparsers)``.

A command's ``run(args) -> int`` returns the exit code; errors meant for the user are raised as
``ValueError`` (or a subclass) and printed as one line, without a traceback.
"""
from __future__ import annotations

import argparse
import atexit
import faulthandler
import logging
import os
import signal
import sys

from ringtune.quiet import quiet_libraries

def build_parser() -> argparse.ArgumentParser:
    # Imported here, after main() quieted the libraries: a command module may import one that warns.
    from audit import command as audit
    from cluster import command as cluster
    from coordinator.commands import devices, plan, train
    from edge_runtime.commands import agent, data, doctor, evaluate, profile
    from exporters import commands as export

    parser = argparse.ArgumentParser(prog="ringtune", description="Private split fine-tuning on the devices you own.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in (agent, train, data, evaluate, profile, doctor, plan, devices, cluster, export, audit):
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    if not verbose:
        quiet_libraries()  # before anything imports torch
    args = build_parser().parse_args(argv)
    if sys.__stderr__ is not None:  # `kill -USR1 PID` prints every thread's stack (where a hang is)
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"ringtune {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ringtune {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The ``ringtune`` command: main(), then exit without the interpreter's final garbage collection.

    With torch and transformers imported, that collection walks millions of objects: on a loaded
    2-core machine a coordinator stopped by Ctrl-C sat 40-50 s in it (Py_FinalizeEx -> gc_collect_main,
    seen with gdb) after printing "interrupted". Exit handlers still run (logging, thread pools)."""
    code = main()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
