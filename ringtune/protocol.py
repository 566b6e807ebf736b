"""The control protocol: one typed message per command and per reply, shared by coordinator and agent.

A request travels as the msgpack map ``{"cmd": NAME, field: value, ...}`` and a reply as
``{"ok": true, field: value, ...}`` or ``{"ok": false, "error": TEXT[, "session_lost": true]}``.
Bulk bytes (an upload's chunk) ride beside the map, in the sealed frame's payload. Only the
``PUBLIC`` requests (hello, pair_begin, pair_finish) travel in the clear; the rest is sealed by a
``ringtune.control.SecureChannel``.

Every message is a frozen dataclass; :func:`decode_request` and :func:`decode_reply` check every
field's type against its annotation (nested plain data such as the plan is checked field by
field, and runs its own ``__post_init__`` checks) and refuse unknown commands, unknown fields and missing ones with a
:class:`ProtocolError`, whatever the bytes. A new command is one request class (``CMD``) with its
reply class (``REPLY``), added to ``REQUESTS``; a new hello field is one field of :class:`HelloReply`.
``PROTOCOL_VERSION`` changes when a message changes; hello carries it, and the coordinator refuses
an agent that speaks another version before reading the rest of its hello.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ringtune.lora_spec import LoraSpec
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan
from ringtune.privacy_spec import PrivacySpec
from ringtune.wire import WireSpec

PROTOCOL_VERSION = 8
"""3: typed messages, hello says which run an agent is busy with, assign carries the run's lineage;
4: hello names the agent's link probe port;
5: hello carries the agent's resident memory and its runtime baseline, status its peak RSS;
6: calibrate may name the tokenizer, and the owner replies with its data's share of scored positions;
7: assign names the wire codecs of the hidden states and gradients (frames name theirs);
8: a step's result says, per stage, how long it computed, waited and sent, and when each F and B ran."""
MAX_REQUEST_BYTES = 16 * 1024 * 1024
"""Largest command an agent accepts (weights ship in chunks of CHUNK_BYTES)."""
MAX_REPLY_BYTES = 1024 * 1024 * 1024
"""Largest reply a coordinator accepts (LoRA tensors of a stage)."""
CHUNK_BYTES = 8 * 1024 * 1024
"""Slice upload chunk size."""
AgentState = Literal["free", "loading", "ready", "running", "idle", "error"]


class ProtocolError(ValueError):
    """A message that is not a valid control message (the text says which field and why)."""


class ProtocolMismatch(ProtocolError):
    """The peer speaks another protocol version."""


class ControlError(RuntimeError):
    """An agent refused or failed a command; the message is the agent's."""


class SessionLost(ControlError):
    """The agent no longer knows the session (it restarted, or another coordinator paired since)."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long the coordinator waits for each kind of reply (see ``Request.reply_seconds``)."""

    heartbeat: float = 5.0
    """A short command (status, stop, ...): an agent silent this long is declared gone."""
    bytes_per_second: float = 8e6
    """The slowest rate at which an agent still takes and verifies bytes (a Pi on a slow link, hashing)."""
    work: float = 120.0
    """A command that computes (calibrate: build and time a block on a slow device)."""


# --- replies ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer; subclasses add fields."""


@dataclass(frozen=True, slots=True)
class Done(Reply):
    """A command that has nothing to return."""


@dataclass(frozen=True, slots=True)
class HelloReply(Reply):
    protocol: int
    """The agent's PROTOCOL_VERSION (checked before anything else)."""
    name: str
    """The agent's name in plans and progress."""
    agent_id: str
    """Stable id (name@host), bound into pairing proofs."""
    version: str
    """ringtune version of the agent."""
    has_data: bool
    """The agent holds private data: it can be the owner."""
    pid: int
    """The agent's process id (on its own machine)."""
    cores: int
    """CPU cores of the machine."""
    threads: int
    """torch threads the agent computes with."""
    ram_bytes: int
    """RAM usable for training (a cgroup limit when there is one)."""
    ram_available: int
    """RAM available now."""
    rss: int
    """The agent's resident memory now (it can grow into ram_available beyond it)."""
    baseline_bytes: int
    """Resident memory of the agent's warmed-up runtime with no run loaded, measured at start (the planner
    adds its stages' memory to it)."""
    runtime: str
    """torch or executorch."""
    export_dir: bool
    """An ExecuTorch agent started with its own --export-dir."""
    gflops: float
    """Sustained matmul GFLOP/s at the agent's thread count."""
    busy: str | None
    """Lineage of the run the agent is serving for a coordinator heard from recently (None: free)."""
    probe_port: int
    """Port of the agent's link probe sink (edge_runtime.transport.link_probe), on its control host."""

    def __post_init__(self) -> None:
        _check_memory(self, "ram_bytes", "ram_available", "rss", "baseline_bytes")


