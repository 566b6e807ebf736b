"""A whole ring in one process (threads + in-memory edges): the same runners, schedules and frames as
agents use, for simulations (``ringtune audit``) and exactness tests."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from edge_runtime.backends.torch.runner import TorchStageRunner
from edge_runtime.data.dataset import OwnerData
from edge_runtime.models.lora import adapter_key
from edge_runtime.models.stage import build_stage
from edge_runtime.privacy.base import NoiseStream
from edge_runtime.privacy.runner import ring_runner
from edge_runtime.transport.base import EdgeConfig
from edge_runtime.transport.memory import InMemoryEdge
from edge_runtime.worker import LocalStage, run_stages_step
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan
from ringtune.privacy_spec import PrivacySpec
from ringtune.security import new_key
from ringtune.wire import WireSpec


@dataclass(frozen=True, slots=True)
class RingResult:
    adapter: dict[str, torch.Tensor]
    """Trained LoRA tensors by peft key."""
    losses: list[float]
    """Loss per step run."""
    training_state: dict[str, torch.Tensor]
    """Every stage's StageRunner.training_state (LoRA + AdamW by tensor name), as a checkpoint holds it."""
    bytes_sent: int = 0
    """Frame bytes every edge sent in the run (hidden states and gradients, sealed)."""


def train_ring_in_process(peft_model: torch.nn.Module, plan: Plan, data: OwnerData, optimizer: OptimizerSpec,
                          steps: int | range, privacy: PrivacySpec = PrivacySpec(), timeout: float = 600.0,
                          restore: dict[str, torch.Tensor] | None = None, wire: WireSpec = WireSpec(),
                          after_step: Callable[[int], None] | None = None) -> RingResult:
    """Train peft_model's LoRA in place over plan's stages for ``steps`` (a count, or the step indices to run,
    e.g. a replay from a checkpoint); ``restore`` is a training state to start from; ``wire`` the frames'
    codecs. ``after_step(step)`` runs between steps, when peft_model holds the weights after that step (e.g.
    to evaluate a learning curve). ``privacy`` is the owner's (its public part replaces the plan's): under
    --grad-privacy withhold the stages before the tail run forward only and the adapter holds the tail's LoRA."""
    noise = NoiseStream(privacy.seed)
    plan = replace(plan, privacy=privacy.public_dict())
    runners = [ring_runner(TorchStageRunner(*build_stage(peft_model, s.layers, s.role), optimizer), plan, i, privacy,
                           noise) for i, s in enumerate(plan.stages)]
    for runner in runners if restore is not None else []:
        runner.load_training_state(restore)
    shape = (data.micro_batch_size, data.seq_len, peft_model.config.hidden_size)
    key = new_key()
    edges = [InMemoryEdge.pair(EdgeConfig.for_link("local", key, i, i + 1, shape, timeout, wire=wire),
                               EdgeConfig.for_link("local", key, i + 1, i, shape, timeout, wire=wire))
             for i in range(len(runners) - 1)]
    stages = [LocalStage(i, runner, edges[i - 1][1] if i else None, edges[i][0] if i < len(edges) else None)
              for i, runner in enumerate(runners)]
    losses = []
    for step in range(steps) if isinstance(steps, int) else steps:
        losses.append(_ring_step(stages, plan, step, data))
        if after_step is not None:
            after_step(step)
    adapter, training_state = {}, {}
    for index, runner in enumerate(runners):
        if plan.trains(index):
            adapter.update({adapter_key(n): t for n, t in runner.lora_state().items()})
        training_state.update(runner.training_state())
    return RingResult(adapter, losses, training_state, sum(e.bytes_sent for pair in edges for e in pair))


def _ring_step(stages: list[LocalStage], plan: Plan, step: int, data: OwnerData) -> float:
    edges = [edge for stage in stages for edge in (stage.prev, stage.next) if edge is not None]
    results = run_stages_step(stages, step, data.step_batch(step), plan.schedule, len(stages), plan.micro_batches,
                              edges)
    return results[len(stages) - 1].loss
