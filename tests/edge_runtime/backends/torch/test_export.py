"""Torch export and load: each stage rebuilt from its own safetensors computes what the in-memory slice does."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open

from edge_runtime.backends.torch.load import load_torch_stage
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.models.stage import build_stage
from exporters.export import export_plan
from ringtune.manifest import ManifestError
from ringtune.plan import Plan, even_plan
from ringtune.run_shape import RunShape

LORA = LoraSpec(r=4, alpha=8, seed=5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_rebuilt_stages_match_the_model(arch, tmp_path):
    plan = even_plan(arch, 4, ["owner", "b", "c"], "owner")
    manifest = export_plan(arch, plan, tmp_path, "torch", RunShape(2, 8), LORA)
    reference = apply_lora(load_model(arch), LORA)
    hidden = torch.randint(0, 256, (2, 8))
    for index, spec in enumerate(plan.stages):
        module, lora = load_torch_stage(tmp_path, index)
        expected_module, expected_lora = build_stage(reference, spec.layers, spec.role)
        assert list(lora) == list(expected_lora) == [t.name for t in manifest.stages[index].lora]
        with safe_open(str(tmp_path / f"stage{index}" / "weights.safetensors"), "pt") as f:
            names = list(f.keys())
        blocks = {int(m.group(1)) for k in names if (m := re.search(r"^\d+/blocks\.(\d+)\.", k))}
        assert blocks == set(range(spec.num_layers))  # only the slice's blocks travel
        output = module(hidden)
        torch.testing.assert_close(output, expected_module(hidden), atol=0, rtol=0)
        hidden = output


def test_corrupt_weights_are_refused(tmp_path):
    export_plan("tiny-llama", Plan.from_dict({"model": "tiny-llama", "owner": "a", "stages": [
        {"device": "a", "layers": [0, 4], "role": "full"}]}), tmp_path, "torch", RunShape(1, 8), LORA)
    weights = tmp_path / "stage0" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"stage 0: file .*weights\.safetensors is corrupt"):
        load_torch_stage(tmp_path, 0)
