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
micro-batch's activations reuse the heap within a forward or backward), and the worker trims the heap
(``HeapTrimmer``) once its resident size grew by ``HEAP_SLACK_BYTES`` since the last trim, which the plan's
prediction counts. Trimming after every forward and backward kept middle agents at 1.06-1.08x their
prediction too, but the pages it handed back faulted in again on the next action: about 10% of each
block's time inside a device's memory cgroup (benchmarks/README, "The heap trim costs the ring 15%").
Even by the slack, an emulated rpi5-8gb agent still faulted in 0.3-0.45 M pages (1.2-1.8 GB) per step, 1.1-1.6 s
of system CPU: so during a run the trimmer also leaves the heap alone while the process is within its budget, the
plan's prediction for the device (``HeapTrimmer.set_budget``; benchmarks/README, "Page faults"). That budget has room
for the heap's fragmentation (``HEAP_ROOM_SHARE``) where the device has the memory: without it, agents sat at their
budget and trimmed every second action, faulting in as much as before (benchmarks/README, "The heap's room").
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import resource
import threading
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
    """Collect garbage and hand the heaps' free pages back to the OS (after loading, before a run)."""
    gc.collect()
    HEAP.trim()


def settle_after_step() -> None:
    """Collect what the step left in cycles; trim by the trimmer's rule only: freed pages within the budget are
    what the next step's micro-batches reuse without faulting them in again."""
    gc.collect()
    HEAP.after_action()
    HEAP.end_step()


def freeze_long_lived() -> None:
    """After a run is loaded: release, then take every object alive now (the imports, the stages, the data) out
    of the collector's view, so the collection after each step walks only what the step made. A full one over an
    agent's ~400k objects cost 0.2 s of CPU here (more on a Pi), on every step's critical path."""
    release_free_memory()
    gc.freeze()


def thaw() -> None:
    """Before the next run loads: what the previous run froze may be collected again (no run leaks another's)."""
    gc.unfreeze()


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads): each is a page touched for the first time since
    it was mapped or handed back, about 4 us of system time here."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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


HEAP_SLACK_BYTES = 64 * 1024 * 1024
"""Growth of an agent's resident size, since its last trim, that it lets the heap keep (freed activations the next
micro-batch reuses without faulting pages in); the plan's memory prediction counts it on every device."""


class HeapTrimmer:
    """Trims the heap after a forward or backward only when the next action could take the process past its budget
    (its RSS plus the largest growth one action has shown in this step) and its RSS grew by more than the slack since
    the last trim (one per process: the owner's head and tail threads share it, as they share the heap)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._after_last_trim = 0  # none yet: the first action trims (no /proc read at import)
        self._after_last_action = 0
        # Of RSS across one action in this step: what the next one may add to pages the heap lacks. Per step, and not
        # across a trim, because the first step's growth (weights read in, a cold heap) and the pages a trim handed
        # back overstate it: counted, they made agents trim whenever within that much of their budget.
        self._largest_growth = 0
        self._budget = 0

    def set_budget(self, budget: int) -> None:
        """Bytes the process may hold before a trim is worth its page faults: the plan's predicted peak for this
        device during a run, 0 otherwise (trim by the slack alone)."""
        with self._lock:
            self._budget, self._largest_growth, self._after_last_action = budget, 0, 0

    def after_action(self) -> None:
        with self._lock:
            resident = rss()
            if self._after_last_action:
                self._largest_growth = max(self._largest_growth, resident - self._after_last_action)
            self._after_last_action = resident
            if (resident + self._largest_growth > self._budget
                    and resident - self._after_last_trim > HEAP_SLACK_BYTES):
                self._trim()

    def end_step(self) -> None:
        """The step is over: the next one's growth is measured afresh."""
        with self._lock:
            self._largest_growth = 0

    def trim(self) -> None:
        """Hand the heaps' free pages back to the OS now."""
        with self._lock:
            self._trim()

    def _trim(self) -> None:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self._after_last_trim = rss()
        self._after_last_action = 0  # the next action's growth is pages handed back, not what an action adds


HEAP_ROOM_SHARE = 1.0
"""Freed memory, as a share of an agent's activations in flight, that its heap may keep beyond the slack where the
device has the room (the plan's prediction counts it): agents that never trimmed settled 0.0-1.0x their activations
above a prediction without it, and stopped faulting pages back in (benchmarks/README, "The heap's room")."""

HEAP = HeapTrimmer()
"""The process's trimmer."""
