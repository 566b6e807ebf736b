"""Run a stage through its exported ExecuTorch programs; LoRA tensors and AdamW stay in Python.

head/middle: ``forward`` runs forward.pte and keeps only the stage input; ``backward`` runs
vjp.pte, which recomputes the forward inside the joint graph (so no activations are held between
the two calls). tail/full: ``forward`` runs vjp.pte at once (it yields the loss, dx and the LoRA
grads in one pass) and ``backward`` hands back the saved dx, so the tail never computes its
forward twice. LoRA grads are summed over the step's micro-batches in ``.grad`` and applied by
``torch.optim.AdamW``, the same optimizer as the torch runtime.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from edge_runtime.backends.base import StageRunner

from ringtune.manifest import (
    ExportManifest,
    ManifestError,
    StageManifest,
    TensorSpec,
    verified_path,
)
from ringtune.optimizer_spec import OptimizerSpec

INSTALL_HINT = "pip install 'ringtune[executorch]'"


class ExecuTorchNotInstalledError(RuntimeError):
    """The executorch runtime is missing on this device."""


class ExecuTorchStageRunner(StageRunner):
    def __init__(self, export_dir: Path, stage_index: int, optimizer: OptimizerSpec) -> None:
        """Load stage ``stage_index`` of an executorch export (checked against the manifest hashes)."""
        manifest = ExportManifest.read(export_dir)
        if manifest.runtime != "executorch":
            raise ManifestError(f"{export_dir} holds a {manifest.runtime!r} export; export with "
                                f"--runtime executorch for this agent")
        self.stage: StageManifest = manifest.stage(stage_index)
        self.role = self.stage.role
        self._forward = _load_method(export_dir, self.stage, "forward")
        self._vjp = _load_method(export_dir, self.stage, "vjp") if "vjp" in self.stage.files else None
        initial = load_file(str(verified_path(export_dir, self.stage, "lora")))
        super().__init__({spec.name: torch.nn.Parameter(initial[spec.name]) for spec in self.stage.lora}, optimizer)
        # _saved: microbatch -> stage input (head/middle) or dx, None on full (tail/full)

    def forward(self, microbatch, inputs, labels=None, step_tokens=None):
        assert microbatch not in self._saved, f"micro-batch {microbatch} forwarded twice"
        args = [self._checked(inputs, self.stage.inputs[0])]
        if self.role in ("head", "middle"):
            self._saved[microbatch] = args[0]
            return self._run(self._forward, args)[0]
        if labels is None or not step_tokens:
            raise ValueError("the tail stage needs labels and the step's scored-token count")
        args += [self._checked(labels, self.stage.inputs[1]), torch.tensor(float(step_tokens))]
        loss, *grads = self._run(self._vjp, args)
        self._saved[microbatch] = grads.pop(0) if self.role == "tail" else None
        self._accumulate(grads)
        return loss

    def infer(self, inputs):
        assert self.role in ("head", "middle"), f"a {self.role} stage has no forward-only program"
        return self._run(self._forward, [self._checked(inputs, self.stage.inputs[0])])[0]

    def backward(self, microbatch, grad_output=None):
        saved = self._saved.pop(microbatch)
        if self.role in ("tail", "full"):
            return saved
        if self._vjp is None:  # a head without blocks has no LoRA to train
            return None
        dy = self._checked(grad_output, self.stage.outputs[0])
        _, *grads = self._run(self._vjp, [saved, dy])
        dx = grads.pop(0) if self.role == "middle" else None
        self._accumulate(grads)
        return dx

    def _run(self, method, args: list[torch.Tensor]) -> list[torch.Tensor]:
        lora = [p.detach() for p in self._lora.values()]
        # Outputs may alias the program's planned memory, which the next call overwrites.
        return [out.clone() for out in method.execute([*args, *lora])]

    def _accumulate(self, grads: list[torch.Tensor]) -> None:
        for p, grad in zip(self._lora.values(), grads, strict=True):
            if p.grad is None:
                p.grad = grad
            else:
                p.grad += grad

    def _checked(self, tensor: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
        """The tensor as the program expects it, or a clear error (programs have fixed shapes)."""
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"stage {self.stage.index} ({self.role}): {spec.name} has shape "
                             f"{list(tensor.shape)} but the ExecuTorch programs were exported for "
                             f"{list(spec.shape)}; pad micro-batches to that shape or export again with "
                             f"matching --micro-batch-size/--seq-len")
        dtype = getattr(torch, spec.dtype)
        if tensor.dtype.is_floating_point != dtype.is_floating_point:
            raise ValueError(f"stage {self.stage.index} ({self.role}): {spec.name} is {tensor.dtype}, "
                             f"the programs take {dtype}")
        return tensor.detach().to(dtype).contiguous()


def _load_method(export_dir: Path, stage: StageManifest, kind: str):
    """The program's method, after the hash check; the file name is in every error."""
    path = verified_path(export_dir, stage, kind)
    try:
        from executorch.runtime import Runtime
    except ImportError as error:
        raise ExecuTorchNotInstalledError(
            f"stage {stage.index} needs the ExecuTorch runtime to run {path}: {INSTALL_HINT}") from error
    try:
        program = Runtime.get().load_program(path)
        method = program.load_method("forward")
    except RuntimeError as error:
        raise ManifestError(f"stage {stage.index}: ExecuTorch cannot load {path} ({error}); export again "
                            f"with the executorch version this device runs") from error
    if method is None:
        raise ManifestError(f"stage {stage.index}: {path} has no 'forward' method; export again")
    return method
