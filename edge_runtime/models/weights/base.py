"""The one interface every weight source implements: names, and one fp32 tensor at a time.

Slicing reads through it: the coordinator asks for each tensor of a stage as it writes the stage's
slice and drops it before the next, so it never holds the model. Keys are the Hugging Face
state-dict names of the causal LM (``model.layers.0.self_attn.q_proj.weight``).
"""
from __future__ import annotations

from typing import Protocol

import torch


class MissingWeightError(ValueError):
    """A tensor the model needs is not in its weights; the message names both."""


class WeightSource(Protocol):
    def keys(self) -> set[str]:
        """Every tensor name the source holds."""

    def get(self, key: str) -> torch.Tensor:
        """The tensor in fp32. Callers use it and drop it; a source may return a view of a mapped file."""

    def describe(self) -> str:
        """Where the weights are (for messages)."""


def resolve_key(source: WeightSource, names: list[str], prefix: str) -> str:
    """The first of a tensor's names (a tied tensor has several) the source holds; a checkpoint saved without
    the base model's ``prefix`` (``transformer.`` of GPT-2) is found too."""
    keys = source.keys()
    for name in names:
        for candidate in (name, name.removeprefix(prefix + ".")):
            if candidate in keys:
                return candidate
    raise MissingWeightError(f"{source.describe()} has no tensor {names[0]!r}: the weights do not match the "
                             f"model's config.json (save the model with transformers' save_pretrained)")
