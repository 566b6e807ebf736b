"""Single-process training with plain peft + Hugging Face loss: the ground truth for exactness tests."""
import torch

from edge_runtime.data.dataset import OwnerData
from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.runners.base import OptimizerSpec


def reference_adapter(model_name: str, lora: LoraSpec, optimizer: OptimizerSpec, data: OwnerData,
                      steps: int) -> dict[str, torch.Tensor]:
    model = apply_lora(load_model(model_name), lora)
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                              weight_decay=optimizer.weight_decay)
    for step in range(steps):
        batch = data.step_batch(step)
        for ids, labels in zip(batch.input_ids, batch.labels):
            # HF's gradient-accumulation-aware loss: token sum / tokens in the whole step.
            model(input_ids=ids, labels=labels, num_items_in_batch=batch.scored_tokens).loss.backward()
        adamw.step()
        adamw.zero_grad()
    return {adapter_key(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)
