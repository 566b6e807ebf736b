"""The agent: serves the control plane, stores shipped slices, runs its stages step by step.

The commands are the typed messages of ``ringtune.protocol`` (public: hello, pair_begin,
pair_finish; the rest sealed). Long work (building stages, running a step, joining a stopped
run's worker) happens on worker threads; the control loop keeps answering ``status``, the
coordinator's heartbeat. Only calibrate (about a second, before any run) computes in the loop.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import traceback
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pynng
import torch
from safetensors.torch import save as save_tensors

import ringtune
from device_profiles.live import matmul_gflops, usable_ram
from edge_runtime.backends.base import StageRunner
from edge_runtime.backends.executorch.load import executorch_runners, export_from_cache, require_executorch
from edge_runtime.backends.torch.load import torch_runners
from edge_runtime.calibration import block_seconds, runtime_baseline
from edge_runtime.checkpoint_store import CheckpointStore, write_atomic
from edge_runtime.data.dataset import OwnerData, read_records, scored_share
from edge_runtime.memory import (HEAP, freeze_long_lived, minor_faults, process_memory, release_free_memory,
                                 rss, settle_after_step, thaw)
from edge_runtime.models.tokenizer import tokenizer_from_blob
from edge_runtime.pairing import Pairing
from edge_runtime.privacy.base import NoiseStream
from edge_runtime.privacy.runner import ring_runner
from edge_runtime.slice_cache import SliceCache
from edge_runtime.training_state import unpack_state
from edge_runtime.transport.base import EdgeClosed, EdgeConfig, EdgeTimeout
from edge_runtime.transport.link_probe import ProbeSink
from edge_runtime.transport.pynng_edge import PynngEdge
from edge_runtime.worker import LocalStage, run_stages_step
from ringtune import control, protocol
from ringtune.base_dtype import check_base_dtype
from ringtune.manifest import ExportManifest
from ringtune.protocol import ProtocolError
from ringtune.run_shape import RunShape
from ringtune.security import AuthError, unwrap_key

log = logging.getLogger(__name__)
POLL_MS = 250
BUSY_SECONDS = 60.0
"""An agent with a run says it is busy while that run's coordinator was heard from this recently."""


@dataclass
class ActiveRun:
    settings: protocol.Assign
    run_key: bytes
    """The run's data-plane key, unwrapped."""
    runners: dict[int, StageRunner] = field(default_factory=dict)
    stages: dict[int, LocalStage] = field(default_factory=dict)
    edges: list[tuple[int, str, PynngEdge]] = field(default_factory=list)
    data: OwnerData | None = None
    state: str = "loading"  # loading -> ready -> running <-> idle; error at any point
    error: str = ""
    ring_broken: bool = False
    step: int = -1
    result: protocol.StepResult | None = None
    worker: threading.Thread | None = None


