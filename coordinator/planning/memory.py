"""What an agent holds: the planner's model of each device's peak resident memory.

Measured on real agents (benchmarks/agent_memory.py), an agent's peak RSS is

    baseline      the runtime with no run loaded: Python, torch, transformers, peft, the warmed-up
                  autograd engine and thread pool; each agent measures it once (hello)
  + weights       its stages' parameters: frozen base weights at their storage dtype (mapped from
                  the slice file), LoRA tensors
  + trainable     LoRA gradients, AdamW's two moments and its update's temporaries
  + activations   per stage, what its blocks keep for backward plus the output it holds until the
                  gradient comes back, times the micro-batches its schedule keeps in flight
                  (1F1B: S - s on stage s of S; GPipe: all M); none on a stage that runs forward only
                  (the owner withholds gradients: every stage before its tail), which also has no
                  LoRA gradients or AdamW state
  + workspace     per stage, the transient peak of one forward + backward beyond what it keeps (the
                  owner's head and tail run in two threads at once, so theirs add up)
  + buffers       per ring edge, frames received and waiting for the schedule, plus the copies a
                  send and a receive make (pack, seal, socket); behind a forward-only stage, which
                  runs ahead, all M may wait
  + heap          per device, freed memory its heap keeps so that the next micro-batch reuses pages without
                  faulting them in: edge_runtime.memory.HEAP_SLACK_BYTES (the cost table's heap_bytes), plus
                  room for the heap's fragmentation, up to HEAP_ROOM_SHARE of the activations in flight
                  (heap_room_share), where the device has it. Fitting counts the slack only; the agent trims
                  its heap when it nears the device's prediction, so a tight device trims more often instead

or, before its slice arrives, baseline + the calibration block (one block, one micro-batch), if
that is larger. Every term is linear in prefix sums over blocks, so the partitioner evaluates the
same formula on whole [start, end) matrices at once (numpy broadcasting) that ``plan_memory``
evaluates for one plan: a plan that the planner says fits is checked with the very same numbers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from coordinator.planning.costs import CostTable
from ringtune.run_shape import RunShape
from device_profiles.profile import DeviceProfile
from edge_runtime.schedules import max_in_flight, schedule_for
from ringtune.plan import Plan, PlanError, Role

GB = 1e9
FRAME_COPIES = 3
"""Copies of a frame alive while it is sent or received, besides the frames that wait (measured)."""


class DoesNotFitError(PlanError):
    """A plan (or every plan) needs more memory than a device has; the message names the devices,
    the GB needed against available, and what would make it fit."""


@dataclass(frozen=True, slots=True)
class Footprint:
    """Bytes by what holds them (one stage, or a whole device)."""
    baseline: float = 0.0
    """The agent's runtime with no run loaded (devices only)."""
    weights: float = 0.0
    """Parameters: frozen base weights at their storage dtype and the LoRA tensors."""
    trainable: float = 0.0
    """LoRA gradients and AdamW state."""
    activations: float = 0.0
    """Kept for backward (and stage outputs held), for every micro-batch in flight."""
    workspace: float = 0.0
    """Transient peak of one forward + backward beyond what is kept."""
    buffers: float = 0.0
    """Ring frames waiting or being sent and received."""
    heap: float = 0.0
    """Freed memory the heap keeps between trims (devices only)."""
    heap_room: float = 0.0
    """Freed memory the heap may keep beyond that where the device has room: its agent trims near the total, and
    fitting never counts on it (devices only)."""
    calibration: float = 0.0
    """The calibration block's transient peak, before any slice is loaded (devices only)."""

    @property
    def running(self) -> float:
        return (self.baseline + self.weights + self.trainable + self.activations + self.workspace + self.buffers
                + self.heap + self.heap_room)

    @property
    def total(self) -> float:
        """The predicted peak: while training, or while calibrating if that is more."""
        return np.maximum(self.running, self.baseline + self.calibration)

    def __add__(self, other: "Footprint") -> "Footprint":
        return Footprint(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_dict(self) -> dict[str, int]:
        return {**{k: int(v) for k, v in asdict(self).items()}, "total": int(self.total)}


def in_flight(schedule: str, num_stages: int, index: int, micro_batches: int) -> int:
    """Micro-batches stage ``index`` of ``num_stages`` keeps activations for at once."""
    return max_in_flight(schedule_for(schedule, num_stages, index, micro_batches))


class MemoryModel:
    """The memory terms of one model (cost table) at one run shape, as prefix sums over blocks."""

    def __init__(self, table: CostTable, shape: RunShape) -> None:
        tokens = shape.tokens
        self.shape = shape
        self.num_blocks = table.num_blocks
        self.weights = _prefix(table.block_param_bytes)  # [L + 1]
        self.trainable = _prefix(table.block_trainable_bytes)
        self.kept = _prefix(table.block_activation_bytes) * tokens  # per micro-batch
        self.workspace = _range_max(np.asarray(table.block_workspace_bytes, dtype=float) * tokens)  # [L + 1, L + 1]
        self.heap = table.heap_bytes
        self.heap_room_share = table.heap_room_share
        self.frame = table.cut_bytes * tokens
        """Bytes of one hidden state (or its gradient) of a micro-batch."""
        # The LM head and loss run on scored positions only, but how many a micro-batch scores varies (one
        # may score every position): priced on every position (the compute model uses the data's mean share).
        scored = table.scored_end
        self.head, self.tail = table.head_end, replace(
            table.tail_end, activation_bytes=table.tail_end.activation_bytes + scored.activation_bytes,
            workspace_bytes=table.tail_end.workspace_bytes + scored.workspace_bytes)
        self.tokens = tokens
        first = 0 if table.num_blocks else None
        self.calibration = 0.0 if first is None else (
            table.block_param_bytes[first] + table.block_trainable_bytes[first]
            + (table.block_activation_bytes[first] + table.block_workspace_bytes[first]) * tokens + 2 * self.frame)

    def stage(self, start, end, role: Role, in_flight: int, trains: bool = True, runs_ahead: bool = False
              ) -> Footprint:
        """Blocks [start, end) in a stage with this role; start and end may be numpy arrays (then
        every term is an array over them, broadcast). A stage that does not train keeps nothing for a
        backward and has no LoRA gradients or AdamW state; runs_ahead: some stage of the ring runs forward
        only and sends every micro-batch at once, so all M frames may wait on each edge instead of
        in_flight. The workspace stays that of a forward and a backward (an upper bound for a forward)."""
        kept = in_flight if trains else 0
        ends = ([self.head] if role in ("head", "full") else []) + ([self.tail] if role in ("tail", "full") else [])
        edges = {"head": 1, "middle": 2, "tail": 1, "full": 0}[role]
        held_output = self.frame if role in ("head", "middle") else 0.0  # the tail's output is the loss
        workspace = np.where(np.asarray(end) > np.asarray(start), self.workspace[start, end], 0.0)
        for part in ends:
            workspace = np.maximum(workspace, part.workspace_bytes * self.tokens)
        return Footprint(
            weights=self.weights[end] - self.weights[start] + sum(e.param_bytes for e in ends),
            trainable=(self.trainable[end] - self.trainable[start] + sum(e.trainable_bytes for e in ends)) * trains,
            activations=(self.kept[end] - self.kept[start] + sum(e.activation_bytes for e in ends) * self.tokens
                         + held_output) * kept,
            workspace=workspace,
            buffers=edges * ((self.shape.micro_batches if runs_ahead else in_flight) + FRAME_COPIES) * self.frame)

    def device(self, baseline: float, stages: list[Footprint]) -> Footprint:
        """A device running these stages (one thread each, at once)."""
        total = Footprint(baseline=baseline, heap=self.heap, calibration=self.calibration)
        for stage in stages:
            total = total + stage
        return total


def plan_memory(table: CostTable, shape: RunShape, plan: Plan, baselines: dict[str, float],
                ram: dict[str, float] | None = None) -> dict[str, Footprint]:
    """Each device's predicted footprint under this plan (its stages, the schedule's in-flight counts, forward
    only where the plan's stage does not train); given each device's RAM, with the heap's room where it fits."""
    model = MemoryModel(table, shape)
    num_stages = len(plan.stages)
    runs_ahead = not plan.trains_every_stage()
    stages: dict[str, list[Footprint]] = {}
    for index, spec in enumerate(plan.stages):
        count = in_flight(shape.schedule, num_stages, index, shape.micro_batches)
        stages.setdefault(spec.device, []).append(model.stage(
            spec.layers[0], spec.layers[1], spec.role, count, plan.trains(index), runs_ahead))
    footprints = {device: model.device(baselines[device], held) for device, held in stages.items()}
    if ram is None:
        return footprints
    return {device: with_heap_room(f, model.heap_room_share, ram[device]) for device, f in footprints.items()}


def with_heap_room(footprint: Footprint, room_share: float, ram: float) -> Footprint:
    """The footprint whose heap may also keep room_share of its activations in flight, as far as the device's RAM
    goes: a device that fits keeps fitting, and one without the room trims its heap more often instead.
    Measured on emulated rpi5-8gb agents that never trimmed (smollm2-135m, 1F1B, 8 micro-batches of 4 x 64): the
    heap settled 0.0-1.0x their activations above the prediction without room (benchmarks/README, "The heap's
    room")."""
    room = min(room_share * footprint.activations, ram - footprint.running)
    return replace(footprint, heap_room=max(0.0, room))


def check_fits(table: CostTable, shape: RunShape, plan: Plan, profiles: list[DeviceProfile]) -> dict[str, Footprint]:
    """Every device's footprint; raise DoesNotFitError naming the devices that would run out."""
    by_name = {p.name: p for p in profiles}
    footprints = plan_memory(table, shape, plan, {p.name: p.baseline_bytes for p in profiles},
                             {p.name: p.ram_bytes for p in profiles})
    over = [(name, f) for name, f in footprints.items() if f.total > by_name[name].ram_bytes]
    if over:
        raise DoesNotFitError("; ".join(
            f"{name} needs {gb(f.total)} ({describe(f)}) but has {gb(by_name[name].ram_bytes)}"
            for name, f in over) + f": {_remedies(shape, plan, over)}")
    return footprints


def describe(footprint: Footprint) -> str:
    """The terms of a footprint in GB, largest first."""
    terms = {"weights": footprint.weights, "activations": footprint.activations, "runtime": footprint.baseline,
             "workspace": footprint.workspace, "LoRA + AdamW": footprint.trainable, "frames": footprint.buffers,
             "heap": footprint.heap + footprint.heap_room}
    return ", ".join(f"{name} {gb(value)}" for name, value in sorted(terms.items(), key=lambda t: -t[1])
                     if value >= 0.01 * footprint.running)


def _remedies(shape: RunShape, plan: Plan, over: list[tuple[str, Footprint]]) -> str:
    hints = []
    if shape.schedule == "gpipe" and shape.micro_batches > 1:
        hints.append("use --schedule 1f1b (GPipe keeps every micro-batch in flight on every stage)")
    if plan.predicted:
        hints.append("plan again for these devices and this shape (without --plan)")
    if any(f.activations > f.weights for _, f in over):
        hints.append(f"lower --micro-batch-size (now {shape.micro_batch_size}) or --seq-len (now {shape.seq_len})")
    hints.append("give the blocks to more devices or to devices with more RAM")
    return "; ".join(hints)


def gb(num_bytes: float, digits: int = 2) -> str:
    return f"{num_bytes / GB:.{digits}f} GB"


def _prefix(values) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=float))])


def _range_max(values: np.ndarray) -> np.ndarray:
    """[L + 1, L + 1]: entry [b, e] is the largest of values[b:e] (0 when the range is empty)."""
    size = len(values)
    table = np.zeros((size + 1, size + 1))
    for start in range(size):
        table[start, start + 1:] = np.maximum.accumulate(values[start:])
    return table
