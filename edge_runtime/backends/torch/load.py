"""An agent's torch stages: mapped from the slice the coordinator shipped, or from a ``ringtune export``
directory; frozen tensors stay views of the mapped file."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from edge_runtime.backends.torch.runner import TorchStageRunner
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.slices import SliceError, materialize
from edge_runtime.models.stage import StageModule
from ringtune.manifest import ExportManifest, ManifestError, verified_path
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import StageSpec


def torch_runners(slice_path: Path, config: dict, lora: LoraSpec, specs: dict[int, StageSpec],
                  optimizer: OptimizerSpec) -> dict[int, TorchStageRunner]:
    """Runners for the stages {ring index: spec} of an agent's slice file."""
    built = materialize(slice_path, config, lora, specs)
    return {i: TorchStageRunner(module, params, optimizer) for i, (module, params) in built.items()}


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
