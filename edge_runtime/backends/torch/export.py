"""Export stages for the torch runtime: each its slice file, cut from the weights without the whole model.

``stage{i}/weights.safetensors`` is the stage's slice (``edge_runtime.models.slices``: frozen weights at
the plan's base dtype, buffers such as the rotary frequencies, and the initial LoRA tensors), cut by the
same function as the slices the coordinator ships; ``config.json`` is the model config.
``load.load_torch_stage`` builds the skeleton on the meta device and maps only this stage.
"""
from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedConfig

from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.slices import Skeleton, build_stages, cut_slice, skeleton
from edge_runtime.models.stage import stage_lora
from edge_runtime.models.weights import WeightSource
from ringtune.manifest import StageManifest, TensorSpec, dtype_name, sha256_file, stage_io
from ringtune.plan import Plan, StageSpec
from ringtune.progress import Progress
from ringtune.run_shape import RunShape

CONFIG_NAME = "config.json"


def write_config(config: PreTrainedConfig, out_dir: Path) -> str:
    """The model config as ``config.json`` in out_dir (shared by the stages); its relative path."""
    (Path(out_dir) / CONFIG_NAME).write_text(config.to_json_string(use_diff=False))
    return CONFIG_NAME


def export_torch_stages(config: PreTrainedConfig, source: WeightSource, plan: Plan, indices: list[int],
                        out_dir: Path, shape: RunShape, lora_spec: LoraSpec,
                        progress: Progress) -> tuple[StageManifest, ...]:
    """Write the plan stages at ``indices`` under out_dir/stage{i}/, their frozen weights at the plan's base
    dtype, each cut from the model's weights on its own."""
    skel = skeleton(config, lora_spec, plan.base_dtype, initial_lora=True)
    stages = []
    blocks = sum(plan.stages[i].num_layers for i in indices)
    with progress.task(f"cutting {plan.base_dtype} torch stages {indices}", blocks, "blocks") as task:
        for i in indices:
            stages.append(export_torch_stage(source, skel, plan.stages[i], i, shape, out_dir))
            task.advance(plan.stages[i].num_layers)
    return tuple(stages)


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
