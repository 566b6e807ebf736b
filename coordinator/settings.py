"""A run's settings as plain data: what to train and how to recover. No secret lives here.

The pairing token is not a setting: it goes from the command line (or the environment) to the
membership that pairs agents, never into these dataclasses, so nothing that writes settings (run.json,
the adapter's ringtune.json, logs) can leak it. The privacy noise seed is a setting the owner needs,
but it is not written either: whoever holds it can subtract the noise. The owner keeps the seed of
each run in its state directory, so a resumed run draws the same noise without it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ringtune.lora_spec import LoraSpec
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.privacy_spec import PrivacySpec


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
    encrypt: bool = False
    """Encrypt hidden states and gradients on the wire (not only authenticate them)."""
    split: str = "planned"
    """planned: the exact partitioner over the agents' profiles; even: blocks split evenly."""
    link_bytes_per_s: float | None = None
    """Link bandwidth of every agent for the planner (--link-mbit); None: measured to each agent."""
    min_owner_blocks: int = 1
    """Blocks the owner keeps at each end (planned split)."""
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    """What the owner privatizes before hidden states and gradients leave it."""
    wire: str = "fp32"
    """Codecs of the frames (--wire): a ringtune.wire spec (CODEC or ACT,GRAD) or auto."""
    base_dtype: str = "auto"
    """Storage of the frozen base weights on the devices: auto (fp32 if it fits, else the widest dtype that
    fits), fp32, bf16, int8 or int4."""


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


def settings_record(settings: TrainSettings) -> dict:
    """The settings as JSON-ready data (run.json, the adapter's ringtune.json): the one serializer."""
    data = dataclasses.asdict(settings)
    data["out"] = str(settings.out)
    data["privacy"] = {k: v for k, v in settings.privacy.to_dict().items() if k != "seed"}
    return data


def settings_from_record(data: dict, out: Path) -> TrainSettings:
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    fields = {**{k: v for k, v in data.items() if k in known}, "out": out,  # older run.json kept a "token" key
              "lora": LoraSpec.from_dict(data["lora"]), "privacy": PrivacySpec.from_dict(data.get("privacy")),
              "optimizer": OptimizerSpec(**{**data["optimizer"], "betas": tuple(data["optimizer"]["betas"])})}
    return TrainSettings(**fields)