class Agent:
    def __init__(self, name: str, listen: str, token: str, state_dir: Path, data_path: str | None = None,
                 threads: int | None = None, runtime: str = "torch", export_dir: Path | None = None,
                 on_busy: Callable[[str | None], None] = lambda lineage: None,
                 max_memory: int | None = None) -> None:
        """on_busy(lineage) is called (from the control loop) when what ``busy`` says changes. max_memory:
        bytes this agent's process may use for a run, its runtime included (default: what the machine,
        or its cgroup, has)."""
        self.name = name
        self.on_busy = on_busy
        self.max_memory = max_memory
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
        self._socket = pynng.Rep0(recv_timeout=POLL_MS, send_timeout=10_000, recv_max_size=protocol.MAX_REQUEST_BYTES)
        self.url = self._socket.listen(listen).url
        self.host = listen.split("://", 1)[1].rsplit(":", 1)[0]
        self.probe = ProbeSink(f"tcp://{self.host}:0")  # the coordinator times a transfer to it before planning
        self._gflops: float | None = None
        self._baseline: int | None = None
        self._block_seconds: dict[str, float] = {}  # calibrations by (model config, LoRA, shape)
        self._run: ActiveRun | None = None
        self._retired: threading.Thread | None = None  # the worker of the last stopped run, maybe still ending
        self._last_sealed = 0.0  # when the paired coordinator was last heard from (monotonic)
        self._announced: str | None = None  # what on_busy was last told
        self._lock = threading.Lock()
        self._running = True

    # --- control loop -------------------------------------------------------------------
    def serve(self) -> None:
        try:
            while self._running:
                try:
                    message = self._socket.recv_msg()
                    raw, peer = message.bytes, _peer_host(message)
                except pynng.Timeout:
                    self._announce()
                    continue
                except pynng.NNGException:
                    raise
                except Exception:  # pynng fails on some messages (e.g. empty ones): answer, go on
                    raw, peer = b"", ""
                reply = self._handle(raw, peer)
                try:
                    self._socket.send(reply)
                except pynng.Timeout:
                    log.error("coordinator did not take the reply")
                self._announce()
        finally:
            self._stop_run()
            self._socket.close()
            self.probe.close()

    def _handle(self, raw: bytes, peer: str = "") -> bytes:
        """Any bytes in, a reply out: a bad request never takes the agent down."""
        try:
            request = control.unpack(raw)
        except Exception as error:
            self.pairing.refused += 1
            return control.pack(protocol.error_reply(f"malformed request: {error}"))
        if "session" in request:
            try:
                message, blob = self.pairing.open(str(request["session"]), bytes(request["sealed"]))
            except (AuthError, KeyError, TypeError, ValueError) as error:
                log.warning("refused a control message: %s", error)
                return control.pack(protocol.error_reply(f"refused: {error}", session_lost=True))
            self._last_sealed = time.monotonic()
            return control.pack({"sealed": self.pairing.channel.seal(self._dispatch(message, blob, peer))})
        cmd = request.get("cmd")
        if not isinstance(cmd, str) or cmd not in protocol.PUBLIC_COMMANDS:
            self.pairing.refused += 1
            return control.pack(protocol.error_reply(f"{cmd!r} needs a paired session: "
                                                     f"pair with the agent's token first"))
        return control.pack(self._dispatch(request, b"", peer))

    def _dispatch(self, fields: dict, blob: bytes, peer: str) -> dict:
        try:
            request = protocol.decode_request(fields, blob)
        except ProtocolError as error:
            self.pairing.refused += 1
            return protocol.error_reply(f"malformed request: {error}")
        try:
            handler = getattr(self, f"_cmd_{request.CMD}")
            reply = handler(request, peer) if request.PUBLIC else handler(request)
            return protocol.encode_reply(reply)
        except ValueError as error:  # a request this agent refuses: the text says why
            log.warning("refused %s: %s", request.CMD, error)
            return protocol.error_reply(str(error))
        except Exception as error:
            log.error("command %s failed: %s", request.CMD, traceback.format_exc())
            return protocol.error_reply(f"{type(error).__name__}: {error}")

    # --- public commands ----------------------------------------------------------------
    @property
    def gflops(self) -> float:
        """Sustained matmul GFLOP/s at this agent's thread count, measured once (for the planner)."""
        if self._gflops is None:
            self._gflops = matmul_gflops(seconds=0.3)
        return self._gflops

    def measure(self) -> None:
        """Measure what hello reports (matmul speed, the runtime's own memory) now, not on the first hello."""
        _ = self.gflops, self.baseline_bytes

    @property
    def baseline_bytes(self) -> int:
        """Resident bytes of this agent with the training runtime warmed up and no run, measured once."""
        if self._baseline is None:
            self._baseline = runtime_baseline()
        return self._baseline

    def ram(self) -> tuple[int, int]:
        """(total, available now) bytes of RAM for this agent: the machine's or its cgroup's, capped by
        --max-memory (which counts the agent's own resident memory as used)."""
        total, available = usable_ram()  # a cgroup (container, emulated device) may cap it
        if self.max_memory is None:
            return total, available
        return min(total, self.max_memory), max(0, min(available, self.max_memory - rss()))

    @property
    def busy(self) -> str | None:
        """The lineage of the run this agent serves, while its coordinator is heard from (else None)."""
        run = self._run
        if run is None or time.monotonic() - self._last_sealed > BUSY_SECONDS:
            return None
        return run.settings.lineage

    def _announce(self) -> None:
        busy = self.busy
        if busy != self._announced:
            self._announced = busy
            self.on_busy(busy)

    def _cmd_hello(self, _: protocol.Hello, __: str) -> protocol.HelloReply:
        ram_total, ram_available = self.ram()
        return protocol.HelloReply(
            protocol=protocol.PROTOCOL_VERSION, name=self.name, agent_id=self.pairing.agent_id,
            version=ringtune.__version__, has_data=self.records is not None, pid=os.getpid(),
            cores=psutil.cpu_count() or 1, threads=torch.get_num_threads(), ram_bytes=ram_total,
            ram_available=ram_available, rss=rss(), baseline_bytes=self.baseline_bytes, runtime=self.runtime,
            export_dir=self.export_dir is not None, gflops=self.gflops, busy=self.busy,
            probe_port=int(self.probe.url.rsplit(":", 1)[1]))

    def _cmd_pair_begin(self, msg: protocol.PairBegin, peer: str) -> protocol.PairBeginReply:
        return protocol.PairBeginReply(**self.pairing.begin(msg.run, peer))

    def _cmd_pair_finish(self, msg: protocol.PairFinish, _: str) -> protocol.PairFinishReply:
        reply = protocol.PairFinishReply(**self.pairing.finish(msg.agent_nonce, msg.nonce, msg.proof))
        self.cache.unpin_all()  # a new coordinator session names the blobs it needs again
        return reply

    # --- paired commands ----------------------------------------------------------------
    def _cmd_have(self, msg: protocol.Have) -> protocol.HaveReply:
        self.cache.pin(msg.digests)  # the run needs them: room for its other blobs is never made by evicting these
        return protocol.HaveReply(missing=[d for d in msg.digests if not self.cache.has(d)])

    def _cmd_upload(self, msg: protocol.Upload) -> protocol.UploadReply:
        complete = self.cache.append(msg.sha256, msg.offset, msg.total, msg.data)
        if complete:
            release_free_memory()  # the chunks' buffers
        return protocol.UploadReply(complete=complete)

    def _cmd_calibrate(self, msg: protocol.Calibrate) -> protocol.CalibrateReply:
        """Time a block of the coordinator's model at the run's micro-batch shape (for the planner) in this agent's
        runtime (ExecuTorch: through the programs it will run); the owner also says which share of its sequences'
        positions the loss scores (a number, not the data)."""
        base_dtype = check_base_dtype(msg.base_dtype)
        export_dir = None if self.runtime == "torch" else self._export_dir(msg.export)
        key = json.dumps([msg.config, msg.lora.to_dict(), msg.micro_batch_size, msg.seq_len, base_dtype,
                          str(export_dir)], sort_keys=True)
        if key not in self._block_seconds:
            self._block_seconds[key] = block_seconds(msg.config, msg.lora, msg.micro_batch_size, msg.seq_len,
                                                     base_dtype, export_dir)
            release_free_memory()  # the calibration block
        share = None
        if msg.tokenizer is not None and self.records is not None:
            share = scored_share(self.records, tokenizer_from_blob(self.cache.read(msg.tokenizer)), msg.seq_len)
        return protocol.CalibrateReply(block_seconds=self._block_seconds[key], scored_share=share)

    def _cmd_assign(self, msg: protocol.Assign) -> protocol.AssignReply:
        indices = msg.plan.stage_indices(self.name)
        if not indices:
            raise ValueError(f"the plan has no stage for {self.name!r}")
        if self.name == msg.plan.owner and self.records is None:
            raise ValueError(f"{self.name!r} is the owner but was started without --data FILE")
        missing = [d for d in filter(None, (msg.slice, msg.export, msg.tokenizer)) if not self.cache.has(d)]
        if missing:
            raise ValueError(f"blobs {[d[:12] for d in missing]} were not uploaded: send them before assign")
        run_key = unwrap_key(self.pairing.session_key, msg.run_key)
        self._stop_run()
        run = ActiveRun(msg, run_key)
        listen = {}
        for index in indices:
            if index > 0:
                edge = PynngEdge(self._edge_config(run, index, index - 1), listen=f"tcp://{self.host}:0")
                run.edges.append((index, "prev", edge))
                listen[index] = edge.url
        self._run = run
        run.worker = threading.Thread(target=self._load, args=(run, indices, self._retired), daemon=True)
        run.worker.start()
        return protocol.AssignReply(listen=listen)

    def _cmd_connect(self, msg: protocol.Connect) -> protocol.Done:
        run = self._require_run(("loading", "ready"))
        for index, url in msg.dial.items():
            edge = PynngEdge(self._edge_config(run, index, index + 1), dial=url)
            run.edges.append((index, "next", edge))
        return protocol.Done()

    def _cmd_step(self, msg: protocol.Step) -> protocol.Done:
        run = self._require_run(("ready", "idle"))
        with self._lock:
            run.state, run.step = "running", msg.step
        run.worker = threading.Thread(target=self._run_step, args=(run, msg.step), daemon=True)
        run.worker.start()
        return protocol.Done()

    def _cmd_status(self, _: protocol.Status) -> protocol.StatusReply:
        run = self._run
        memory = process_memory()  # one read of /proc/self/status per heartbeat
        common = {"rss": memory.get("VmRSS", 0), "peak_rss": memory.get("VmHWM", 0),
                  "refused_control": self.pairing.refused, "pairing_backoff": self.pairing.backed_off}
        if run is None:
            return protocol.StatusReply(state="free", **common)
        refused: dict[str, int] = {}
        for _, _, edge in run.edges:
            for reason, count in edge.refused.items():
                refused[reason] = refused.get(reason, 0) + count
        with self._lock:
            return protocol.StatusReply(state=run.state, step=run.step, error=run.error, ring_broken=run.ring_broken,
                                        result=run.result, refused=refused, **common)

    def _cmd_lora(self, _: protocol.Lora) -> protocol.StagesReply:
        run = self._require_run(("idle", "ready"))
        return protocol.StagesReply(stages={i: save_tensors(r.lora_state()) for i, r in run.runners.items()})

    def _cmd_checkpoint(self, _: protocol.Checkpoint) -> protocol.StagesReply:
        """Every local stage's training state (LoRA + AdamW), at a step boundary."""
        run = self._require_run(("idle", "ready"))
        return protocol.StagesReply(stages={i: save_tensors(r.training_state()) for i, r in run.runners.items()})

    def _cmd_restore(self, msg: protocol.Restore) -> protocol.Done:
        """Load this agent's part of an uploaded training state (whatever split it was taken under)."""
        run = self._require_run(("ready",))
        tensors, _, _ = unpack_state(self.cache.read(msg.sha256))
        for runner in run.runners.values():
            runner.load_training_state(tensors)
        self.cache.discard(msg.sha256)
        return protocol.Done()

    def _cmd_keep_checkpoint(self, msg: protocol.KeepCheckpoint) -> protocol.Done:
        """Store an uploaded training state durably (the owner's copy of every stage's state)."""
        self._checkpoints(msg.lineage).save(msg.step, self.cache.read(msg.sha256))
        self.cache.discard(msg.sha256)
        return protocol.Done()

    def _cmd_fetch_checkpoint(self, msg: protocol.FetchCheckpoint) -> protocol.FetchCheckpointReply:
        checkpoint = self._checkpoints(msg.lineage).latest()
        return (protocol.FetchCheckpointReply(step=None) if checkpoint is None
                else protocol.FetchCheckpointReply(step=checkpoint.step, state=checkpoint.state))

    def _cmd_stop(self, _: protocol.Stop) -> protocol.Done:
        self._stop_run()
        return protocol.Done()

    def _cmd_shutdown(self, _: protocol.Shutdown) -> protocol.Done:
        self._running = False
        return protocol.Done()

    # --- work on threads ----------------------------------------------------------------
    def _load(self, run: ActiveRun, indices: list[int], previous: threading.Thread | None) -> None:
        """previous: the worker of the run stopped before this one (its memory is freed before loading)."""
        try:
            s = run.settings
            if previous is not None:
                previous.join(timeout=2 * s.timeout)  # edges closed: it ends after the compute in flight, at most
                if previous.is_alive():
                    raise RuntimeError(f"the worker of this agent's previous run has not ended after {2 * s.timeout:.0f}"
                                       f" s (its memory is not freed yet): restart the agent {self.name}")
            thaw()
            noise = NoiseStream(self._noise_seed(s) if s.privacy.active else None)
            run.runners = {i: ring_runner(runner, s.plan, i, s.privacy, noise)
                           for i, runner in self._runners(s, indices).items()}
            if self.name == s.plan.owner:
                tokenizer = tokenizer_from_blob(self.cache.read(s.tokenizer))
                run.data = OwnerData(self.records, tokenizer, s.micro_batch_size, s.seq_len,
                                     s.plan.micro_batches, s.seed, s.privacy.hide_labels)
            freeze_long_lived()
            HEAP.set_budget(s.plan.predicted.get("memory_bytes", {}).get(self.name, 0))
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
            cpu_started, faults_before = time.process_time(), minor_faults()
            results = run_stages_step(list(run.stages.values()), step, batch, plan.schedule, len(plan.stages),
                                      plan.micro_batches, [edge for _, _, edge in run.edges])
            losses = [r.loss for r in results.values() if r.loss is not None]
            result = protocol.StepResult(loss=losses[0] if losses else None,
                                         tokens=batch.tokens if batch is not None else 0,
                                         stages={i: r.timing for i, r in results.items()},
                                         bytes_sent=sum(edge.bytes_sent for _, _, edge in run.edges),
                                         cpu_seconds=time.process_time() - cpu_started,
                                         page_faults=minor_faults() - faults_before)
            settle_after_step()
            with self._lock:
                run.result, run.state = result, "idle"
        except Exception as error:
            self._fail(run, error)

    def _fail(self, run: ActiveRun, error: BaseException) -> None:
        log.error("run %s failed: %s", run.settings.run, traceback.format_exc())
        with self._lock:
            run.state, run.error = "error", f"{self.name}: {error}"
            run.ring_broken = isinstance(error, (EdgeTimeout, EdgeClosed))

    # --- helpers ------------------------------------------------------------------------
    def _runners(self, s: protocol.Assign, indices: list[int]) -> dict[int, StageRunner]:
        if self.runtime == "torch":
            return torch_runners(self.cache.path(s.slice), s.config, s.lora, {i: s.plan.stages[i] for i in indices},
                                 s.optimizer)
        if s.slice is None:
            raise ValueError(f"{self.name} runs ExecuTorch programs on the weights of its slice, but the coordinator "
                             f"sent none: install the same ringtune version on both")
        # XNNPACK's pool would take every core of the machine: give it the agent's threads
        return executorch_runners(self._export_dir(s.export), self.cache.path(s.slice), s.config, s.lora,
                                  {i: s.plan.stages[i] for i in indices}, RunShape(s.micro_batch_size, s.seq_len),
                                  s.optimizer, torch.get_num_threads())

    def _export_dir(self, shipped: str | None) -> Path:
        """The ExecuTorch programs this agent runs: its own export directory, or the one the coordinator shipped
        (``shipped``: the manifest's sha256)."""
        if self.export_dir is None and shipped is None:
            raise ValueError(f"{self.name} runs ExecuTorch but the coordinator sent no export: upgrade ringtune "
                             f"on the coordinator or start the agent with --export-dir DIR")
        return self.export_dir or export_from_cache(self.cache, shipped, self.state_dir / "exports")

    def _edge_config(self, run: ActiveRun, stage: int, peer: int) -> EdgeConfig:
        s = run.settings
        return EdgeConfig.for_link(s.run, run.run_key, stage, peer, (s.micro_batch_size, s.seq_len, s.hidden_size),
                                   s.timeout, s.encrypt, s.wire)

    def _noise_seed(self, s: protocol.Assign) -> int:
        """The run's noise seed: the one given (tests, audits), else one drawn from the CSPRNG at the run's first
        start; kept (0600) beside the owner's checkpoints, so replays and --resume draw the same noise."""
        path = self._checkpoints(s.lineage).root / "noise-seed"
        if path.exists():
            return int(path.read_text())
        seed = NoiseStream(s.privacy.seed).seed
        write_atomic(path, str(seed).encode(), mode=0o600)
        return seed

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
        """Drop the run without waiting for its worker (the next run's loader waits for it)."""
        run, self._run = self._run, None
        if run is None:
            return
        HEAP.set_budget(0)
        for _, _, edge in run.edges:
            edge.abort()
            edge.close()  # also ends a send blocked on a neighbour that is gone
        self._retired = run.worker


def _peer_host(message: pynng.Message) -> str:
    """The address a request came from, without its port (pairing failures are counted per host)."""
    try:
        return str(message.pipe.remote_address).rsplit(":", 1)[0]
    except Exception:  # no pipe (closed meanwhile) or a transport without addresses
        return ""
