"""An agent's ExecuTorch stages: its slice's weights run by block programs from shipped blobs or a local export
directory, checked against the run.

Shipped exports arrive as content-addressed blobs (the manifest and each program); they are linked
into an export directory under the agent's state directory, so the runner reads the same layout as
``ringtune export`` writes, and checks every file against the manifest hashes again.
"""
from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.backends.executorch.runner import (
    INSTALL_HINT,
    ExecuTorchNotInstalledError,
    ExecuTorchStageRunner,
    load_block_programs,
)
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.slices import materialize
from edge_runtime.models.stage import StageModule
from edge_runtime.slice_cache import SliceCache
from ringtune.manifest import MANIFEST_NAME, ExportManifest, ManifestError
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import StageSpec
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
    for entry in manifest.programs:
        for relative in entry.files.values():
            target = directory / relative
            if target.exists():
                continue
            digest = entry.sha256[relative]
            if not cache.has(digest):
                raise ManifestError(f"{entry.label}: {relative} (sha256 {digest[:12]}...) was not uploaded; "
                                    f"the coordinator must send it before assign")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(cache.path(digest), target)
    (directory / MANIFEST_NAME).write_text(text)
    return directory


def executorch_runners(export_dir: Path, slice_path: Path, config: dict, lora: LoraSpec, specs: dict[int, StageSpec],
                       shape: RunShape, optimizer: OptimizerSpec, threads: int) -> dict[int, ExecuTorchStageRunner]:
    """Runners for the stages {ring index: spec} of an agent's slice file, their blocks run by the export's
    programs (after checking they were made for this run) on an XNNPACK thread pool of ``threads``."""
    manifest = ExportManifest.read(export_dir)
    _check_matches(manifest, export_dir, shape, lora)
    programs = load_block_programs(export_dir, threads)
    built = materialize(slice_path, config, lora, specs)
    return {index: ExecuTorchStageRunner(module, params, programs, optimizer)
            for index, (module, params) in built.items()}


def block_runner(export_dir: Path, stage: StageModule, lora: LoraSpec, shape: RunShape,
                 threads: int) -> ExecuTorchStageRunner:
    """A runner of calibration's one-block stage (``edge_runtime.calibration.one_block_stage``) through the export's
    programs, after checking they were made for this run."""
    manifest = ExportManifest.read(export_dir)
    _check_matches(manifest, export_dir, shape, lora)
    trained = {name: p for name, p in stage.named_parameters() if p.requires_grad}
    return ExecuTorchStageRunner(stage, trained, load_block_programs(export_dir, threads), OptimizerSpec())


def _check_matches(manifest: ExportManifest, export_dir: Path, shape: RunShape, lora: LoraSpec) -> None:
    where = Path(export_dir) / MANIFEST_NAME
    fix = "export again with `ringtune export --runtime executorch` for this run's shape and LoRA"
    exported = (manifest.micro_batch_size, manifest.seq_len)
    if exported != (shape.micro_batch_size, shape.seq_len):
        raise ManifestError(f"the ExecuTorch programs in {where} were exported for micro-batches of {exported[0]} x "
                            f"{exported[1]} tokens but this run uses {shape.micro_batch_size} x {shape.seq_len}: "
                            f"{fix} (--micro-batch-size {shape.micro_batch_size} --seq-len {shape.seq_len}), "
                            f"or train with --micro-batch-size {exported[0]} --seq-len {exported[1]}")
    shipped = LoraSpec.from_dict(manifest.lora)
    if (shipped.r, shipped.alpha, shipped.target_modules) != (lora.r, lora.alpha, lora.target_modules):
        raise ManifestError(f"the ExecuTorch programs in {where} were exported with LoRA {manifest.lora}, the run "
                            f"uses {lora.to_dict()}: {fix} (same --lora-r, --lora-alpha, --lora-targets)")
