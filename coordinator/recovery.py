"""Keep a run going when devices leave: checkpoints, re-planning on the survivors, exact replay.

Every ``checkpoint_every`` steps the coordinator collects every stage's training state (LoRA +
AdamW, by tensor name, so any later split can restore it) into one blob, writes it to
``OUT/checkpoints`` and has the owner keep a copy in its state directory. When an agent is declared
gone (a heartbeat unanswered for ``heartbeat_timeout`` seconds, or its local process ended), the
survivors drop the broken ring, the planner splits the model over them, the slices are shipped,
every stage restores the last checkpoint and the steps since are run again: the data order is a
pure function of (seed, step), so nothing is lost or applied twice. ``resume`` continues a run
whose coordinator stopped, from the newer of the local and the owner's checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load as load_tensors

from coordinator.client import AgentClient, AgentUnreachable, PairingFailed
from coordinator.training import AgentGone, RunFailed, Trainer, TrainResult, TrainSettings, log_metrics
from edge_runtime.checkpoint_store import Checkpoint, CheckpointStore
from edge_runtime.models.lora import LoraSpec
from edge_runtime.runners.base import OptimizerSpec
from edge_runtime.training_state import pack_state, unpack_state
from ringtune import control
from ringtune.plan import Plan, PlanError
from ringtune.privacy_spec import PrivacySpec

RUN_FILE = "run.json"
REJOIN_POLL_SECONDS = 1.0
STOP_REPLY_SECONDS = 35.0
"""An agent stopping a step waits up to 30 s for its current computation."""


@dataclass(frozen=True, slots=True)
class RecoverySettings:
    checkpoint_every: int = 10
    """Optimizer steps between checkpoints (at most this many steps are recomputed after a failure)."""
    rebalance: bool = False
    """At each checkpoint, take back agents that left and answer again, and re-plan over them."""
    pause_timeout: float = 3600.0
    """Seconds a paused run (owner gone, or the survivors cannot hold the model) waits for a device."""
    resume: bool = False
    """Continue the run saved in TrainSettings.out (after its coordinator crashed or was stopped)."""


def settings_to_dict(settings: TrainSettings) -> dict:
    """The run's settings for run.json; the pairing token is never written."""
    data = asdict(settings)
    data["out"] = str(settings.out)
    data.pop("token")
    return data


def settings_from_dict(data: dict, token: str, out: Path) -> TrainSettings:
    fields = {**data, "out": out, "token": token, "lora": LoraSpec.from_dict(data["lora"]),
              "privacy": PrivacySpec.from_dict(data.get("privacy")),
              "optimizer": OptimizerSpec(**{**data["optimizer"], "betas": tuple(data["optimizer"]["betas"])})}
    return TrainSettings(**fields)


def load_run(out: Path, token: str) -> tuple[TrainSettings, str]:
    """(settings, lineage id) of the run saved in out, for --resume."""
    path = out / RUN_FILE
    if not path.is_file():
        raise ValueError(f"{out} holds no ringtune run ({RUN_FILE} is missing): give the --out directory of the "
                         f"run to continue")
    data = json.loads(path.read_text())
    return settings_from_dict(data["settings"], token, out), data["lineage"]


