"""Export one stage for the torch runtime: its tensors as safetensors, rebuilt without the full model.

``stage{i}/weights.safetensors`` holds every tensor the stage uses (frozen weights, buffers such
as the rotary frequencies, and the initial LoRA tensors) under its full peft name; ``config.json``
is the model config. ``load_torch_stage`` builds the model skeleton on the meta device (no memory,
no random init), wraps it with the same LoRA spec, and puts the stage's tensors in place, so a
device only ever allocates its own slice.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.stage import StageModule, build_stage
from exporters.manifest import (ExportManifest, ManifestError, RunShape, StageManifest, TensorSpec,
                                dtype_name, sha256_file, stage_io, verified_path)
from ringtune.plan import StageSpec

CONFIG_NAME = "config.json"
ALIASES_KEY = "ringtune.aliases"


def write_config(peft_model: nn.Module, out_dir: Path) -> str:
    """The model config as ``config.json`` in out_dir (shared by the stages); its relative path."""
    text = peft_model.config.to_json_string(use_diff=False)
    (Path(out_dir) / CONFIG_NAME).write_text(text)
    return CONFIG_NAME


def export_torch_stage(peft_model: nn.Module, spec: StageSpec, index: int, shape: RunShape,
                       out_dir: Path) -> StageManifest:
    """Write ``stage{index}/weights.safetensors`` (and config.json once) under out_dir."""
    stage, lora = build_stage(peft_model, spec.layers, spec.role)
    tensors, aliases = _stage_tensors(peft_model, stage)
    (Path(out_dir) / f"stage{index}").mkdir(parents=True, exist_ok=True)
    files = {"weights": f"stage{index}/weights.safetensors", "config": write_config(peft_model, out_dir)}
    save_file(tensors, str(Path(out_dir) / files["weights"]),
              metadata={ALIASES_KEY: json.dumps(aliases, sort_keys=True)})
    inputs, outputs = stage_io(spec.role, stage.config.hidden_size, shape)
    lora_specs = tuple(TensorSpec(name, tuple(p.shape), dtype_name(p.dtype)) for name, p in lora.items())
    return StageManifest(index=index, device=spec.device, role=spec.role, layers=spec.layers, files=files,
                         sha256={path: sha256_file(Path(out_dir) / path) for path in files.values()},
                         inputs=inputs, outputs=outputs, lora=lora_specs)


def load_torch_stage(export_dir: Path, stage_index: int) -> tuple[StageModule, dict[str, nn.Parameter]]:
    """The stage module and its LoRA tensors (as ``build_stage`` returns them), from a torch export."""
    from transformers import AutoConfig, AutoModelForCausalLM

    manifest = ExportManifest.read(export_dir)
    if manifest.runtime != "torch":
        raise ManifestError(f"{export_dir} holds a {manifest.runtime!r} export; export with --runtime torch "
                            f"for a torch agent")
    stage = manifest.stage(stage_index)
    config_data = json.loads(verified_path(export_dir, stage, "config").read_text())
    config = AutoConfig.for_model(config_data.pop("model_type"), **config_data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    peft_model = apply_lora(model, LoraSpec.from_dict(manifest.lora))
    _assign(peft_model, verified_path(export_dir, stage, "weights"))
    module, lora = build_stage(peft_model.eval(), stage.layers, stage.role)
    missing = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing:
        raise ManifestError(f"stage {stage_index}: {missing[:3]} are not in the export; export again with "
                            f"this ringtune version")
    return module, lora


def _stage_tensors(peft_model: nn.Module, stage: StageModule) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The stage's parameters and buffers once each by full peft name, and {alias: name} for tied ones."""
    used = {id(t) for t in [*stage.parameters(), *stage.buffers()]}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_name: dict[int, str] = {}
    named = [*peft_model.named_parameters(remove_duplicate=False), *peft_model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) not in used:
            continue
        if id(tensor) in first_name:
            aliases[name] = first_name[id(tensor)]
        else:
            first_name[id(tensor)] = name
            tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def _assign(peft_model: nn.Module, path: Path) -> None:
    """Replace the meta tensors named in the file (and their tied aliases) with the file's tensors."""
    with safe_open(str(path), framework="pt") as f:
        aliases = json.loads(f.metadata().get(ALIASES_KEY, "{}"))
        loaded = {name: f.get_tensor(name) for name in f.keys()}
    placed: dict[str, torch.Tensor] = {}
    for name, tensor in [*loaded.items(), *((alias, loaded[source]) for alias, source in aliases.items())]:
        module_name, _, leaf = name.rpartition(".")
        module = peft_model.get_submodule(module_name)
        if leaf in module._parameters:
            old = module._parameters[leaf]
            source = aliases.get(name, name)
            if source not in placed:
                placed[source] = nn.Parameter(tensor, requires_grad=old.requires_grad)
            module._parameters[leaf] = placed[source]
        else:
            module._buffers[leaf] = tensor
