"""LoRA through peft on the blocks' linear layers, and the adapter directory peft loads back."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

ADAPTER_NAME = "default"


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

    def to_peft(self, base_model_name: str | None = None) -> LoraConfig:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0,
                          bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "LoraSpec":
        targets = data.get("target_modules", "all-linear")
        return LoraSpec(r=int(data["r"]), alpha=int(data["alpha"]),
                        target_modules=targets if isinstance(targets, str) else tuple(targets),
                        seed=int(data.get("seed", 0)))


def apply_lora(model: torch.nn.Module, spec: LoraSpec) -> PeftModel:
    """Wrap the model with LoRA; only LoRA tensors require grad. Same spec, same initial weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        peft_model = get_peft_model(model, spec.to_peft())
    return peft_model


def lora_parameters(peft_model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable LoRA tensors by their full name in the peft model."""
    return {name: p for name, p in peft_model.named_parameters() if p.requires_grad}


def adapter_key(param_name: str) -> str:
    """The key peft saves a LoRA tensor under (the adapter name dropped)."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def write_adapter(out_dir: Path, spec: LoraSpec, base_model: str, tensors: dict[str, torch.Tensor],
                  metadata: dict | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that PeftModel.from_pretrained loads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.to_peft(base_model).save_pretrained(str(out_dir))
    state = {adapter_key(name): t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    if metadata is not None:
        (out_dir / "ringtune.json").write_text(json.dumps(metadata, indent=1))
    return out_dir
