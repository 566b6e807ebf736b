"""The agent: serves the control plane, loads its stages, runs their schedules step by step.

Commands (see ``ringtune.control``): hello, assign, connect, step, status, lora, stop, shutdown.
Long work (loading a model, running a step) happens on worker threads; the control loop keeps
answering ``status``, which is the coordinator's heartbeat.
"""
from __future__ import annotations

import logging
import os
import threading
import traceback
from dataclasses import dataclass, field

import psutil
import pynng
import torch
from safetensors.torch import save as save_tensors

import ringtune
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from edge_runtime.models.stage import build_stage
from edge_runtime.runners.base import OptimizerSpec
from edge_runtime.runners.torch_runner import TorchStageRunner
from edge_runtime.schedules import schedule_for
from edge_runtime.transport.base import EdgeConfig
from edge_runtime.transport.pynng_edge import PynngEdge
from edge_runtime.worker import LocalStage, run_stage_step
from ringtune import control
from ringtune.plan import Plan

log = logging.getLogger(__name__)
POLL_MS = 250


@dataclass(frozen=True, slots=True)
class RunSettings:
    run: str
    """Run id."""
    plan: Plan
    """The whole ring; this agent runs the stages whose device is its name."""
    lora: LoraSpec
    """LoRA shape and initialisation."""
    optimizer: OptimizerSpec
    """AdamW settings."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    seq_len: int
    """Tokens per sequence."""
    seed: int
    """Data order seed."""
    key: bytes
    """Session key for data-plane MACs."""
    timeout: float
    """Data-plane timeout in seconds."""

    @staticmethod
    def from_message(msg: dict) -> "RunSettings":
        return RunSettings(run=msg["run"], plan=Plan.from_dict(msg["plan"]), lora=LoraSpec.from_dict(msg["lora"]),
                           optimizer=OptimizerSpec(**msg["optimizer"]), micro_batch_size=int(msg["micro_batch_size"]),
                           seq_len=int(msg["seq_len"]), seed=int(msg["seed"]), key=bytes(msg["key"]),
                           timeout=float(msg["timeout"]))


@dataclass
class ActiveRun:
    settings: RunSettings
    runners: dict = field(default_factory=dict)
    stages: dict[int, LocalStage] = field(default_factory=dict)
    edges: list = field(default_factory=list)
    data: OwnerData | None = None
    state: str = "loading"  # loading -> ready -> running <-> idle; error at any point
    error: str = ""
    step: int = -1
    result: dict = field(default_factory=dict)
    worker: threading.Thread | None = None


class Agent:
    def __init__(self, name: str, listen: str, data_path: str | None = None, threads: int | None = None) -> None:
        self.name = name
        self.data_path = data_path
        self.records = read_records(data_path) if data_path else None  # fail fast on bad data
        if threads:
            torch.set_num_threads(threads)
        self._socket = pynng.Rep0(recv_timeout=POLL_MS, send_timeout=10_000, recv_max_size=control.MAX_REQUEST_BYTES)
        self.url = self._socket.listen(listen).url
        self.host = listen.split("://", 1)[1].rsplit(":", 1)[0]
        self._run: ActiveRun | None = None
        self._lock = threading.Lock()
        self._running = True

    # --- control loop -------------------------------------------------------------------
    def serve(self) -> None:
        while self._running:
            try:
                raw = self._socket.recv()
            except pynng.Timeout:
                continue
            try:
                request = control.unpack(raw)
                reply = self._dispatch(request)
            except Exception as error:  # a bad request must never take the agent down
                log.error("command failed: %s", traceback.format_exc())
                reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            try:
                self._socket.send(control.pack(reply))
            except pynng.Timeout:
                log.error("coordinator did not take the reply")
        self._stop_run()
        self._socket.close()

    def _dispatch(self, request: dict) -> dict:
        handler = getattr(self, f"_cmd_{request.get('cmd')}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown command {request.get('cmd')!r}"}
        return {"ok": True, **handler(request)}

    # --- commands -----------------------------------------------------------------------
    def _cmd_hello(self, _: dict) -> dict:
        memory = psutil.virtual_memory()
        return {"name": self.name, "version": ringtune.__version__, "protocol": control.PROTOCOL_VERSION,
                "has_data": self.records is not None, "pid": os.getpid(), "cores": psutil.cpu_count(),
                "threads": torch.get_num_threads(), "ram_bytes": memory.total, "ram_available": memory.available}

    def _cmd_assign(self, msg: dict) -> dict:
        settings = RunSettings.from_message(msg)
        indices = settings.plan.stage_indices(self.name)
        if not indices:
            raise ValueError(f"the plan has no stage for {self.name!r}")
        if self.name == settings.plan.owner and self.records is None:
            raise ValueError(f"{self.name!r} is the owner but was started without --data FILE")
        self._stop_run()
        run = ActiveRun(settings)
        hidden = load_config(settings.plan.model).hidden_size
        shape = (settings.micro_batch_size, settings.seq_len, hidden)
        listen = {}
        for index in indices:
            if index > 0:
                edge = PynngEdge(self._edge_config(settings, shape, f"stage {index - 1}"),
                                 listen=f"tcp://{self.host}:0")
                run.edges.append((index, "prev", edge))
                listen[index] = edge.url
        self._run = run
        run.worker = threading.Thread(target=self._load, args=(run, indices, shape), daemon=True)
        run.worker.start()
        return {"listen": listen}

    def _cmd_connect(self, msg: dict) -> dict:
        run = self._require_run(("loading", "ready"))
        for index, url in msg["dial"].items():
            config = self._edge_config(run.settings, None, f"stage {int(index) + 1}")
            run.edges.append((int(index), "next", PynngEdge(config, dial=url)))
        return {}

    def _cmd_step(self, msg: dict) -> dict:
        run = self._require_run(("ready", "idle"))
        step = int(msg["step"])
        with self._lock:
            run.state, run.step = "running", step
        run.worker = threading.Thread(target=self._run_step, args=(run, step), daemon=True)
        run.worker.start()
        return {}

    def _cmd_status(self, _: dict) -> dict:
        run = self._run
        rss = psutil.Process().memory_info().rss
        if run is None:
            return {"state": "free", "rss": rss}
        refused = {}
        for _, _, edge in run.edges:
            for reason, count in edge.refused.items():
                refused[reason] = refused.get(reason, 0) + count
        with self._lock:
            return {"state": run.state, "step": run.step, "error": run.error, "result": run.result,
                    "rss": rss, "refused": refused}

    def _cmd_lora(self, _: dict) -> dict:
        run = self._require_run(("idle", "ready"))
        return {"stages": {index: save_tensors(runner.lora_state()) for index, runner in run.runners.items()}}

    def _cmd_stop(self, _: dict) -> dict:
        self._stop_run()
        return {}

    def _cmd_shutdown(self, _: dict) -> dict:
        self._running = False
        return {}

    # --- work on threads ----------------------------------------------------------------
    def _load(self, run: ActiveRun, indices: list[int], shape: tuple[int, ...]) -> None:
        try:
            settings = run.settings
            peft_model = apply_lora(load_model(settings.plan.model), settings.lora)
            runners = {}
            for index in indices:
                spec = settings.plan.stages[index]
                module, lora = build_stage(peft_model, spec.layers, spec.role)
                runners[index] = TorchStageRunner(module, lora, settings.optimizer)
            del peft_model
            if self.name == settings.plan.owner:
                tokenizer = load_tokenizer(settings.plan.model)
                run.data = OwnerData(self.records, tokenizer, settings.micro_batch_size, settings.seq_len,
                                     settings.plan.micro_batches, settings.seed)
            run.runners = runners
            with self._lock:
                if run.state == "loading":
                    run.state = "ready"
        except Exception as error:
            self._fail(run, error)

    def _wire(self, run: ActiveRun) -> None:
        """Pair runners with their edges once both exist (connect may arrive before loading ends)."""
        if run.stages:
            return
        edges = {(index, side): edge for index, side, edge in run.edges}
        for index, runner in run.runners.items():
            run.stages[index] = LocalStage(index, runner, edges.get((index, "prev")), edges.get((index, "next")))

    def _run_step(self, run: ActiveRun, step: int) -> None:
        try:
            self._wire(run)
            batch = run.data.step_batch(step) if run.data is not None else None
            for _, _, edge in run.edges:
                edge.begin_step(step)
            results: dict[int, object] = {}
            threads = [threading.Thread(target=self._run_stage, args=(run, stage, step, batch, results), daemon=True)
                       for stage in run.stages.values()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            errors = [r for r in results.values() if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
            losses = [r.loss for r in results.values() if r.loss is not None]
            result = {"loss": losses[0] if losses else None,
                      "tokens": batch.tokens if batch is not None else 0,
                      "compute_seconds": {i: r.compute_seconds for i, r in results.items()},
                      "wall_seconds": {i: r.wall_seconds for i, r in results.items()},
                      "bytes_sent": sum(edge.bytes_sent for _, _, edge in run.edges)}
            with self._lock:
                run.result, run.state = result, "idle"
        except Exception as error:
            self._fail(run, error)

    def _run_stage(self, run: ActiveRun, stage: LocalStage, step: int, batch, results: dict) -> None:
        plan = run.settings.plan
        actions = schedule_for(plan.schedule, len(plan.stages), stage.index, plan.micro_batches)
        try:
            results[stage.index] = run_stage_step(stage, step, actions, batch)
        except Exception as error:
            results[stage.index] = error
            for _, _, edge in run.edges:  # unblock this agent's other stage thread
                edge.abort()

    def _fail(self, run: ActiveRun, error: BaseException) -> None:
        log.error("run %s failed: %s", run.settings.run, traceback.format_exc())
        with self._lock:
            run.state, run.error = "error", f"{self.name}: {error}"

    # --- helpers ------------------------------------------------------------------------
    def _edge_config(self, settings: RunSettings, shape, peer: str) -> EdgeConfig:
        if shape is None:
            hidden = load_config(settings.plan.model).hidden_size
            shape = (settings.micro_batch_size, settings.seq_len, hidden)
        return EdgeConfig(run=settings.run, key=settings.key, shape=shape, timeout=settings.timeout, peer=peer)

    def _require_run(self, states: tuple[str, ...]) -> ActiveRun:
        run = self._run
        if run is None:
            raise ValueError("no run is assigned to this agent")
        if run.state == "error":
            raise ValueError(run.error)
        if run.state not in states:
            raise ValueError(f"agent is {run.state}, expected {' or '.join(states)}")
        return run

    def _stop_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        for _, _, edge in run.edges:
            edge.abort()
        if run.worker is not None:
            run.worker.join(timeout=30)
        for _, _, edge in run.edges:
            edge.close()

