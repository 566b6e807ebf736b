"""ExecuTorch programs for the agents that run that runtime: exported once per stage, cached, shipped.

The coordinator exports the stages of every agent whose hello says ``runtime: executorch`` (and
that has no export directory of its own), at the run's fixed micro-batch shape. Each stage's
export is cached under ``$RINGTUNE_CACHE/exports/KEY`` where KEY hashes everything the programs
depend on (model, LoRA, shape, the stage's position, blocks and role, toolchain versions), so a
second run, or a mixed ring reusing some stages, exports nothing. An agent gets its own stages'
files and a manifest that lists only them, as content-addressed blobs (sha256-checked on upload,
and against the manifest again when loaded).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from coordinator.slices import Blob
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import cache_dir, model_identity
from exporters.export import export_manifest, export_stages, export_versions
from ringtune.manifest import FORMAT_VERSION, ManifestError, StageManifest
from ringtune.plan import Plan
from ringtune.protocol import HelloReply
from ringtune.run_shape import RunShape

RUNTIME = "executorch"
STAGE_MANIFEST = "stage.json"


@dataclass(frozen=True, slots=True)
class AgentExport:
    manifest: Blob
    """The agent's ExportManifest (its stages only) as JSON: what ``assign`` names."""
    files: tuple[Blob, ...]
    """Its stages' programs and initial LoRA tensors."""


def runs_torch(hello: HelloReply) -> bool:
    return hello.runtime == "torch"


def needs_export(hello: HelloReply) -> bool:
    """An agent that runs ExecuTorch and has not loaded its own export directory."""
    return hello.runtime == RUNTIME and not hello.export_dir


def agent_exports(model: str, plan: Plan, names: list[str], shape: RunShape, lora: LoraSpec,
                  root: Path | None = None, workers: int = 2, progress=None) -> tuple[dict[str, AgentExport], list[int]]:
    """Export (or find in the cache) the stages of ``names`` and pack each agent's blobs; also
    the stages that had to be exported."""
    root = Path(root or cache_dir() / "exports")
    root.mkdir(parents=True, exist_ok=True)
    indices = [i for name in names for i in plan.stage_indices(name)]
    keys = {i: stage_key(model, plan, i, shape, lora) for i in indices}
    missing = [i for i in indices if not (root / keys[i] / STAGE_MANIFEST).is_file()]
    if missing:
        _export_into_cache(model, plan, missing, keys, shape, lora, root, workers, progress)
    exports = {}
    for name in names:
        stages = tuple(replace(_cached_stage(root / keys[i]), device=name) for i in plan.stage_indices(name))
        manifest = export_manifest(model, RUNTIME, shape, lora, stages)
        files = tuple(_cached_file(root / keys[s.index], s, relative) for s in stages for relative in s.files.values())
        exports[name] = AgentExport(Blob.of_bytes(manifest.to_json().encode()), files)
    return exports, missing


def stage_key(model: str, plan: Plan, index: int, shape: RunShape, lora: LoraSpec) -> str:
    """Hash of everything one stage's programs depend on."""
    spec = plan.stages[index]
    identity = {"model": model, "model_files": model_identity(model), "index": index, "layers": spec.layers,
                "role": spec.role, "shape": [shape.micro_batch_size, shape.seq_len], "lora": lora.to_dict(),
                "versions": export_versions(RUNTIME), "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _export_into_cache(model: str, plan: Plan, indices: list[int], keys: dict[int, str], shape: RunShape,
                       lora: LoraSpec, root: Path, workers: int, progress) -> None:
    """Export into a scratch directory, then move each stage into place (a torn export is never used)."""
    scratch = root / f"tmp-{uuid.uuid4().hex}"
    try:
        stages = export_stages(model, plan, indices, scratch, RUNTIME, shape, lora, workers, progress)
        for stage in stages:
            entry = scratch / f"entry{stage.index}"
            entry.mkdir()
            os.replace(scratch / f"stage{stage.index}", entry / f"stage{stage.index}")
            (entry / STAGE_MANIFEST).write_text(json.dumps(asdict(stage), sort_keys=True))
            try:
                os.replace(entry, root / keys[stage.index])
            except OSError:
                pass  # another coordinator cached the same stage meanwhile: same bytes
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _cached_stage(entry: Path) -> StageManifest:
    return StageManifest.from_dict(json.loads((entry / STAGE_MANIFEST).read_text()))


def _cached_file(entry: Path, stage: StageManifest, relative: str) -> Blob:
    blob = Blob.of_file(entry / relative)
    if blob.sha256 != stage.sha256[relative]:
        raise ManifestError(f"stage {stage.index}: the cached {entry / relative} is corrupt; delete {entry} "
                            f"and run again to export it anew")
    return blob
