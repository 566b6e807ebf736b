import pytest
import torch

from helpers import ARCHITECTURES
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import UnknownModelError, load_model
from edge_runtime.models.stage import build_stage
from edge_runtime.models.structure import UnsupportedModelError, find_parts


def trained_looking_lora(name):
    model = apply_lora(load_model(name), LoraSpec(r=4, alpha=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("cuts", [[(0, 4, "full")], [(0, 1, "head"), (1, 3, "middle"), (3, 4, "tail")],
                                  [(0, 0, "head"), (0, 2, "middle"), (2, 4, "tail")]])
def test_chained_stages_equal_the_whole_model(name, cuts):
    model = trained_looking_lora(name)
    ids = torch.randint(0, 256, (2, 17))
    expected = model(input_ids=ids).logits
    hidden = ids
    for start, end, role in cuts:
        stage, _ = build_stage(model, (start, end), role)
        hidden = stage(hidden)
    assert torch.allclose(hidden, expected, atol=1e-5)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_stage_trains_only_its_own_lora(name):
    model = apply_lora(load_model(name), LoraSpec(r=2, alpha=4))
    _, middle = build_stage(model, (1, 3), "middle")
    assert middle and all(".1." in n or ".2." in n for n in middle)
    _, head = build_stage(model, (0, 0), "head")
    assert head == {}


def test_parts_are_found_by_structure():
    llama, gpt2 = find_parts(load_model("tiny-llama")), find_parts(load_model("tiny-gpt2"))
    assert llama.rotary is not None and llama.position_embed is None
    assert gpt2.rotary is None and gpt2.position_embed is not None
    assert len(llama.blocks) == len(gpt2.blocks) == 4


def test_a_model_without_decoder_structure_is_refused():
    from transformers import BertConfig, BertForMaskedLM
    bert = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedModelError):
        find_parts(bert)


def test_unknown_model_names_the_choices():
    with pytest.raises(UnknownModelError, match="tiny-llama, tiny-gpt2, tiny-gemma3, tiny-llama-2l, tiny-gpt2-2l, smollm2-135m"):
        load_model("gpt-5")