@dataclass(frozen=True, slots=True)
class PairBeginReply(Reply):
    agent_id: str
    """The agent's id, bound into both proofs."""
    nonce: bytes
    """The agent's challenge."""


@dataclass(frozen=True, slots=True)
class PairFinishReply(Reply):
    proof: bytes
    """The agent's proof that it holds the token too."""
    session: str
    """Id of the new sealed session."""


@dataclass(frozen=True, slots=True)
class CalibrateReply(Reply):
    block_seconds: float
    """Forward + backward of one block at the run's micro-batch shape."""
    scored_share: float | None = None
    """The owner's data: scored positions over all positions of its padded sequences (None elsewhere). A
    number about the data, never the data: the planner prices the LM head and the loss with it."""


@dataclass(frozen=True, slots=True)
class HaveReply(Reply):
    missing: list[str]
    """The digests the agent does not hold (upload them)."""


@dataclass(frozen=True, slots=True)
class UploadReply(Reply):
    complete: bool
    """The blob is whole, verified and stored."""


@dataclass(frozen=True, slots=True)
class AssignReply(Reply):
    listen: dict[int, str]
    """Data-plane URL per local stage index that has a previous stage (its neighbour dials it)."""


@dataclass(frozen=True, slots=True)
class Span:
    """One forward or backward of a micro-batch, as a stage computed it (what ``train --timeline`` draws)."""

    kind: Literal["F", "B"]
    """F (forward) or B (backward)."""
    microbatch: int
    """Micro-batch index within the step."""
    start: float
    """Seconds from the agent's step start."""
    end: float
    """Seconds from the agent's step start."""


