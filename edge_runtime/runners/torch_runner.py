"""The reference runtime: eager PyTorch on the CPU, autograd through the stage module."""
from __future__ import annotations

import torch

from edge_runtime.models.stage import StageModule
from edge_runtime.runners.base import OptimizerSpec, StageRunner


class TorchStageRunner(StageRunner):
    def __init__(self, module: StageModule, lora: dict[str, torch.nn.Parameter], optimizer: OptimizerSpec) -> None:
        self.module = module
        self.role = module.role
        self._lora = lora
        # A head stage with no blocks has nothing to train.
        self._optimizer = torch.optim.AdamW(list(lora.values()), lr=optimizer.lr, betas=optimizer.betas,
                                            eps=optimizer.eps, weight_decay=optimizer.weight_decay) if lora else None
        # microbatch -> (stage input that needs a grad or None, output to backpropagate from)
        self._saved: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def forward(self, microbatch, inputs, labels=None, step_tokens=None):
        assert microbatch not in self._saved, f"micro-batch {microbatch} forwarded twice"
        stage_input = None
        if self.role in ("middle", "tail"):
            stage_input = inputs.detach().requires_grad_(True)
            inputs = stage_input
        if self.role in ("tail", "full"):
            if labels is None or not step_tokens:
                raise ValueError("the tail stage needs labels and the step's scored-token count")
            output = self.module.loss_sum(inputs, labels) / step_tokens
        else:
            output = self.module(inputs)
        self._saved[microbatch] = (stage_input, output)
        return output.detach()

    def backward(self, microbatch, grad_output=None):
        stage_input, output = self._saved.pop(microbatch)
        if not output.requires_grad:
            return None
        if self.role in ("tail", "full"):
            output.backward()
        else:
            output.backward(grad_output)
        return None if stage_input is None else stage_input.grad

    def step(self):
        assert not self._saved, f"micro-batches {sorted(self._saved)} were never backpropagated"
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)

    def lora_state(self):
        return {name: p.detach().clone() for name, p in self._lora.items()}

    def load_lora_state(self, state):
        with torch.no_grad():
            for name, p in self._lora.items():
                p.copy_(state[name])
