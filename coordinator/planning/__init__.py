"""Planning: the model cost table (from a config, no weights) and the exact partitioner."""
from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedConfig

from coordinator.planning.base_dtype import choose_base_dtype
from coordinator.planning.cost_table import CostTable, EndCost, config_from_file, model_cost_table
from coordinator.planning.partitioner import DoesNotFitError, RunShape, partition
from device_profiles.profile import DeviceProfile
from edge_runtime.models.lora import LoraSpec
from ringtune.plan import Plan

__all__ = ["CostTable", "DoesNotFitError", "EndCost", "RunShape", "config_from_file", "model_cost_table",
           "partition", "plan_run"]


def plan_run(model: str | PreTrainedConfig, profiles: list[DeviceProfile], owner: str, shape: RunShape,
             lora: LoraSpec = LoraSpec(), model_name: str | None = None, base_dtype: str = "auto") -> Plan:
    """The fastest plan that fits: model is a built-in name, a local model directory or a config;
    model_name is what the plan records (default: the name or the config's name_or_path); base_dtype is
    auto (fp32 if it fits, else the widest dtype that fits) or a dtype."""
    tables: dict[str, CostTable] = {}

    def table_for(dtype: str) -> CostTable:
        if dtype not in tables:
            tables[dtype] = model_cost_table(model, lora, shape.seq_len, model_name, dtype)
        return tables[dtype]

    dtype, why = choose_base_dtype(base_dtype, table_for, profiles, owner, shape)
    return replace(partition(table_for(dtype), profiles, owner, shape), base_dtype=dtype, base_dtype_reason=why)
