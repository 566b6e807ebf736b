"""A stage's weights as one safetensors blob, and a stage rebuilt from config + blob alone.

The coordinator cuts slices from the full model; an agent builds the model skeleton on the meta
device (no memory) and materializes only its stages' tensors, so it never holds the whole model.
Blob keys are ``"<stage index>/<name in the stage module>"``; tensors shared inside a stage (tied
embedding and head) are stored once, with the other names listed as aliases in the metadata.
"""
from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.stage import StageModule, stage_lora
from edge_runtime.models.structure import find_parts
from ringtune.plan import StageSpec


class SliceError(ValueError):
    """A slice blob that does not fit the stage it is meant for."""


def stage_tensors(stage: StageModule) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the stage, by name, shared ones under each of their names."""
    named = dict(stage.named_parameters(remove_duplicate=False))
    named.update(stage.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in named.items()}


def pack_slice(stages: dict[int, StageModule]) -> bytes:
    canonical: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for index, stage in stages.items():
        for name, tensor in stage_tensors(stage).items():
            key, identity = f"{index}/{name}", (tensor.data_ptr(), tuple(tensor.shape))
            if identity in canonical:
                aliases[key] = canonical[identity]
            else:
                canonical[identity] = key
                tensors[key] = tensor.contiguous()
    return save_tensors(tensors, metadata={"aliases": json.dumps(aliases)})


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def skeleton(config_dict: dict, lora: LoraSpec) -> nn.Module:
    """The peft-wrapped model on the meta device: structure and names, no memory."""
    from peft import get_peft_model

    config = AutoConfig.for_model(**config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        peft_model = get_peft_model(model, lora.to_peft())
    return peft_model.eval()


def materialize(blob: bytes, config_dict: dict, lora: LoraSpec,
                specs: dict[int, StageSpec]) -> dict[int, tuple[StageModule, dict[str, nn.Parameter]]]:
    """Build the stages {ring index: spec} from a slice blob: (module, LoRA tensors by full peft name)."""
    tensors = load_tensors(blob)
    aliases = json.loads(_metadata(blob).get("aliases", "{}"))
    peft_model = skeleton(config_dict, lora)
    parts = find_parts(peft_model)
    built = {}
    for index, spec in specs.items():
        stage = StageModule(parts, peft_model.config, spec.layers, spec.role)
        _fill(stage, index, tensors, aliases)
        built[index] = (stage, stage_lora(peft_model, stage))
    return built


def _fill(stage: StageModule, index: int, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    """Replace the stage's meta tensors with the blob's; shared names get the same Parameter."""
    made: dict[str, nn.Parameter] = {}
    expected = stage_tensors(stage)
    for name in expected:
        key = f"{index}/{name}"
        source = aliases.get(key, key)
        if source not in tensors:
            raise SliceError(f"the slice has no tensor {key!r}: it was cut for a different plan or model")
        module_path, _, leaf = name.rpartition(".")
        module = stage.get_submodule(module_path)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            if source not in made:
                made[source] = nn.Parameter(tensors[source], requires_grad=old.requires_grad)
            if made[source].shape != old.shape:
                raise SliceError(f"{key}: slice has shape {list(made[source].shape)}, model expects {list(old.shape)}")
            module._parameters[leaf] = made[source]
        else:
            module._buffers[leaf] = tensors[source]


def _metadata(blob: bytes) -> dict[str, str]:
    header_len = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + header_len]).get("__metadata__", {})
