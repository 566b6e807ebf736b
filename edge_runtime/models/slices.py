"""A stage's weights as one safetensors file, and a stage rebuilt from config + that file alone.

The coordinator writes each device's slice to a file, one tensor at a time; an agent builds the model
skeleton on the meta device (no memory) and maps only its stages' tensors from its cached copy of the
file (``safe_open``: the frozen weights stay views of the mapped file, never bytes and tensors at
once), so no device holds the whole model. Keys are ``"<stage index>/<name in the stage module>"``;
tensors shared inside a slice (tied embedding and head, the rotary frequencies of several stages) are
stored once, the other names listed as aliases in the metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.safetensors_stream import TensorLayout, write_safetensors
from edge_runtime.models.stage import StageModule, stage_lora
from edge_runtime.models.structure import find_parts
from ringtune.plan import StageSpec


class SliceError(ValueError):
    """A slice file that does not fit the stage it is meant for."""


def stage_tensors(stage: StageModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the stage, by name, shared ones under each of their names."""
    named = dict(stage.named_parameters(remove_duplicate=False))
    named.update(stage.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in named.items()}


def write_slice(stages: dict[int, StageModule], path: Path) -> str:
    """Write the stages' tensors to path, one at a time; return the file's sha256."""
    canonical: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for index, stage in stages.items():
        for name, tensor in stage_tensors(stage).items():
            key, identity = f"{index}/{name}", (tensor.data_ptr(), tuple(tensor.shape))
            if identity in canonical:
                aliases[key] = canonical[identity]
            else:
                canonical[identity] = key
                tensors[key] = tensor
    layout = [TensorLayout(key, tuple(t.shape), t.dtype) for key, t in tensors.items()]
    return write_safetensors(path, layout, lambda entry: tensors[entry.name], {"aliases": json.dumps(aliases)})


def skeleton(config_dict: dict, lora: LoraSpec) -> nn.Module:
    """The peft-wrapped model on the meta device: structure and names, no memory."""
    from peft import get_peft_model

    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        peft_model = get_peft_model(model, lora.to_peft())
    return peft_model.eval()


def materialize(path: Path, config_dict: dict, lora: LoraSpec,
                specs: dict[int, StageSpec]) -> dict[int, tuple[StageModule, dict[str, nn.Parameter]]]:
    """Build the stages {ring index: spec} from a slice file: (module, LoRA tensors by full peft name).
    Frozen tensors stay views of the mapped file; trainable ones are copied (the optimizer writes them)."""
    peft_model = skeleton(config_dict, lora)
    parts = find_parts(peft_model)
    built = {}
    with safe_open(str(path), "pt") as tensors:
        aliases = json.loads((tensors.metadata() or {}).get("aliases", "{}"))
        keys = set(tensors.keys())
        for index, spec in specs.items():
            stage = StageModule(parts, peft_model.config, spec.layers, spec.role)
            _fill(stage, index, tensors, keys, aliases)
            built[index] = (stage, stage_lora(peft_model, stage))
    return built


def _fill(stage: StageModule, index: int, tensors, keys: set[str], aliases: dict[str, str]) -> None:
    """Replace the stage's meta tensors with the file's; shared names get the same Parameter."""
    made: dict[str, nn.Parameter] = {}
    for name in stage_tensors(stage):
        key = f"{index}/{name}"
        source = aliases.get(key, key)
        if source not in keys:
            raise SliceError(f"the slice has no tensor {key!r}: it was cut for a different plan or model")
        module_path, _, leaf = name.rpartition(".")
        module = stage.get_submodule(module_path)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            if source not in made:
                tensor = tensors.get_tensor(source)
                made[source] = nn.Parameter(tensor.clone() if old.requires_grad else tensor,
                                            requires_grad=old.requires_grad)
            if made[source].shape != old.shape:
                raise SliceError(f"{key}: slice has shape {list(made[source].shape)}, model expects {list(old.shape)}")
            module._parameters[leaf] = made[source]
        else:
            module._buffers[leaf] = tensors.get_tensor(source)
