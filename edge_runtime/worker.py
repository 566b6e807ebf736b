"""Run one stage through one optimizer step: follow its schedule, move frames, step the optimizer."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from edge_runtime.data.dataset import StepBatch
from edge_runtime.memory import HEAP, rss
from edge_runtime.backends.base import StageRunner
from edge_runtime.schedules import Action, forward_only, schedule_for
from edge_runtime.transport.base import Edge
from ringtune.protocol import Span, StageTiming

log = logging.getLogger(__name__)


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
    timing: StageTiming
    """Where the stage's step went."""


def run_stage_step(stage: LocalStage, step: int, actions: list[Action], batch: StepBatch | None,
                   started: float) -> StageStepStats:
    """batch is the owner's data for this step (needed by the head, tail and full stages); started is the
    agent's step start (perf_counter), the zero of every stage's spans so the owner's two lanes share a clock."""
    runner = stage.runner
    runner.begin_step(step)
    loss, compute, wait, send = 0.0, 0.0, 0.0, 0.0
    spans = []
    for action in actions:
        mb = action.microbatch
        waiting = time.perf_counter()
        if action.kind == "F":
            inputs = batch.input_ids[mb] if stage.prev is None else stage.prev.recv("activation", step, mb)
            labels = batch.labels[mb] if stage.next is None else None
            tokens = batch.scored_tokens if stage.next is None else None
            computing = time.perf_counter()
            output = runner.forward(mb, inputs, labels, tokens)
            sending = time.perf_counter()
            if stage.next is None:
                loss += float(output)
            else:
                stage.next.send("activation", step, mb, output)
        else:
            grad = None if stage.next is None else stage.next.recv("gradient", step, mb)
            computing = time.perf_counter()
            grad_input = runner.backward(mb, grad)
            sending = time.perf_counter()
            if stage.prev is not None and grad_input is not None:  # None: the owner's tail withholds it
                stage.prev.send("gradient", step, mb, grad_input)
        sent = time.perf_counter()
        wait, compute, send = wait + computing - waiting, compute + sending - computing, send + sent - sending
        spans.append(Span(action.kind, mb, computing - started, sending - started))
        HEAP.after_action()
        if log.isEnabledFor(logging.DEBUG):  # memory per micro-batch in flight (ringtune -v agent ...)
            log.debug("step %d stage %d after %s%d: RSS %.1f MB", step, stage.index, action.kind, mb, rss() / 1e6)
    t0 = time.perf_counter()
    runner.step()
    compute += time.perf_counter() - t0
    timing = StageTiming(compute, wait, send, time.perf_counter() - started, tuple(spans))
    return StageStepStats(loss if stage.next is None else None, timing)


def run_stages_step(stages: list[LocalStage], step: int, batch: StepBatch | None, schedule: str, num_stages: int,
                    micro_batches: int, edges: list[Edge]) -> dict[int, StageStepStats]:
    """One step of several stages held by one process, each in its own thread (they exchange frames with
    each other). A failing stage aborts ``edges`` so the others stop waiting; its error is raised."""
    results: dict[int, StageStepStats | BaseException] = {}
    started = time.perf_counter()

    def work(stage: LocalStage) -> None:
        actions = schedule_for(schedule, num_stages, stage.index, micro_batches)
        actions = actions if stage.runner.trains else forward_only(actions)
        try:
            results[stage.index] = run_stage_step(stage, step, actions, batch, started)
        except BaseException as error:
            results[stage.index] = error
            for edge in edges:
                edge.abort()

    threads = [threading.Thread(target=work, args=(stage,), daemon=True) for stage in stages]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [r for r in results.values() if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results
