"""Everything a run writes under its --out directory, from one writer.

``OUT/run.json`` (lineage and settings, for --resume), ``plan.json``, ``metrics.jsonl`` (one JSON
line per step or event), ``checkpoints/`` (atomic, hashed), the adapter (``adapter_config.json``,
``adapter_model.safetensors``) with its ``ringtune.json`` (plan, losses, settings), ``logs/``
(local agents' stderr) and, with --timeline, ``timeline.png`` (drawn by coordinator/timeline.py at the
path given here). Settings pass through ``settings_record``, which has no secret to write: the pairing
token never reaches this module.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from coordinator.settings import TrainSettings, settings_from_record, settings_record
from edge_runtime.checkpoint_store import CheckpointStore
from ringtune.adapter_metadata import ADAPTER_METADATA_FILE
from ringtune.plan import Plan

RUN_FILE = "run.json"
PLAN_FILE = "plan.json"
METRICS_FILE = "metrics.jsonl"
TIMELINE_FILE = "timeline.png"


class RunStore:
    def __init__(self, out: Path) -> None:
        self.out = out
        self._metrics = None

    @property
    def logs(self) -> Path:
        """Where local agents write their logs."""
        return self.out / "logs"

    @property
    def timeline(self) -> Path:
        """Where --timeline draws a typical step."""
        return self.out / TIMELINE_FILE

    @property
    def checkpoints(self) -> CheckpointStore:
        return CheckpointStore(self.out / "checkpoints")

    def start(self, lineage: str, settings: TrainSettings, resume: bool) -> None:
        """Record the run (run.json) and open metrics.jsonl (appended to when resuming)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / RUN_FILE).write_text(json.dumps({"lineage": lineage, "settings": settings_record(settings)},
                                                    indent=1))
        self._metrics = (self.out / METRICS_FILE).open("a" if resume else "w")

    def read_run(self) -> tuple[TrainSettings, str]:
        """(settings, lineage id) of the run saved here, for --resume."""
        path = self.out / RUN_FILE
        if not path.is_file():
            raise ValueError(f"{self.out} holds no ringtune run ({RUN_FILE} is missing): give the --out directory "
                             f"of the run to continue")
        data = json.loads(path.read_text())
        return settings_from_record(data["settings"], self.out), data["lineage"]

    def read_plan(self) -> Plan | None:
        """The plan the run last trained on (for --resume), if it got that far."""
        path = self.out / PLAN_FILE
        return Plan.from_json(path.read_text()) if path.exists() else None

    def write_plan(self, plan: Plan) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / PLAN_FILE).write_text(plan.to_json())

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl (a step, or an event such as a recovery), flushed at once."""
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()

    def write_adapter(self, settings: TrainSettings, plan: Plan, tensors: dict[str, torch.Tensor],
                      losses: list[float]) -> Path:
        from edge_runtime.models.lora import write_adapter

        metadata = {"plan": plan.to_dict(), "losses": losses, "steps": settings.steps,
                    "settings": settings_record(settings)}
        write_adapter(self.out, settings.lora, settings.model, tensors, partial=not plan.trains_every_stage())
        (self.out / ADAPTER_METADATA_FILE).write_text(json.dumps(metadata, indent=1))
        return self.out

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None


def step_records(out: Path) -> list[dict]:
    """The per-step lines of a run's metrics.jsonl (events such as checkpoints and recoveries left out)."""
    lines = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    return [line for line in lines if "event" not in line]
