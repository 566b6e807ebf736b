"""StageRunner: forward/backward of one stage per micro-batch, and its own optimizer."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Role


class StageRunner(ABC):
    """Runs one stage. Micro-batches are independent until ``step()`` applies their summed gradient.

    head/full stages take token ids [B, T]; middle/tail take hidden [B, T, d]. Tail/full stages
    also take the labels [B, T] and the number of scored tokens in the whole optimizer step, so
    the summed micro-batch losses equal the step's token-mean loss. Subclasses compute; the LoRA
    tensors and their AdamW live here, the same for every runtime.
    """

    role: Role
    trains: bool = True
    """False for a stage that runs forward only (ForwardOnlyRunner): its schedule has no backward."""

    def __init__(self, lora: dict[str, torch.nn.Parameter], optimizer: OptimizerSpec) -> None:
        self._lora = lora
        # A head stage with no blocks has nothing to train.
        self._optimizer = torch.optim.AdamW(list(lora.values()), lr=optimizer.lr, betas=optimizer.betas,
                                            eps=optimizer.eps, weight_decay=optimizer.weight_decay) if lora else None
        self._saved: dict[int, object] = {}
        """What each forwarded micro-batch needs for its backward."""

    @abstractmethod
    def forward(self, microbatch: int, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                step_tokens: int | None = None) -> torch.Tensor:
        """Output hidden [B, T, d] (head/middle), or this micro-batch's share of the loss (tail/full)."""

    @abstractmethod
    def infer(self, inputs: torch.Tensor) -> torch.Tensor:
        """Output hidden [B, T, d] of a head/middle stage without autograd: nothing is kept for a backward."""

    @abstractmethod
    def backward(self, microbatch: int, grad_output: torch.Tensor | None = None) -> torch.Tensor | None:
        """Accumulate LoRA grads; return the gradient w.r.t. the stage input, None when nothing goes back (a
        head/full stage, or a tail whose owner withholds gradients)."""

    def begin_step(self, step: int) -> None:
        """Called before the first micro-batch of global step ``step`` (a runner whose randomness is keyed
        by the step reads it here)."""

    def step(self) -> None:
        """Apply the accumulated gradient with AdamW and clear it (the step boundary)."""
        assert not self._saved, f"micro-batches {sorted(self._saved)} were never backpropagated"
        if self._optimizer is not None:
            self._optimizer.step()
            self._optimizer.zero_grad(set_to_none=True)

    def lora_state(self) -> dict[str, torch.Tensor]:
        """Current LoRA tensors by full peft parameter name."""
        return {name: p.detach().clone() for name, p in self._lora.items()}

    def training_state(self) -> dict[str, torch.Tensor]:
        """LoRA tensors and their AdamW state as ``KIND/NAME`` (KIND: lora, exp_avg, exp_avg_sq, step).

        AdamW's state is per tensor, so the states of any split can be merged and re-split exactly.
        """
        state = {f"lora/{name}": t for name, t in self.lora_state().items()}
        if self._optimizer is not None:
            for name, p in self._lora.items():
                for kind, value in self._optimizer.state.get(p, {}).items():
                    state[f"{kind}/{name}"] = value.detach().clone()
        return state

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore this stage's part of a (possibly larger) training state exactly."""
        missing = [name for name in self._lora if f"lora/{name}" not in state]
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} LoRA tensors of this stage (e.g. {missing[0]}): "
                             f"it belongs to another model or LoRA shape")
        self.load_lora_state({name: state[f"lora/{name}"] for name in self._lora})
        if self._optimizer is None:
            return
        optimizer_state: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            kind, name = key.split("/", 1)
            if kind != "lora" and name in self._lora:
                optimizer_state.setdefault(name, {})[kind] = tensor.clone()
        self._optimizer.state.clear()
        for name, state_of_tensor in optimizer_state.items():  # empty before the first optimizer step
            self._optimizer.state[self._lora[name]] = state_of_tensor

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace LoRA tensors (e.g. from a checkpoint)."""
        with torch.no_grad():
            for name, p in self._lora.items():
                p.copy_(state[name])


class RunnerWrapper(StageRunner):
    """A runner around another (any runtime) that changes what a micro-batch does; the LoRA, its AdamW and the
    training state stay the inner runner's."""

    def __init__(self, inner: StageRunner) -> None:
        super().__init__({}, OptimizerSpec())  # no LoRA of its own: the inner runner trains
        self.inner = inner
        self.role = inner.role

    @property
    def trains(self) -> bool:
        return self.inner.trains

    def begin_step(self, step):
        self.inner.begin_step(step)

    def step(self):
        self.inner.step()

    def lora_state(self):
        return self.inner.lora_state()

    def load_lora_state(self, state):
        self.inner.load_lora_state(state)

    def training_state(self):
        return self.inner.training_state()

    def load_training_state(self, state):
        self.inner.load_training_state(state)


class ForwardOnlyRunner(RunnerWrapper):
    """A stage that does not train, because no gradient comes back to it (the owner withholds its tail's
    gradients): every micro-batch runs forward without autograd, nothing is kept between micro-batches, its
    schedule has no backward (schedules.forward_only), and its LoRA stays as it was loaded."""

    trains = False

    def forward(self, microbatch, inputs, labels=None, step_tokens=None):
        return self.inner.infer(inputs)

    def infer(self, inputs):
        return self.inner.infer(inputs)

    def backward(self, microbatch, grad_output=None):
        raise AssertionError(f"stage {self.role} runs forward only: its schedule has no backward")

    def step(self):
        """Nothing to apply: no gradient reached this stage."""
