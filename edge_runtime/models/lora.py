"""LoRA through peft on the blocks' linear layers, and the adapter directory peft loads back."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

from ringtune.lora_spec import LoraSpec

ADAPTER_NAME = "default"
__all__ = ["LoraSpec", "adapter_key", "apply_lora", "lora_parameters", "write_adapter"]


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
                  partial: bool = False) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that PeftModel.from_pretrained loads. partial: tensors
    holds the LoRA of only the blocks that trained; peft then adapts exactly the modules they belong to."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {adapter_key(name): t.detach().to(torch.float32).contiguous() for name, t in tensors.items()}
    spec.to_peft(base_model, adapted_modules(state) if partial else None).save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def adapted_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The base model's modules an adapter state's LoRA tensors belong to ("base_model.model.NAME.lora_A.weight")."""
    prefix = "base_model.model."
    return sorted({key[len(prefix):].rsplit(".lora_", 1)[0] for key in state})
