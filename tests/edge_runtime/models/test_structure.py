"""Parts found by structure (Gemma-3's per-layer attention types), and architectures the slicer
cannot split refused in one line: in process and through the command line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import madeup_models
from helpers import write_text_data
from edge_runtime.models.registry import load_config, load_model
from edge_runtime.models.stage import StageModule
from edge_runtime.models.structure import UnsupportedModelError, find_parts, sliceable_meta_model

REPO = Path(__file__).parents[3]


def test_gemma3_parts_are_found_by_structure():
    model = load_model("tiny-gemma3")
    parts = find_parts(model)
    assert parts.attention_types == ("sliding_attention", "full_attention") * 2
    assert parts.rotary_takes_type and parts.logit_softcap == 10.0 and parts.position_embed is None
    assert parts.head.weight is parts.embed.weight  # tied, so the tail ships the embedding too
    ids = torch.randint(0, 256, (1, 5))
    assert not torch.allclose(parts.embed(ids), parts.embed.weight[ids])  # the embedding scales its output


def test_tiny_gemma3_sliding_window_matters_at_test_lengths():
    """A stage that masked every block causally over the whole sequence would differ from the model."""
    model = load_model("tiny-gemma3")
    assert load_config("tiny-gemma3").sliding_window < 12
    ids = torch.randint(0, 256, (2, 12))
    stage = StageModule(find_parts(model), model.config, (0, 4), "full")
    with torch.no_grad():
        assert torch.allclose(stage(ids), model(input_ids=ids).logits, atol=1e-5)
        stage.attention_types = ("full_attention",) * 4
        assert not torch.allclose(stage(ids), model(input_ids=ids).logits, atol=1e-3)


@pytest.mark.parametrize("config, missing", [
    (madeup_models.MadeupConfig(towers=2), "2 lists of 2 blocks (model.layers, model.mirror_layers)"),
    (madeup_models.MadeupConfig(final_norm=False), "no final norm after the blocks")])
def test_a_made_up_architecture_is_refused_naming_what_is_missing(config, missing):
    with pytest.raises(UnsupportedModelError, match=r"model type 'madeup-decoder' \(MadeupForCausalLM\)") as error:
        sliceable_meta_model(config)
    assert missing in str(error.value) and "\n" not in str(error.value)


def test_a_multimodal_gemma3_config_is_refused():
    from transformers import Gemma3Config

    with pytest.raises(UnsupportedModelError, match="'gemma3'.*no num_hidden_layers.*text decoder's config"):
        sliceable_meta_model(Gemma3Config())


def madeup_cli(*args: str) -> subprocess.CompletedProcess:
    """`ringtune ARGS` in a process where the made-up architecture is registered with transformers
    (imported before the CLI quiets the libraries, so stderr also carries their import notes)."""
    code = "import madeup_models, sys; from ringtune.cli import main; sys.exit(main())"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env=env, cwd=REPO)


def test_the_command_line_refuses_a_made_up_architecture_in_one_line(tmp_path):
    two_towers = madeup_models.write_model_dir(tmp_path / "two-towers", towers=2)
    plan = madeup_cli("plan", "--model", str(two_towers), "--device", "rpi5-8gb:pi-a")
    no_norm = madeup_models.write_model_dir(tmp_path / "no-norm", final_norm=False)
    train = madeup_cli("train", "--model", str(no_norm), "--local", "2", "--data",
                       str(write_text_data(tmp_path / "data.jsonl")), "--out", str(tmp_path / "run"))
    for result, missing in ((plan, "2 lists of 2 blocks"), (train, "no final norm after the blocks")):
        errors = [line for line in result.stderr.splitlines() if line.startswith("ringtune ")]
        assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1, result.stderr
        assert "model type 'madeup-decoder'" in errors[0] and missing in errors[0]
    assert not (tmp_path / "run").exists()  # refused before any agent started
