import re

import pytest
import torch
from safetensors import safe_open

from helpers import ARCHITECTURES
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.quantization import compact_model
from edge_runtime.models.registry import load_config, load_model, weight_source
from edge_runtime.models.slices import SliceError, cut_slice, materialize, skeleton
from ringtune.base_dtype import BASE_DTYPES
from ringtune.plan import StageSpec, even_plan

LORA = LoraSpec(r=2, alpha=4)


class RecordingSource:
    """A weight source that remembers what was read (the cut must read only its stages' tensors)."""

    def __init__(self, source) -> None:
        self.source, self.read = source, []

    def keys(self):
        return self.source.keys()

    def get(self, key):
        self.read.append(key)
        return self.source.get(key)

    def describe(self):
        return self.source.describe()


def cut_devices(name, plan, dtype, tmp_path, source=None):
    """{device: slice path}, cut from the model's weight source."""
    skel = skeleton(load_config(name), LORA, dtype, initial_lora=True)
    paths = {}
    for device in plan.devices():
        paths[device] = tmp_path / f"{device}.safetensors"
        cut_slice(source or weight_source(name), skel, {i: plan.stages[i] for i in plan.stage_indices(device)},
                  paths[device])
    return paths


@pytest.mark.parametrize("dtype", BASE_DTYPES)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_stages_rebuilt_from_slices_equal_the_whole_model(name, dtype, tmp_path):
    reference = apply_lora(load_model(name), LORA)
    compact_model(reference, dtype)
    plan = even_plan(name, 4, ["a", "b", "c"], "a")
    rebuilt = {}
    for device, path in cut_devices(name, plan, dtype, tmp_path).items():
        rebuilt.update(materialize(path, load_config(name).to_dict(), LORA,
                                   {i: plan.stages[i] for i in plan.stage_indices(device)}))
    ids = torch.randint(0, 256, (2, 12))
    hidden = ids
    with torch.no_grad():
        for index in range(len(plan.stages)):
            hidden = rebuilt[index][0](hidden)
        expected = reference(input_ids=ids).logits
    assert torch.equal(hidden, expected)
    lora = {name: p for _, (_, tensors) in rebuilt.items() for name, p in tensors.items()}
    expected_lora = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    assert lora.keys() == expected_lora.keys() and all(torch.equal(lora[k], expected_lora[k]) for k in lora)
    assert all(p.requires_grad for p in lora.values())
    assert not any(t.is_meta for stage, _ in rebuilt.values() for t in (*stage.parameters(), *stage.buffers()))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_a_cut_reads_only_its_stages_tensors_and_stores_shared_ones_once(name, tmp_path):
    plan = even_plan(name, 4, ["a", "b", "c"], "a")  # a: head [0, 1) + tail [3, 4); b: [1, 2); c: [2, 3)
    source = RecordingSource(weight_source(name))
    paths = cut_devices(name, plan, "int8", tmp_path, source)
    blocks = {int(m.group(1)) for key in source.read if (m := re.search(r"\.(?:h|layers)\.(\d+)\.", key))}
    assert blocks == {0, 1, 2, 3}
    middle = RecordingSource(weight_source(name))
    skel = skeleton(load_config(name), LORA, "int8", initial_lora=True)
    cut_slice(middle, skel, {1: plan.stages[1]}, tmp_path / "b-again.safetensors")
    assert {int(m.group(1)) for key in middle.read if (m := re.search(r"\.(?:h|layers)\.(\d+)\.", key))} == {1}
    assert not any("embed" in key or "wte" in key or "lm_head" in key for key in middle.read)
    with safe_open(str(paths["a"]), "pt") as tensors:
        keys = list(tensors.keys())
    rotary = [k for k in keys if ".rotary." in f".{k}" or "/rotary." in k]
    if name != "tiny-gpt2":  # the owner's two stages share the rotary frequencies: stored once
        assert rotary and all(k.startswith("0/") for k in rotary)
    if name == "tiny-gpt2":  # tied embedding and head: stored once on the owner
        assert len([k for k in keys if k.endswith("qweight") and ("embed" in k or "head" in k)]) == 2  # wte, wpe


def test_a_slice_for_another_plan_is_refused(tmp_path):
    plan = even_plan("tiny-llama", 4, ["a", "b"], "a")  # b runs [1, 3)
    skel = skeleton(load_config("tiny-llama"), LORA, initial_lora=True)
    cut_slice(weight_source("tiny-llama"), skel, {1: StageSpec("b", (1, 2))}, tmp_path / "slice.safetensors")
    with pytest.raises(SliceError, match="different plan"):
        materialize(tmp_path / "slice.safetensors", load_config("tiny-llama").to_dict(), LORA, {1: plan.stages[1]})
