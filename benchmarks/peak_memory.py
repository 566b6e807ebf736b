"""Peak resident memory of a process, as the kernel tracks it (VmHWM), and its reset.

Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a process started by a
large parent would report the parent's peak.
"""
from __future__ import annotations

from pathlib import Path


def peak_rss(pid: int | str = "self") -> int:
    """Bytes: the process's resident-memory high-water mark."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Start the high-water mark again from the current RSS (needs the right to write clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
