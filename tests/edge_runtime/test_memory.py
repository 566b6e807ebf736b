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
kept = []
for action in sys.argv[2].split():  # each action keeps this many MiB more (its own pages); "|" ends a step
    if action == "|":
        trimmer.end_step()
        continue
    kept.append(mmap.mmap(-1, int(action) * (1 << 20) + 1))
    for offset in range(0, len(kept[-1]), mmap.PAGESIZE):
        kept[-1][offset] = 1
    trimmer.after_action()
print(held + sum(map(len, kept)) - rss())  # what a trim gave back, if one came
"""
MiB = 1 << 20


@pytest.mark.parametrize("headroom_mib, actions_mib, trims", [
    ("none", "0", True),  # no budget (no run): trimmed past the slack
    ("512", "0", False),  # well within the plan's prediction: the freed pages stay for the next micro-batch
    ("150", "96", True),  # within it, but one more action like the last would pass it
    ("300", "96", False),
    ("200", "96 16", True),  # 112 MiB held, and an action of this step grew by 96
    ("200", "96 | 16", False),  # the same in the next step: a step's growth is measured afresh (the first one reads
    # the weights in, and is no guide to the next)
])
def test_the_heap_is_trimmed_only_when_the_next_action_could_pass_the_budget(headroom_mib, actions_mib, trims):
    """Freed pages within the plan's prediction are reused without faulting in again; a trim comes once RSS plus the
    largest growth one action has shown in this step would pass it."""
    probe = subprocess.run([sys.executable, "-c", TRIM_PROBE, headroom_mib, actions_mib],
                           capture_output=True, text=True, check=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    released = int(probe.stdout)
    if trims:
        assert released > 100 * MiB  # of the 256 MiB freed: glibc gives some back by itself, before the trim
    else:
        assert abs(released) < 16 * MiB
