"""Export every stage of a plan (or some of its stages) for one runtime, and the manifest that lists them.

ExecuTorch lowering is slow (tens of seconds per block, all of it Python graph passes, one core)
and each stage's ``forward`` and ``vjp`` lower independently, so with ``workers > 1`` each program
is lowered in its own process, the biggest first.
"""
from __future__ import annotations

import importlib.util
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from exporters.manifest import ExportManifest, RunShape, StageManifest, toolchain_versions
from ringtune.quiet import quiet_libraries
from ringtune.plan import Plan, validate_plan

RUNTIMES = ("executorch", "torch")
DEFAULT_SHAPE = RunShape(micro_batch_size=1, seq_len=128)
DEFAULT_LORA = LoraSpec()


def export_plan(model_name: str, plan: Plan, out_dir: Path, runtime: str = "executorch",
                shape: RunShape = DEFAULT_SHAPE, lora_spec: LoraSpec = DEFAULT_LORA,
                workers: int = 1) -> ExportManifest:
    """Write each stage's artifacts under out_dir/stage{i}/ and out_dir/manifest.json."""
    stages = export_stages(model_name, plan, range(len(plan.stages)), out_dir, runtime, shape, lora_spec, workers)
    manifest = export_manifest(model_name, runtime, shape, lora_spec, stages)
    manifest.write(out_dir)
    return manifest


def export_manifest(model_name: str, runtime: str, shape: RunShape, lora_spec: LoraSpec,
                    stages: tuple[StageManifest, ...]) -> ExportManifest:
    return ExportManifest(model=model_name, runtime=runtime, micro_batch_size=shape.micro_batch_size,
                          seq_len=shape.seq_len, lora=lora_spec.to_dict(), versions=export_versions(runtime),
                          stages=stages)


def export_versions(runtime: str) -> dict[str, str]:
    """The toolchain an export depends on (part of the manifest and of export cache keys)."""
    return toolchain_versions("torch", "transformers", "peft", *(("executorch",) if runtime == "executorch" else ()))


def export_stages(model_name: str, plan: Plan, indices, out_dir: Path, runtime: str = "executorch",
                  shape: RunShape = DEFAULT_SHAPE, lora_spec: LoraSpec = DEFAULT_LORA,
                  workers: int = 1) -> tuple[StageManifest, ...]:
    """Write the artifacts of the plan stages at ``indices`` under out_dir/stage{i}/."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == "executorch" and importlib.util.find_spec("executorch") is None:
        raise ValueError("exporting ExecuTorch programs needs the executorch extra on this machine: "
                         "pip install 'ringtune[executorch]'")
    peft_model = _lora_model(model_name, runtime, lora_spec)
    validate_plan(plan, peft_model.config.num_hidden_layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    if runtime == "torch":
        from exporters.torch_export import export_torch_stage
        return tuple(export_torch_stage(peft_model, plan.stages[i], i, shape, out_dir) for i in indices)
    from exporters.executorch_export import stage_programs, write_program, write_stage_manifest
    from edge_runtime.models.stage import build_stage

    jobs = [(i, kind) for i in indices
            for kind in stage_programs(plan.stages[i], bool(build_stage(peft_model, plan.stages[i].layers,
                                                                        plan.stages[i].role)[1]))]
    # Lowering time grows with the graph: blocks, and the joint graph is about twice the forward.
    jobs.sort(key=lambda job: -(plan.stages[job[0]].num_layers + 1) * (2 if job[1] == "vjp" else 1))
    if workers > 1 and len(jobs) > 1:
        context = multiprocessing.get_context("spawn")  # no forked torch/executorch state
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                 initializer=quiet_libraries) as pool:
            futures = [pool.submit(_write_program_job, model_name, lora_spec.to_dict(), plan.to_dict(), i, shape,
                                   str(out_dir), kind) for i, kind in jobs]
            for future in futures:
                future.result()
    else:
        for i, kind in jobs:
            write_program(peft_model, plan.stages[i], i, shape, out_dir, kind)
    return tuple(write_stage_manifest(peft_model, plan.stages[i], i, shape, out_dir) for i in indices)


def _lora_model(model_name: str, runtime: str, lora_spec: LoraSpec):
    model = load_model(model_name)
    if runtime == "executorch":
        # SDPA attention does not lower to XNNPACK; eager attention computes the same function.
        model.set_attn_implementation("eager")
    return apply_lora(model, lora_spec)


_worker_models: dict[tuple, object] = {}


def _write_program_job(model_name: str, lora: dict, plan: dict, index: int, shape: RunShape, out_dir: str,
                       kind: str) -> None:
    """One program, in a worker process (which keeps the model for its next job)."""
    import torch

    from exporters.executorch_export import write_program

    torch.set_num_threads(1)  # one lowering per core; the passes are single-threaded Python anyway
    key = (model_name, json.dumps(lora, sort_keys=True))
    if key not in _worker_models:
        _worker_models.clear()
        _worker_models[key] = _lora_model(model_name, "executorch", LoraSpec.from_dict(lora))
    spec = Plan.from_dict(plan).stages[index]
    write_program(_worker_models[key], spec, index, shape, Path(out_dir), kind)
