"""What the user watches during a run: a live table on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys
import time
from typing import Protocol

from ringtune.plan import Plan


class Progress(Protocol):
    def event(self, text: str) -> None:
        """Something happened (plan made, slices shipped, ...)."""

    def step(self, plan: Plan, record: dict, total_steps: int) -> None:
        """A step finished; record is the metrics line of the step."""

    def close(self) -> None:
        """The run ended."""


def device_rows(plan: Plan, record: dict) -> list[tuple[str, str, str, str, str]]:
    """(device, layers, busy %, compute s, memory) per device for one step."""
    rows = []
    for name in plan.devices():
        device = record["devices"][name]
        layers = " + ".join(f"[{plan.stages[i].layers[0]}, {plan.stages[i].layers[1]})"
                            for i in plan.stage_indices(name))
        compute = sum(device["compute_seconds"].values())
        busy = compute / record["step_seconds"] if record["step_seconds"] else 0.0
        rows.append((name, layers, f"{busy:.0%}", f"{compute:.2f}", f"{device['rss'] / 2**20:.0f} MiB"))
    return rows


def summary_line(record: dict, total_steps: int, started: float) -> str:
    done = record["step"]
    eta = (time.monotonic() - started) / done * (total_steps - done)
    return (f"step {done}/{total_steps}  loss {record['loss']:.4f}  {record['tokens_per_s']:.0f} tokens/s  "
            f"{record['step_seconds']:.2f} s/step  ETA {eta:.0f} s")


class PlainProgress:
    def __init__(self, write=print) -> None:
        self._write = write
        self._started = time.monotonic()

    def event(self, text: str) -> None:
        self._write(text)

    def step(self, plan: Plan, record: dict, total_steps: int) -> None:
        self._write(summary_line(record, total_steps, self._started))

    def close(self) -> None:
        pass


class LiveProgress:
    """A rich table redrawn in place: the run's totals, then a row per device."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self._console = Console()
        self._live = Live(console=self._console, auto_refresh=False)
        self._live.start()
        self._started = time.monotonic()

    def event(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False)

    def step(self, plan: Plan, record: dict, total_steps: int) -> None:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table()
        for column in ("device", "layers", "busy", "compute s", "memory"):
            table.add_column(column, justify="left" if column in ("device", "layers") else "right")
        for row in device_rows(plan, record):
            table.add_row(*row)
        self._live.update(Group(Text(summary_line(record, total_steps, self._started)), table), refresh=True)

    def close(self) -> None:
        self._live.stop()


def progress_for_terminal() -> Progress:
    return LiveProgress() if sys.stdout.isatty() else PlainProgress(lambda line: print(line, flush=True))
