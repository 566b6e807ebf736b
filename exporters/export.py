"""Export every stage of a plan (or some of its stages) for one runtime, and the manifest that lists them.

The runtime's backend writes the stages (``edge_runtime.backends.{torch,executorch}.export``); this
driver checks the plan against the model, picks the backend and describes the result. Stages are cut
from the model's weights one at a time (a slice file, mapped), so no process holds the whole model.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_runtime.backends.executorch.export import export_executorch_stages
from edge_runtime.backends.torch.export import export_torch_stages
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_config, weight_source
from ringtune.manifest import ExportManifest, StageManifest, toolchain_versions
from ringtune.plan import Plan, validate_plan
from ringtune.run_shape import RunShape

RUNTIMES = ("executorch", "torch")
DEFAULT_SHAPE = RunShape(micro_batch_size=1, seq_len=128)
DEFAULT_LORA = LoraSpec()


def export_plan(model_name: str, plan: Plan, out_dir: Path, runtime: str = "executorch",
                shape: RunShape = DEFAULT_SHAPE, lora_spec: LoraSpec = DEFAULT_LORA,
                workers: int = 1, progress=None) -> ExportManifest:
    """Write each stage's artifacts under out_dir/stage{i}/ and out_dir/manifest.json."""
    stages = export_stages(model_name, plan, range(len(plan.stages)), out_dir, runtime, shape, lora_spec, workers,
                           progress)
    manifest = export_manifest(model_name, runtime, shape, lora_spec, stages, plan.base_dtype)
    manifest.write(out_dir)
    return manifest


def export_manifest(model_name: str, runtime: str, shape: RunShape, lora_spec: LoraSpec,
                    stages: tuple[StageManifest, ...], base_dtype: str = "fp32") -> ExportManifest:
    return ExportManifest(model=model_name, runtime=runtime, micro_batch_size=shape.micro_batch_size,
                          seq_len=shape.seq_len, lora=lora_spec.to_dict(), versions=export_versions(runtime),
                          stages=stages, base_dtype=base_dtype)


def export_versions(runtime: str) -> dict[str, str]:
    """The toolchain an export depends on (part of the manifest and of export cache keys)."""
    return toolchain_versions("torch", "transformers", "peft", *(("executorch",) if runtime == "executorch" else ()))


def export_stages(model_name: str, plan: Plan, indices, out_dir: Path, runtime: str = "executorch",
                  shape: RunShape = DEFAULT_SHAPE, lora_spec: LoraSpec = DEFAULT_LORA,
                  workers: int = 1, progress=None) -> tuple[StageManifest, ...]:
    """Write the artifacts of the plan stages at ``indices`` under out_dir/stage{i}/. Each stage is cut from the
    model's weights on its own (no process holds the whole model)."""
    from ringtune.progress import PlainProgress

    progress = progress or PlainProgress()
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == "executorch" and importlib.util.find_spec("executorch") is None:
        raise ValueError("exporting ExecuTorch programs needs the executorch extra on this machine: "
                         "pip install 'ringtune[executorch]'")
    config = load_config(model_name)
    validate_plan(plan, config.num_hidden_layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    source = weight_source(model_name)
    if runtime == "torch":
        return export_torch_stages(config, source, plan, indices, out_dir, shape, lora_spec, progress)
    return export_executorch_stages(config, source, plan, indices, out_dir, shape, lora_spec, workers, progress)
