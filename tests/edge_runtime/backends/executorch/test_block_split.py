"""A block split into a forward that saves and a backward that takes what it saved equals autograd."""
import pytest
import torch
from torch.func import functional_call

from helpers import ARCHITECTURES
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.models.stage import build_stage
from edge_runtime.backends.executorch.block_split import split_block


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_split_block_equals_autograd(name):
    model = load_model(name)
    model.set_attn_implementation("eager")  # what ExecuTorch programs run (SDPA does not lower to XNNPACK)
    peft_model = apply_lora(model, LoraSpec(r=4))
    for p in peft_model.parameters():
        torch.nn.init.normal_(p, std=0.1) if p.requires_grad else None  # LoRA B starts at zero: give it values
    stage, lora = build_stage(peft_model, (1, 2), "middle")
    relative = {id(p): n for n, p in stage.named_parameters()}
    lora_names = [relative[id(p)] for p in lora.values()]
    x = torch.randn(2, 16, peft_model.config.hidden_size, requires_grad=True)
    split = split_block(stage, lora_names, x)
    frozen = split.example_forward[:len(split.signature.frozen)]
    y, *saved = split.forward(*frozen, x.detach(), *(p.detach() for p in lora.values()))
    assert len(saved) == split.signature.saved
    reference = functional_call(stage, {}, (x,))
    dy = torch.randn_like(reference)
    reference.backward(dy)
    kept = [(x.detach(), *(p.detach() for p in lora.values()))[i] for i in split.signature.kept]
    dx, *dlora = split.backward(*frozen, *saved, *kept, dy)
    assert torch.allclose(y, reference.detach(), rtol=1e-4, atol=1e-4)  # float tolerance: decomposed ops sum in another order
    assert torch.allclose(dx, x.grad, rtol=1e-4, atol=1e-4)  # float tolerance: decomposed ops sum in another order
    for grad, p in zip(dlora, lora.values(), strict=True):
        assert torch.allclose(grad, p.grad, rtol=1e-4, atol=1e-4)  # float tolerance: decomposed ops sum in another order
    # Only activations cross from the forward to the backward: no weight (or a view of one) is saved.
    weights = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    assert all(t.untyped_storage().data_ptr() not in weights for t in saved)
