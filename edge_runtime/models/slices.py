"""A device's stages as one safetensors file, cut from a weight source one tensor at a time, and the
stages rebuilt from config + that file alone.

Cutting (coordinator, exporter): a skeleton of the model is built without base weights (meta device;
LoRA initialized exactly as on the whole model, buffers such as rotary frequencies computed), each
stage's frozen layers are made compact for the run's base dtype, and the file is written tensor by
tensor: base weights read from the source, quantized there, and dropped before the next. So no
process holds the model, and a weight is quantized by the same function wherever the cut falls.

Loading (agent): the skeleton on the meta device, compacted the same way, filled from the file with
``safe_open``: frozen tensors stay views of the mapped file (never bytes and tensors at once),
trainable ones are copied. Keys are ``"<stage index>/<name in the stage module>"``; tensors shared
inside a slice (tied embedding and head, rotary frequencies of both owner stages) are stored once, the
other names listed as aliases in the metadata, with the base dtype.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.quantization import WeightOrigin, compact_model, quantize
from edge_runtime.models.safetensors_stream import TensorLayout, write_safetensors
from edge_runtime.models.stage import StageModule, stage_lora
from edge_runtime.models.structure import find_parts
from edge_runtime.models.weights.base import WeightSource, resolve_key
from ringtune.plan import StageSpec

SLICE_FORMAT = "2"
"""Changes when the layout of slice files does (part of cache keys)."""
_BLOCK = re.compile(r"^(\d+)/blocks\.(\d+)\.")


class SliceError(ValueError):
    """A slice file that does not fit the stage it is meant for."""


def stage_tensors(stage: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the stage (the objects themselves), by name, shared ones under each of
    their names."""
    named = dict(stage.named_parameters(remove_duplicate=False))
    named.update(stage.named_buffers(remove_duplicate=False))
    return named


@dataclass(frozen=True, slots=True)
class Skeleton:
    model: nn.Module
    """The peft-wrapped causal LM, frozen layers compact; base weights on the meta device."""
    base_dtype: str
    """How its frozen weights are stored."""
    names: dict[int, list[str]]
    """Hugging Face state-dict names of each base parameter, by id (a tied one has several)."""
    origins: dict[int, WeightOrigin]
    """The weight each compact tensor comes from, by the compact tensor's id."""


def skeleton(config: PreTrainedConfig, lora: LoraSpec, base_dtype: str = "fp32", initial_lora: bool = False,
             attn_implementation: str | None = None) -> Skeleton:
    """The model without base weights, its frozen layers compact for base_dtype. initial_lora: LoRA tensors
    initialized exactly as ``apply_lora`` does on the whole model, and buffers computed (a cutter's
    skeleton); otherwise everything is on the meta device (an agent's skeleton, filled from its slice)."""
    kwargs = {"dtype": torch.float32, **({"attn_implementation": attn_implementation} if attn_implementation else {})}
    if initial_lora:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        model.tie_weights()  # ties made under init_empty_weights are lost
        model.requires_grad_(False)
        with _placeholders(model):
            model = apply_lora(model.eval(), lora)
    else:
        from peft import get_peft_model

        with torch.device("meta"):
            model = get_peft_model(AutoModelForCausalLM.from_config(config, **kwargs), lora.to_peft())
    names: dict[int, list[str]] = {}
    for name, param in model.get_base_model().named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name.replace(".base_layer.", "."))
    origins = compact_model(model, base_dtype)
    return Skeleton(model.eval(), base_dtype, names, origins)