@dataclass(frozen=True, slots=True)
class StageTiming:
    """Where one stage's step went, by its agent's clock."""

    compute_seconds: float
    """Forward, backward and optimizer time; waits and sends excluded."""
    wait_seconds: float
    """Blocked on a neighbour's frame: its compute, the link and the schedule's bubbles."""
    send_seconds: float
    """Handing frames to the link: encoding, sealing, and a full socket buffer's back-pressure."""
    wall_seconds: float
    """From the agent's step start to this stage's optimizer step done."""
    spans: tuple[Span, ...]
    """Every forward and backward of the step, in the order computed."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """What an agent measured in its last step."""

    loss: float | None
    """Step loss (the owner's tail stage; None elsewhere)."""
    tokens: int
    """Scored tokens of the step (owner; 0 elsewhere)."""
    stages: dict[int, StageTiming]
    """Timings per local stage."""
    bytes_sent: int
    """Data-plane bytes this agent sent in the run so far."""
    cpu_seconds: float = 0.0
    """CPU time the agent process used during the step, all its threads (compute, frames, heartbeat)."""
    page_faults: int = 0
    """Minor page faults of the agent process during the step: pages its heap had handed back, touched again."""


@dataclass(frozen=True, slots=True)
class StatusReply(Reply):
    """The heartbeat's answer."""

    state: AgentState
    """free (no run), loading, ready, running, idle (a step is done) or error."""
    rss: int
    """Resident memory of the agent process, bytes."""
    peak_rss: int
    """Its peak resident memory since it started (VmHWM), bytes: what the plan's prediction is held to."""
    refused_control: int
    """Control messages refused (failed pairings, bad seals, malformed requests)."""
    pairing_backoff: int
    """Pairing attempts refused because their address failed too often recently."""
    step: int = -1
    """The step running or last done."""
    error: str = ""
    """Why the run failed (state error)."""
    ring_broken: bool = False
    """The run failed waiting on a ring link (a neighbour's fault, not this agent's)."""
    result: StepResult | None = None
    """The last step's measurements."""

    def __post_init__(self) -> None:
        _check_memory(self, "rss", "peak_rss")
    refused: dict[str, int] = field(default_factory=dict)
    """Data-plane frames refused, by reason."""


@dataclass(frozen=True, slots=True)
class StagesReply(Reply):
    stages: dict[int, bytes]
    """Per local stage index, a safetensors blob (LoRA, or LoRA + AdamW state)."""


@dataclass(frozen=True, slots=True)
class FetchCheckpointReply(Reply):
    step: int | None
    """Step of the newest intact checkpoint kept (None: none)."""
    state: bytes | None = None
    """Its training-state blob."""


# --- requests --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Request:
    CMD: ClassVar[str]
    REPLY: ClassVar[type[Reply]] = Done
    PUBLIC: ClassVar[bool] = False
    """Answered without a paired session."""
    BLOB: ClassVar[str | None] = None
    """A bytes field that travels beside the map (in the sealed payload)."""

    def reply_seconds(self, timeouts: Timeouts) -> float:
        """How long to wait for the reply (a short command by default)."""
        return timeouts.heartbeat


@dataclass(frozen=True, slots=True)
class Hello(Request):
    """The agent's public profile (in the clear: it may have restarted since pairing)."""
    CMD: ClassVar[str] = "hello"
    REPLY: ClassVar[type[Reply]] = HelloReply
    PUBLIC: ClassVar[bool] = True

    def reply_seconds(self, timeouts: Timeouts) -> float:
        return max(timeouts.heartbeat, 10.0)


@dataclass(frozen=True, slots=True)
class PairBegin(Request):
    CMD: ClassVar[str] = "pair_begin"
    REPLY: ClassVar[type[Reply]] = PairBeginReply
    PUBLIC: ClassVar[bool] = True
    run: str
    """The coordinator's run id (bound into the proofs)."""


@dataclass(frozen=True, slots=True)
class PairFinish(Request):
    CMD: ClassVar[str] = "pair_finish"
    REPLY: ClassVar[type[Reply]] = PairFinishReply
    PUBLIC: ClassVar[bool] = True
    agent_nonce: bytes
    """The agent's challenge being answered."""
    nonce: bytes
    """The coordinator's challenge."""
    proof: bytes
    """The coordinator's proof that it holds the token."""


@dataclass(frozen=True, slots=True)
class Calibrate(Request):
    """Time one block of the coordinator's model at the run's micro-batch shape (for the planner), in the agent's own
    runtime: eager torch, or its ExecuTorch programs."""
    CMD: ClassVar[str] = "calibrate"
    REPLY: ClassVar[type[Reply]] = CalibrateReply
    config: dict
    """The model's config (transformers to_dict)."""
    lora: LoraSpec
    """LoRA shape of the run."""
    micro_batch_size: int
    """Sequences per micro-batch."""
    seq_len: int
    """Tokens per sequence."""
    base_dtype: str = "fp32"
    """How the block's frozen weights are stored (dequantizing costs time on the device itself)."""
    tokenizer: str | None = None
    """sha256 of the uploaded tokenizer blob (owner only): the owner then reports its data's scored share."""
    export: str | None = None
    """sha256 of the uploaded ExecuTorch export's manifest, for an ExecuTorch agent without an export directory of its
    own: it times the block through the programs it will run."""

    def reply_seconds(self, timeouts: Timeouts) -> float:
        return max(timeouts.heartbeat, timeouts.work)


@dataclass(frozen=True, slots=True)
class Have(Request):
    CMD: ClassVar[str] = "have"
    REPLY: ClassVar[type[Reply]] = HaveReply
    digests: list[str]
    """sha256 digests of blobs the coordinator would upload."""


@dataclass(frozen=True, slots=True)
class Upload(Request):
    """One chunk of a blob; the last one makes the agent verify and store the whole blob."""
    CMD: ClassVar[str] = "upload"
    REPLY: ClassVar[type[Reply]] = UploadReply
    BLOB: ClassVar[str | None] = "data"
    sha256: str
    """Digest of the whole blob."""
    offset: int
    """Where this chunk starts."""
    total: int
    """Size of the whole blob."""
    data: bytes = b""
    """The chunk."""

    def reply_seconds(self, timeouts: Timeouts) -> float:
        last = self.offset + len(self.data) >= self.total
        return timeouts.heartbeat + (self.total if last else len(self.data)) / timeouts.bytes_per_second


@dataclass(frozen=True, slots=True)
class Assign(Request):
    """This agent's stages of a run: it starts loading them on a worker and answers at once."""
    CMD: ClassVar[str] = "assign"
    REPLY: ClassVar[type[Reply]] = AssignReply
    run: str
    """Run id (frames of other runs are refused)."""
    lineage: str
    """Id of the run across --resume (what the agent says it is busy with)."""
    plan: Plan
    """The whole ring; the agent runs the stages whose device is its name."""
    config: dict
    """The model's config (to build the skeleton its slice fills)."""
    hidden_size: int
    """Width of the hidden states on the ring."""
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
    """Data-plane key of the run, wrapped with the session key."""
    timeout: float
    """Data-plane timeout in seconds."""
    encrypt: bool
    """Encrypt hidden states on the wire."""
    privacy: PrivacySpec
    """What this agent privatizes before it sends (the owner's spec; off elsewhere)."""
    wire: WireSpec = WireSpec()
    """Codecs of the hidden states and gradients on the ring (every agent of the run uses the same)."""
    slice: str | None = None
    """sha256 of this agent's slice blob (torch runtime)."""
    export: str | None = None
    """sha256 of the shipped ExecuTorch export manifest."""
    tokenizer: str | None = None
    """sha256 of the tokenizer blob (owner only)."""


@dataclass(frozen=True, slots=True)
class Connect(Request):
    CMD: ClassVar[str] = "connect"
    dial: dict[int, str]
    """Per local stage index, the URL of the next stage to dial."""


@dataclass(frozen=True, slots=True)
class Step(Request):
    """Start an optimizer step on a worker (the answer comes through status)."""
    CMD: ClassVar[str] = "step"
    step: int
    """Global step index (also the owner's data cursor)."""


@dataclass(frozen=True, slots=True)
class Status(Request):
    """The heartbeat."""
    CMD: ClassVar[str] = "status"
    REPLY: ClassVar[type[Reply]] = StatusReply


@dataclass(frozen=True, slots=True)
class Lora(Request):
    CMD: ClassVar[str] = "lora"
    REPLY: ClassVar[type[Reply]] = StagesReply


@dataclass(frozen=True, slots=True)
class Checkpoint(Request):
    """Every local stage's training state (LoRA + AdamW), at a step boundary."""
    CMD: ClassVar[str] = "checkpoint"
    REPLY: ClassVar[type[Reply]] = StagesReply


@dataclass(frozen=True, slots=True)
class Restore(Request):
    """Load this agent's part of an uploaded training state (whatever split it was taken under)."""
    CMD: ClassVar[str] = "restore"
    sha256: str
    """Digest of the uploaded training-state blob."""


@dataclass(frozen=True, slots=True)
class KeepCheckpoint(Request):
    """Store an uploaded training state durably (the owner's copy)."""
    CMD: ClassVar[str] = "keep_checkpoint"
    lineage: str
    """The run's lineage id (16 hex digits): names the checkpoint directory."""
    step: int
    """Steps done in that state."""
    sha256: str
    """Digest of the uploaded blob."""


@dataclass(frozen=True, slots=True)
class FetchCheckpoint(Request):
    CMD: ClassVar[str] = "fetch_checkpoint"
    REPLY: ClassVar[type[Reply]] = FetchCheckpointReply
    lineage: str
    """The run's lineage id."""


@dataclass(frozen=True, slots=True)
class Stop(Request):
    """Drop the run (its ring, its stages); the agent is free afterwards."""
    CMD: ClassVar[str] = "stop"


@dataclass(frozen=True, slots=True)
class Shutdown(Request):
    CMD: ClassVar[str] = "shutdown"


REQUESTS: dict[str, type[Request]] = {cls.CMD: cls for cls in (
    Hello, PairBegin, PairFinish, Calibrate, Have, Upload, Assign, Connect, Step, Status, Lora, Checkpoint,
    Restore, KeepCheckpoint, FetchCheckpoint, Stop, Shutdown)}
"""Every command, by name."""
PUBLIC_COMMANDS = frozenset(name for name, cls in REQUESTS.items() if cls.PUBLIC)
"""Commands an agent answers without a paired session."""


# --- encoding --------------------------------------------------------------------------------

def encode_request(request: Request) -> tuple[dict, bytes]:
    """The map to send and the bulk bytes that travel beside it."""
    fields = _fields_of(request)
    blob = fields.pop(request.BLOB) if request.BLOB else b""
    return {"cmd": request.CMD, **fields}, blob


def decode_request(message: Any, blob: bytes = b"") -> Request:
    """The typed request of a received map (and its bulk bytes); ProtocolError if it is not one."""
    if not isinstance(message, dict):
        raise ProtocolError("a control request must be a map")
    cmd = message.get("cmd")
    cls = REQUESTS.get(cmd) if isinstance(cmd, str) else None
    if cls is None:
        raise ProtocolError(f"unknown command {cmd!r}")
    fields = {k: v for k, v in message.items() if k != "cmd"}
    if cls.BLOB:
        fields[cls.BLOB] = blob
    return _build(cls, fields, cmd)


def encode_reply(reply: Reply) -> dict:
    return {"ok": True, **_fields_of(reply)}


def error_reply(text: str, session_lost: bool = False) -> dict:
    return {"ok": False, "error": text, **({"session_lost": True} if session_lost else {})}


def decode_reply(request: type[Request] | Request, message: Any, agent: str = "agent") -> Reply:
    """The typed reply to a request; ControlError (SessionLost) when the agent refused or failed it."""
    if not isinstance(message, dict):
        raise ProtocolError(f"{agent} sent a reply that is not a map")
    if message.get("ok") is not True:
        failure = SessionLost if message.get("session_lost") is True else ControlError
        raise failure(f"{agent}: {message.get('error', 'unknown error')}")
    fields = {k: v for k, v in message.items() if k != "ok"}
    if request.REPLY is HelloReply and fields.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"{agent} speaks control protocol {fields.get('protocol')!r}, this coordinator "
                               f"{PROTOCOL_VERSION}: install the same ringtune version on both")
    return _build(request.REPLY, fields, f"{request.CMD} reply")


