"""The agent: serves the control plane, stores shipped slices, runs its stages step by step.

Public commands: hello, pair_begin, pair_finish. After pairing (sealed): have, upload, assign,
connect, step, status, lora, checkpoint, restore, keep_checkpoint, fetch_checkpoint, stop,
shutdown. Long work (building stages, running a step) happens
on worker threads; the control loop keeps answering ``status``, the coordinator's heartbeat.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pynng
import torch
from safetensors.torch import save as save_tensors

import ringtune
from device_profiles.live import matmul_gflops, usable_ram
from edge_runtime.calibration import block_seconds
from edge_runtime.checkpoint_store import CheckpointStore
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.executorch_stages import executorch_runners, export_from_cache, require_executorch
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.slices import materialize
from edge_runtime.models.tokenizer import tokenizer_from_blob
from edge_runtime.pairing import Pairing
from edge_runtime.privacy.base import NoiseStream
from edge_runtime.privacy.runner import privatize
from edge_runtime.runners.base import OptimizerSpec, StageRunner
from edge_runtime.runners.torch_runner import TorchStageRunner
from edge_runtime.slice_cache import SliceCache
from edge_runtime.training_state import unpack_state
from edge_runtime.transport.base import EdgeConfig
from edge_runtime.transport.pynng_edge import PynngEdge
from edge_runtime.worker import LocalStage, run_stages_step
from exporters.manifest import ExportManifest, RunShape as ExportShape
from ringtune import control
from ringtune.plan import Plan
from ringtune.privacy_spec import PrivacySpec
from ringtune.security import AuthError, unwrap_key

log = logging.getLogger(__name__)
POLL_MS = 250


@dataclass(frozen=True, slots=True)
class RunSettings:
    run: str
    """Run id."""
    plan: Plan
    """The whole ring; this agent runs the stages whose device is its name."""
    config: dict
    """The model's config (to build the skeleton its slice fills)."""
    hidden_size: int
    """Width of the hidden states on the ring."""
    slice: str | None
    """sha256 of this agent's slice blob in the cache (torch runtime)."""
    export: str | None
    """sha256 of the shipped ExecuTorch export manifest (executorch runtime without --export-dir)."""
    tokenizer: str | None
    """sha256 of the tokenizer blob (owner only)."""
    lora: LoraSpec
    """LoRA shape (its initial tensors are in the slice)."""
    optimizer: OptimizerSpec
    """AdamW settings."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    seq_len: int
    """Tokens per sequence."""
    seed: int
    """Data order seed."""
    run_key: bytes
    """Data-plane key of the run (arrives wrapped with the session key)."""
    timeout: float
    """Data-plane timeout in seconds."""
    encrypt: bool
    """Encrypt hidden states on the wire."""
    privacy: PrivacySpec
    """What this agent privatizes before it sends (the owner's; off elsewhere)."""

    @property
    def edge_shape(self) -> tuple[int, int, int]:
        return (self.micro_batch_size, self.seq_len, self.hidden_size)

    @staticmethod
    def from_message(msg: dict, session_key: bytes) -> "RunSettings":
        return RunSettings(run=msg["run"], plan=Plan.from_dict(msg["plan"]), config=msg["config"],
                           hidden_size=int(msg["hidden_size"]),
                           slice=msg.get("slice"), export=msg.get("export"), tokenizer=msg.get("tokenizer"),
                           lora=LoraSpec.from_dict(msg["lora"]), optimizer=OptimizerSpec(**msg["optimizer"]),
                           micro_batch_size=int(msg["micro_batch_size"]), seq_len=int(msg["seq_len"]),
                           seed=int(msg["seed"]), run_key=unwrap_key(session_key, bytes(msg["run_key"])),
                           timeout=float(msg["timeout"]), encrypt=bool(msg.get("encrypt", False)),
                           privacy=PrivacySpec.from_dict(msg.get("privacy")))


@dataclass
class ActiveRun:
    settings: RunSettings
    runners: dict[int, StageRunner] = field(default_factory=dict)
    stages: dict[int, LocalStage] = field(default_factory=dict)
    edges: list[tuple[int, str, PynngEdge]] = field(default_factory=list)
    data: OwnerData | None = None
    state: str = "loading"  # loading -> ready -> running <-> idle; error at any point
    error: str = ""
    step: int = -1
    result: dict = field(default_factory=dict)
    worker: threading.Thread | None = None


class Agent:
    def __init__(self, name: str, listen: str, token: str, state_dir: Path, data_path: str | None = None,
                 threads: int | None = None, runtime: str = "torch", export_dir: Path | None = None) -> None:
        self.name = name
        self.runtime = runtime
        self.export_dir = export_dir
        self.state_dir = state_dir
        if runtime == "executorch":
            require_executorch()
            if export_dir is not None:
                ExportManifest.read(export_dir)  # fail fast on a directory without an export
        self.records = read_records(data_path) if data_path else None  # fail fast on bad data
        if threads:
            torch.set_num_threads(threads)
        self.pairing = Pairing(token, f"{name}@{socket.gethostname()}")
        self.cache = SliceCache(state_dir / "cache")
        self.state_dir = state_dir
        self._socket = pynng.Rep0(recv_timeout=POLL_MS, send_timeout=10_000, recv_max_size=control.MAX_REQUEST_BYTES)
        self.url = self._socket.listen(listen).url
        self.host = listen.split("://", 1)[1].rsplit(":", 1)[0]
        self._gflops: float | None = None
        self._block_seconds: dict[str, float] = {}  # calibrations by (model config, LoRA, shape)
        self._run: ActiveRun | None = None
        self._lock = threading.Lock()
        self._running = True

    # --- control loop -------------------------------------------------------------------
    def serve(self) -> None:
        try:
            while self._running:
                try:
                    raw = self._socket.recv()
                except pynng.Timeout:
                    continue
                except pynng.NNGException:
                    raise
                except Exception:  # pynng fails on some messages (e.g. empty ones): answer, go on
                    raw = b""
                reply = self._handle(raw)
                try:
                    self._socket.send(reply)
                except pynng.Timeout:
                    log.error("coordinator did not take the reply")
        finally:
            self._stop_run()
            self._socket.close()

    def _handle(self, raw: bytes) -> bytes:
        """Any bytes in, a reply out: a bad request never takes the agent down."""
        try:
            request = control.unpack(raw)
        except Exception as error:
            self.pairing.refused += 1
            return control.pack({"ok": False, "error": f"malformed request: {error}"})
        if "session" in request:
            try:
                message, blob = self.pairing.open(str(request["session"]), bytes(request["sealed"]))
            except (AuthError, KeyError, TypeError, ValueError) as error:
                log.warning("refused a control message: %s", error)
                return control.pack({"ok": False, "error": f"refused: {error}", "session_lost": True})
            return control.pack({"sealed": self.pairing.channel.seal(self._dispatch(message, blob))})
        if request.get("cmd") not in control.PUBLIC_COMMANDS:
            self.pairing.refused += 1
            return control.pack({"ok": False, "error": f"{request.get('cmd')!r} needs a paired session: "
                                                       f"pair with the agent's token first"})
        return control.pack(self._dispatch(request, b""))

    def _dispatch(self, request: dict, blob: bytes) -> dict:
        handler = getattr(self, f"_cmd_{request.get('cmd')}", None)
        if handler is None:
            return {"ok": False, "error": f"unknown command {request.get('cmd')!r}"}
        try:
            return {"ok": True, **handler(request, blob)}
        except Exception as error:
            log.error("command %s failed: %s", request.get("cmd"), traceback.format_exc())
            return {"ok": False, "error": f"{type(error).__name__}: {error}" if not isinstance(error, ValueError)
                    else str(error)}

    # --- public commands ----------------------------------------------------------------
    @property
    def gflops(self) -> float:
        """Sustained matmul GFLOP/s at this agent's thread count, measured once (for the planner)."""
        if self._gflops is None:
            self._gflops = matmul_gflops(seconds=0.3)
        return self._gflops

    def _cmd_hello(self, _: dict, __: bytes) -> dict:
        ram_total, ram_available = usable_ram()  # a cgroup (container, emulated device) may cap it
        return {"name": self.name, "agent_id": self.pairing.agent_id, "version": ringtune.__version__,
                "protocol": control.PROTOCOL_VERSION, "has_data": self.records is not None, "pid": os.getpid(),
                "cores": psutil.cpu_count(), "threads": torch.get_num_threads(), "ram_bytes": ram_total,
                "ram_available": ram_available, "runtime": self.runtime, "export_dir": self.export_dir is not None,
                "gflops": self.gflops}

    def _cmd_pair_begin(self, msg: dict, _: bytes) -> dict:
        return self.pairing.begin(str(msg["run"]))

    def _cmd_pair_finish(self, msg: dict, _: bytes) -> dict:
        return self.pairing.finish(msg["agent_nonce"], msg["nonce"], msg["proof"])

    # --- paired commands ----------------------------------------------------------------
    def _cmd_have(self, msg: dict, _: bytes) -> dict:
        return {"missing": [d for d in msg["digests"] if not self.cache.has(d)]}

    def _cmd_upload(self, msg: dict, blob: bytes) -> dict:
        return {"complete": self.cache.append(msg["sha256"], int(msg["offset"]), int(msg["total"]), blob)}

    def _cmd_calibrate(self, msg: dict, _: bytes) -> dict:
        """Time a block of the coordinator's model at the run's micro-batch shape (for the planner)."""
        key = json.dumps([msg["config"], msg["lora"], msg["micro_batch_size"], msg["seq_len"]], sort_keys=True)
        if key not in self._block_seconds:
            self._block_seconds[key] = block_seconds(msg["config"], LoraSpec.from_dict(msg["lora"]),
                                                     int(msg["micro_batch_size"]), int(msg["seq_len"]))
        return {"block_seconds": self._block_seconds[key]}

    def _cmd_assign(self, msg: dict, _: bytes) -> dict:
        settings = RunSettings.from_message(msg, self.pairing.session_key)
        indices = settings.plan.stage_indices(self.name)
        if not indices:
            raise ValueError(f"the plan has no stage for {self.name!r}")
        if self.name == settings.plan.owner and self.records is None:
            raise ValueError(f"{self.name!r} is the owner but was started without --data FILE")
        missing = [d for d in filter(None, (settings.slice, settings.export, settings.tokenizer))
                   if not self.cache.has(d)]
        if missing:
            raise ValueError(f"blobs {[d[:12] for d in missing]} were not uploaded: send them before assign")
        self._stop_run()
        run = ActiveRun(settings)
        listen = {}
        for index in indices:
            if index > 0:
                edge = PynngEdge(self._edge_config(settings, index, index - 1), listen=f"tcp://{self.host}:0")
                run.edges.append((index, "prev", edge))
                listen[index] = edge.url
        self._run = run
        run.worker = threading.Thread(target=self._load, args=(run, indices), daemon=True)
        run.worker.start()
        return {"listen": listen}

    def _cmd_connect(self, msg: dict, _: bytes) -> dict:
        run = self._require_run(("loading", "ready"))
        for index, url in msg["dial"].items():
            index = int(index)
            edge = PynngEdge(self._edge_config(run.settings, index, index + 1), dial=url)
            run.edges.append((index, "next", edge))
        return {}

    def _cmd_step(self, msg: dict, _: bytes) -> dict:
        run = self._require_run(("ready", "idle"))
        step = int(msg["step"])
        with self._lock:
            run.state, run.step = "running", step
        run.worker = threading.Thread(target=self._run_step, args=(run, step), daemon=True)
        run.worker.start()
        return {}

    def _cmd_status(self, _: dict, __: bytes) -> dict:
        run = self._run
        status = {"rss": psutil.Process().memory_info().rss, "refused_control": self.pairing.refused}
        if run is None:
            return {**status, "state": "free"}
        refused: dict[str, int] = {}
        for _, _, edge in run.edges:
            for reason, count in edge.refused.items():
                refused[reason] = refused.get(reason, 0) + count
        with self._lock:
            return {**status, "state": run.state, "step": run.step, "error": run.error, "result": run.result,
                    "refused": refused}

    def _cmd_lora(self, _: dict, __: bytes) -> dict:
        run = self._require_run(("idle", "ready"))
        return {"stages": {index: save_tensors(runner.lora_state()) for index, runner in run.runners.items()}}

    def _cmd_checkpoint(self, _: dict, __: bytes) -> dict:
        """Every local stage's training state (LoRA + AdamW), at a step boundary."""
        run = self._require_run(("idle", "ready"))
        return {"stages": {index: save_tensors(runner.training_state()) for index, runner in run.runners.items()}}

    def _cmd_restore(self, msg: dict, _: bytes) -> dict:
        """Load this agent's part of an uploaded training state (whatever split it was taken under)."""
        run = self._require_run(("ready",))
        tensors, _, _ = unpack_state(self.cache.read(msg["sha256"]))
        for runner in run.runners.values():
            runner.load_training_state(tensors)
        self.cache.discard(msg["sha256"])
        return {}

    def _cmd_keep_checkpoint(self, msg: dict, _: bytes) -> dict:
        """Store an uploaded training state durably (the owner's copy of every stage's state)."""
        self._checkpoints(msg["lineage"]).save(int(msg["step"]), self.cache.read(msg["sha256"]))
        self.cache.discard(msg["sha256"])
        return {}

    def _cmd_fetch_checkpoint(self, msg: dict, _: bytes) -> dict:
        checkpoint = self._checkpoints(msg["lineage"]).latest()
        return {"step": None} if checkpoint is None else {"step": checkpoint.step, "state": checkpoint.state}

    def _cmd_stop(self, _: dict, __: bytes) -> dict:
        self._stop_run()
        return {}

    def _cmd_shutdown(self, _: dict, __: bytes) -> dict:
        self._running = False
        return {}

    # --- work on threads ----------------------------------------------------------------
    def _load(self, run: ActiveRun, indices: list[int]) -> None:
        try:
            s = run.settings
            noise = NoiseStream(s.privacy.seed)  # the owner's: no seed given means one from the CSPRNG
            run.runners = {i: privatize(runner, s.privacy, noise) for i, runner in self._runners(s, indices).items()}
            if self.name == s.plan.owner:
                tokenizer = tokenizer_from_blob(self.cache.read(s.tokenizer))
                run.data = OwnerData(self.records, tokenizer, s.micro_batch_size, s.seq_len,
                                     s.plan.micro_batches, s.seed)
            with self._lock:
                if run.state == "loading":
                    run.state = "ready"
        except Exception as error:
            self._fail(run, error)

    def _run_step(self, run: ActiveRun, step: int) -> None:
        try:
            if not run.stages:  # connect may arrive before loading ends: pair runners and edges now
                edges = {(index, side): edge for index, side, edge in run.edges}
                run.stages = {i: LocalStage(i, r, edges.get((i, "prev")), edges.get((i, "next")))
                              for i, r in run.runners.items()}
            batch = run.data.step_batch(step) if run.data is not None else None
            for _, _, edge in run.edges:
                edge.begin_step(step)
            plan = run.settings.plan
            results = run_stages_step(list(run.stages.values()), step, batch, plan.schedule, len(plan.stages),
                                      plan.micro_batches, [edge for _, _, edge in run.edges])
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

    def _fail(self, run: ActiveRun, error: BaseException) -> None:
        log.error("run %s failed: %s", run.settings.run, traceback.format_exc())
        with self._lock:
            run.state, run.error = "error", f"{self.name}: {error}"

    # --- helpers ------------------------------------------------------------------------
    def _runners(self, s: RunSettings, indices: list[int]) -> dict[int, StageRunner]:
        if self.runtime == "torch":
            built = materialize(self.cache.path(s.slice), s.config, s.lora, {i: s.plan.stages[i] for i in indices})
            return {i: TorchStageRunner(module, lora, s.optimizer) for i, (module, lora) in built.items()}
        if self.export_dir is None and s.export is None:
            raise ValueError(f"{self.name} runs ExecuTorch but the coordinator sent no export: upgrade ringtune "
                             f"on the coordinator or start the agent with --export-dir DIR")
        export_dir = self.export_dir or export_from_cache(self.cache, s.export, self.state_dir / "exports")
        return executorch_runners(export_dir, s.plan, indices, ExportShape(s.micro_batch_size, s.seq_len),
                                  s.lora, s.optimizer)

    def _edge_config(self, settings: RunSettings, stage: int, peer: int) -> EdgeConfig:
        return EdgeConfig.for_link(settings.run, settings.run_key, stage, peer, settings.edge_shape,
                                   settings.timeout, settings.encrypt)

    def _checkpoints(self, lineage: str) -> CheckpointStore:
        if not re.fullmatch(r"[0-9a-f]{16}", str(lineage)):
            raise ValueError(f"{lineage!r} is not a run lineage id (16 hex digits)")
        return CheckpointStore(self.state_dir / "checkpoints" / lineage)

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
            edge.close()  # also ends a send blocked on a neighbour that is gone
        if run.worker is not None:
            run.worker.join(timeout=30)
