"""This process's memory as the kernel counts it, and the allocator settings that keep it honest.

The plan's memory prediction is held to an agent's peak resident size (VmHWM, file pages of the
mapped slice included). Linux's ``getrusage`` peak is no use for that: it carries across fork and
exec, so a process started by a large parent would report the parent's peak.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB), so after
the first micro-batch the activations of later ones come from the heap, where freed blocks stay
resident and fragment; every extra thread may get its own heap. Measured on a middle agent holding
13 SmolLM2 blocks (1F1B, 3 micro-batches of 4 x 64 in flight): RSS grew 0.25 GB per step and peaked
at 2.56 GB. A threshold fixed at 256 KB kept the peak at what is live, but made every activation a
fresh mapping whose pages fault in: forward + backward of a block cost 1.34x glibc's default (SmolLM2
blocks, 4 x 64 tokens; benchmarks/allocator.py). So the threshold is fixed at 4 MB (a
micro-batch's activations reuse the heap within a forward or backward) and the worker trims the heap
after each forward and backward: middle agents then peak at 1.06-1.08x their prediction, as with 256 KB.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from pathlib import Path

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 4 * 1024 * 1024
"""Blocks this large or larger get their own mapping, returned to the OS when freed; smaller ones reuse the heap
until the next trim."""
ARENA_MAX = 2
"""Heaps shared by all threads (glibc's default is 8 per core)."""


def _glibc():
    """glibc's malloc controls, or None (musl, macOS, Windows: nothing to tune)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def configure_allocator() -> None:
    """Fix the mmap threshold and cap the arenas: call once, early, in a long-running agent."""
    if _LIBC is None:
        log.info("not glibc: allocator left at its defaults")
        return
    set_mmap_threshold(MMAP_THRESHOLD)
    _LIBC.mallopt(M_ARENA_MAX, ARENA_MAX)


def set_mmap_threshold(size: int) -> None:
    """Blocks of ``size`` bytes or more get their own mapping (glibc only; before the allocations it governs)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, size)


def release_free_memory() -> None:
    """Collect garbage and hand the heaps' free pages back to the OS (after loading, after a step)."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand the heaps' free pages back to the OS (after each micro-batch's forward or backward)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def freeze_long_lived() -> None:
    """After a run is loaded: release, then take every object alive now (the imports, the stages, the data) out
    of the collector's view, so the collection after each step walks only what the step made. A full one over an
    agent's ~400k objects cost 0.2 s of CPU here (more on a Pi), on every step's critical path."""
    release_free_memory()
    gc.freeze()


def thaw() -> None:
    """Before the next run loads: what the previous run froze may be collected again (no run leaks another's)."""
    gc.unfreeze()


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile, ... of /proc/PID/status in bytes ({} if it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.split() for line in lines if line.endswith("kB"))
    return {parts[0].rstrip(":"): int(parts[1]) * 1024 for parts in fields}


def rss(pid: int | str = "self") -> int:
    """Bytes resident now."""
    return process_memory(pid).get("VmRSS", 0)


def peak_rss(pid: int | str = "self") -> int:
    """Bytes: the resident-memory high-water mark since start (or since reset_peak_rss)."""
    memory = process_memory(pid)
    if "VmHWM" not in memory:
        raise RuntimeError(f"/proc/{pid}/status has no VmHWM")
    return memory["VmHWM"]


def reset_peak_rss(pid: int | str = "self") -> None:
    """Start the high-water mark again from the current RSS (a process may reset its own)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
