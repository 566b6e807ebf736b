"""Torch export: each stage rebuilt from its own safetensors computes what the in-memory slice does."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.models.stage import build_stage
from exporters import commands
from exporters.export import export_plan
from exporters.torch_export import load_torch_stage
from ringtune.manifest import ExportManifest, ManifestError
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


def test_cli_writes_manifest_and_refuses_wrong_runtime(tmp_path):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(even_plan("tiny-gpt2", 4, ["owner", "b"], "owner").to_json())
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["export", "--plan", str(plan_path), "--out", str(tmp_path / "out"),
                              "--runtime", "torch", "--micro-batch-size", "2", "--seq-len", "8", "--lora-r", "4"])
    assert args.run(args) == 0
    manifest = ExportManifest.read(tmp_path / "out")
    assert (manifest.model, manifest.runtime, manifest.lora["r"]) == ("tiny-gpt2", "torch", 4)
    assert [s.role for s in manifest.stages] == ["head", "middle", "tail"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["versions"]["torch"].startswith("2.")
    from edge_runtime.runners.executorch_runner import ExecuTorchStageRunner
    from ringtune.optimizer_spec import OptimizerSpec
    with pytest.raises(ManifestError, match="--runtime executorch"):
        ExecuTorchStageRunner(tmp_path / "out", 0, OptimizerSpec())


def test_corrupt_weights_are_refused(tmp_path):
    export_plan("tiny-llama", Plan.from_dict({"model": "tiny-llama", "owner": "a", "stages": [
        {"device": "a", "layers": [0, 4], "role": "full"}]}), tmp_path, "torch", RunShape(1, 8), LORA)
    weights = tmp_path / "stage0" / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"stage 0: file .*weights\.safetensors is corrupt"):
        load_torch_stage(tmp_path, 0)


def test_compact_stages_export_for_torch_and_executorch_refuses_them_in_one_line(tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(even_plan("tiny-llama", 4, ["owner", "b"], "owner").to_json())
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["export", "--plan", str(plan_path), "--out", str(tmp_path / "torch"), "--runtime", "torch",
                              "--base-dtype", "int4", "--micro-batch-size", "1", "--seq-len", "8"])
    assert args.run(args) == 0
    assert "cutting int4 torch stages [0, 1, 2]: done, 4/4 blocks" in capsys.readouterr().out
    assert ExportManifest.read(tmp_path / "torch").base_dtype == "int4"
    module, _ = load_torch_stage(tmp_path / "torch", 1)
    assert any(name.endswith("qweight") and t.dtype == torch.uint8 for name, t in module.named_buffers())
    result = subprocess.run([sys.executable, "-m", "ringtune.cli", "export", "--plan", str(plan_path), "--out",
                             str(tmp_path / "et"), "--runtime", "executorch", "--base-dtype", "int8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "ExecuTorch stages take --base-dtype fp32 only" in result.stderr
