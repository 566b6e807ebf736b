"""Run one stage through one optimizer step: follow its schedule, move frames, step the optimizer."""
from __future__ import annotations

import time
from dataclasses import dataclass

from edge_runtime.data.dataset import StepBatch
from edge_runtime.runners.base import StageRunner
from edge_runtime.schedules import Action
from edge_runtime.transport.base import Edge


@dataclass(frozen=True, slots=True)
class LocalStage:
    index: int
    """Position in the ring (0 = owner's head)."""
    runner: StageRunner
    """Computes forward/backward of this stage's slice."""
    prev: Edge | None
    """Edge to the previous stage (None on the head/full stage)."""
    next: Edge | None
    """Edge to the next stage (None on the tail/full stage)."""


@dataclass(frozen=True, slots=True)
class StageStepStats:
    loss: float | None
    """Step loss (tail/full stage only)."""
    compute_seconds: float
    """Time spent in forward/backward/optimizer, excluding waits for frames."""
    wall_seconds: float
    """Time from the first action to the optimizer step."""


def run_stage_step(stage: LocalStage, step: int, actions: list[Action], batch: StepBatch | None) -> StageStepStats:
    """batch is the owner's data for this step (needed by the head, tail and full stages)."""
    runner = stage.runner
    loss, compute = 0.0, 0.0
    started = time.perf_counter()
    for action in actions:
        mb = action.microbatch
        if action.kind == "F":
            inputs = batch.input_ids[mb] if stage.prev is None else stage.prev.recv("activation", step, mb)
            labels = batch.labels[mb] if stage.next is None else None
            tokens = batch.scored_tokens if stage.next is None else None
            t0 = time.perf_counter()
            output = runner.forward(mb, inputs, labels, tokens)
            compute += time.perf_counter() - t0
            if stage.next is None:
                loss += float(output)
            else:
                stage.next.send("activation", step, mb, output)
        else:
            grad = None if stage.next is None else stage.next.recv("gradient", step, mb)
            t0 = time.perf_counter()
            grad_input = runner.backward(mb, grad)
            compute += time.perf_counter() - t0
            if stage.prev is not None:
                stage.prev.send("gradient", step, mb, grad_input)
    t0 = time.perf_counter()
    runner.step()
    compute += time.perf_counter() - t0
    return StageStepStats(loss if stage.next is None else None, compute, time.perf_counter() - started)
