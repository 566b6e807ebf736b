"""The agent's collector and heap: what a run loaded is frozen for its steps and collectable again after it; the heap
is trimmed only above the plan's budget."""
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from edge_runtime.memory import freeze_long_lived, thaw

ROOT = Path(__file__).resolve().parents[2]


class Node:
    """An object that can sit in a reference cycle (and be watched through a weak reference)."""


def test_a_run_s_objects_are_frozen_for_its_steps_and_collectable_again_at_the_next_load():
    try:
        loaded = Node()
        loaded.self = loaded  # a cycle alive at load time (as modules and their hooks can be)
        watched = weakref.ref(loaded)
        freeze_long_lived()
        assert gc.get_freeze_count() > 0
        made_by_a_step = Node()
        made_by_a_step.self = made_by_a_step
        step_object = weakref.ref(made_by_a_step)
        del loaded, made_by_a_step
        gc.collect()  # the collection after a step: it frees what the step made, not what the run loaded
        assert step_object() is None and watched() is not None
        thaw()  # the next run loads
        gc.collect()
        assert watched() is None and gc.get_freeze_count() == 0
    finally:
        thaw()


TRIM_PROBE = """import mmap
import sys
from edge_runtime.memory import HeapTrimmer, configure_allocator, rss
configure_allocator()
trimmer = HeapTrimmer()
chunks, pins = [], []
for _ in range(256):  # 256 MiB of touched heap pages, each chunk with a live block above it: freed, they stay
    chunks.append(b"x" * (1 << 20))
    pins.append(b"y" * 1024)
del chunks
held = rss()
trimmer.set_budget(held + int(sys.argv[1]) * (1 << 20) if sys.argv[1] != "none" else 0)
trimmer.after_action()  # an action that left RSS where it was
kept = mmap.mmap(-1, int(sys.argv[2]) * (1 << 20) + 1)  # the next action keeps this many MiB more (its own pages)
for offset in range(0, len(kept), mmap.PAGESIZE):
    kept[offset] = 1
trimmer.after_action()
print(held + len(kept) - rss())  # what a trim gave back, if one came
"""
MiB = 1 << 20


@pytest.mark.parametrize("headroom_mib, next_action_mib, trims", [
    ("none", 0, True),  # no budget (no run): trimmed past the slack
    ("512", 0, False),  # well within the plan's prediction: the freed pages stay for the next micro-batch
    ("150", 96, True),  # within it, but one more action like the last would pass it
    ("300", 96, False),
])
def test_the_heap_is_trimmed_only_when_the_next_action_could_pass_the_budget(headroom_mib, next_action_mib, trims):
    """Freed pages within the plan's prediction are reused without faulting in again; a trim comes once RSS plus the
    largest growth one action has shown would pass it."""
    probe = subprocess.run([sys.executable, "-c", TRIM_PROBE, headroom_mib, str(next_action_mib)],
                           capture_output=True, text=True, check=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    released = int(probe.stdout)
    if trims:
        assert released > 100 * MiB  # of the 256 MiB freed: glibc gives some back by itself, before the trim
    else:
        assert abs(released) < 16 * MiB
