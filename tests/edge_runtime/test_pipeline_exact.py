"""In-process ring (threads + in-memory edges): split, pipelined training equals single-process training."""
import pytest
import torch

from helpers import ARCHITECTURES, write_text_data
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from edge_runtime.runners.base import OptimizerSpec
from reference import max_difference, reference_adapter
from ringtune.plan import even_plan

LORA = LoraSpec(r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSpec(lr=1e-2, weight_decay=0.01)
B, T, M, STEPS = 2, 24, 4, 3


def train_ring(model_name, devices, schedule, data):
    plan = even_plan(model_name, load_config(model_name).num_hidden_layers, devices, devices[0], schedule, M)
    return train_ring_in_process(apply_lora(load_model(model_name), LORA), plan, data, OPTIMIZER, STEPS, timeout=60)


@pytest.fixture(scope="module")
def data_for(tmp_path_factory):
    path = write_text_data(tmp_path_factory.mktemp("d") / "data.jsonl")
    return lambda model: OwnerData(read_records(path), load_tokenizer(model), B, T, M, seed=5)


@pytest.mark.parametrize("model_name", ARCHITECTURES)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "sequential"])
@pytest.mark.parametrize("devices", [["a"], ["a", "b"], ["a", "b", "c"]])
def test_ring_equals_single_process_training(model_name, schedule, devices, data_for):
    torch.manual_seed(0)
    data = data_for(model_name)
    ring, losses = train_ring(model_name, devices, schedule, data)
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS)
    assert max_difference(ring, reference) < 1e-5
    assert any(float(t.abs().max()) > 0 for k, t in ring.items() if "lora_B" in k), "training changed nothing"
    assert losses[-1] < losses[0]