def _fields_of(message) -> dict:
    return {f.name: _plain(getattr(message, f.name)) for f in dataclasses.fields(message)}


def _plain(value):
    """Plain data msgpack can carry."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _check_memory(message, *names: str) -> None:
    """Byte counts the planner sums: negative ones would make a plan fit that does not."""
    negative = [n for n in names if getattr(message, n) < 0]
    if negative:
        raise ValueError(f"negative byte counts {negative}")


def _build(cls: type, fields: dict, where: str):
    hints = _hints(cls)
    unknown = sorted(map(str, set(fields) - set(hints)))
    if unknown:
        raise ProtocolError(f"{where}: unknown field(s) {unknown}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in fields:
            values[f.name] = _typed(hints[f.name], fields[f.name], f"{where}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError(f"{where}: field {f.name!r} is missing")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # the spec's own checks (e.g. a privacy spec without clip)
        raise ProtocolError(f"{where}: {error}") from None


def _typed(hint, value, where: str):
    """value checked against the annotation hint (and converted: lists to tuples, maps to dataclasses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _typed(option, value, where)
            except ProtocolError:
                continue
        raise ProtocolError(f"{where}: {_name(value)} is none of {[_name_of(a) for a in args]}")
    if origin is Literal:
        if value in args and isinstance(value, str):
            return value
        raise ProtocolError(f"{where}: {value!r} is not one of {list(args)}")
    if hint is type(None):
        if value is None:
            return None
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is dict:  # free-form plain data (a model config, the planner's predictions)
        if isinstance(value, dict):
            return value
    elif hint is bytes:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return bytes(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_typed(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
            if len(value) == len(args):
                return tuple(_typed(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    elif origin is dict:
        if isinstance(value, dict):
            return {_key(args[0], k, where): _typed(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    elif dataclasses.is_dataclass(hint):  # plain data (the plan, LoRA and privacy specs) checked field by field
        if isinstance(value, dict):
            return _build(hint, {str(k): v for k, v in value.items()}, where)
    else:
        raise AssertionError(f"{where}: the protocol has no rule for {hint!r}")
    raise ProtocolError(f"{where}: expected {_name_of(hint)}, got {_name(value)}")


def _key(hint, key, where: str):
    if hint is int and isinstance(key, str) and key.isdigit():
        return int(key)  # JSON-born maps
    return _typed(hint, key, f"{where} key")


def _hints(cls: type) -> dict:
    cached = _HINTS.get(cls)
    if cached is None:
        cached = _HINTS[cls] = {k: v for k, v in typing.get_type_hints(cls).items()
                                if typing.get_origin(v) is not ClassVar}
    return cached


_HINTS: dict[type, dict] = {}


def _name(value) -> str:
    return type(value).__name__


def _name_of(hint) -> str:
    return getattr(hint, "__name__", str(hint))
