"""The owner's stage runners with privatization: head outputs and tail input-gradients pass a mechanism."""
from __future__ import annotations

import torch

from edge_runtime.privacy.base import GradientMechanism, HiddenMechanism, NoiseStream
from edge_runtime.privacy.dchi import DChiMechanism
from edge_runtime.privacy.gaussian import GaussianMechanism
from edge_runtime.privacy.maxnorm import MaxNormMechanism
from edge_runtime.runners.base import OptimizerSpec, StageRunner
from ringtune.privacy_spec import PrivacySpec


def hidden_mechanism(spec: PrivacySpec) -> HiddenMechanism | None:
    if spec.hidden == "dchi":
        return DChiMechanism(spec.epsilon, spec.clip)
    if spec.hidden == "gaussian":
        return GaussianMechanism(spec.sigma, spec.clip)
    return None


def gradient_mechanism(spec: PrivacySpec) -> GradientMechanism | None:
    return MaxNormMechanism() if spec.gradient == "maxnorm" else None


class PrivateStageRunner(StageRunner):
    """Wraps the owner's head or tail runner (any runtime). The head's output z = clip(y) + noise is what
    travels and what the next stage computes on; its backward turns dL/dz into dL/dy through the clip.
    The tail's gradient w.r.t. its input is privatized before it is returned (and sent)."""

    def __init__(self, inner: StageRunner, spec: PrivacySpec, noise: NoiseStream) -> None:
        super().__init__({}, OptimizerSpec())  # no LoRA of its own: the inner runner trains
        self.inner = inner
        self.role = inner.role
        self.noise = noise
        self.hidden = hidden_mechanism(spec) if inner.role == "head" else None
        self.gradient = gradient_mechanism(spec) if inner.role == "tail" else None
        self._clip_graph: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step = 0

    def forward(self, microbatch, inputs, labels=None, step_tokens=None):
        output = self.inner.forward(microbatch, inputs, labels, step_tokens)
        if self.hidden is None:
            return output
        plain = output.detach().requires_grad_(True)  # [B, T, d]
        with torch.enable_grad():
            private = self.hidden.apply(plain, self.noise.generator(self._step, microbatch, "hidden"))
        self._clip_graph[microbatch] = (plain, private)
        return private.detach()

    def backward(self, microbatch, grad_output=None):
        if self.hidden is not None:
            plain, private = self._clip_graph.pop(microbatch)
            grad_output = torch.autograd.grad(private, plain, grad_output)[0]
        grad_input = self.inner.backward(microbatch, grad_output)
        if self.gradient is None or grad_input is None:
            return grad_input
        return self.gradient.apply(grad_input, self.noise.generator(self._step, microbatch, "gradient"))

    def step(self):
        assert not self._clip_graph, f"micro-batches {sorted(self._clip_graph)} were never backpropagated"
        self.inner.step()
        self._step += 1

    def lora_state(self):
        return self.inner.lora_state()

    def load_lora_state(self, state):
        self.inner.load_lora_state(state)


def privatize(runner: StageRunner, spec: PrivacySpec, noise: NoiseStream) -> StageRunner:
    """The runner as is when nothing of it leaves privatized (privacy off, or a middle/full stage)."""
    if (runner.role == "head" and spec.hidden != "off") or (runner.role == "tail" and spec.gradient != "off"):
        return PrivateStageRunner(runner, spec, noise)
    return runner
