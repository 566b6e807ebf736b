"""Planning: the model cost table (from a config, no weights) and the exact partitioner."""
from __future__ import annotations

from transformers import PreTrainedConfig

from coordinator.planning.cost_table import CostTable, EndCost, config_from_file, model_cost_table
from coordinator.planning.partitioner import DoesNotFitError, RunShape, partition
from device_profiles.profile import DeviceProfile
from edge_runtime.models.lora import LoraSpec
from ringtune.plan import Plan

__all__ = ["CostTable", "DoesNotFitError", "EndCost", "RunShape", "config_from_file", "model_cost_table",
           "partition", "plan_run"]


def plan_run(model: str | PreTrainedConfig, profiles: list[DeviceProfile], owner: str, shape: RunShape,
             lora: LoraSpec = LoraSpec(), model_name: str | None = None) -> Plan:
    """The fastest plan that fits: model is a built-in name, a local model directory or a config;
    model_name is what the plan records (default: the name or the config's name_or_path)."""
    table = model_cost_table(model, lora, shape.seq_len, model_name)
    return partition(table, profiles, owner, shape)
