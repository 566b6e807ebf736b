"""Export one stage for the torch runtime: its slice file, cut from the weights without the whole model.

``stage{i}/weights.safetensors`` is the stage's slice (``edge_runtime.models.slices``: frozen weights at
the plan's base dtype, buffers such as the rotary frequencies, and the initial LoRA tensors), cut by the
same function as the slices the coordinator ships; ``config.json`` is the model config.
``load_torch_stage`` builds the skeleton on the meta device and maps only this stage.
"""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from transformers import PreTrainedConfig

from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.slices import Skeleton, SliceError, build_stages, cut_slice, materialize
from edge_runtime.models.stage import StageModule, stage_lora
from edge_runtime.models.weights import WeightSource
from ringtune.manifest import (
    ExportManifest,
    ManifestError,
    StageManifest,
    TensorSpec,
    dtype_name,
    sha256_file,
    stage_io,
    verified_path,
)
from ringtune.plan import StageSpec
from ringtune.run_shape import RunShape

CONFIG_NAME = "config.json"


def write_config(config: PreTrainedConfig, out_dir: Path) -> str:
    """The model config as ``config.json`` in out_dir (shared by the stages); its relative path."""
    (Path(out_dir) / CONFIG_NAME).write_text(config.to_json_string(use_diff=False))
    return CONFIG_NAME


def export_torch_stage(source: WeightSource, skel: Skeleton, spec: StageSpec, index: int, shape: RunShape,
                       out_dir: Path) -> StageManifest:
    """Write ``stage{index}/weights.safetensors`` (and config.json once) under out_dir."""
    config = skel.model.get_base_model().config
    (Path(out_dir) / f"stage{index}").mkdir(parents=True, exist_ok=True)
    files = {"weights": f"stage{index}/weights.safetensors", "config": write_config(config, out_dir)}
    digest = cut_slice(source, skel, {index: spec}, Path(out_dir) / files["weights"])
    lora = stage_lora(skel.model, build_stages(skel.model, {index: spec})[index])
    inputs, outputs = stage_io(spec.role, config.hidden_size, shape)
    lora_specs = tuple(TensorSpec(name, tuple(p.shape), dtype_name(p.dtype)) for name, p in lora.items())
    return StageManifest(index=index, device=spec.device, role=spec.role, layers=spec.layers, files=files,
                         sha256={files["weights"]: digest, CONFIG_NAME: sha256_file(Path(out_dir) / CONFIG_NAME)},
                         inputs=inputs, outputs=outputs, lora=lora_specs)


def load_torch_stage(export_dir: Path, stage_index: int) -> tuple[StageModule, dict[str, nn.Parameter]]:
    """The stage module and its LoRA tensors (as ``build_stage`` returns them), from a torch export."""
    manifest = ExportManifest.read(export_dir)
    if manifest.runtime != "torch":
        raise ManifestError(f"{export_dir} holds a {manifest.runtime!r} export; export with --runtime torch "
                            f"for a torch agent")
    stage = manifest.stage(stage_index)
    config = json.loads(verified_path(export_dir, stage, "config").read_text())
    weights = verified_path(export_dir, stage, "weights")
    spec = StageSpec(stage.device, stage.layers, stage.role)
    try:
        return materialize(weights, config, LoraSpec.from_dict(manifest.lora), {stage_index: spec})[stage_index]
    except SliceError as error:
        raise ManifestError(f"stage {stage_index}: {error}; export again with this ringtune version") from None
