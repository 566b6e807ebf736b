"""LoRA settings as plain data (no torch import: the CLI and planners use it)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class LoraSpec:
    r: int = 8
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    target_modules: tuple[str, ...] | str = "all-linear"
    """Module names to adapt, or peft's 'all-linear' (every linear layer in the blocks)."""
    seed: int = 0
    """Seed of the LoRA A initialisation (B starts at zero)."""

    def to_peft(self, base_model_name: str | None = None, modules: list[str] | None = None):
        """peft's LoraConfig (peft is imported only here: this module stays light for the CLI); modules: adapt
        exactly these (full names in the base model: an adapter whose other blocks were not trained), None: the
        spec's target_modules."""
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=modules or targets, lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "LoraSpec":
        targets = data.get("target_modules", "all-linear")
        return LoraSpec(r=int(data["r"]), alpha=int(data["alpha"]),
                        target_modules=targets if isinstance(targets, str) else tuple(targets),
                        seed=int(data.get("seed", 0)))
