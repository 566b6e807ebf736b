"""One ring over the agents present: plan, ship slices, assign and connect, run steps, collect state.

Every command goes to an agent through :meth:`RingSession.call`, which records the answer in the
membership (the heartbeat) and turns an agent that does not answer, or lost its session, into
``AgentGone``. When a survivor reports an error, a heartbeat round asks every stage first, so the agent
that is really gone is blamed, not the neighbour that waited for it. The coordinator sees names,
plans, losses and timings; never data or activations.
"""
from __future__ import annotations

import hashlib
import ipaddress
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from safetensors.torch import load as load_tensors

from coordinator.client import AgentUnreachable, DeadlineMissed
from coordinator.interrupt import Interrupt
from coordinator.membership import AgentGone, Membership, RunFailed
from coordinator.link_bandwidth import agent_link_bytes_per_s
from coordinator.planning import CostTable, model_cost_table, partition
from coordinator.planning.base_dtype import choose_base_dtype
from coordinator.planning.calibration import calibrated_profile
from coordinator.planning.memory import check_fits
from coordinator.run_store import RunStore
from coordinator.settings import TrainSettings
from coordinator.slices import ModelShipment, cut_model, owner_head, tokenizer_blob_of
from coordinator.stage_exports import AgentExport, executorch_export, needs_export, runs_torch
from coordinator.timeline import stage_timings
from device_profiles.profile import DeviceProfile
from edge_runtime.backends.executorch.export import check_executorch_dtype
from edge_runtime.checkpoint_store import Checkpoint
from edge_runtime.models.registry import load_config, load_tokenizer
from edge_runtime.privacy.calibration import calibrate
from edge_runtime.training_state import pack_state
from ringtune import protocol
from ringtune.base_dtype import AUTO, BASE_DTYPES
from ringtune.plan import Plan, PlanError, even_plan, validate_plan
from ringtune.privacy_spec import PRESETS, PrivacySpec
from ringtune.progress import Progress, amount_text
from ringtune.run_shape import RunShape
from ringtune.security import new_key, wrap_key
from ringtune.wire import AUTO as WIRE_AUTO, WireSpec

# Each status poll costs an agent CPU (about 3.6% of a core at 10 ms, measured on the emulated cluster):
# a slow device's time matters more than up to 50 ms of latency at the end of a multi-second step.
POLL_SECONDS = 0.05


class RingBroken(RunFailed):
    """A stage stopped because a ring link failed while every agent still answers (the ring is rebuilt)."""


class CoordinatorStalled(RunFailed):
    """The coordinator was not running past a reply's deadline: who is gone is unknown, so the ring is rebuilt from
    the last checkpoint on the agents present (one that is really gone is found then), none declared gone."""


@dataclass(frozen=True, slots=True)
class Assigned:
    """A ring ready to step."""

    plan: Plan
    """The plan the agents loaded."""
    ship_seconds: float
    """Time spent shipping slices (part of a recovery's time)."""


