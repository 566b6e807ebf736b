"""The export manifest: what was exported (torch: each stage; ExecuTorch: each block structure's programs),
with file hashes, as plain JSON.

Written next to the files by ``ringtune export`` and read by the runners, which refuse a
file whose sha256 differs from the manifest. It holds no timestamps, so the same export gives the
same manifest bytes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from ringtune.plan import Role
from ringtune.run_shape import RunShape

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2
"""2: ExecuTorch exports hold one program pair per block structure (``programs``), not programs per stage."""


class ManifestError(ValueError):
    """A manifest or an exported file that cannot be used; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    """Input/output name (a full peft parameter name for LoRA tensors)."""
    shape: tuple[int, ...]
    """Fixed shape the program was exported with."""
    dtype: str
    """torch dtype name without the ``torch.`` prefix, e.g. ``float32``."""

    @staticmethod
    def from_dict(data: dict) -> TensorSpec:
        return TensorSpec(data["name"], tuple(int(n) for n in data["shape"]), data["dtype"])


@dataclass(frozen=True, slots=True)
class StageManifest:
    index: int
    """Position of the stage in ring order."""
    device: str
    """Device the plan assigns the stage to."""
    role: Role
    """head, middle, tail or full."""
    layers: tuple[int, int]
    """Half-open block range [start, end)."""
    files: dict[str, str]
    """Artifact kind (``weights``, ``config``) -> path relative to the manifest."""
    sha256: dict[str, str]
    """Relative path -> hex sha256 of the file's bytes."""
    inputs: tuple[TensorSpec, ...]
    """Stage inputs other than LoRA, in program order (e.g. x; or x, labels, step_tokens)."""
    outputs: tuple[TensorSpec, ...]
    """Forward program outputs (hidden state, or the loss share on tail/full)."""
    lora: tuple[TensorSpec, ...]
    """LoRA tensors, in the order the programs take them after the stage inputs."""

    @staticmethod
    def from_dict(data: dict) -> StageManifest:
        specs = lambda key: tuple(TensorSpec.from_dict(t) for t in data[key])
        return StageManifest(index=int(data["index"]), device=data["device"], role=data["role"],
                             layers=(int(data["layers"][0]), int(data["layers"][1])),
                             files=dict(data["files"]), sha256=dict(data["sha256"]),
                             inputs=specs("inputs"), outputs=specs("outputs"), lora=specs("lora"))


@dataclass(frozen=True, slots=True)
class BlockSignature:
    """How to call a block structure's two programs."""
    frozen: tuple[str, ...]
    """Names, in a one-block stage module (``blocks.0.*``, ``rotary.*``), of the frozen tensors both take first."""
    lora: tuple[str, ...]
    """Names of the LoRA tensors the forward takes after x, in that order (the gradients' order too)."""
    saved: int
    """Tensors the forward returns after y (what the backward needs of the forward)."""
    kept: tuple[int, ...]
    """Indices into ``(x, *lora)`` of the inputs the backward takes after the saved tensors."""

    def to_dict(self) -> dict:
        return {"frozen": list(self.frozen), "lora": list(self.lora), "saved": self.saved, "kept": list(self.kept)}

    @staticmethod
    def from_dict(data: dict) -> BlockSignature:
        return BlockSignature(tuple(data["frozen"]), tuple(data["lora"]), int(data["saved"]),
                              tuple(int(i) for i in data["kept"]))


@dataclass(frozen=True, slots=True)
class BlockProgram:
    """The ExecuTorch programs of one block structure: every block of the model that has it runs them."""
    kind: int
    """Index of the structure among the model's distinct blocks (LLaMA: one; Gemma-3: sliding and full)."""
    blocks: tuple[int, ...]
    """The model's blocks of this structure."""
    files: dict[str, str]
    """``forward`` and ``backward`` -> path relative to the manifest."""
    sha256: dict[str, str]
    """Relative path -> hex sha256 of the file's bytes."""
    signature: dict
    """How to call them (``BlockSignature.to_dict``)."""

    @property
    def label(self) -> str:
        return f"block structure {self.kind} (blocks {list(self.blocks)})"

    @staticmethod
    def from_dict(data: dict) -> BlockProgram:
        return BlockProgram(kind=int(data["kind"]), blocks=tuple(int(b) for b in data["blocks"]),
                            files=dict(data["files"]), sha256=dict(data["sha256"]), signature=dict(data["signature"]))