class _placeholders:
    """Meta base weights stand in as zero-stride CPU tensors while peft wraps the model: peft moves each new
    LoRA layer to its base layer's device, and LoRA's initial values must come from the same random draws as
    on the whole model. Afterwards the meta weights are put back."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.meta: dict[int, nn.Parameter] = {}

    def __enter__(self) -> None:
        stand_ins: dict[int, nn.Parameter] = {}
        for module in self.model.modules():
            for name, param in module._parameters.items():
                if param is not None and param.is_meta:
                    if id(param) not in stand_ins:
                        zero = torch.zeros((), dtype=param.dtype).expand(param.shape)
                        stand_ins[id(param)] = nn.Parameter(zero, requires_grad=False)
                        self.meta[id(stand_ins[id(param)])] = param
                    module._parameters[name] = stand_ins[id(param)]

    def __exit__(self, *_) -> None:
        for module in self.model.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) in self.meta:
                    module._parameters[name] = self.meta[id(param)]


def build_stages(model: nn.Module, specs: dict[int, StageSpec]) -> dict[int, StageModule]:
    """The stages {ring index: spec} of a (skeleton) model."""
    parts = find_parts(model)
    return {index: StageModule(parts, model.config, spec.layers, spec.role) for index, spec in specs.items()}


@dataclass(frozen=True, slots=True)
class _Entry:
    layout: TensorLayout
    """Key, shape and dtype in the file."""
    identity: tuple
    """Equal for tensors stored once."""
    tensor: torch.Tensor | None
    """A tensor the skeleton holds (LoRA, buffers); None when it is read from the source."""
    origin: WeightOrigin | None
    """For a compact tensor: the weight it comes from."""


def cut_slice(source: WeightSource, skel: Skeleton, specs: dict[int, StageSpec], path: Path,
              on_block: Callable[[], None] = lambda: None) -> str:
    """Write the stages {ring index: spec} of the model (a cutter's skeleton) to path; return the file's sha256.
    on_block() after each block's tensors are written."""
    unique, aliases = _stored_once(_entries(build_stages(skel.model, specs), skel.origins, skel.names))
    block_ends = set(_last_of_each_block(unique))
    prefix = skel.model.get_base_model().base_model_prefix
    quantized: dict[int, dict[str, torch.Tensor]] = {}  # the compact tensors of the weight being written

    def produce(layout: TensorLayout) -> torch.Tensor:
        entry = unique[layout.name]
        if entry.tensor is not None:
            return entry.tensor
        weight_id = id(entry.origin.weight) if entry.origin else entry.identity[1]
        if entry.origin is not None and weight_id in quantized:
            return quantized[weight_id][entry.origin.part]
        value = source.get(resolve_key(source, skel.names[weight_id], prefix))
        if entry.origin is None:
            return _checked(value, layout)
        quantized.clear()
        quantized[weight_id] = quantize(value.T if entry.origin.transposed else value, skel.base_dtype)
        return quantized[weight_id][entry.origin.part]

    metadata = {"aliases": json.dumps(aliases), "base_dtype": skel.base_dtype, "slice_format": SLICE_FORMAT}
    return write_safetensors(path, [entry.layout for entry in unique.values()], produce, metadata,
                             on_tensor=lambda layout: on_block() if layout.name in block_ends else None)


def _stored_once(entries: list[_Entry]) -> tuple[dict[str, _Entry], dict[str, str]]:
    """The entries to write, by key, and the aliases of the others (key -> stored key)."""
    unique: dict[str, _Entry] = {}
    canonical: dict[tuple, str] = {}
    aliases = {}
    for entry in entries:
        if entry.identity in canonical:
            aliases[entry.layout.name] = canonical[entry.identity]
        else:
            canonical[entry.identity] = entry.layout.name
            unique[entry.layout.name] = entry
    return unique, aliases


def _last_of_each_block(unique: dict[str, _Entry]) -> list[str]:
    last: dict[tuple, str] = {}
    for name in unique:
        if (block := _BLOCK.match(name)) is not None:
            last[block.groups()] = name
    return list(last.values())


def _entries(stages: dict[int, StageModule], origins: dict[int, WeightOrigin],
             names: dict[int, list[str]]) -> list[_Entry]:
    entries = []
    for index, stage in stages.items():
        for name, tensor in stage_tensors(stage).items():
            layout = TensorLayout(f"{index}/{name}", tuple(tensor.shape), tensor.dtype)
            if id(tensor) in origins:
                origin = origins[id(tensor)]
                entries.append(_Entry(layout, ("compact", id(origin.weight), origin.part), None, origin))
            elif tensor.is_meta:
                param = _parameter(stage, name)
                if id(param) not in names:
                    raise SliceError(f"{layout.name} has no weights and no name in the model")
                entries.append(_Entry(layout, ("source", id(param)), None, None))
            else:
                entries.append(_Entry(layout, ("tensor", id(tensor)), tensor.detach().contiguous(), None))
    return entries


def _parameter(stage: nn.Module, name: str) -> nn.Parameter:
    module_path, _, leaf = name.rpartition(".")
    return stage.get_submodule(module_path)._parameters[leaf]


def _checked(value: torch.Tensor, layout: TensorLayout) -> torch.Tensor:
    if tuple(value.shape) != layout.shape:
        raise SliceError(f"{layout.name}: the weights hold shape {list(value.shape)}, the model's config says "
                         f"{list(layout.shape)}")
    return value.to(layout.dtype)


def slice_base_dtype(path: Path) -> str:
    with safe_open(str(path), "pt") as tensors:
        return (tensors.metadata() or {}).get("base_dtype", "fp32")


def materialize(path: Path, config_dict: dict, lora: LoraSpec, specs: dict[int, StageSpec],
                attn_implementation: str | None = None) -> dict[int, tuple[StageModule, dict[str, nn.Parameter]]]:
    """Build the stages {ring index: spec} from a slice file: (module, LoRA tensors by full peft name).
    Frozen tensors stay views of the mapped file; trainable ones are copied (the optimizer writes them)."""
    config = AutoConfig.for_model(**config_dict)
    built = {}
    with safe_open(str(path), "pt") as tensors:
        metadata = tensors.metadata() or {}
        aliases = json.loads(metadata.get("aliases", "{}"))
        model = skeleton(config, lora, metadata.get("base_dtype", "fp32"), attn_implementation=attn_implementation).model
        stages = build_stages(model, specs)
        keys = set(tensors.keys())
        for index, stage in stages.items():
            _fill(stage, index, tensors, keys, aliases)
            built[index] = (stage, stage_lora(model, stage))
    return built


def _fill(stage: StageModule, index: int, tensors, keys: set[str], aliases: dict[str, str]) -> None:
    """Replace the stage's meta tensors with the file's; shared names get the same tensor."""
    made: dict[str, torch.Tensor] = {}
    for name, old in stage_tensors(stage).items():
        key = f"{index}/{name}"
        source = aliases.get(key, key)
        if source not in keys:
            raise SliceError(f"the slice has no tensor {key!r}: it was cut for a different plan or model")
        module_path, _, leaf = name.rpartition(".")
        module = stage.get_submodule(module_path)
        trainable = leaf in module._parameters and module._parameters[leaf].requires_grad
        if source not in made:
            tensor = tensors.get_tensor(source)
            if tensor.shape != old.shape or tensor.dtype != old.dtype:
                raise SliceError(f"{key}: the slice has {list(tensor.shape)} {tensor.dtype}, the model expects "
                                 f"{list(old.shape)} {old.dtype}")
            made[source] = nn.Parameter(tensor.clone() if trainable else tensor, requires_grad=trainable) \
                if leaf in module._parameters else tensor
        if leaf in module._parameters:
            module._parameters[leaf] = made[source]
        else:
            module._buffers[leaf] = made[source]
