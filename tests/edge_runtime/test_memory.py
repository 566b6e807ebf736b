"""The agent's collector settings: what a run loaded is frozen for its steps and collectable again after it."""
import gc
import weakref

from edge_runtime.memory import freeze_long_lived, thaw


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
