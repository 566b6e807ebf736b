"""Run a stage's blocks through ExecuTorch programs; the model's ends, LoRA tensors and AdamW stay in torch.

The export holds one program pair per block structure (``export.py``): a forward
that returns the block's output and what its backward needs, and that backward. Every block of the
stage runs its structure's pair, fed that block's frozen weights (from the agent's slice, the same
file a torch agent loads) and LoRA tensors, so the backward never recomputes the forward. The
embedding (head, full) and the final norm, the LM head and the loss (tail, full) run in eager torch:
the head only on the scored positions, which fixed-shape programs cannot select. LoRA gradients are
summed over the step's micro-batches in ``.grad`` and applied by ``torch.optim.AdamW``, the same
optimizer as the torch runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edge_runtime.backends.base import StageRunner
from edge_runtime.models.stage import StageModule
from ringtune.manifest import BlockProgram, BlockSignature, ExportManifest, ManifestError, verified_path
from ringtune.optimizer_spec import OptimizerSpec

INSTALL_HINT = "pip install 'ringtune[executorch]'"
BLOCK_PREFIX = "blocks.0."
"""Where a one-block stage keeps its block's tensors (the names the programs' signature uses)."""


class ExecuTorchNotInstalledError(RuntimeError):
    """The executorch runtime is missing on this device."""


@dataclass(frozen=True, slots=True)
class LoadedProgram:
    """One block structure's loaded forward and backward methods."""
    entry: BlockProgram
    """What the manifest says about them."""
    signature: BlockSignature
    """Their inputs and outputs."""
    forward_method: object
    """executorch.runtime Method: (*frozen, x, *lora) -> (y, *saved)."""
    backward_method: object
    """executorch.runtime Method: (*frozen, *saved, *kept, dy) -> (dx, *dlora)."""

    def frozen_of(self, tensors: dict[str, torch.Tensor], position: int) -> list[torch.Tensor]:
        """The frozen inputs of the stage's block at ``position`` from the stage's named tensors."""
        missing = [name for name in self.signature.frozen if _in_stage(name, position) not in tensors]
        if missing:
            raise ManifestError(f"{self.entry.label}: the programs take {missing[0]}, which this model's blocks do "
                                f"not have; export the programs for this model")
        return [tensors[_in_stage(name, position)].detach() for name in self.signature.frozen]

    def forward(self, frozen: list[torch.Tensor], x: torch.Tensor, lora: list[torch.Tensor]):
        """(y [B, T, d], saved tensors, kept inputs) of one block."""
        y, *saved = _run(self.forward_method, [*frozen, x, *lora])
        inputs = (x, *lora)
        return y, saved, [inputs[i] for i in self.signature.kept]

    def backward(self, frozen: list[torch.Tensor], saved: list[torch.Tensor], kept: list[torch.Tensor],
                 dy: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(dx, LoRA gradients in signature order) of one block."""
        dx, *dlora = _run(self.backward_method, [*frozen, *saved, *kept, dy.contiguous()])
        return dx, dlora


@dataclass(frozen=True, slots=True)
class BlockPrograms:
    manifest: ExportManifest
    """The export's manifest."""
    loaded: dict[int, LoadedProgram]
    """By structure index."""

    def for_block(self, block: int) -> LoadedProgram:
        return self.loaded[self.manifest.program_for(block).kind]


def load_block_programs(export_dir: Path, threads: int | None = None) -> BlockPrograms:
    """Every program of an export, checked against the manifest hashes. ``threads`` sizes XNNPACK's
    thread pool (by default it takes every core of the machine, whatever the agent was given)."""
    manifest = ExportManifest.read(export_dir)
    if manifest.runtime != "executorch":
        raise ManifestError(f"{export_dir} holds a {manifest.runtime!r} export; export with "
                            f"--runtime executorch for this agent")
    runtime = _runtime()
    if threads is not None:
        from executorch.extension.pybindings import portable_lib
        portable_lib._unsafe_reset_threadpool(max(1, threads))
    loaded = {}
    for entry in manifest.programs:
        methods = [_load_method(runtime, export_dir, entry, kind) for kind in ("forward", "backward")]
        loaded[entry.kind] = LoadedProgram(entry, BlockSignature.from_dict(entry.signature), *methods)
    return BlockPrograms(manifest, loaded)


class ExecuTorchStageRunner(StageRunner):
    def __init__(self, module: StageModule, lora: dict[str, torch.nn.Parameter], programs: BlockPrograms,
                 optimizer: OptimizerSpec) -> None:
        """module: the stage built from the agent's slice (ends and frozen block weights); lora: its LoRA
        tensors by full peft name."""
        super().__init__(lora, optimizer)
        self.module = module
        self.role = module.role
        self._shape = (programs.manifest.micro_batch_size, programs.manifest.seq_len)
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        start, end = module.layers
        self._blocks = []  # per block of the stage: (program, frozen inputs, LoRA parameters)
        for position, block in enumerate(range(start, end)):
            program = programs.for_block(block)
            missing = [n for n in program.signature.lora if _in_stage(n, position) not in tensors]
            if missing:
                raise ManifestError(f"block {block}: the programs take LoRA tensor {missing[0]} the stage does "
                                    f"not have; export again with this run's --lora-r/--lora-targets")
            self._blocks.append((program, program.frozen_of(tensors, position),
                                 [tensors[_in_stage(n, position)] for n in program.signature.lora]))
        # _saved: microbatch -> (per block: saved tensors and kept inputs; the tail's gradient of its last hidden)

    def forward(self, microbatch, inputs, labels=None, step_tokens=None):
        assert microbatch not in self._saved, f"micro-batch {microbatch} forwarded twice"
        if self.role in ("tail", "full") and (labels is None or not step_tokens):
            raise ValueError("the tail stage needs labels and the step's scored-token count")
        hidden, per_block = self._blocks_forward(inputs)
        if self.role in ("head", "middle"):
            self._saved[microbatch] = (per_block, None)
            return hidden
        last = hidden.detach().requires_grad_(True)
        loss = self.module.scored_loss_sum(self.module.final_norm(last), labels) / step_tokens
        loss.backward()  # the ends are frozen: only the last hidden state gets a gradient
        self._saved[microbatch] = (per_block, last.grad)
        return loss.detach()

    def infer(self, inputs):
        assert self.role in ("head", "middle"), f"a {self.role} stage has no forward-only use"
        return self._blocks_forward(inputs)[0]  # what the backward would need is dropped

    def _blocks_forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The hidden state after the stage's blocks [B, T, d], and per block what its backward needs."""
        if tuple(inputs.shape[:2]) != self._shape:
            raise ValueError(f"blocks {list(self.module.layers)} ({self.role}): the input has shape "
                             f"{list(inputs.shape)} but the ExecuTorch programs were exported for micro-batches of "
                             f"{self._shape[0]} x {self._shape[1]} tokens; pad micro-batches to that shape or export "
                             f"again with matching --micro-batch-size/--seq-len")
        if self.module.embed is not None:
            with torch.no_grad():
                hidden = self.module.embed_tokens(inputs)  # [B, T, d]
        else:
            hidden = inputs.detach().to(torch.float32)
        per_block = []
        for program, frozen, lora in self._blocks:
            hidden, saved, kept = program.forward(frozen, hidden.contiguous(), [p.detach() for p in lora])
            per_block.append((saved, kept))
        return hidden, per_block

    def backward(self, microbatch, grad_output=None):
        per_block, dy = self._saved.pop(microbatch)
        dy = grad_output if dy is None else dy
        for (program, frozen, lora), (saved, kept) in zip(reversed(self._blocks), reversed(per_block)):
            dy, grads = program.backward(frozen, saved, kept, dy)
            for p, grad in zip(lora, grads, strict=True):
                p.grad = grad if p.grad is None else p.grad + grad
        return None if self.role in ("head", "full") else dy


def _in_stage(name: str, position: int) -> str:
    """A one-block stage's tensor name as the stage's block at ``position`` holds it."""
    return f"blocks.{position}.{name.removeprefix(BLOCK_PREFIX)}" if name.startswith(BLOCK_PREFIX) else name


def _run(method, args: list[torch.Tensor]) -> list[torch.Tensor]:
    # execute() copies the outputs out of the program's planned memory (the pybinding's clone_outputs=True), so they
    # outlive the next call (test_export.py's test_matches_torch_runner keeps two micro-batches in flight).
    return list(method.execute(args))


def _runtime():
    try:
        from executorch.runtime import Runtime
    except ImportError as error:
        raise ExecuTorchNotInstalledError(f"ExecuTorch programs need the ExecuTorch runtime: {INSTALL_HINT}") from error
    return Runtime.get()


def _load_method(runtime, export_dir: Path, entry: BlockProgram, kind: str):
    """The program's method, after the hash check; the file name is in every error."""
    path = verified_path(export_dir, entry, kind)
    try:
        method = runtime.load_program(path).load_method("forward")
    except RuntimeError as error:
        raise ManifestError(f"{entry.label}: ExecuTorch cannot load {path} ({error}); export again with the "
                            f"executorch version this device runs") from error
    if method is None:
        raise ManifestError(f"{entry.label}: {path} has no 'forward' method; export again")
    return method