class RingSession:
    def __init__(self, settings: TrainSettings, members: Membership, store: RunStore, progress: Progress,
                 interrupt: Interrupt) -> None:
        self.settings = settings
        self.interrupt = interrupt
        self.members = members
        self.store = store
        self.progress = progress
        self._calibration: dict[tuple[str, str], float] = {}  # block seconds by (agent, base dtype), for the planner
        self._links: dict[str, float] = {}  # measured link bytes/s by agent, for the planner
        self._cost_tables: dict[str, CostTable] = {}  # the model's cost table by base dtype, built when first needed
        self._scored_share: float | None = None  # the owner's data: share of positions the loss scores
        self._export: AgentExport | None = None  # the model's ExecuTorch programs, lowered or found when first needed
        self.privacy = settings.privacy  # with a preset's numbers computed at the prepared plan's cut
        self.wire = WireSpec.resolve(settings.wire, float("inf"))  # auto: decided by the links when planning
        self._config = load_config(settings.model)  # read once: every plan, calibration and check uses it
        # Fixed by the run's first plan: a re-plan after a device leaves (or a --resume) must train the same
        # base weights, so auto is decided once per run.
        self.base_dtype: str | None = None

    # --- plan -----------------------------------------------------------------------------
    def make_plan(self) -> Plan:
        s = self.settings
        devices = [s.owner] + [n for n in self.members.present() if n != s.owner]
        # ExecuTorch programs keep their frozen weights in fp32
        dtypes = BASE_DTYPES if all(runs_torch(self.members.hello(n)) for n in devices) else ("fp32",)
        requested = self.base_dtype or s.base_dtype
        if s.split == "even":
            num_layers = self._config.num_hidden_layers
            dtype = "fp32" if requested == AUTO else requested
            if dtype not in dtypes:
                check_executorch_dtype(dtype)
            why = (self._kept_dtype_reason() if self.base_dtype else f"asked for with --base-dtype {dtype}"
                   if s.base_dtype != AUTO else
                   "--split even does not size the model to the devices: fp32 unless --base-dtype says otherwise")
            return replace(even_plan(s.model, num_layers, devices, s.owner, s.schedule, s.micro_batches),
                           base_dtype=dtype, base_dtype_reason=why)
        # sequential is a comparison baseline: plan it like 1F1B, then run it one micro-batch at a time
        links = self._link_bytes_per_s(devices)
        shape = RunShape(s.micro_batch_size, s.seq_len, s.micro_batches,
                         "gpipe" if s.schedule == "gpipe" else "1f1b", s.min_owner_blocks,
                         wire=self._wire(devices, links), privacy=s.privacy)
        measured = {p.name: p for p in self._profiles(devices, links)}
        # Whether a dtype fits is a question of memory: decided before calibrating at the chosen dtype.
        dtype, why = choose_base_dtype(requested, self._table, list(measured.values()), s.owner, shape, dtypes)
        if self.base_dtype:
            why = self._kept_dtype_reason()
        table = self._table(dtype)
        seconds = self._block_seconds(devices, dtype)
        if seconds:
            self.progress.event(f"one block forward + backward ({dtype} weights): " + ", ".join(
                f"{name} {t * 1e3:.1f} ms" for name, t in seconds.items()))
        shape = replace(shape, scored_share=self._scored_share or 1.0)  # the owner told it while calibrating
        profiles = [calibrated_profile(measured[n], table, shape, seconds[n]) if n in seconds else measured[n]
                    for n in devices]
        plan = partition(table, profiles, s.owner, shape)
        left_out = sorted(set(devices) - set(plan.devices()))
        if left_out:
            self.progress.event(f"the planner leaves out {', '.join(left_out)}: the step is predicted faster without them")
        return replace(plan, schedule=s.schedule, base_dtype=dtype, base_dtype_reason=why)

    def _kept_dtype_reason(self) -> str:
        return f"kept from this run's first plan: the adapter trains on {self.base_dtype} base weights"

    def _profiles(self, names: list[str], links: dict[str, float]) -> list[DeviceProfile]:
        """The agents as their hellos describe them: the RAM their process may grow into (available now
        plus what it holds), their runtime's own memory, their matmul speed; their links as measured."""
        profiles = []
        for name in names:
            hello = self.members.hello(name)
            profiles.append(DeviceProfile(
                name, ram_bytes=min(hello.ram_bytes, hello.ram_available + hello.rss), cores=hello.threads,
                gflops=hello.gflops, link_bytes_per_s=links[name], baseline_bytes=hello.baseline_bytes,
                sources={"gflops": "measured by the agent (matmul)", "ram_bytes": "available now + the agent's RSS",
                         "baseline_bytes": "measured by the agent",
                         "link_bytes_per_s": "--link-mbit" if self.settings.link_bytes_per_s else
                         "measured: timed transfer from the coordinator"}))
        return profiles

    def _link_bytes_per_s(self, names: list[str]) -> dict[str, float]:
        """--link-mbit for every agent, or each agent's link measured once per run (coordinator.link_bandwidth)."""
        if self.settings.link_bytes_per_s:
            return {name: self.settings.link_bytes_per_s for name in names}
        todo = [n for n in names if n not in self._links]
        for name in todo:  # one at a time: each transfer has the network to itself
            self._links[name] = self._guard(name, lambda: agent_link_bytes_per_s(
                name, self.members.client(name).url, self.members.hello(name).probe_port))
        if todo:
            self.progress.event("link bandwidth: " + ", ".join(
                f"{name} {self._links[name] * 8 / 1e6:.0f} Mbit/s" for name in todo))
        return {name: self._links[name] for name in names}

    def _wire(self, names: list[str], links: dict[str, float]) -> WireSpec:
        """The run's codecs: --wire, or under auto by the slowest link between these devices. Agents on this
        machine's loopback have no link to save (a busy machine measures loopback at any speed)."""
        remote = [links[n] for n in names if not _on_loopback(self.members.client(n).url)]
        wire = WireSpec.resolve(self.settings.wire, min(remote) if len(names) > 1 and remote else float("inf"))
        if wire != self.wire:
            self.progress.event(f"wire: {wire.describe()}" + (" (auto: a link is under 1 Gbit/s)"
                                                               if self.settings.wire == WIRE_AUTO else ""))
        self.wire = wire
        return wire

    def _table(self, base_dtype: str) -> CostTable:
        """The model's cost table at a base dtype, built once (re-plans after a device leaves reuse it)."""
        s = self.settings
        if base_dtype not in self._cost_tables:
            self._cost_tables[base_dtype] = model_cost_table(s.model, s.lora, s.seq_len, s.model, base_dtype)
        return self._cost_tables[base_dtype]

    def _block_seconds(self, names: list[str], base_dtype: str) -> dict[str, float]:
        """Each agent's time for one block of the model at the run's shape and base dtype, in its own runtime,
        measured once per run and in parallel."""
        todo = [n for n in names if (n, base_dtype) not in self._calibration]
        if todo:
            self._calibrate(todo, base_dtype)
        return {n: self._calibration[n, base_dtype] for n in names}

    def _calibrate(self, names: list[str], base_dtype: str) -> None:
        """Time a block on each agent, in parallel (ExecuTorch agents through the programs they will run, sent
        first); the owner (given the tokenizer first) also reports its data's share of scored positions, once per
        run."""
        s = self.settings
        request = protocol.Calibrate(config=self._config.to_dict(), lora=s.lora,
                                     micro_batch_size=s.micro_batch_size, seq_len=s.seq_len, base_dtype=base_dtype)
        export = self._programs(names)
        requests = {}
        for name in names:
            requests[name] = request
            if needs_export(self.members.hello(name)):
                self._send(name, export.blobs)
                requests[name] = replace(requests[name], export=export.manifest.sha256)
        asks_share = self._scored_share is None and s.owner in names
        if asks_share:
            tokenizer = tokenizer_blob_of(s.model)
            self.upload(s.owner, tokenizer.sha256, tokenizer.path)
            requests[s.owner] = replace(requests[s.owner], tokenizer=tokenizer.sha256)
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            replies = dict(zip(names, pool.map(lambda n: self.call(n, requests[n]), names)))
        self._calibration.update({(n, base_dtype): reply.block_seconds for n, reply in replies.items()})
        if asks_share and replies[s.owner].scored_share is not None:
            self._scored_share = replies[s.owner].scored_share
            self.progress.event(f"the owner's data: {self._scored_share:.1%} of the positions are scored "
                                f"(the LM head and the loss run there only)")

    def prepare(self, plan: Plan) -> Plan:
        """Check the plan against the model and the agents, show it and save it in the output directory."""
        s = self.settings
        if s.base_dtype not in (AUTO, plan.base_dtype):  # a saved plan run at another dtype
            plan = replace(plan, base_dtype=s.base_dtype,
                           base_dtype_reason=f"asked for with --base-dtype {s.base_dtype} (the plan had {plan.base_dtype})")
        if self.base_dtype not in (None, plan.base_dtype):
            raise PlanError(f"this run trains on {self.base_dtype} base weights but the plan has {plan.base_dtype}: "
                            f"make the plan with --base-dtype {self.base_dtype}")
        validate_plan(plan, self._config.num_hidden_layers)
        planned_gradient = PrivacySpec.from_dict(plan.privacy).gradient  # what its step prediction assumed
        self.privacy = self._calibrated_privacy(plan)
        plan = replace(plan, privacy=self.privacy.public_dict())
        unknown = sorted(set(plan.devices()) - set(self.members.present()))
        if unknown:
            raise RunFailed(f"the plan names devices {unknown} but the agents are {sorted(self.members.present())}: "
                            f"start those agents or make a plan for these (ringtune plan --discover)")
        # Whoever made the plan (the planner, --split even, a --plan file), it must fit as it will run:
        # its schedule, its micro-batches, this run's micro-batch shape, these agents' memory.
        shape = RunShape(s.micro_batch_size, s.seq_len, plan.micro_batches, plan.schedule)
        profiles = self._profiles(plan.devices(), self._link_bytes_per_s(plan.devices()))
        memory = check_fits(self._table(plan.base_dtype), shape, plan, profiles)
        step = f"; predicted {plan.predicted['step_seconds']:.3g} s/step" if "step_seconds" in plan.predicted else ""
        if step and planned_gradient != self.privacy.gradient:  # forward-only stages cost less than training ones
            step = (f"; no step prediction: the plan was made for gradients {planned_gradient}, this run's are "
                    f"{self.privacy.gradient} (make the plan with --grad-privacy {self.privacy.gradient} for one)")
            plan = replace(plan, predicted={k: v for k, v in plan.predicted.items() if k != "step_seconds"})
        plan = replace(plan, predicted={**plan.predicted, "memory_bytes": {n: int(f.total) for n, f in memory.items()},
                                        "memory": {n: f.to_dict() for n, f in memory.items()}})
        self.progress.event("plan: " + ", ".join(f"{st.device} {st.role} [{st.layers[0]}, {st.layers[1]})"
                                                 for st in plan.stages)
                            + step + "; memory " + ", ".join(f"{p.name} {memory[p.name].total / 1e9:.2f} of "
                                                             f"{p.ram_bytes / 1e9:.1f} GB" for p in profiles))
        self.progress.event(f"base weights: {plan.base_dtype}"
                            + (f" ({plan.base_dtype_reason})" if plan.base_dtype_reason else ""))
        self.store.write_plan(plan)
        self.base_dtype = plan.base_dtype
        if s.privacy.active:
            self.progress.event("privacy: " + self.privacy.describe() + (
                "" if len(plan.stages) > 1 else " (a one-device run sends nothing, so nothing is privatized)"))
        head_blocks = plan.stages[0].num_layers
        if s.privacy.preset and len(plan.stages) > 1 and head_blocks < PRESETS[s.privacy.preset].owner_blocks:
            self.progress.event(f"privacy: warning: preset {s.privacy.preset} was measured with the owner keeping "
                                f"{PRESETS[s.privacy.preset].owner_blocks} blocks at each end; this plan keeps "
                                f"{head_blocks}, which hides less (use --split planned, which keeps the preset's "
                                f"blocks, or a model with more blocks)")
        return plan

    def _calibrated_privacy(self, plan: Plan) -> PrivacySpec:
        """The run's privacy with a preset's clip and noise computed at this plan's cut, on public text through
        the owner's head slice (edge_runtime.privacy.calibration)."""
        s = self.settings
        if s.privacy.calibrated or plan.stages[0].role != "head":
            return s.privacy
        head = owner_head(s.model, s.lora, plan, self.progress)
        return calibrate(s.privacy, head, load_tokenizer(s.model), s.seq_len)

    # --- ship, assign, connect ------------------------------------------------------------
    def assign(self, plan: Plan) -> Assigned:
        s = self.settings
        shipment = cut_model(s.model, s.lora, plan, self.progress)
        export = self._programs(plan.devices())
        started = time.perf_counter()
        self._ship(plan, shipment, export)
        ship_seconds = time.perf_counter() - started
        run_key = new_key()
        listen: dict[int, str] = {}
        for name in plan.devices():
            hello = self.members.hello(name)
            request = protocol.Assign(
                run=self.members.run_id, lineage=self.members.lineage, plan=plan, config=shipment.config,
                hidden_size=shipment.hidden_size, lora=s.lora, optimizer=s.optimizer,
                micro_batch_size=s.micro_batch_size, seq_len=s.seq_len, seed=s.seed,
                run_key=wrap_key(self.members.client(name).session_key, run_key), timeout=s.data_timeout,
                encrypt=s.encrypt, privacy=self.privacy if name == plan.owner else PrivacySpec(), wire=self.wire,
                slice=shipment.slices[name].sha256,
                export=export.manifest.sha256 if needs_export(hello) else None,
                tokenizer=shipment.tokenizer.sha256 if name == plan.owner else None)
            listen.update(self.call(name, request).listen)
        for name in plan.devices():
            dial = {i: listen[i + 1] for i in plan.stage_indices(name) if i + 1 < len(plan.stages)}
            self.call(name, protocol.Connect(dial=dial))
        with self.progress.task(f"loading stages on {', '.join(plan.devices())}", len(plan.devices()),
                                "agents") as task:
            self.wait_all(plan, lambda st: st.state == "ready", s.load_timeout, "load its stages",
                          lambda name: task.advance(1))
        return Assigned(plan, ship_seconds)

    def _programs(self, names: list[str]) -> AgentExport | None:
        """The model's ExecuTorch programs (lowered once per block structure, then cached) if one of the listed
        agents runs ExecuTorch without an export directory of its own."""
        s = self.settings
        if self._export is None and any(needs_export(self.members.hello(name)) for name in names):
            self.progress.event("ExecuTorch programs (lowered once per block structure, then cached) ...")
            started = time.perf_counter()
            self._export, lowered = executorch_export(s.model, RunShape(s.micro_batch_size, s.seq_len), s.lora,
                                                      progress=self.progress)
            self.progress.event(f"lowered the programs of block structures {lowered} in "
                                f"{time.perf_counter() - started:.0f} s" if lowered
                                else "ExecuTorch programs found in the export cache")
        return self._export

    def _ship(self, plan: Plan, shipment: ModelShipment, export: AgentExport | None) -> None:
        """Each agent gets its own slice, ExecuTorch agents the programs too (and the owner the tokenizer), unless
        cached; the agents are sent to in parallel (each over its own link), from the files."""
        own = {name: [shipment.slices[name]] + (list(export.blobs) if needs_export(self.members.hello(name)) else [])
               for name in plan.devices()}
        blobs = {name: own[name] + ([shipment.tokenizer] if name == plan.owner else []) for name in plan.devices()}
        with ThreadPoolExecutor(max_workers=len(blobs)) as pool:
            list(pool.map(lambda name: self._send(name, blobs[name]), blobs))
        sizes = ", ".join(f"{name} {amount_text(sum(blob.size for blob in own[name]), 'bytes')}"
                          + (" with ExecuTorch programs" if needs_export(self.members.hello(name)) else "") for name in own)
        self.progress.event(f"slices ready on every agent ({sizes})")

    def _send(self, name: str, blobs) -> None:
        """Upload to an agent those of ``blobs`` it does not hold (and have it keep all of them for the run)."""
        missing = set(self.call(name, protocol.Have(digests=[b.sha256 for b in blobs])).missing)
        todo = [blob for blob in blobs if blob.sha256 in missing]
        if todo:
            with self.progress.task(f"shipping to {name}", sum(blob.size for blob in todo), "bytes") as task:
                for blob in todo:
                    self.upload(name, blob.sha256, blob.path, task.advance)

    # --- steps ----------------------------------------------------------------------------
    def run_step(self, plan: Plan, step: int) -> dict:
        """Run one optimizer step on every stage; its metrics record."""
        started = time.perf_counter()
        for name in plan.devices():
            self.call(name, protocol.Step(step=step))
        results = self.wait_all(plan, lambda st: st.state == "idle" and st.step == step, None, f"finish step {step}")
        elapsed = time.perf_counter() - started
        owner = results[plan.owner].result
        return {"step": step + 1, "loss": owner.loss, "tokens": owner.tokens,
                "tokens_per_s": owner.tokens / elapsed, "step_seconds": elapsed,
                "devices": {name: {**stage_timings(st.result.stages), "bytes_sent": st.result.bytes_sent,
                                   "cpu_seconds": st.result.cpu_seconds,
                                   "page_faults": st.result.page_faults, "rss": st.rss, "peak_rss": st.peak_rss}
                            for name, st in results.items()}}

    def wait_all(self, plan: Plan, done: Callable[[protocol.StatusReply], bool], timeout: float | None,
                 what: str, finished: Callable[[str], None] = lambda name: None) -> dict[str, protocol.StatusReply]:
        """Poll every agent (the heartbeat) until all are done (finished(name) as each is); raise naming the
        first failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = set(plan.devices())
        results: dict[str, protocol.StatusReply] = {}
        while pending:
            self.members.check_alive(self.members.present())
            for name in sorted(pending):
                status = self.call(name, protocol.Status())
                if status.state == "error":
                    self._blame(plan, name, status)
                if done(status):
                    results[name] = status
                    pending.discard(name)
                    finished(name)
            if deadline is not None and time.monotonic() > deadline:
                raise RunFailed(f"agents {sorted(pending)} did not {what} within {timeout:.0f} s")
            if pending:
                self.interrupt.sleep(POLL_SECONDS)
        return results

    def _blame(self, plan: Plan, name: str, status: protocol.StatusReply) -> None:
        """A stage failed: first a heartbeat round (the agent that is really gone is blamed, AgentGone), then
        RingBroken if the failure was a ring link's, else RunFailed naming the agent."""
        for other in plan.devices():
            if other != name:
                self.call(other, protocol.Status())
        if status.ring_broken:
            raise RingBroken(f"the ring broke at {name} while every agent answers: {status.error}")
        raise RunFailed(f"agent {name} failed: {status.error}")

    # --- state ----------------------------------------------------------------------------
    def collect_checkpoint(self, plan: Plan, step: int, losses: list[float]) -> Checkpoint:
        """Every stage's training state (LoRA + AdamW) in one blob, also kept by the owner."""
        tensors = {}
        for name in plan.devices():
            for blob in self.call(name, protocol.Checkpoint()).stages.values():
                tensors.update(load_tensors(blob))
        state = pack_state(tensors, step, losses)
        digest = hashlib.sha256(state).hexdigest()
        self.upload(plan.owner, digest, state)
        self.call(plan.owner, protocol.KeepCheckpoint(lineage=self.members.lineage, step=step, sha256=digest))
        return Checkpoint(step, state)

    def restore(self, plan: Plan, checkpoint: Checkpoint) -> None:
        digest = hashlib.sha256(checkpoint.state).hexdigest()
        for name in plan.devices():
            self.upload(name, digest, checkpoint.state)
            self.call(name, protocol.Restore(sha256=digest))
        self.progress.event(f"restored the checkpoint of step {checkpoint.step} on {', '.join(plan.devices())}")

    def owners_checkpoint(self) -> Checkpoint | None:
        reply = self.call(self.settings.owner, protocol.FetchCheckpoint(lineage=self.members.lineage))
        return None if reply.step is None else Checkpoint(reply.step, reply.state)

    def adapter_tensors(self, plan: Plan) -> dict:
        """The LoRA tensors of the stages that train (all of them unless the owner withholds gradients)."""
        tensors = {}
        for name in plan.devices():
            for index, blob in self.call(name, protocol.Lora()).stages.items():
                if plan.trains(int(index)):
                    tensors.update(load_tensors(blob))
        return tensors

    def stop(self, names: list[str], timeout: float | None = None) -> None:
        """Every listed agent drops its ring; one that does not answer is left for the next command to find."""
        for name in names:
            try:
                self.members.client(name).request(protocol.Stop(), timeout)
            except (AgentUnreachable, protocol.ControlError):
                pass

    # --- calls ----------------------------------------------------------------------------
    def call(self, name: str, request: protocol.Request) -> protocol.Reply:
        """One command to an agent; an agent that does not answer (or lost its session) is AgentGone."""
        return self._guard(name, lambda: self.members.client(name).request(request))

    def upload(self, name: str, digest: str, blob: bytes | Path, on_chunk: Callable[[int], None] = lambda size: None) -> None:
        self._guard(name, lambda: self.members.client(name).upload(digest, blob, on_chunk))

    def _guard(self, name: str, action: Callable):
        self.interrupt.check()
        try:
            reply = action()
        except DeadlineMissed as error:
            raise CoordinatorStalled(str(error)) from None
        except (AgentUnreachable, protocol.SessionLost) as error:
            self.members.check_alive([name])  # a more precise reason when we know it (process exited)
            raise AgentGone(name, f"agent {name} left the run: {error}") from None
        self.members.heard(name)
        return reply


def _on_loopback(url: str) -> bool:
    """Whether an agent's control URL (tcp://HOST:PORT) is on this machine's loopback."""
    host = urlparse(url).hostname or ""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False
