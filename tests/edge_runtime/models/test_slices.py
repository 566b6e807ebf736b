import pytest
import torch

from helpers import ARCHITECTURES
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.models.slices import SliceError, materialize, write_slice
from edge_runtime.models.stage import build_stage
from ringtune.plan import even_plan


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_stages_rebuilt_from_slices_equal_the_whole_model(name, tmp_path):
    lora = LoraSpec(r=2, alpha=4)
    model = apply_lora(load_model(name), lora)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    plan = even_plan(name, 4, ["a", "b", "c"], "a")
    rebuilt = {}
    for device in plan.devices():
        indices = plan.stage_indices(device)
        path = tmp_path / f"{device}.safetensors"
        write_slice({i: build_stage(model, plan.stages[i].layers, plan.stages[i].role)[0] for i in indices}, path)
        rebuilt.update(materialize(path, model.get_base_model().config.to_dict(), lora,
                                   {i: plan.stages[i] for i in indices}))
    ids = torch.randint(0, 256, (2, 12))
    hidden = ids
    with torch.no_grad():
        for index in range(len(plan.stages)):
            hidden = rebuilt[index][0](hidden)
        expected = model(input_ids=ids).logits
    assert torch.equal(hidden, expected)
    owner_lora = set(rebuilt[0][1]) | set(rebuilt[3][1])
    assert owner_lora and all(p.requires_grad for _, lora_params in rebuilt.values() for p in lora_params.values())
    assert not any(p.is_meta for stage, _ in rebuilt.values() for p in stage.parameters())


def test_a_slice_for_another_plan_is_refused(tmp_path):
    lora = LoraSpec(r=2, alpha=4)
    model = apply_lora(load_model("tiny-llama"), lora)
    plan = even_plan("tiny-llama", 4, ["a", "b"], "a")
    write_slice({1: build_stage(model, (1, 2), "middle")[0]}, tmp_path / "slice.safetensors")
    with pytest.raises(SliceError, match="different plan"):
        materialize(tmp_path / "slice.safetensors", model.get_base_model().config.to_dict(), lora, {1: plan.stages[1]})
