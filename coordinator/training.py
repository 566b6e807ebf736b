"""Drive a synchronous pipelined run: assign stages, wire the ring, step, collect the adapter.

The coordinator sees names, plans, losses and timings; never data or activations.
"""
from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from safetensors.torch import load as load_tensors

from coordinator.client import AgentClient, AgentUnreachable
from coordinator.planning import RunShape, model_cost_table, partition
from coordinator.planning.calibration import calibrated_profile
from coordinator.progress import PlainProgress, Progress
from coordinator.slices import ModelShipment, cut_model, peft_model_for_run
from coordinator.stage_exports import AgentExport, agent_exports, needs_export, runs_torch
from device_profiles.profile import DeviceProfile
from edge_runtime.models.lora import LoraSpec, write_adapter
from edge_runtime.models.registry import load_config, load_tokenizer
from edge_runtime.privacy.calibration import calibrate
from edge_runtime.runners.base import OptimizerSpec
from exporters.manifest import RunShape as ExportShape
from ringtune import control
from ringtune.plan import Plan, even_plan, validate_plan
from ringtune.privacy_spec import PrivacySpec
from ringtune.security import new_key, wrap_key

# Each status poll costs an agent CPU (about 3.6% of a core at 10 ms, measured on the emulated cluster):
# a slow device's time matters more than up to 50 ms of latency at the end of a multi-second step.
POLL_SECONDS = 0.05
# A device builds one block of the model and times it before planning; a Pi may take a while.
CALIBRATION_TIMEOUT = 120.0


class RunFailed(RuntimeError):
    """The run stopped; the message names the agent and what happened."""


class AgentGone(RunFailed):
    """An agent stopped answering, lost its session (restarted) or its process ended (the run can go on
    without it)."""

    def __init__(self, agent: str, message: str) -> None:
        super().__init__(message)
        self.agent = agent


@dataclass(frozen=True, slots=True)
class TrainSettings:
    model: str
    """Model name or local path."""
    owner: str
    """Name of the agent that holds the data."""
    steps: int
    """Optimizer steps."""
    micro_batches: int
    """Micro-batches per step."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    seq_len: int
    """Tokens per sequence."""
    out: Path
    """Directory for the adapter, plan and metrics."""
    schedule: str = "1f1b"
    """Pipeline schedule: 1f1b, gpipe or sequential."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA shape and initialisation."""
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    """AdamW settings."""
    seed: int = 0
    """Data order seed."""
    data_timeout: float = 120.0
    """Seconds an agent waits for a neighbour's frame."""
    heartbeat_timeout: float = 5.0
    """Seconds without an answer before an agent is declared gone."""
    load_timeout: float = 900.0
    """Seconds agents may take to load their stages."""
    token: str = ""
    """Pairing token the agents were started with."""
    encrypt: bool = False
    """Encrypt hidden states and gradients on the wire (not only authenticate them)."""
    split: str = "planned"
    """planned: the exact partitioner over the agents' profiles; even: blocks split evenly."""
    link_bytes_per_s: float = 125e6
    """Assumed link bandwidth of every agent, for the planner."""
    min_owner_blocks: int = 1
    """Blocks the owner keeps at each end (planned split)."""
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    """What the owner privatizes before hidden states and gradients leave it."""


@dataclass(frozen=True, slots=True)
class TrainResult:
    plan: Plan
    """The plan that ran."""
    losses: list[float]
    """Loss per step."""
    adapter_dir: Path
    """Where the adapter was written."""
    tokens_per_second: float
    """Mean training throughput over the run (non-pad tokens)."""
    step_seconds: list[float]
    """Wall time per step, as seen by the coordinator."""