@dataclass(frozen=True, slots=True)
class ExportManifest:
    model: str
    """Model name or path the stages were cut from."""
    runtime: str
    """``executorch`` or ``torch``."""
    micro_batch_size: int
    """Fixed micro-batch size B of the programs (executorch) or of the run (torch)."""
    seq_len: int
    """Fixed sequence length T."""
    lora: dict
    """The LoraSpec as a dict (``LoraSpec.from_dict`` reads it back)."""
    versions: dict[str, str]
    """ringtune / torch / executorch / transformers / peft versions used to export."""
    stages: tuple[StageManifest, ...]
    """torch: one entry per plan stage, in ring order (executorch: none)."""
    programs: tuple[BlockProgram, ...] = ()
    """executorch: the program pair of each block structure (they serve any plan of the model)."""
    format_version: int = FORMAT_VERSION
    """Bumped when the layout changes incompatibly."""
    base_dtype: str = "fp32"
    """How the frozen base weights are stored (torch slices; ExecuTorch programs take fp32)."""

    def stage(self, index: int) -> StageManifest:
        for stage in self.stages:
            if stage.index == index:
                return stage
        raise ManifestError(f"the export has stages {[s.index for s in self.stages]}, not stage {index}; "
                            f"export again with the plan this run uses")

    def program_for(self, block: int) -> BlockProgram:
        for program in self.programs:
            if block in program.blocks:
                return program
        raise ManifestError(f"the export has no program for block {block} of {self.model}: export again for "
                            f"this model with `ringtune export --runtime executorch`")

    def write(self, directory: Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(self.to_json())
        return path

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @staticmethod
    def read(directory: Path) -> ExportManifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_NAME} in {directory}: run `ringtune export` into it first")
        return ExportManifest.from_json(path.read_text(), str(path))

    @staticmethod
    def from_json(text: str, source: str = MANIFEST_NAME) -> ExportManifest:
        data = json.loads(text)
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{source} has format {data.get('format_version')}, this ringtune reads "
                                f"{FORMAT_VERSION}: export again with this ringtune")
        return ExportManifest(model=data["model"], runtime=data["runtime"],
                              micro_batch_size=int(data["micro_batch_size"]), seq_len=int(data["seq_len"]),
                              lora=dict(data["lora"]), versions=dict(data["versions"]),
                              stages=tuple(StageManifest.from_dict(s) for s in data["stages"]),
                              programs=tuple(BlockProgram.from_dict(p) for p in data.get("programs", ())),
                              base_dtype=str(data.get("base_dtype", "fp32")))


def stage_io(role: Role, hidden_size: int, shape: RunShape) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """A stage's inputs (without LoRA) and forward outputs at the fixed run shape."""
    b, t = shape.micro_batch_size, shape.seq_len
    hidden = TensorSpec("hidden", (b, t, hidden_size), "float32")
    first = TensorSpec("input_ids", (b, t), "int64") if role in ("head", "full") else hidden
    if role in ("tail", "full"):
        inputs = (first, TensorSpec("labels", (b, t), "int64"), TensorSpec("step_tokens", (), "float32"))
        return inputs, (TensorSpec("loss", (), "float32"),)
    return (first,), (hidden,)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_path(directory: Path, entry: StageManifest | BlockProgram, kind: str) -> Path:
    """The entry's ``kind`` file, after checking it exists and matches the manifest hash."""
    label = entry.label if isinstance(entry, BlockProgram) else f"stage {entry.index}"
    if kind not in entry.files:
        raise ManifestError(f"{label} has no {kind!r} file in the manifest; export again with the runtime this "
                            f"agent uses")
    relative = entry.files[kind]
    path = Path(directory) / relative
    if not path.is_file():
        raise ManifestError(f"{label}: file {path} is missing; export again or re-fetch it")
    actual = sha256_file(path)
    if actual != entry.sha256[relative]:
        raise ManifestError(f"{label}: file {path} is corrupt or from another export (sha256 "
                            f"{actual[:12]}..., manifest says {entry.sha256[relative][:12]}...); export "
                            f"again with `ringtune export` or re-fetch it from the coordinator")
    return path


def toolchain_versions(*packages: str) -> dict[str, str]:
    """Installed versions of ringtune and the given packages (missing ones are left out)."""
    versions = {}
    for name in ("ringtune", *packages):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
