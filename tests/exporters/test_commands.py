"""``ringtune export``: the manifest it writes, and the refusals a user sees in one line."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from edge_runtime.backends.executorch.runner import load_block_programs
from edge_runtime.backends.torch.load import load_torch_stage
from exporters import commands
from ringtune.manifest import ExportManifest, ManifestError
from ringtune.plan import even_plan


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
    with pytest.raises(ManifestError, match="--runtime executorch"):
        load_block_programs(tmp_path / "out")


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
