"""Weights held in memory: the tiny seeded test models (a few hundred kB), built whole."""
from __future__ import annotations

import torch


class InMemoryWeights:
    def __init__(self, tensors: dict[str, torch.Tensor], name: str) -> None:
        self._tensors = tensors
        self._name = name

    def keys(self) -> set[str]:
        return set(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach().to(torch.float32)

    def describe(self) -> str:
        return f"the weights of {self._name}"
