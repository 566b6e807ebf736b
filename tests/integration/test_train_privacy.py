"""`ringtune train --privacy`: real agents privatize on the owner exactly like the in-process ring."""
import json
import subprocess
from dataclasses import replace

import pytest
from safetensors.torch import load_file

from helpers import ringtune_command, write_text_data
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.privacy.calibration import calibrate, head_stage
from ringtune.optimizer_spec import OptimizerSpec
from reference import assert_peft_reproduces_the_trained_model, max_difference
from ringtune.plan import Plan
from ringtune.privacy_spec import PRESETS, PrivacySpec

pytestmark = pytest.mark.slow
PRIVACY = "dchi:epsilon=30,clip=4,seed=5"
SHAPE = ["--steps", "2", "--micro-batches", "2", "--micro-batch-size", "2", "--seq-len", "24",
         "--lr", "0.01", "--lora-r", "4", "--lora-alpha", "8", "--seed", "11", "--split", "even"]


@pytest.mark.parametrize("privacy", [PRIVACY, "strong,seed=5"])
def test_private_run_over_agents_equals_the_in_process_ring_and_is_recorded(tmp_path, privacy):
    """A preset is calibrated by the coordinator at the plan's cut (the even split's one head block here):
    the plan records its numbers, and the owner privatizes with exactly them."""
    data = write_text_data(tmp_path / "train.jsonl", records=16)
    out = tmp_path / "run"
    result = subprocess.run(ringtune_command("train", "--model", "tiny-llama", "--local", "2", "--data", str(data),
                                             "--out", str(out), "--privacy", privacy, "--grad-privacy", "maxnorm",
                                             *SHAPE), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    plan = Plan.from_json((out / "plan.json").read_text())
    assert plan.privacy["hidden"] == "dchi" and "seed" not in plan.privacy
    gradient = "withhold" if "strong" in privacy else "maxnorm"  # a preset brings its own
    assert json.loads((out / "ringtune.json").read_text())["settings"]["privacy"]["gradient"] == gradient
    spec = replace(PrivacySpec.from_dict(plan.privacy), seed=5)
    if spec.preset:
        head_blocks = plan.stages[0].layers[1]
        assert spec == calibrate(PrivacySpec.parse(privacy), head_stage(load_model("tiny-llama"), head_blocks),
                                 load_tokenizer("tiny-llama"), 24)
    else:
        assert spec == PrivacySpec.parse(PRIVACY, "maxnorm")
    assert f"privacy: {spec.describe()}" in result.stdout
    assert (f"preset strong was measured with the owner keeping {PRESETS['strong'].owner_blocks} blocks at each end; "
            "this plan keeps 1"
            in result.stdout) == bool(spec.preset)  # the even split of tiny-llama's 4 blocks
    owner_data = OwnerData(read_records(data), load_tokenizer("tiny-llama"), 2, 24, 2, seed=11)
    expected = train_ring_in_process(apply_lora(load_model("tiny-llama"), LoraSpec(4, 8, seed=11)), plan,
                                     owner_data, OptimizerSpec(lr=0.01), 2, spec).adapter
    assert max_difference(load_file(out / "adapter_model.safetensors"), expected) < 1e-5
    if gradient == "withhold":  # the adapter holds the tail's blocks only, and peft adapts only those
        tail = set(range(*plan.stages[-1].layers))
        block = lambda name: int(name.split(".layers.")[1].split(".")[0])
        assert {block(key) for key in expected} == tail
        adapted = json.loads((out / "adapter_config.json").read_text())["target_modules"]
        assert {block(name) for name in adapted} == tail and len(adapted) == len(expected) // 2  # lora_A and B
        assert_peft_reproduces_the_trained_model("tiny-llama", out)
        scored = subprocess.run(ringtune_command("evaluate", "--model", "tiny-llama", "--adapter", str(out), "--data",
                                                 str(data), "--seq-len", "24", "--json"),
                                capture_output=True, text=True, timeout=120)
        assert scored.returncode == 0, scored.stderr
        evaluated = json.loads(scored.stdout)
        assert evaluated["hide_labels"] and evaluated["loss_after"] != evaluated["loss_before"]
