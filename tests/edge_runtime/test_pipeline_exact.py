"""In-process ring (threads + in-memory edges): split, pipelined training equals single-process training."""
import pytest
import torch

from helpers import ARCHITECTURES, write_text_data
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.quantization import compact_model
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from edge_runtime.training_state import pack_state, unpack_state
from ringtune.optimizer_spec import OptimizerSpec
from reference import dequantized_tolerance, max_difference, reference_adapter
from ringtune.plan import even_plan

LORA = LoraSpec(r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSpec(lr=1e-2, weight_decay=0.01)
B, T, M, STEPS = 2, 24, 4, 3


def train_ring(model_name, devices, schedule, data, steps=range(STEPS), restore=None, base_dtype="fp32"):
    """restore: a training state (StageRunner.training_state of some split) to start from."""
    plan = even_plan(model_name, load_config(model_name).num_hidden_layers, devices, devices[0], schedule, M)
    model = apply_lora(load_model(model_name), LORA)
    compact_model(model, base_dtype)
    result = train_ring_in_process(model, plan, data, OPTIMIZER, steps, timeout=60, restore=restore)
    return result.adapter, result.losses, result.training_state


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
    ring, losses, _ = train_ring(model_name, devices, schedule, data)
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS)
    assert max_difference(ring, reference) < 1e-5
    assert any(float(t.abs().max()) > 0 for k, t in ring.items() if "lora_B" in k), "training changed nothing"
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_name", ARCHITECTURES)
@pytest.mark.parametrize("base_dtype", ["bf16", "int8", "int4"])
def test_compact_base_weights_train_the_same_on_one_and_three_devices(model_name, base_dtype, data_for):
    """Frozen weights quantized once, identically wherever the cut falls (1 and 3 devices equal to 1e-5); the
    tiled fp32 matmuls equal plain peft on a model holding the dequantized values (int8 rounds in another
    order: dequantized_tolerance says why and by how much)."""
    data = data_for(model_name)
    one, _, _ = train_ring(model_name, ["a"], "1f1b", data, base_dtype=base_dtype)
    three, losses, _ = train_ring(model_name, ["a", "b", "c"], "1f1b", data, base_dtype=base_dtype)
    assert max_difference(one, three) < 1e-5
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS, base_dtype=base_dtype)
    assert max_difference(three, reference) < dequantized_tolerance(base_dtype)
    assert max_difference(three, reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS)) > 1e-6, \
        "compact weights changed nothing"
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("model_name", ARCHITECTURES)
def test_training_state_taken_under_one_split_continues_exactly_under_another(model_name, data_for):
    """What recovery relies on: checkpoint on 3 devices, restore on 2, replay; equals uninterrupted training."""
    data = data_for(model_name)
    _, _, taken = train_ring(model_name, ["a", "b", "c"], "1f1b", data, steps=range(1))
    tensors, step, losses = unpack_state(pack_state(taken, 1, [0.5]))
    assert (step, losses) == (1, [0.5]) and any(k.startswith("exp_avg_sq/") for k in tensors)
    resumed, _, _ = train_ring(model_name, ["a", "c"], "1f1b", data, steps=range(1, STEPS), restore=tensors)
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS)
    assert max_difference(resumed, reference) < 1e-5
    fresh, _, _ = train_ring(model_name, ["a", "c"], "1f1b", data, steps=range(1, STEPS))
    assert max_difference(fresh, reference) > 1e-4, "the restored state made no difference"
