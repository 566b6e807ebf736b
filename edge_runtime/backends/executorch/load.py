"""An agent's ExecuTorch stages: from shipped blobs or a local export directory, checked against the run.

Shipped exports arrive as content-addressed blobs (the manifest and each stage file); they are
linked into an export directory under the agent's state directory, so the runner reads the same
layout as ``ringtune export`` writes, and checks every file against the manifest hashes again.
"""
from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.backends.executorch.runner import (
    INSTALL_HINT,
    ExecuTorchNotInstalledError,
    ExecuTorchStageRunner,
)
from edge_runtime.models.lora import LoraSpec
from edge_runtime.slice_cache import SliceCache
from ringtune.manifest import MANIFEST_NAME, ExportManifest, ManifestError
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan
from ringtune.run_shape import RunShape


def require_executorch() -> None:
    """Fail at agent start, not at the first run, when the runtime is missing."""
    try:
        import executorch.runtime  # noqa: F401
    except ImportError as error:
        raise ExecuTorchNotInstalledError(f"--runtime executorch needs the ExecuTorch runtime ({error}): "
                                          f"{INSTALL_HINT}, or run with --runtime torch") from None


def export_from_cache(cache: SliceCache, manifest_digest: str, root: Path) -> Path:
    """An export directory of hard links to the cached blobs the manifest names (no copies)."""
    text = cache.read(manifest_digest).decode()
    manifest = ExportManifest.from_json(text, f"shipped manifest {manifest_digest[:12]}")
    directory = root / manifest_digest
    for stage in manifest.stages:
        for relative in stage.files.values():
            target = directory / relative
            if target.exists():
                continue
            digest = stage.sha256[relative]
            if not cache.has(digest):
                raise ManifestError(f"stage {stage.index}: {relative} (sha256 {digest[:12]}...) was not uploaded; "
                                    f"the coordinator must send it before assign")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(cache.path(digest), target)
    (directory / MANIFEST_NAME).write_text(text)
    return directory


def executorch_runners(export_dir: Path, plan: Plan, indices: list[int], shape: RunShape, lora: LoraSpec,
                       optimizer: OptimizerSpec) -> dict[int, ExecuTorchStageRunner]:
    """Runners for this agent's stages, after checking the export was made for this run."""
    manifest = ExportManifest.read(export_dir)
    for index in indices:
        _check_matches(manifest, export_dir, index, plan, shape, lora)
    return {index: ExecuTorchStageRunner(export_dir, index, optimizer) for index in indices}


def _check_matches(manifest: ExportManifest, export_dir: Path, index: int, plan: Plan, shape: RunShape,
                   lora: LoraSpec) -> None:
    stage = manifest.stage(index)
    program = Path(export_dir) / stage.files["forward"]
    fix = "export again with `ringtune export` for this run's plan and shape"
    exported = (manifest.micro_batch_size, manifest.seq_len)
    if exported != (shape.micro_batch_size, shape.seq_len):
        raise ManifestError(f"stage {index}: {program} was exported for micro-batches of {exported[0]} x "
                            f"{exported[1]} tokens but this run uses {shape.micro_batch_size} x {shape.seq_len}: "
                            f"{fix} (--micro-batch-size {shape.micro_batch_size} --seq-len {shape.seq_len}), "
                            f"or train with --micro-batch-size {exported[0]} --seq-len {exported[1]}")
    spec = plan.stages[index]
    if (manifest.model, stage.layers, stage.role) != (plan.model, spec.layers, spec.role):
        raise ManifestError(f"stage {index}: {program} holds {manifest.model} blocks {list(stage.layers)} "
                            f"({stage.role}) but the plan gives {plan.model} blocks {list(spec.layers)} "
                            f"({spec.role}): {fix}")
    if LoraSpec.from_dict(manifest.lora) != lora:
        raise ManifestError(f"stage {index}: {program} was exported with LoRA {manifest.lora}, the run uses "
                            f"{lora.to_dict()}: {fix} (same --lora-r, --lora-alpha, --seed)")
