"""Step time of a ring by simulating its schedule, for plans the partitioner's closed form does not cover.

The partitioner prices a one-lap ring as sum of stage times + (M - 1) x the busiest device. A ring of several
laps (``coordinator.planning.laps``) gives a device several stages, which fill each other's bubbles; no closed
form covers that, so its step is simulated as agents run it: one thread per stage follows its schedule
(``edge_runtime.schedules``), a forward waits for the previous stage's activation and a backward for the next
stage's gradient (each one link time later), and a device's runnable stages share its CPU equally (processor
sharing). Pure and exact for that model: events are completions and arrivals, no time steps.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.schedules import Action, schedule_for

INF = float("inf")


@dataclass(frozen=True, slots=True)
class SimStage:
    """One stage of the ring, as the simulation needs it."""

    device: str
    """The device whose CPU the stage shares with its other stages."""
    forward_seconds: float
    """One micro-batch's forward, alone on the device."""
    backward_seconds: float
    """One micro-batch's backward, alone on the device."""
    link_seconds: float
    """Its activation to the next stage, and that stage's gradient back (each way; 0 on the tail)."""


def simulate_step(stages: list[SimStage], schedule: str, micro_batches: int) -> float:
    """Seconds from the step's start until every stage has run its schedule."""
    actions = [schedule_for(schedule, len(stages), index, micro_batches) for index in range(len(stages))]
    position = [0] * len(stages)
    remaining = [_work(stages[i], a[0]) if a else 0.0 for i, a in enumerate(actions)]
    finished: dict[tuple[str, int, int], float] = {}  # (kind, stage, micro-batch) -> time
    now = 0.0
    while any(p < len(a) for p, a in zip(position, actions)):
        arrivals = [_arrival(stages, actions, position, finished, i) for i in range(len(stages))]
        runnable = [i for i, t in enumerate(arrivals) if t <= now]
        sharing = {stages[i].device: 0 for i in runnable}
        for i in runnable:
            sharing[stages[i].device] += 1
        completions = [now + remaining[i] * sharing[stages[i].device] for i in runnable]
        later = [t for t in arrivals if now < t < INF]
        step_to = min(completions + later)
        assert step_to < INF, "the schedule deadlocked"  # every stage waits on another: a schedule bug
        for i in runnable:
            remaining[i] -= (step_to - now) / sharing[stages[i].device]
        now = step_to
        for i in runnable:
            if remaining[i] <= 1e-12 * max(1.0, now):
                action = actions[i][position[i]]
                finished[action.kind, i, action.microbatch] = now
                position[i] += 1
                remaining[i] = _work(stages[i], actions[i][position[i]]) if position[i] < len(actions[i]) else 0.0
    return now


def _work(stage: SimStage, action: Action) -> float:
    return stage.forward_seconds if action.kind == "F" else stage.backward_seconds


def _arrival(stages: list[SimStage], actions: list[list[Action]], position: list[int],
             finished: dict[tuple[str, int, int], float], index: int) -> float:
    """When stage index's next action can start (INF: not yet known, or none left)."""
    if position[index] >= len(actions[index]):
        return INF
    action = actions[index][position[index]]
    last = len(stages) - 1
    if action.kind == "F":
        if index == 0:
            return 0.0
        return finished.get(("F", index - 1, action.microbatch), INF) + stages[index - 1].link_seconds
    if index == last:
        return finished.get(("F", index, action.microbatch), INF)
    return finished.get(("B", index + 1, action.microbatch), INF) + stages[index].link_seconds
