"""Pipeline schedules as data: the ordered (forward|backward, micro-batch) actions of one stage.

Every stage runs its own list; the lists of neighbouring stages are consistent (a stage only
waits for frames its neighbour sends earlier in its own list), so the ring cannot deadlock.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ringtune.plan import SCHEDULES

Kind = Literal["F", "B"]


@dataclass(frozen=True, slots=True, order=True)
class Action:
    kind: Kind
    """F: forward of the micro-batch; B: its backward."""
    microbatch: int
    """Index of the micro-batch within the optimizer step."""


def gpipe(num_stages: int, stage: int, micro_batches: int) -> list[Action]:
    """All forwards, then all backwards (activations of all M micro-batches in flight)."""
    _check(num_stages, stage, micro_batches)
    return ([Action("F", m) for m in range(micro_batches)]
            + [Action("B", m) for m in range(micro_batches)])


def one_f_one_b(num_stages: int, stage: int, micro_batches: int) -> list[Action]:
    """1F1B: warm up with S - s - 1 forwards, alternate one forward and one backward, drain.

    Stage s keeps at most S - s micro-batches of activations in flight.
    """
    _check(num_stages, stage, micro_batches)
    warmup = min(num_stages - stage - 1, micro_batches)
    actions = [Action("F", m) for m in range(warmup)]
    for m in range(micro_batches - warmup):
        actions.append(Action("F", warmup + m))
        actions.append(Action("B", m))
    actions.extend(Action("B", m) for m in range(micro_batches - warmup, micro_batches))
    return actions


def sequential(num_stages: int, stage: int, micro_batches: int) -> list[Action]:
    """One micro-batch in flight in the whole ring (plain split learning), for comparison."""
    _check(num_stages, stage, micro_batches)
    actions: list[Action] = []
    for m in range(micro_batches):
        actions += [Action("F", m), Action("B", m)]
    return actions


_BUILDERS = {"1f1b": one_f_one_b, "gpipe": gpipe, "sequential": sequential}
assert tuple(_BUILDERS) == SCHEDULES, "every schedule a plan names has its builder"


def schedule_for(name: str, num_stages: int, stage: int, micro_batches: int) -> list[Action]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown schedule {name!r}: use one of {', '.join(SCHEDULES)}")
    return _BUILDERS[name](num_stages, stage, micro_batches)


def forward_only(actions: list[Action]) -> list[Action]:
    """A schedule's forwards, in order: what a stage that does not train runs (no gradient comes back to it, so
    it waits for none and keeps nothing)."""
    return [action for action in actions if action.kind == "F"]


def max_in_flight(actions: list[Action]) -> int:
    """Largest number of micro-batches forwarded but not yet backpropagated."""
    live = peak = 0
    for action in actions:
        live += 1 if action.kind == "F" else -1
        peak = max(peak, live)
    return peak


def _check(num_stages: int, stage: int, micro_batches: int) -> None:
    if micro_batches < 1:
        raise ValueError(f"micro-batches must be >= 1, got {micro_batches}")
    assert 0 <= stage < num_stages, (stage, num_stages)
