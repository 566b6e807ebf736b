"""ExecuTorch programs for the agents that run that runtime: lowered once per block structure, cached, shipped.

The programs of a model are one pair per distinct block structure (edge_runtime/backends/executorch/export.py);
they take the frozen weights as inputs, so they depend on the model's config, the LoRA shape and the
run's micro-batch shape, not on the weights nor on the plan. Each structure's programs are cached
under ``$RINGTUNE_CACHE/exports/KEY`` where KEY hashes exactly that (and the toolchain), so any
later run, re-plan or other model of the same architecture reuses them. Every ExecuTorch agent gets
the same manifest and programs, as content-addressed blobs (sha256-checked on upload, and against the
manifest again when loaded), beside the slice of weights a torch agent gets.
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
from edge_runtime.models.registry import cache_dir, load_config
from exporters.export import export_manifest, export_programs, export_versions, structures
from ringtune.manifest import FORMAT_VERSION, BlockProgram, ManifestError
from ringtune.protocol import HelloReply
from ringtune.run_shape import RunShape

RUNTIME = "executorch"
PROGRAM_ENTRY = "program.json"


@dataclass(frozen=True, slots=True)
class AgentExport:
    manifest: Blob
    """The ExportManifest as JSON: what ``assign`` and ``calibrate`` name."""
    files: tuple[Blob, ...]
    """The programs."""

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.manifest, *self.files)


def runs_torch(hello: HelloReply) -> bool:
    return hello.runtime == "torch"


def needs_export(hello: HelloReply) -> bool:
    """An agent that runs ExecuTorch and has not loaded its own export directory."""
    return hello.runtime == RUNTIME and not hello.export_dir


def executorch_export(model: str, shape: RunShape, lora: LoraSpec, root: Path | None = None,
                      workers: int = 2, progress=None) -> tuple[AgentExport, list[int]]:
    """The model's programs (lowered now for the block structures not in the cache) packed for agents; also
    the structures that had to be lowered."""
    root = Path(root or cache_dir() / "exports")
    root.mkdir(parents=True, exist_ok=True)
    config = load_config(model).to_dict()
    blocks = structures(model)
    keys = {kind: program_key(config, kind, shape, lora) for kind in blocks}
    missing = [kind for kind in blocks if not (root / keys[kind] / PROGRAM_ENTRY).is_file()]
    if missing:
        _export_into_cache(model, missing, keys, shape, lora, root, workers, progress)
    programs = tuple(replace(_cached_program(root / keys[kind]), blocks=tuple(blocks[kind])) for kind in blocks)
    manifest = export_manifest(model, RUNTIME, shape, lora, (), programs)
    files = tuple(_cached_file(root / keys[p.kind], p, relative) for p in programs for relative in p.files.values())
    return AgentExport(Blob.of_bytes(manifest.to_json().encode()), files), missing


def program_key(config: dict, kind: int, shape: RunShape, lora: LoraSpec) -> str:
    """Hash of everything one block structure's programs depend on (not the weights: they are inputs; not
    the LoRA seed: the LoRA tensors are inputs too)."""
    identity = {"config": config, "kind": kind, "shape": [shape.micro_batch_size, shape.seq_len],
                "lora": {**lora.to_dict(), "seed": None}, "versions": export_versions(RUNTIME),
                "format": FORMAT_VERSION}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _export_into_cache(model: str, kinds: list[int], keys: dict[int, str], shape: RunShape, lora: LoraSpec,
                       root: Path, workers: int, progress) -> None:
    """Export into a scratch directory, then move each structure's programs into place (a torn export is
    never used)."""
    scratch = root / f"tmp-{uuid.uuid4().hex}"
    try:
        for program in export_programs(model, scratch, shape, lora, workers, kinds, progress):
            entry = scratch / f"entry{program.kind}"
            entry.mkdir()
            os.replace(scratch / f"block{program.kind}", entry / f"block{program.kind}")
            (entry / PROGRAM_ENTRY).write_text(json.dumps(asdict(program), sort_keys=True))
            try:
                os.replace(entry, root / keys[program.kind])
            except OSError:
                pass  # another coordinator cached the same programs meanwhile: same bytes
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _cached_program(entry: Path) -> BlockProgram:
    return BlockProgram.from_dict(json.loads((entry / PROGRAM_ENTRY).read_text()))


def _cached_file(entry: Path, program: BlockProgram, relative: str) -> Blob:
    blob = Blob.of_file(entry / relative)
    if blob.sha256 != program.sha256[relative]:
        raise ManifestError(f"{program.label}: the cached {entry / relative} is corrupt; delete {entry} and run "
                            f"again to export it anew")
    return blob
