"""The reference runtime: eager PyTorch on the CPU, autograd through the stage module."""
from __future__ import annotations

import torch

from edge_runtime.backends.base import StageRunner
from edge_runtime.models.stage import StageModule
from ringtune.optimizer_spec import OptimizerSpec


class TorchStageRunner(StageRunner):
    def __init__(self, module: StageModule, lora: dict[str, torch.nn.Parameter], optimizer: OptimizerSpec) -> None:
        super().__init__(lora, optimizer)
        self.module = module
        self.role = module.role
        # _saved: microbatch -> (stage input that needs a grad or None, output to backpropagate from)

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

    def infer(self, inputs):
        with torch.inference_mode():
            return self.module(inputs)

    def backward(self, microbatch, grad_output=None):
        stage_input, output = self._saved.pop(microbatch)
        if not output.requires_grad:
            return None
        if self.role in ("tail", "full"):
            output.backward()
        else:
            output.backward(grad_output)
        return None if stage_input is None else stage_input.grad
