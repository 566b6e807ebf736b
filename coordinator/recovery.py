"""Keep a run going when devices leave: the run loop and its recovery policy.

Every ``checkpoint_every`` steps the coordinator collects every stage's training state (LoRA +
AdamW, by tensor name, so any later split can restore it) into one blob, writes it to
``OUT/checkpoints`` and has the owner keep a copy in its state directory. When an agent is declared
gone (a heartbeat unanswered for ``heartbeat_timeout`` seconds, or its local process ended), the
survivors drop the broken ring, the planner splits the model over them, the slices are shipped,
every stage restores the last checkpoint and the steps since are run again: the data order is a
pure function of (seed, step), and privacy noise of (seed, step, micro-batch, stage), so nothing is
lost, applied twice or drawn differently. A ring link that failed while every agent answers is
rebuilt on the same agents the same way, and so is a ring whose coordinator did not run past a reply's
deadline (Ctrl-Z, a paused VM: nobody is declared gone for it). ``resume`` continues a run whose coordinator stopped, from
the newer of the local and the owner's checkpoint.

The policy: the owner gone, or survivors that cannot hold the model, pause the run until a departed
agent answers again (or, with discovery, an admissible new one appears); with ``rebalance``, agents
that answer again (and new ones, with discovery) are taken back at each checkpoint. Nothing else
ever takes an agent in.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.interrupt import Interrupt
from coordinator.membership import AgentGone, Membership, RunFailed
from coordinator.run_store import RunStore
from coordinator.session import CoordinatorStalled, RingBroken, RingSession
from coordinator.settings import RecoverySettings, TrainSettings
from edge_runtime.checkpoint_store import Checkpoint
from edge_runtime.training_state import unpack_state
from ringtune.plan import Plan, PlanError
from ringtune.progress import Progress

REJOIN_POLL_SECONDS = 1.0
STOP_AT_END_SECONDS = 1.0
"""How long the end of a run (or Ctrl-C) waits for each agent to drop its ring."""
RING_RETRIES = 3
"""Ring failures in a row (every agent answering), or stalls of the coordinator, before the run gives up."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    plan: Plan
    """The plan that ran last."""
    losses: list[float]
    """Loss per step."""
    adapter_dir: Path
    """Where the adapter was written."""
    tokens_per_second: float
    """Mean training throughput over the run (non-pad tokens)."""
    step_seconds: list[float]
    """Wall time per step, as seen by the coordinator."""


@dataclass
class _Failure:
    """A recovery in progress (from the first failure until training runs again)."""

    agents: list[str]
    """Who left (or "ring" for a broken link)."""
    detected: float
    """When the first failure was seen (monotonic)."""
    steps_replayed: int
    """Steps since the checkpoint that must run again."""


