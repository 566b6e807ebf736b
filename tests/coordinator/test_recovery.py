"""run.json: what --resume needs to continue a run, without the pairing token."""
import json
from pathlib import Path

import pytest

from coordinator.recovery import RUN_FILE, load_run, settings_to_dict
from coordinator.training import TrainSettings
from edge_runtime.models.lora import LoraSpec
from edge_runtime.runners.base import OptimizerSpec


def test_settings_survive_run_json_except_the_token(tmp_path):
    settings = TrainSettings(model="tiny-llama", owner="pi-a", steps=12, micro_batches=4, micro_batch_size=2,
                             seq_len=32, out=Path("elsewhere"), lora=LoraSpec(4, 8, ("q_proj", "v_proj"), 11),
                             optimizer=OptimizerSpec(lr=0.01, betas=(0.8, 0.99)), seed=11, token="secret-token",
                             split="even", encrypt=True)
    (tmp_path / RUN_FILE).write_text(json.dumps({"lineage": "0123456789abcdef",
                                                 "settings": settings_to_dict(settings)}))
    assert "secret-token" not in (tmp_path / RUN_FILE).read_text()
    loaded, lineage = load_run(tmp_path, "new-token")
    assert lineage == "0123456789abcdef"
    assert loaded == TrainSettings(**{**{f: getattr(settings, f) for f in TrainSettings.__slots__},
                                      "out": tmp_path, "token": "new-token"})


def test_resume_of_a_directory_without_a_run_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="run.json is missing"):
        load_run(tmp_path, "token")
