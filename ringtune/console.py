"""Tables on the terminal, the one way every command prints them (rich)."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TextIO

from rich import box
from rich.console import Console
from rich.table import Table

PLAIN_WIDTH = 1000
"""Console width when not on a terminal: rows never wrap in logs, pipes and scripts."""


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, title: str | None = None,
                right: Iterable[str] = (), file: TextIO | None = None) -> None:
    """Rows of text under their column headers: boxed on a terminal, plain aligned columns otherwise.

    ``right`` names the columns aligned right (numbers)."""
    file = file or sys.stdout
    terminal = file.isatty()
    console = Console(file=file, width=None if terminal else PLAIN_WIDTH, highlight=False)
    table = Table(title=title if terminal else None, box=box.ROUNDED if terminal else None, pad_edge=terminal,
                  show_edge=terminal)
    right = set(right)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    for row in rows:
        table.add_row(*row)
    console.print(table)
