"""Cut the model into per-device slice blobs (the coordinator holds the model; agents get slices)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.models.slices import pack_slice, sha256
from edge_runtime.models.stage import build_stage
from edge_runtime.models.tokenizer import tokenizer_blob
from ringtune.plan import Plan


@dataclass(frozen=True, slots=True)
class Blob:
    data: bytes
    """The bytes shipped."""
    sha256: str
    """Content hash: the agent's cache key."""

    @staticmethod
    def of(data: bytes) -> "Blob":
        return Blob(data, sha256(data))


@dataclass(frozen=True, slots=True)
class ModelShipment:
    config: dict
    """The model's config (agents build the skeleton from it)."""
    hidden_size: int
    """Width of the hidden states that cross the ring."""
    slices: dict[str, Blob]
    """Per device: base weights and initial LoRA tensors of its stages."""
    tokenizer: Blob
    """For the owner."""


def cut_model(model: str, lora: LoraSpec, plan: Plan) -> ModelShipment:
    peft_model = peft_model_for_run(model, lora)
    slices = {}
    for device in plan.devices():
        stages = {i: build_stage(peft_model, plan.stages[i].layers, plan.stages[i].role)[0]
                  for i in plan.stage_indices(device)}
        slices[device] = Blob.of(pack_slice(stages))
    config = peft_model.get_base_model().config
    return ModelShipment(config.to_dict(), config.hidden_size, slices, Blob.of(tokenizer_blob(load_tokenizer(model))))


@lru_cache(maxsize=1)
def peft_model_for_run(model: str, lora: LoraSpec):
    """Kept for the run: re-planning after a device leaves cuts new slices without reloading the model.
    Nothing trains it here, so its LoRA tensors stay the initial ones."""
    return apply_lora(load_model(model), lora)
