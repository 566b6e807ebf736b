"""The plan: which device runs which half-open block range, as plain data (JSON).

The coordinator emits a plan; agents and exporters consume it. Stage order is ring order:
stage 0 is the owner's head (embedding + first blocks), the last stage is the owner's tail
(last blocks + final norm + LM head + loss). A one-device run has a single ``full`` stage.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from ringtune.privacy_spec import PrivacySpec

Role = Literal["head", "middle", "tail", "full"]
Schedule = Literal["1f1b", "gpipe", "sequential"]
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)
"""Every pipeline schedule an agent runs (edge_runtime.schedules builds each one's actions)."""
PLANNED_SCHEDULES: tuple[Schedule, ...] = ("1f1b", "gpipe")
"""Schedules the planner's memory and time model covers; sequential, a comparison baseline, runs on
a plan made for 1f1b."""


class PlanError(ValueError):
    """A plan that cannot be run; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class StageSpec:
    device: str
    """Name of the agent that runs this stage."""
    layers: tuple[int, int]
    """Half-open range [start, end) of transformer blocks."""
    role: Role = "middle"
    """head: embedding + blocks; tail: blocks + norm + head + loss; full: the whole model."""

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    """Model name or local path, as given to ``ringtune train --model``."""
    owner: str
    """The device that holds the data, the two ends of the model and the loss."""
    stages: tuple[StageSpec, ...]
    """Stages in ring order."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule for one optimizer step."""
    micro_batches: int = 1
    """Micro-batches per optimizer step."""
    predicted: dict = field(default_factory=dict)
    """Planner's predictions (step seconds, bottleneck, memory); empty for a hand-made plan."""
    privacy: dict = field(default_factory=dict)
    """The owner's privatization (PrivacySpec.public_dict(), no noise seed); empty when off."""
    base_dtype: str = "fp32"
    """How frozen base weights are stored on the devices: fp32, bf16, int8 or int4."""
    base_dtype_reason: str = ""
    """Why the planner chose that dtype (--base-dtype auto), or that it was asked for."""

    def devices(self) -> list[str]:
        """Distinct devices in ring order (the owner first)."""
        seen: list[str] = []
        for stage in self.stages:
            if stage.device not in seen:
                seen.append(stage.device)
        return seen

    def stage_indices(self, device: str) -> list[int]:
        return [i for i, s in enumerate(self.stages) if s.device == device]

    def trains(self, index: int) -> bool:
        """Whether stage index trains its LoRA: every stage, except that when the owner withholds gradients
        (--grad-privacy withhold, --privacy strong) only its tail does and the others run forward only."""
        return PrivacySpec.from_dict(self.privacy).trains(self.stages[index].role)

    def trains_every_stage(self) -> bool:
        """False when some stage runs forward only (then the adapter holds only the trained stages' LoRA)."""
        return all(self.trains(i) for i in range(len(self.stages)))

    def to_dict(self) -> dict:
        """Plain data (lists, not tuples), as it travels in control messages and JSON."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_dict(data: dict) -> "Plan":
        stages = tuple(
            StageSpec(device=s["device"], layers=(int(s["layers"][0]), int(s["layers"][1])),
                      role=s.get("role", "middle"))
            for s in data["stages"]
        )
        return Plan(model=data["model"], owner=data["owner"], stages=stages,
                    schedule=data.get("schedule", "1f1b"),
                    micro_batches=int(data.get("micro_batches", 1)),
                    predicted=dict(data.get("predicted", {})), privacy=dict(data.get("privacy", {})),
                    base_dtype=str(data.get("base_dtype", "fp32")),
                    base_dtype_reason=str(data.get("base_dtype_reason", "")))

    @staticmethod
    def from_json(text: str) -> "Plan":
        return Plan.from_dict(json.loads(text))


def validate_plan(plan: Plan, num_layers: int) -> None:
    """Raise PlanError unless the stages cover [0, num_layers) once, in order, owner at both ends."""
    stages = plan.stages
    if not stages:
        raise PlanError("the plan has no stages")
    if len(stages) == 1:
        only = stages[0]
        if only.role != "full" or only.layers != (0, num_layers) or only.device != plan.owner:
            raise PlanError(f"a one-stage plan must be the owner's 'full' stage over [0, {num_layers})")
        return
    if stages[0].role != "head" or stages[-1].role != "tail":
        raise PlanError("the first stage must have role 'head' and the last role 'tail'")
    if stages[0].device != plan.owner or stages[-1].device != plan.owner:
        raise PlanError(f"the owner {plan.owner!r} must run the first and the last stage")
    expected_start = 0
    for index, stage in enumerate(stages):
        if stage.layers[0] != expected_start or stage.layers[1] < stage.layers[0]:
            raise PlanError(f"stage {index} ({stage.device}) has layers {list(stage.layers)}; "
                            f"expected a range starting at {expected_start}")
        if 0 < index < len(stages) - 1:
            if stage.role != "middle" or stage.num_layers < 1:
                raise PlanError(f"middle stage {index} ({stage.device}) needs at least one block")
            if stage.device == plan.owner:
                raise PlanError("the owner runs only the head and the tail stage")
        expected_start = stage.layers[1]
    if expected_start != num_layers:
        raise PlanError(f"the stages cover blocks [0, {expected_start}) but the model has {num_layers}")
    middle_devices = [s.device for s in stages[1:-1]]
    if len(set(middle_devices)) != len(middle_devices):
        raise PlanError("a device may hold at most one block range in a run")


def even_plan(model: str, num_layers: int, devices: list[str], owner: str,
              schedule: Schedule = "1f1b", micro_batches: int = 1) -> Plan:
    """Blocks split as evenly as possible; the owner's share is divided between head and tail.

    The owner counts as one device: with D devices each gets about num_layers / D blocks.
    """
    if owner not in devices:
        raise PlanError(f"the owner {owner!r} is not among the devices {devices}")
    if len(devices) == 1:
        return Plan(model, owner, (StageSpec(owner, (0, num_layers), "full"),), schedule, micro_batches)
    if len(devices) > num_layers:
        raise PlanError(f"{len(devices)} devices but the model has only {num_layers} blocks: every "
                        f"device other than the owner needs at least one block; use at most "
                        f"{num_layers} devices")
    others = [d for d in devices if d != owner]
    base, extra = divmod(num_layers, len(devices))
    shares = [base + (1 if i < extra else 0) for i in range(len(devices))]
    owner_share, middle_shares = shares[0], shares[1:]
    head_blocks = owner_share // 2
    stages = [StageSpec(owner, (0, head_blocks), "head")]
    start = head_blocks
    for device, share in zip(others, middle_shares):
        stages.append(StageSpec(device, (start, start + share), "middle"))
        start += share
    stages.append(StageSpec(owner, (start, num_layers), "tail"))
    plan = Plan(model, owner, tuple(stages), schedule, micro_batches)
    validate_plan(plan, num_layers)
    return plan
