"""Export every stage of a plan for one runtime, and the manifest that lists them."""
from __future__ import annotations

from pathlib import Path

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from exporters.manifest import ExportManifest, RunShape, toolchain_versions
from ringtune.plan import Plan, validate_plan

RUNTIMES = ("executorch", "torch")
DEFAULT_SHAPE = RunShape(micro_batch_size=1, seq_len=128)
DEFAULT_LORA = LoraSpec()


def export_plan(model_name: str, plan: Plan, out_dir: Path, runtime: str = "executorch",
                shape: RunShape = DEFAULT_SHAPE, lora_spec: LoraSpec = DEFAULT_LORA) -> ExportManifest:
    """Write each stage's artifacts under out_dir/stage{i}/ and out_dir/manifest.json."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    model = load_model(model_name)
    validate_plan(plan, model.config.num_hidden_layers)
    if runtime == "executorch":
        from exporters.executorch_export import export_executorch_stage as export_stage
        # SDPA attention does not lower to XNNPACK; eager attention computes the same function.
        model.set_attn_implementation("eager")
    else:
        from exporters.torch_export import export_torch_stage as export_stage
    peft_model = apply_lora(model, lora_spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = tuple(export_stage(peft_model, spec, index, shape, out_dir) for index, spec in enumerate(plan.stages))
    packages = ("torch", "transformers", "peft") + (("executorch",) if runtime == "executorch" else ())
    manifest = ExportManifest(model=model_name, runtime=runtime, micro_batch_size=shape.micro_batch_size,
                              seq_len=shape.seq_len, lora=lora_spec.to_dict(),
                              versions=toolchain_versions(*packages), stages=stages)
    manifest.write(out_dir)
    return manifest
