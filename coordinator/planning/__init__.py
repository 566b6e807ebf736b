"""Planning: the model cost table (from a config, no weights) and the exact partitioner.

Importing this package does not import torch: tracing a table does (``cost_table``), and
``plan_run`` reads tables traced before from the cache (``table_cache``).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from coordinator.planning.base_dtype import choose_base_dtype
from coordinator.planning.costs import CostTable, EndCost
from coordinator.planning.partitioner import DoesNotFitError, partition
from device_profiles.profile import DeviceProfile
from ringtune.base_dtype import AUTO
from ringtune.lora_spec import LoraSpec
from ringtune.plan import Plan
from ringtune.run_shape import RunShape

__all__ = ["CostTable", "DoesNotFitError", "EndCost", "config_from_file", "model_cost_table",
           "partition", "plan_run"]
_TRACING = ("config_from_file", "model_cost_table")


def __getattr__(name: str) -> Any:
    if name in _TRACING:  # imports torch, transformers and peft
        from coordinator.planning import cost_table

        return getattr(cost_table, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def plan_run(model: str | Path | Any, profiles: list[DeviceProfile], owner: str, shape: RunShape,
             lora: LoraSpec = LoraSpec(), model_name: str | None = None, base_dtype: str = AUTO) -> Plan:
    """The fastest plan that fits: model is a built-in name, a local model directory, a config.json path
    or a config; model_name is what the plan records (default: the name, the path or the config's
    name_or_path); base_dtype is auto (fp32 if it fits, else the widest dtype that fits) or a dtype."""
    from coordinator.planning.table_cache import cached_cost_table

    tables: dict[str, CostTable] = {}

    def table_for(dtype: str) -> CostTable:
        if dtype not in tables:
            tables[dtype] = cached_cost_table(model, lora, shape.seq_len, model_name, dtype)
        return tables[dtype]

    dtype, why = choose_base_dtype(base_dtype, table_for, profiles, owner, shape)
    return replace(partition(table_for(dtype), profiles, owner, shape), base_dtype=dtype, base_dtype_reason=why)
