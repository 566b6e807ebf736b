"""Export a model for one runtime, and the manifest that lists what was written.

The runtime's backend writes the files (``edge_runtime.backends.{torch,executorch}.export``); this
driver checks the plan against the model, picks the backend and describes the result. torch: every
stage of a plan (or some of its stages), each cut from the model's weights on its own (a slice file,
mapped), so no process holds the whole model. executorch: one program pair per distinct block
structure, whatever the plan; the weights are program inputs (the agents' slices), so only the
config is read.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_runtime.backends.executorch import export as executorch_export
from edge_runtime.backends.torch.export import export_torch_stages
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_config, weight_source
from ringtune.manifest import BlockProgram, ExportManifest, StageManifest, toolchain_versions
from ringtune.plan import Plan, validate_plan
from ringtune.run_shape import RunShape

DEFAULT_SHAPE = RunShape(micro_batch_size=1, seq_len=128)
DEFAULT_LORA = LoraSpec()


def export_plan(model_name: str, plan: Plan, out_dir: Path, runtime: str = "executorch",
                shape: RunShape = DEFAULT_SHAPE, lora_spec: LoraSpec = DEFAULT_LORA,
                workers: int = 1, progress=None) -> ExportManifest:
    """torch: each stage's artifacts under out_dir/stage{i}/; executorch: each block structure's programs under
    out_dir/block{k}/ (they serve any plan of the model). Then out_dir/manifest.json."""
    if runtime == "executorch":
        executorch_export.check_executorch_dtype(plan.base_dtype)
        validate_plan(plan, load_config(model_name).num_hidden_layers)
        manifest = export_manifest(model_name, runtime, shape, lora_spec, (),
                                   export_programs(model_name, out_dir, shape, lora_spec, workers, progress=progress))
    else:
        stages = export_stages(model_name, plan, range(len(plan.stages)), out_dir, runtime, shape, lora_spec, progress)
        manifest = export_manifest(model_name, runtime, shape, lora_spec, stages, base_dtype=plan.base_dtype)
    manifest.write(out_dir)
    return manifest


def export_manifest(model_name: str, runtime: str, shape: RunShape, lora_spec: LoraSpec,
                    stages: tuple[StageManifest, ...], programs: tuple[BlockProgram, ...] = (),
                    base_dtype: str = "fp32") -> ExportManifest:
    return ExportManifest(model=model_name, runtime=runtime, micro_batch_size=shape.micro_batch_size,
                          seq_len=shape.seq_len, lora=lora_spec.to_dict(), versions=export_versions(runtime),
                          stages=stages, programs=programs, base_dtype=base_dtype)


def export_versions(runtime: str) -> dict[str, str]:
    """The toolchain an export depends on (part of the manifest and of export cache keys)."""
    return toolchain_versions("torch", "transformers", "peft", *(("executorch",) if runtime == "executorch" else ()))


def export_stages(model_name: str, plan: Plan, indices, out_dir: Path, runtime: str = "torch",
                  shape: RunShape = DEFAULT_SHAPE, lora_spec: LoraSpec = DEFAULT_LORA,
                  progress=None) -> tuple[StageManifest, ...]:
    """Write the torch artifacts of the plan stages at ``indices`` under out_dir/stage{i}/. Each stage is cut from
    the model's weights on its own (no process holds the whole model)."""
    if runtime != "torch":
        raise ValueError(f"unknown runtime {runtime!r} for stage exports: use torch (ExecuTorch exports block "
                         f"programs: export_programs)")
    config = load_config(model_name)
    validate_plan(plan, config.num_hidden_layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return export_torch_stages(config, weight_source(model_name), plan, list(indices), out_dir, shape, lora_spec,
                               _progress(progress))


def structures(model_name: str) -> dict[int, list[int]]:
    """The model's distinct block structures: structure index -> its blocks (one program pair each)."""
    return executorch_export.structures(load_config(model_name))


def export_programs(model_name: str, out_dir: Path, shape: RunShape = DEFAULT_SHAPE,
                    lora_spec: LoraSpec = DEFAULT_LORA, workers: int = 1, kinds: list[int] | None = None,
                    progress=None) -> tuple[BlockProgram, ...]:
    """Write the ExecuTorch programs of the model's block structures (``kinds``: some of them) under
    out_dir/block{k}/; only the model's config is read."""
    if importlib.util.find_spec("executorch") is None:
        raise ValueError("exporting ExecuTorch programs needs the executorch extra on this machine: "
                         "pip install 'ringtune[executorch]'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return executorch_export.export_executorch_programs(load_config(model_name), out_dir, shape, lora_spec, workers,
                                                        _progress(progress), kinds)


def _progress(progress):
    from ringtune.progress import PlainProgress

    return progress or PlainProgress()