class ResilientTrainer:
    def __init__(self, settings: TrainSettings, recovery: RecoverySettings, members: Membership, store: RunStore,
                 progress: Progress, find_agents: Callable[[], list[str]] | None = None,
                 interrupt: Interrupt | None = None) -> None:
        """find_agents: the control URLs of the agents seen now (--discover): a paused run, or --rebalance at a
        checkpoint, may take in new agents among them (the membership decides which may join). interrupt: where
        Ctrl-C is seen (the run stops at the next command with KeyboardInterrupt)."""
        if recovery.checkpoint_every < 1:
            raise ValueError("--checkpoint-every must be at least 1")
        self.settings = settings
        self.recovery = recovery
        self.members = members
        self.store = store
        self.progress = progress
        self.find_agents = find_agents
        self.interrupt = interrupt or Interrupt()
        self.session = RingSession(settings, members, store, progress, self.interrupt)

    def run(self, plan: Plan | None = None) -> TrainResult:
        s = self.settings
        checkpoint = self._resume_point() if self.recovery.resume else None
        last_plan = self.store.read_plan() if checkpoint is not None else None
        if last_plan is not None:  # the checkpoint's adapter was trained on that plan's base weights
            self.session.base_dtype = last_plan.base_dtype
        self.store.start(self.members.lineage, s, self.recovery.resume)
        step, losses = _rollback(checkpoint)
        step_seconds, tokens, failure, ring_failures = [], 0, None, 0
        ring = None
        try:
            while step < s.steps:
                try:
                    if ring is None:
                        ring, plan = self._setup(plan, checkpoint, failure), None
                        failure = None
                    record = self.session.run_step(ring, step)
                    losses.append(record["loss"])
                    step_seconds.append(record["step_seconds"])
                    tokens += record["tokens"]
                    step += 1
                    ring_failures = 0
                    self.store.log(record)
                    self.progress.step(ring, record, s.steps)
                    if step % self.recovery.checkpoint_every == 0 and step < s.steps:
                        checkpoint = self._checkpoint(ring, step, losses)
                        if self.recovery.rebalance and self._take_back():
                            ring = None
                except (AgentGone, RingBroken, CoordinatorStalled) as error:
                    ring_failures = 0 if isinstance(error, AgentGone) else ring_failures + 1
                    if ring_failures > RING_RETRIES:
                        check = ("keep the coordinator running" if isinstance(error, CoordinatorStalled)
                                 else "check the network between the devices")
                        raise RunFailed(f"{error} ({RING_RETRIES} times in a row: {check})") from None
                    if isinstance(error, CoordinatorStalled):
                        self._stalled(error, step, checkpoint)
                    else:
                        failure = self._lose(error, step, checkpoint, failure)
                    ring = None
                    step, losses = _rollback(checkpoint)
            if ring is None:  # resumed after the last step: nothing left to train
                ring = self._setup(plan, checkpoint, None)
            adapter = self.store.write_adapter(s, ring, self.session.adapter_tensors(ring), losses)
        finally:
            self.session.stop(self.members.present(), timeout=STOP_AT_END_SECONDS)
            self.store.close()
        return TrainResult(ring, losses, adapter, tokens / max(sum(step_seconds), 1e-9), step_seconds)

    # --- the ring -----------------------------------------------------------------------
    def _setup(self, plan: Plan | None, checkpoint: Checkpoint | None, failure: _Failure | None) -> Plan:
        """Plan over the agents present (pausing while that is impossible), assign, restore."""
        while True:
            owner = self.settings.owner
            if owner not in self.members.present():
                self._pause(f"the owner is gone ({self.members.why_gone(owner)})", [owner])
                continue
            try:
                plan = self.session.prepare(plan or self.session.make_plan())
            except PlanError as error:
                if not self.members.departed():
                    raise
                self._pause(f"the remaining devices cannot run the model ({error})", self.members.departed())
                continue
            assigned = self.session.assign(plan)
            if checkpoint is not None:
                self.session.restore(plan, checkpoint)
            if failure is not None:
                self._recovered(assigned.plan, failure, assigned.ship_seconds)
            return plan

    def _checkpoint(self, plan: Plan, step: int, losses: list[float]) -> Checkpoint:
        started = time.perf_counter()
        checkpoint = self.session.collect_checkpoint(plan, step, losses)
        self.store.checkpoints.save(step, checkpoint.state)
        self.store.log({"event": "checkpoint", "step": step, "bytes": len(checkpoint.state),
                        "seconds": time.perf_counter() - started})
        return checkpoint

    def _resume_point(self) -> Checkpoint | None:
        """The newer of this directory's checkpoint and the owner's copy."""
        local = self.store.checkpoints.latest()
        held = self.session.owners_checkpoint()
        candidates = [c for c in (local, held) if c is not None]
        if not candidates:
            self.progress.event("no checkpoint was taken before the run stopped: starting from step 0")
            return None
        newest = max(candidates, key=lambda c: c.step)
        source = ("the owner's copy" if newest is held and (local is None or held.step > local.step)
                  else str(self.store.checkpoints.root))
        self.progress.event(f"resuming from the checkpoint of step {newest.step} ({source})")
        return newest

    # --- devices leaving and coming back ------------------------------------------------
    def _lose(self, error: AgentGone | RingBroken, step: int, checkpoint: Checkpoint | None,
              earlier: _Failure | None) -> _Failure:
        """Drop the agent (if one left) and stop the broken ring; what to report once training runs again."""
        detected, detected_at = time.monotonic(), time.time()
        agent = error.agent if isinstance(error, AgentGone) else "ring"
        if isinstance(error, AgentGone):
            self.members.leave(agent, str(error))
        self.session.stop(self.members.present())
        resume_at = checkpoint.step if checkpoint is not None else 0
        self.store.log({"event": "failed", "agent": agent, "reason": str(error), "at_step": step + 1,
                        "time": detected_at, "silent_seconds": self.members.silent_seconds(agent, detected),
                        "stop_seconds": time.monotonic() - detected, "steps_replayed": step - resume_at,
                        "resume_at_step": resume_at})
        what = f"{agent} is gone ({error})" if agent != "ring" else str(error)
        self.progress.event(f"{what}; re-planning over {', '.join(sorted(self.members.present()))} "
                            f"and replaying from step {resume_at}")
        if earlier is not None:  # a second failure during recovery: time it from the first
            earlier.agents.append(agent)
            return earlier
        return _Failure([agent], detected, step - resume_at)

    def _stalled(self, error: CoordinatorStalled, step: int, checkpoint: Checkpoint | None) -> None:
        """The coordinator itself stopped past a deadline: stop the ring and rebuild it from the checkpoint, on the
        agents present (one that is really gone is found while the ring is set up again)."""
        self.session.stop(self.members.present())
        resume_at = checkpoint.step if checkpoint is not None else 0
        self.store.log({"event": "stalled", "reason": str(error), "at_step": step + 1, "resume_at_step": resume_at,
                        "time": time.time()})
        self.progress.event(f"{error}; rebuilding the ring from step {resume_at}")

    def _recovered(self, plan: Plan, failure: _Failure, ship_seconds: float) -> None:
        seconds = time.monotonic() - failure.detected
        self.store.log({"event": "recovered", "failed": failure.agents, "recover_seconds": seconds,
                        "ship_seconds": ship_seconds, "steps_replayed": failure.steps_replayed,
                        "devices": plan.devices(), "time": time.time()})
        self.progress.event(f"recovered in {seconds:.1f} s without {', '.join(failure.agents)}: "
                            f"training again on {', '.join(plan.devices())}, "
                            f"{failure.steps_replayed} step(s) to replay")

    def _pause(self, reason: str, waiting_for: list[str]) -> None:
        """Wait until one of these departed agents answers again (then it is back in the run)."""
        timeout = self.recovery.pause_timeout
        self.store.log({"event": "paused", "reason": reason, "waiting_for": waiting_for, "time": time.time()})
        awaited = ", ".join(waiting_for) + (" (or a new device found by discovery)" if self.find_agents else "")
        self.progress.event(f"paused: {reason}; waiting up to {timeout:.0f} s for {awaited} to come back")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any([self._rejoin(name) for name in waiting_for]) | self._take_in_new():
                return
            self.interrupt.sleep(REJOIN_POLL_SECONDS)
        raise RunFailed(f"paused: {reason}, and {awaited} did not come back within {timeout:.0f} s. "
                        f"The last checkpoint is in {self.store.checkpoints.root}: restart the agents and continue "
                        f"with ringtune train --resume {self.settings.out}")

    def _take_back(self) -> bool:
        """--rebalance: re-admit departed agents that answer again, and new ones discovered; True if any."""
        return any([self._rejoin(name) for name in self.members.departed()]) | self._take_in_new()

    def _rejoin(self, name: str) -> bool:
        if not self.members.rejoin(name):
            return False
        self.store.log({"event": "rejoined", "agent": name, "time": time.time()})
        self.progress.event(f"{name} is back")
        return True

    def _take_in_new(self) -> bool:
        """Pair the admissible discovered agents that are not in the run; True if any joined."""
        if self.find_agents is None:
            return False
        joined = self.members.take_in(self.find_agents())
        for name in joined:
            url = self.members.client(name).url
            self.store.log({"event": "joined", "agent": name, "url": url, "time": time.time()})
            self.progress.event(f"{name} ({url}) found by discovery: taking it in")
        return bool(joined)


def _rollback(checkpoint: Checkpoint | None) -> tuple[int, list[float]]:
    """The step to continue at and the losses up to it."""
    if checkpoint is None:
        return 0, []
    _, step, losses = unpack_state(checkpoint.state)
    return step, losses