class Trainer:
    """The steps of a run against paired agents: plan, assign and wire the ring, run a step, collect the
    adapter. coordinator.recovery.ResilientTrainer drives them (checkpoints, failures, resume)."""

    def __init__(self, settings: TrainSettings, clients: list[AgentClient],
                 progress: Progress | None = None,
                 check_alive: Callable[[Iterable[str]], None] = lambda names: None) -> None:
        """check_alive(names) raises AgentGone when it knows one of these agents is gone (e.g. a local
        process exited)."""
        self.settings = settings
        self.privacy = settings.privacy  # with a preset's numbers computed at each plan's cut (_prepare)
        self.progress = progress or PlainProgress()
        self.check_alive = check_alive
        self.run_id = secrets.token_hex(8)
        self._gone: set[str] = set()
        self._calibration: dict[str, float] = {}  # block seconds by agent, for the planner
        self._cost_table = None  # the model's cost table, built at the first plan
        self.clients = self._by_name(clients)

    def _by_name(self, clients: list[AgentClient]) -> dict[str, AgentClient]:
        named: dict[str, AgentClient] = {}
        self.hellos: dict[str, dict] = {}
        for client in clients:
            hello = client.call("hello", reply_timeout=max(self.settings.heartbeat_timeout, 10.0))
            if hello["protocol"] != control.PROTOCOL_VERSION:
                raise RunFailed(f"agent {hello['name']} speaks protocol {hello['protocol']}; upgrade ringtune on it")
            if hello["name"] in named:
                raise RunFailed(f"two agents are named {hello['name']!r} ({named[hello['name']].url}, {client.url}); "
                                f"give each a unique --name")
            client.name = hello["name"]
            client.pair(self.settings.token, self.run_id)
            named[client.name] = client
            self.hellos[client.name] = hello
        if self.settings.owner not in named:
            raise RunFailed(f"the owner {self.settings.owner!r} is not among the agents {sorted(named)}")
        return named

    def make_plan(self) -> Plan:
        s = self.settings
        devices = [s.owner] + [n for n in self.clients if n != s.owner]
        if s.split == "even":
            num_layers = load_config(s.model).num_hidden_layers
            return even_plan(s.model, num_layers, devices, s.owner, s.schedule, s.micro_batches)
        # sequential is a comparison baseline: plan it like 1F1B, then run it one micro-batch at a time
        shape = RunShape(s.micro_batch_size, s.seq_len, s.micro_batches,
                         "gpipe" if s.schedule == "gpipe" else "1f1b", s.min_owner_blocks)
        if self._cost_table is None:  # re-plans after a device leaves reuse it
            self._cost_table = model_cost_table(s.model, s.lora, s.seq_len, s.model)
        table = self._cost_table
        seconds = self._block_seconds(devices)
        if seconds:
            self.progress.event("one block forward + backward: " + ", ".join(
                f"{name} {t * 1e3:.1f} ms" for name, t in seconds.items()))
        profiles = []
        for name in devices:
            measured = DeviceProfile(name, ram_bytes=self.hellos[name]["ram_available"], cores=self.hellos[name]["threads"],
                                     gflops=self.hellos[name]["gflops"], link_bytes_per_s=s.link_bytes_per_s,
                                     sources={"gflops": "measured by the agent (matmul)", "ram_bytes": "available now"})
            profiles.append(calibrated_profile(measured, table, shape, seconds[name]) if name in seconds else measured)
        plan = partition(table, profiles, s.owner, shape)
        left_out = sorted(set(devices) - set(plan.devices()))
        if left_out:
            self.progress.event(f"the planner leaves out {', '.join(left_out)}: the step is predicted faster without them")
        return replace(plan, schedule=s.schedule)

    def _block_seconds(self, names: list[str]) -> dict[str, float]:
        """Each torch agent's time for one block of the model at the run's shape, measured once per run
        and in parallel (ExecuTorch agents keep their matmul speed: their runtime is not eager torch)."""
        s = self.settings
        todo = [n for n in names if n not in self._calibration and runs_torch(self.hellos[n])]
        request = {"config": load_config(s.model).to_dict(), "lora": s.lora.to_dict(),
                   "micro_batch_size": s.micro_batch_size, "seq_len": s.seq_len}
        timeout = max(s.heartbeat_timeout, CALIBRATION_TIMEOUT)
        with ThreadPoolExecutor(max_workers=max(len(todo), 1)) as pool:
            replies = pool.map(lambda n: self._guard(n, lambda: self.clients[n].call(
                "calibrate", reply_timeout=timeout, **request)), todo)
            self._calibration.update({n: reply["block_seconds"] for n, reply in zip(todo, replies)})
        return {n: self._calibration[n] for n in names if n in self._calibration}

    def _prepare(self, plan: Plan) -> Plan:
        """Check the plan against the model and the agents, show it and save it in the output directory."""
        s = self.settings
        self.privacy = self._calibrated_privacy(plan)
        plan = replace(plan, privacy=self.privacy.public_dict())
        validate_plan(plan, load_config(s.model).num_hidden_layers)
        unknown = sorted(set(plan.devices()) - set(self.clients))
        if unknown:
            raise RunFailed(f"the plan names devices {unknown} but the agents are {sorted(self.clients)}: "
                            f"start those agents or make a plan for these (ringtune plan --discover)")
        self.progress.event("plan: " + ", ".join(f"{st.device} {st.role} [{st.layers[0]}, {st.layers[1]})" for st in plan.stages)
                    + (f"; predicted {plan.predicted['step_seconds']:.3g} s/step" if plan.predicted else ""))
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / "plan.json").write_text(plan.to_json())
        if s.privacy.active:
            self.progress.event("privacy: " + self.privacy.describe() + (
                "" if len(plan.stages) > 1 else " (a one-device run sends nothing, so nothing is privatized)"))
        return plan

    def _calibrated_privacy(self, plan: Plan) -> PrivacySpec:
        """The run's privacy with a preset's clip and noise computed at this plan's cut (on public text)."""
        s = self.settings
        head = plan.stages[0]
        if s.privacy.calibrated or head.role != "head":
            return s.privacy
        return calibrate(s.privacy, peft_model_for_run(s.model, s.lora), load_tokenizer(s.model),
                         head.layers[1] - head.layers[0], s.seq_len)

    def _assign(self, plan: Plan) -> None:
        s = self.settings
        shipment = cut_model(s.model, s.lora, plan)
        exports = self._exports(plan)
        self._ship(plan, shipment, exports)
        run_key = new_key()
        common = {"run": self.run_id, "plan": plan.to_dict(), "config": shipment.config,
                  "hidden_size": shipment.hidden_size,
                  "lora": s.lora.to_dict(), "optimizer": asdict(s.optimizer), "micro_batch_size": s.micro_batch_size,
                  "seq_len": s.seq_len, "seed": s.seed, "timeout": s.data_timeout, "encrypt": s.encrypt}
        listen: dict[int, str] = {}
        for name in plan.devices():
            client = self.clients[name]
            reply = self._call(name, "assign", **common,
                               slice=shipment.slices[name].sha256 if runs_torch(self.hellos[name]) else None,
                               export=exports[name].manifest.sha256 if name in exports else None,
                               tokenizer=shipment.tokenizer.sha256 if name == plan.owner else None,
                               privacy=self.privacy.to_dict() if name == plan.owner else None,
                               run_key=wrap_key(client.session_key, run_key))
            listen.update({int(i): url for i, url in reply["listen"].items()})
        for name in plan.devices():
            dial = {i: listen[i + 1] for i in plan.stage_indices(name) if i + 1 < len(plan.stages)}
            self._call(name, "connect", dial=dial)
        self.progress.event(f"loading stages on {', '.join(plan.devices())} ...")
        self._wait_all(plan, lambda st: st["state"] == "ready", s.load_timeout, "load its stages")

    def _exports(self, plan: Plan) -> dict[str, AgentExport]:
        """ExecuTorch programs for the agents that run them (exported once per stage, then cached)."""
        s = self.settings
        names = [name for name in plan.devices() if needs_export(self.hellos[name])]
        if not names:
            return {}
        self.progress.event(f"ExecuTorch stages for {', '.join(names)} (exported once, then cached) ...")
        started = time.perf_counter()
        exports, exported = agent_exports(s.model, plan, names, ExportShape(s.micro_batch_size, s.seq_len), s.lora)
        self.progress.event(f"exported stages {exported} in {time.perf_counter() - started:.0f} s" if exported
                            else "ExecuTorch stages found in the export cache")
        return exports

    def _ship(self, plan: Plan, shipment: ModelShipment, exports: dict[str, AgentExport]) -> None:
        """Each agent gets only its own slice or programs (and the owner the tokenizer), unless cached."""
        sizes = []
        for name in plan.devices():
            own = ([exports[name].manifest, *exports[name].files] if name in exports
                   else [shipment.slices[name]] if runs_torch(self.hellos[name]) else [])
            blobs = own + ([shipment.tokenizer] if name == plan.owner else [])
            for blob in blobs:
                self._guard(name, lambda: self.clients[name].upload(blob.sha256, blob.path))
            sizes.append(f"{name} {sum(blob.size for blob in own) / 1e6:.0f} MB"
                         + ("" if runs_torch(self.hellos[name]) else " of ExecuTorch programs"))
        sizes = ", ".join(sizes)
        self.progress.event(f"slices ready on every agent ({sizes})")

    def _run_step(self, plan: Plan, step: int) -> dict:
        """Run one optimizer step on every stage; its metrics record."""
        started = time.perf_counter()
        for name in plan.devices():
            self._call(name, "step", step=step)
        results = self._wait_all(plan, lambda st: st["state"] == "idle" and st["step"] == step,
                                 None, f"finish step {step}")
        elapsed = time.perf_counter() - started
        owner = results[plan.owner]["result"]
        return {"step": step + 1, "loss": owner["loss"], "tokens": owner["tokens"],
                "tokens_per_s": owner["tokens"] / elapsed, "step_seconds": elapsed,
                "devices": {name: {"compute_seconds": st["result"]["compute_seconds"],
                                   "bytes_sent": st["result"]["bytes_sent"], "rss": st["rss"]}
                            for name, st in results.items()}}

    def _wait_all(self, plan: Plan, done: Callable[[dict], bool], timeout: float | None, what: str) -> dict[str, dict]:
        """Poll every agent (the heartbeat) until all are done; raise RunFailed naming the first failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = set(plan.devices())
        results: dict[str, dict] = {}
        while pending:
            for name in sorted(pending):
                self.check_alive(self.clients)
                status = self._status(name)
                if status["state"] == "error":
                    raise RunFailed(f"agent {name} failed: {status['error']}")
                if done(status):
                    results[name] = status
                    pending.discard(name)
            if deadline is not None and time.monotonic() > deadline:
                raise RunFailed(f"agents {sorted(pending)} did not {what} within {timeout:.0f} s")
            if pending:
                time.sleep(POLL_SECONDS)
        return results

    def _status(self, name: str) -> dict:
        return self._call(name, "status", reply_timeout=self.settings.heartbeat_timeout)

    def _call(self, name: str, cmd: str, **payload) -> dict:
        return self._guard(name, lambda: self.clients[name].call(cmd, **payload))

    def _guard(self, name: str, action: Callable[[], dict]):
        """Run a control action; an agent that does not answer ends the run with its name."""
        try:
            return action()
        except (AgentUnreachable, control.SessionLost) as error:
            self._gone.add(name)
            self.check_alive([name])  # a more precise reason when we know it (process exited)
            raise AgentGone(name, f"agent {name} left the run: {error}") from None

    def _write_adapter(self, plan: Plan, losses: list[float]) -> Path:
        s = self.settings
        tensors = {}
        for name in plan.devices():
            for blob in self._call(name, "lora")["stages"].values():
                tensors.update(load_tensors(blob))
        metadata = {"plan": plan.to_dict(), "losses": losses, "steps": s.steps,
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}}
        return write_adapter(s.out, s.lora, s.model, tensors, metadata)

    def _stop_all(self) -> None:
        for name, client in self.clients.items():
            if name in self._gone:
                continue
            try:
                client.call("stop", reply_timeout=1.0)
            except (AgentUnreachable, control.ControlError):
                pass  # an agent that is gone has nothing left to stop


def step_records(out: Path) -> list[dict]:
    """The per-step lines of a run's metrics.jsonl (events such as checkpoints and recoveries left out)."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "event" not in line]


def log_metrics(metrics, record: dict) -> None:
    """One line of metrics.jsonl (a step, or an event such as a recovery), flushed at once."""
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