class ResilientTrainer(Trainer):
    def __init__(self, settings: TrainSettings, clients: list[AgentClient], recovery: RecoverySettings,
                 lineage: str | None = None, find_agents: Callable[[], list[str]] | None = None, **kwargs) -> None:
        """lineage: the id of the run being resumed (names the owner's checkpoint directory).
        find_agents: the control URLs of the agents seen now (--discover); a paused run, or --rebalance at
        a checkpoint, takes in new agents among them as well as agents that left and came back."""
        if recovery.checkpoint_every < 1:
            raise ValueError("--checkpoint-every must be at least 1")
        super().__init__(settings, clients, **kwargs)
        self.recovery = recovery
        self.lineage = lineage or self.run_id
        self.store = CheckpointStore(settings.out / "checkpoints")
        self.departed: dict[str, AgentClient] = {}
        self.find_agents = find_agents
        self._opened: list[AgentClient] = []
        """Clients of agents taken in during the run (closed when it ends)."""
        self._why_gone: dict[str, str] = {}
        self._last_answer: dict[str, float] = {}
        self._metrics = None
        """metrics.jsonl while the run is on."""
        self._ship_seconds = 0.0
        """How long the last shipping of slices took (part of a recovery's time)."""

    def run(self, plan: Plan | None = None) -> TrainResult:
        s = self.settings
        s.out.mkdir(parents=True, exist_ok=True)
        checkpoint = self._resume_point() if self.recovery.resume else None
        (s.out / RUN_FILE).write_text(json.dumps({"lineage": self.lineage, "settings": settings_to_dict(s)}, indent=1))
        step, losses = self._rollback(checkpoint)
        step_seconds, tokens, failure = [], 0, None
        with (s.out / "metrics.jsonl").open("a" if self.recovery.resume else "w") as metrics:
            self._metrics = metrics
            try:
                ring = None
                while step < s.steps:
                    try:
                        if ring is None:
                            ring, plan = self._setup(plan, checkpoint), None
                            if failure is not None:
                                self._recovered(ring, failure)
                                failure = None
                        record = self._run_step(ring, step)
                        losses.append(record["loss"])
                        step_seconds.append(record["step_seconds"])
                        tokens += record["tokens"]
                        step += 1
                        log_metrics(metrics, record)
                        self.progress.step(ring, record, s.steps)
                        if step % self.recovery.checkpoint_every == 0 and step < s.steps:
                            checkpoint = self._checkpoint(ring, step, losses)
                            if self.recovery.rebalance and self._take_back():
                                ring = None
                    except AgentGone as gone:
                        failure = self._lose(gone, step, checkpoint, failure)
                        ring = None
                        step, losses = self._rollback(checkpoint)
                if ring is None:  # resumed after the last step: nothing left to train
                    ring = self._setup(plan, checkpoint)
                adapter = self._write_adapter(ring, losses)
            finally:
                self._stop_all()
                for client in self._opened:
                    client.close()
        return TrainResult(ring, losses, adapter, tokens / max(sum(step_seconds), 1e-9), step_seconds)

    # --- the ring -----------------------------------------------------------------------
    def _setup(self, plan: Plan | None, checkpoint: Checkpoint | None) -> Plan:
        """Plan over the agents present (pausing while that is impossible), assign, restore."""
        while True:
            if self.settings.owner not in self.clients:
                owner = self.settings.owner
                self._pause(f"the owner is gone ({self._why_gone.get(owner)})", [owner])
                continue
            try:
                plan = self._prepare(plan or self.make_plan())
            except PlanError as error:
                if not self.departed:
                    raise
                self._pause(f"the remaining devices cannot run the model ({error})", sorted(self.departed))
                continue
            self._assign(plan)
            if checkpoint is not None:
                self._restore(plan, checkpoint)
            return plan

    def _checkpoint(self, plan: Plan, step: int, losses: list[float]) -> Checkpoint:
        """Collect every stage's state into one blob; keep it here and on the owner."""
        started = time.perf_counter()
        tensors = {}
        for name in plan.devices():
            for blob in self._call(name, "checkpoint")["stages"].values():
                tensors.update(load_tensors(blob))
        state = pack_state(tensors, step, losses)
        self.store.save(step, state)
        digest = hashlib.sha256(state).hexdigest()
        self._guard(plan.owner, lambda: self.clients[plan.owner].upload(digest, state))
        self._call(plan.owner, "keep_checkpoint", lineage=self.lineage, step=step, sha256=digest)
        log_metrics(self._metrics, {"event": "checkpoint", "step": step, "bytes": len(state),
                                    "seconds": time.perf_counter() - started})
        return Checkpoint(step, state)

    def _restore(self, plan: Plan, checkpoint: Checkpoint) -> None:
        digest = hashlib.sha256(checkpoint.state).hexdigest()
        for name in plan.devices():
            self._guard(name, lambda: self.clients[name].upload(digest, checkpoint.state))
            self._call(name, "restore", sha256=digest)
        self.progress.event(f"restored the checkpoint of step {checkpoint.step} on {', '.join(plan.devices())}")

    def _rollback(self, checkpoint: Checkpoint | None) -> tuple[int, list[float]]:
        """The step to continue at and the losses up to it."""
        if checkpoint is None:
            return 0, []
        _, step, losses = unpack_state(checkpoint.state)
        return step, losses

    def _resume_point(self) -> Checkpoint | None:
        """The newer of this directory's checkpoint and the owner's copy."""
        local = self.store.latest()
        reply = self._call(self.settings.owner, "fetch_checkpoint", lineage=self.lineage)
        held = None if reply["step"] is None else Checkpoint(int(reply["step"]), bytes(reply["state"]))
        candidates = [c for c in (local, held) if c is not None]
        if not candidates:
            self.progress.event("no checkpoint was taken before the run stopped: starting from step 0")
            return None
        newest = max(candidates, key=lambda c: c.step)
        source = "the owner's copy" if newest is held and (local is None or held.step > local.step) else str(self.store.root)
        self.progress.event(f"resuming from the checkpoint of step {newest.step} ({source})")
        return newest

    # --- devices leaving and coming back ------------------------------------------------
    def _lose(self, gone: AgentGone, step: int, checkpoint: Checkpoint | None, earlier: dict | None) -> dict:
        """Drop the agent and stop the broken ring; what to report once training runs again."""
        detected, detected_at = time.monotonic(), time.time()
        if gone.agent in self.clients:
            self.departed[gone.agent] = self.clients.pop(gone.agent)
        self._why_gone[gone.agent] = str(gone)
        self._stop_survivors()
        stop_seconds = time.monotonic() - detected
        resume_at = checkpoint.step if checkpoint is not None else 0
        event = {"event": "failed", "agent": gone.agent, "reason": str(gone), "at_step": step + 1,
                 "time": detected_at, "silent_seconds": detected - self._last_answer.get(gone.agent, detected),
                 "stop_seconds": stop_seconds, "steps_replayed": step - resume_at, "resume_at_step": resume_at}
        log_metrics(self._metrics, event)
        self.progress.event(f"{gone.agent} is gone ({gone}); re-planning over {', '.join(sorted(self.clients))} "
                            f"and replaying from step {resume_at}")
        if earlier is not None:  # a second failure during recovery: time it from the first
            return {**earlier, "agents": earlier["agents"] + [gone.agent]}
        return {"agents": [gone.agent], "detected": detected, "steps_replayed": step - resume_at}

    def _stop_survivors(self) -> None:
        """Let every remaining agent drop the broken ring (and finish its computation) before re-planning."""
        for client in self.clients.values():
            try:
                client.call("stop", reply_timeout=STOP_REPLY_SECONDS)
            except (AgentUnreachable, control.ControlError):
                pass  # the next command finds out whether it is gone too

    def _recovered(self, plan: Plan, failure: dict) -> None:
        seconds = time.monotonic() - failure["detected"]
        log_metrics(self._metrics, {"event": "recovered", "failed": failure["agents"], "recover_seconds": seconds,
                                    "ship_seconds": self._ship_seconds,
                                    "steps_replayed": failure["steps_replayed"], "devices": plan.devices(),
                                    "time": time.time()})
        self.progress.event(f"recovered in {seconds:.1f} s without {', '.join(failure['agents'])}: "
                            f"training again on {', '.join(plan.devices())}, "
                            f"{failure['steps_replayed']} step(s) to replay")

    def _pause(self, reason: str, waiting_for: list[str]) -> None:
        """Wait until one of these departed agents answers again (then it is back in the run)."""
        timeout = self.recovery.pause_timeout
        log_metrics(self._metrics, {"event": "paused", "reason": reason, "waiting_for": waiting_for, "time": time.time()})
        awaited = ", ".join(waiting_for) + (" (or a new device found by discovery)" if self.find_agents else "")
        self.progress.event(f"paused: {reason}; waiting up to {timeout:.0f} s for {awaited} to come back")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any([self._rejoin(name) for name in waiting_for]) | self._take_in_new():
                return
            time.sleep(REJOIN_POLL_SECONDS)
        raise RunFailed(f"paused: {reason}, and {awaited} did not come back within {timeout:.0f} s. "
                        f"The last checkpoint is in {self.store.root}: restart the agents and continue with "
                        f"ringtune train --resume {self.settings.out}")

    def _take_back(self) -> bool:
        """--rebalance: re-admit departed agents that answer again, and new ones discovered; True if any."""
        return any([self._rejoin(name) for name in sorted(self.departed)]) | self._take_in_new()

    def _rejoin(self, name: str) -> bool:
        client = self.departed[name]
        if not self._admit(client, name):
            return False
        self.clients[name] = self.departed.pop(name)
        self._gone.discard(name)
        log_metrics(self._metrics, {"event": "rejoined", "agent": name, "time": time.time()})
        self.progress.event(f"{name} is back")
        return True

    def _take_in_new(self) -> bool:
        """Pair the discovered agents not in the run at their address yet; True if any joined."""
        if self.find_agents is None:
            return False
        known = {client.url for client in (*self.clients.values(), *self.departed.values())}
        joined = False
        for url in self.find_agents():
            if url in known:
                continue
            client = AgentClient(url, timeout=self.settings.heartbeat_timeout)
            if not self._admit(client, None):
                client.close()
                continue
            self._opened.append(client)
            self.departed.pop(client.name, None)  # an agent that left, back at a new address
            self._gone.discard(client.name)
            self.clients[client.name] = client
            joined = True
            log_metrics(self._metrics, {"event": "joined", "agent": client.name, "url": url, "time": time.time()})
            self.progress.event(f"{client.name} ({url}) found by discovery: taking it in")
        return joined

    def _admit(self, client: AgentClient, name: str | None) -> bool:
        """Hello and pair the departed agent name, or (name None) any agent not in the run; False if it cannot join."""
        try:
            hello = client.hello(reply_timeout=REJOIN_POLL_SECONDS)
            unwanted = hello["name"] != name if name else hello["name"] in self.clients
            if unwanted or hello["protocol"] != control.PROTOCOL_VERSION:
                return False
            client.name = hello["name"]
            client.pair(self.settings.token, self.run_id)
        except (AgentUnreachable, control.ControlError, PairingFailed):
            return False
        self.hellos[client.name] = hello
        return True

    def _ship(self, plan: Plan, shipment, exports) -> None:
        started = time.perf_counter()
        super()._ship(plan, shipment, exports)
        self._ship_seconds = time.perf_counter() - started

    def _call(self, name: str, cmd: str, **payload) -> dict:
        reply = super()._call(name, cmd, **payload)
        self._last_answer[name] = time.monotonic()
        return reply

