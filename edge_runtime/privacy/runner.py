"""The owner's stage runners with privatization: head outputs and tail input-gradients pass a mechanism."""
from __future__ import annotations

import torch

from edge_runtime.privacy.base import GradientMechanism, HiddenMechanism, NoiseStream
from edge_runtime.privacy.dchi import DChiMechanism
from edge_runtime.privacy.gaussian import GaussianMechanism
from edge_runtime.privacy.maxnorm import MaxNormMechanism
from edge_runtime.backends.base import ForwardOnlyRunner, RunnerWrapper, StageRunner
from ringtune.plan import Plan
from ringtune.privacy_spec import PrivacySpec


def hidden_mechanism(spec: PrivacySpec) -> HiddenMechanism | None:
    if not spec.calibrated:
        raise ValueError(f"privacy preset {spec.preset} has no clip and noise yet: they are computed at the cut "
                         f"on public text (edge_runtime.privacy.calibration.calibrate) before the run starts")
    if spec.hidden == "dchi":
        return DChiMechanism(spec.epsilon, spec.clip)
    if spec.hidden == "gaussian":
        return GaussianMechanism(spec.sigma, spec.clip)
    return None


def gradient_mechanism(spec: PrivacySpec) -> GradientMechanism | None:
    return MaxNormMechanism() if spec.gradient == "maxnorm" else None


def check_public_prefix(expected: torch.Tensor, ids: torch.Tensor, step: int, microbatch: int) -> None:
    """ValueError unless every row of the token ids [B, T] starts with expected [N]: a position < N is sent
    unprivatized, which is safe only while it holds the same public template token in every sequence."""
    differs = (ids[:, :len(expected)] != expected).any(dim=1)  # [B]
    if differs.any():
        row = int(differs.nonzero()[0])
        raise ValueError(
            f"--privacy public={len(expected)}: step {step} micro-batch {microbatch} row {row} starts with token "
            f"ids {ids[row, :len(expected)].tolist()}, not {expected.tolist()} like the run's first micro-batch, "
            f"so those positions may hold private tokens: lower public= or put the fixed public prompt first "
            f"(a prompt longer than --seq-len is cut from the left, which also causes this)")


class PrivateStageRunner(RunnerWrapper):
    """Wraps the owner's head or tail runner (any runtime). The head's output z = clip(y) + noise is what
    travels and what the next stage computes on; its backward turns dL/dz into dL/dy through the clip (a head
    that runs forward only keeps no graph). The tail's gradient w.r.t. its input is privatized before it is
    returned (and sent), or withheld: then the tail returns none and sends none. With spec.public
    = N the head sends positions < N as they are, after checking that every sequence starts with the N
    token ids of the run's first micro-batch. Noise is keyed by (seed, global step, micro-batch, stage), the
    stage being the owner's role (head or tail: its ring index changes when a re-plan adds or drops
    devices), so a step replayed after a restore, on any split, draws the same noise; the training state is
    the inner runner's."""

    def __init__(self, inner: StageRunner, spec: PrivacySpec, noise: NoiseStream) -> None:
        super().__init__(inner)
        self.noise = noise
        self.spec = spec
        self._prefix: torch.Tensor | None = None  # [N] token ids of the run's first sequence, with public=N
        self.hidden = hidden_mechanism(spec) if inner.role == "head" else None
        self.gradient = gradient_mechanism(spec) if inner.role == "tail" else None
        self.withholds = inner.role == "tail" and spec.gradient == "withhold"
        self._clip_graph: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._step = 0  # the global step being run (begin_step)

    def begin_step(self, step):
        self._step = step
        super().begin_step(step)

    def forward(self, microbatch, inputs, labels=None, step_tokens=None):
        if self.hidden is not None and self.spec.public:
            self._check_prefix(microbatch, inputs)
        output = self.inner.forward(microbatch, inputs, labels, step_tokens)
        if self.hidden is None:
            return output
        generator = self.noise.generator(self._step, microbatch, self.role, "hidden")
        if not self.trains:  # no backward will come through the clip
            with torch.no_grad():
                return self.hidden.apply(output, generator, self.spec.public)
        plain = output.detach().requires_grad_(True)  # [B, T, d]
        with torch.enable_grad():
            private = self.hidden.apply(plain, generator, self.spec.public)
        self._clip_graph[microbatch] = (plain, private)
        return private.detach()

    def infer(self, inputs):
        raise AssertionError("a private stage runs forward only around its inner runner (ring_runner): its output "
                             "is privatized per micro-batch")

    def _check_prefix(self, microbatch: int, ids: torch.Tensor) -> None:
        self.spec.check_seq_len(ids.shape[1])
        if self._prefix is None:
            self._prefix = ids[0, :self.spec.public].clone()
        check_public_prefix(self._prefix, ids, self._step, microbatch)

    def backward(self, microbatch, grad_output=None):
        if self.hidden is not None:
            plain, private = self._clip_graph.pop(microbatch)
            grad_output = torch.autograd.grad(private, plain, grad_output)[0]
        grad_input = self.inner.backward(microbatch, grad_output)
        if self.withholds:
            return None
        if self.gradient is None or grad_input is None:
            return grad_input
        return self.gradient.apply(grad_input, self.noise.generator(self._step, microbatch, self.role, "gradient"))

    def step(self):
        assert not self._clip_graph, f"micro-batches {sorted(self._clip_graph)} were never backpropagated"
        super().step()


def ring_runner(runner: StageRunner, plan: Plan, index: int, spec: PrivacySpec, noise: NoiseStream) -> StageRunner:
    """Stage index's runner as the ring runs it: forward only where the plan's stage does not train (the owner
    withholds gradients), privatized where the owner's spec says; privacy off leaves the runner as it is."""
    return privatize(runner if plan.trains(index) else ForwardOnlyRunner(runner), spec, noise)


def privatize(runner: StageRunner, spec: PrivacySpec, noise: NoiseStream) -> StageRunner:
    """The runner as is when nothing of it leaves privatized (privacy off, or a middle/full stage)."""
    if (runner.role == "head" and spec.hidden != "off") or (runner.role == "tail" and spec.gradient != "off"):
        return PrivateStageRunner(runner, spec, noise)
    return runner
