"""Export every stage of a plan (or some of its stages) for one runtime, and the manifest that lists them.

ExecuTorch lowering is slow (tens of seconds per block, all of it Python graph passes, one core)
and each stage's ``forward`` and ``vjp`` lower independently, so with ``workers > 1`` each program
is lowered in its own process, the biggest first. Stages are cut from the model's weights one at a
time (a slice file, mapped), so no process holds the whole model.
"""
from __future__ import annotations

import importlib.util
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_config, weight_source
from edge_runtime.models.slices import cut_slice, materialize, skeleton
from ringtune.manifest import ExportManifest, StageManifest, toolchain_versions
from ringtune.plan import Plan, validate_plan
from ringtune.lifetime import end_with_parent
from ringtune.quiet import quiet_libraries
from ringtune.run_shape import RunShape

RUNTIMES = ("executorch", "torch")
DEFAULT_SHAPE = RunShape(micro_batch_size=1, seq_len=128)
DEFAULT_LORA = LoraSpec()
SCRATCH_SLICE = "slice.safetensors.tmp"
"""A stage's fp32 slice while its ExecuTorch programs are lowered (deleted after)."""


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


def check_executorch_dtype(base_dtype: str) -> None:
    """ExecuTorch programs keep their frozen weights in fp32 for now: refuse other dtypes in one line."""
    if base_dtype != "fp32":
        raise ValueError(f"ExecuTorch stages take --base-dtype fp32 only (XNNPACK's int8 linears also quantize "
                         f"activations, which would break exactness): use --base-dtype fp32, or run the "
                         f"{base_dtype} stages with --runtime torch")


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
        from exporters.torch_export import export_torch_stage

        skel = skeleton(config, lora_spec, plan.base_dtype, initial_lora=True)
        stages = []
        blocks = sum(plan.stages[i].num_layers for i in indices)
        with progress.task(f"cutting {plan.base_dtype} torch stages {indices}", blocks, "blocks") as task:
            for i in indices:
                stages.append(export_torch_stage(source, skel, plan.stages[i], i, shape, out_dir))
                task.advance(plan.stages[i].num_layers)
        return tuple(stages)
    check_executorch_dtype(plan.base_dtype)
    skel = skeleton(config, lora_spec, initial_lora=True, attn_implementation="eager")
    slices = {}
    for i in indices:
        (out_dir / f"stage{i}").mkdir(exist_ok=True)
        slices[i] = out_dir / f"stage{i}" / SCRATCH_SLICE
        cut_slice(source, skel, {i: plan.stages[i]}, slices[i])
    try:
        return _export_programs(config.to_dict(), plan, indices, slices, out_dir, shape, lora_spec, workers, progress)
    finally:
        for path in slices.values():
            path.unlink(missing_ok=True)


def _export_programs(config: dict, plan: Plan, indices: list[int], slices: dict[int, Path], out_dir: Path,
                     shape: RunShape, lora_spec: LoraSpec, workers: int, progress) -> tuple[StageManifest, ...]:
    from exporters.executorch_export import stage_programs, write_program, write_stage_manifest

    stages = {i: _stage(slices[i], config, lora_spec, plan.stages[i], i) for i in indices}
    jobs = [(i, kind) for i in indices for kind in stage_programs(plan.stages[i], bool(stages[i][1]))]
    # Lowering time grows with the graph: blocks, and the joint graph is about twice the forward.
    jobs.sort(key=lambda job: -(plan.stages[job[0]].num_layers + 1) * (2 if job[1] == "vjp" else 1))
    blocks = sum(plan.stages[i].num_layers for i, _ in jobs)
    with progress.task(f"exporting ExecuTorch programs of stages {indices}", blocks, "blocks") as task:
        if workers > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")  # no forked torch/executorch state
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                     initializer=_start_worker) as pool:
                futures = {pool.submit(_write_program_job, str(slices[i]), config, lora_spec.to_dict(),
                                       plan.to_dict(), i, shape, str(out_dir), kind): i for i, kind in jobs}
                for future in as_completed(futures):
                    future.result()
                    task.advance(plan.stages[futures[future]].num_layers)
        else:
            for i, kind in jobs:
                write_program(*stages[i], plan.stages[i], i, shape, out_dir, kind)
                task.advance(plan.stages[i].num_layers)
    return tuple(write_stage_manifest(*stages[i], plan.stages[i], i, shape, out_dir) for i in indices)


def _start_worker() -> None:
    """A lowering worker: library warnings filtered, and it ends with the coordinator (even a killed one)."""
    quiet_libraries()
    end_with_parent()


def _stage(slice_path: Path, config: dict, lora_spec: LoraSpec, spec, index: int):
    """(stage module, LoRA tensors) mapped from the stage's slice, with eager attention (SDPA does not lower to
    XNNPACK; eager attention computes the same function)."""
    return materialize(slice_path, config, lora_spec, {index: spec}, attn_implementation="eager")[index]


def _write_program_job(slice_path: str, config: dict, lora: dict, plan: dict, index: int, shape: RunShape,
                       out_dir: str, kind: str) -> None:
    """One program, in a worker process."""
    import torch

    from exporters.executorch_export import write_program

    torch.set_num_threads(1)  # one lowering per core; the passes are single-threaded Python anyway
    spec = Plan.from_dict(plan).stages[index]
    write_program(*_stage(Path(slice_path), config, LoraSpec.from_dict(lora), spec, index), spec, index, shape,
                  Path(out_dir), kind)
