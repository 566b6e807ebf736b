"""run.json: what --resume needs to continue a run; the settings hold no secret to write."""
import dataclasses
from pathlib import Path

import pytest

from coordinator.run_store import RunStore
from coordinator.settings import TrainSettings
from edge_runtime.models.lora import LoraSpec
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.privacy_spec import PrivacySpec


def test_settings_survive_run_json(tmp_path):
    settings = TrainSettings(model="tiny-llama", owner="pi-a", steps=12, micro_batches=4, micro_batch_size=2,
                             seq_len=32, out=Path("elsewhere"), lora=LoraSpec(4, 8, ("q_proj", "v_proj"), 11),
                             optimizer=OptimizerSpec(lr=0.01, betas=(0.8, 0.99)), seed=11, split="even",
                             encrypt=True, privacy=PrivacySpec("dchi", epsilon=2.0, clip=50.0, seed=7))
    store = RunStore(tmp_path)
    store.start("0123456789abcdef", settings, resume=False)
    store.close()
    loaded, lineage = RunStore(tmp_path).read_run()
    assert lineage == "0123456789abcdef"
    assert loaded == dataclasses.replace(settings, out=tmp_path, privacy=dataclasses.replace(settings.privacy, seed=None))
    assert '"seed": 7' not in (tmp_path / "run.json").read_text()  # the owner keeps the noise seed


def test_settings_have_no_secret_field():
    assert not {"token", "key", "secret"} & {f.name for f in dataclasses.fields(TrainSettings)}


def test_resume_of_a_directory_without_a_run_says_what_to_give(tmp_path):
    with pytest.raises(ValueError, match="run.json is missing"):
        RunStore(tmp_path).read_run()
