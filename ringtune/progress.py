"""What the user watches during a run: a live table and progress bars on a terminal, plain lines otherwise.

Long work (cutting slices, exporting programs, shipping them) is a task with a total: a bar on a terminal
(with bytes and rate for transfers), otherwise a line when it starts, at every quarter and when it ends.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Protocol

from ringtune.plan import Plan

MB = 1e6


class Task(Protocol):
    """A context manager: entering shows the work, leaving ends it."""

    def __enter__(self) -> "Task": ...

    def __exit__(self, *exc) -> None: ...

    def advance(self, amount: float) -> None:
        """This much more of the total is done (thread-safe)."""


class Progress(Protocol):
    def event(self, text: str) -> None:
        """Something happened (plan made, slices shipped, ...)."""

    def task(self, description: str, total: float, unit: str) -> "Task":
        """Long work with a total in unit ("blocks", "bytes"): ``with progress.task(...) as task: task.advance(n)``."""

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


def amount_text(amount: float, unit: str) -> str:
    if unit == "bytes":
        return f"{amount / MB:.{0 if amount >= 10 * MB else 1}f} MB"
    return f"{amount:g} {unit}"


class PlainTask:
    """Plain lines: the start, each quarter of the total, the end with the time it took (and the rate for bytes)."""

    def __init__(self, write, description: str, total: float, unit: str) -> None:
        self._write, self.description, self.total, self.unit = write, description, total, unit
        self.done = 0.0
        self._quarter = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def __enter__(self) -> "PlainTask":
        self._write(f"{self.description}: 0/{amount_text(self.total, self.unit)} ...")
        return self

    def advance(self, amount: float) -> None:
        with self._lock:
            self.done += amount
            quarter = int(4 * self.done / self.total) if self.total else 4
            if self._quarter < quarter < 4:
                self._quarter = quarter
                self._write(f"{self.description}: {self._state()}")

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self._write(f"{self.description}: done, {self._state()} in {time.monotonic() - self._started:.1f} s")

    def _state(self) -> str:
        text = f"{amount_text(self.done, self.unit).split()[0]}/{amount_text(self.total, self.unit)}"
        seconds = time.monotonic() - self._started
        if self.unit == "bytes" and seconds > 0:
            text += f", {self.done / MB / seconds:.1f} MB/s"
        return text


class PlainProgress:
    def __init__(self, write=print) -> None:
        self._write = write
        self._started = time.monotonic()

    def event(self, text: str) -> None:
        self._write(text)

    def task(self, description: str, total: float, unit: str) -> PlainTask:
        return PlainTask(self._write, description, total, unit)

    def step(self, plan: Plan, record: dict, total_steps: int) -> None:
        self._write(summary_line(record, total_steps, self._started))

    def close(self) -> None:
        pass


class LiveTask:
    """One rich progress bar; it leaves the display when the work ends."""

    def __init__(self, owner: "LiveProgress", description: str, total: float, unit: str) -> None:
        self._owner, self.description, self.total, self.unit = owner, description, total, unit
        self._id = None
        self._started = time.monotonic()

    def __enter__(self) -> "LiveTask":
        self._id = self._owner.bars.add_task(self.description, total=self.total, unit=self.unit, shown="")
        self._owner.redraw()
        return self

    def advance(self, amount: float) -> None:
        self._owner.bars.advance(self._id, amount)
        self._owner.redraw(throttle=True)

    def __exit__(self, kind, *_) -> None:
        done = next(task.completed for task in self._owner.bars.tasks if task.id == self._id)
        self._owner.bars.remove_task(self._id)
        self._owner.redraw()
        if kind is None:
            self._owner.event(f"{self.description}: {amount_text(done, self.unit)} in "
                              f"{time.monotonic() - self._started:.1f} s")


class LiveProgress:
    """A rich table redrawn in place: the run's totals, then a row per device; progress bars above it while
    slices are cut, exported or shipped."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._console = Console()
        self._live = Live(console=self._console, auto_refresh=False)
        self._live.start()
        self._started = time.monotonic()
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[shown]}"),
                             TimeElapsedColumn(), console=self._console, auto_refresh=False)
        self._table = None
        self._drawn = 0.0
        self._lock = threading.Lock()

    def event(self, text: str) -> None:
        self._console.print(text, markup=False, highlight=False)

    def task(self, description: str, total: float, unit: str) -> LiveTask:
        return LiveTask(self, description, total, unit)

    def redraw(self, throttle: bool = False) -> None:
        from rich.console import Group

        with self._lock:
            now = time.monotonic()
            if throttle and now - self._drawn < 0.1:
                return
            self._drawn = now
            for task in self.bars.tasks:
                unit = task.fields.get("unit", "")
                rate = task.completed / task.elapsed / MB if unit == "bytes" and task.elapsed else None
                task.fields["shown"] = (f"{amount_text(task.completed, unit).split()[0]}/{amount_text(task.total, unit)}"
                                        + (f" {rate:.1f} MB/s" if rate is not None else ""))
            parts = ([self.bars] if self.bars.tasks else []) + ([self._table] if self._table is not None else [])
            self._live.update(Group(*parts), refresh=True)

    def step(self, plan: Plan, record: dict, total_steps: int) -> None:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table()
        for column in ("device", "layers", "busy", "compute s", "memory"):
            table.add_column(column, justify="left" if column in ("device", "layers") else "right")
        for row in device_rows(plan, record):
            table.add_row(*row)
        self._table = Group(Text(summary_line(record, total_steps, self._started)), table)
        self.redraw()

    def close(self) -> None:
        self._live.stop()


def progress_for_terminal() -> Progress:
    return LiveProgress() if sys.stdout.isatty() else PlainProgress(lambda line: print(line, flush=True))
