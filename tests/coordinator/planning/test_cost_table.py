"""The cost table from configs on the meta device, and planning a 7B model without weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import ARCHITECTURES
from coordinator.planning import DoesNotFitError, config_from_file, model_cost_table, plan_run
from coordinator.planning.partitioner import partition
from device_profiles import resolve_device
from edge_runtime.memory import HEAP_SLACK_BYTES
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model
from edge_runtime.models.structure import find_parts
from ringtune.run_shape import RunShape

LLAMA_7B = Path(__file__).parent / "data" / "llama-2-7b" / "config.json"
GEMMA3_1B = Path(__file__).parent / "data" / "gemma-3-1b" / "config.json"


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_table_matches_the_real_model(name):
    table = model_cost_table(name, LoraSpec(r=4), seq_len=16)
    peft_model = apply_lora(load_model(name), LoraSpec(r=4))
    parts = find_parts(peft_model)
    block = parts.blocks[0]
    assert table.num_blocks == len(parts.blocks)
    assert table.block_param_bytes[0] == _bytes(block.parameters())
    lora = [p for p in block.parameters() if p.requires_grad]
    assert lora and table.block_trainable_bytes[0] == 4 * _bytes(lora)  # tensor, grad, two AdamW moments
    unique = {id(p): p for p in peft_model.parameters()}.values()
    ends = table.head_end.param_bytes + table.tail_end.param_bytes
    assert sum(table.block_param_bytes) + ends == _bytes(unique)  # a tied head is counted once
    hidden = peft_model.config.hidden_size
    assert table.cut_bytes == 4 * hidden
    # Every linear layer runs forward; backward needs at least the input gradients.
    frozen = sum(p.numel() for n, p in block.named_parameters() if n.endswith("weight") and p.dim() == 2)
    assert table.block_forward_flops[0] >= 2 * frozen - 1
    assert table.block_backward_flops[0] >= table.block_forward_flops[0] * 0.9
    assert table.block_activation_bytes[0] >= 4 * hidden  # at least the block input
    assert table.scored_end.forward_flops >= 2 * hidden * peft_model.config.vocab_size  # per scored position
    assert table.heap_bytes == HEAP_SLACK_BYTES  # what an agent's heap keeps between trims
    assert table.tail_end.forward_flops < 16 * hidden  # the final norm alone, on every position


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_compact_linear_weights_are_counted_for_pricing_their_dequantization(name):
    """Each block's frozen linear weights (GPT-2's Conv1D too), and the LM head's; none at fp32."""
    model = load_model(name)
    parts = find_parts(model)
    linear = sum(p.numel() for n, p in parts.blocks[0].named_parameters() if n.endswith("weight") and p.dim() == 2)
    compact = model_cost_table(name, LoraSpec(r=4), seq_len=16, base_dtype="int8")
    assert compact.block_compact_weights[0] == linear
    assert compact.scored_end.compact_weights == parts.head.weight.numel() and compact.tail_end.compact_weights == 0
    assert compact.head_end.compact_weights == 0  # an embedding lookup dequantizes only the rows it reads
    plain = model_cost_table(name, LoraSpec(r=4), seq_len=16)
    assert set(plain.block_compact_weights) == {0} and plain.scored_end.compact_weights == 0


def test_llama_7b_plans_on_eight_pi5():
    """Planning needs only the config (meta device); how long it takes is not a test's business."""
    devices = [resolve_device(f"rpi5-8gb:pi-{i}") for i in range(8)]
    plan = plan_run(config_from_file(LLAMA_7B), devices, "pi-0", RunShape(), model_name="llama-2-7b")
    assert plan.stages[0].device == plan.stages[-1].device == "pi-0"
    assert plan.stages[-1].layers[1] == 32
    for name, used in plan.predicted["memory_bytes"].items():
        assert used <= devices[0].ram_bytes
    assert sum(plan.predicted["memory_bytes"].values()) > 27e9  # fp32 weights of 6.7 B parameters


def test_gemma3_1b_plans_from_its_config():
    """Gemma-3 1B (26 blocks: 5 sliding-window to 1 full, a 262k-token tied embedding) by config alone."""
    devices = [resolve_device("rpi4-4gb:pi-a"), resolve_device("rpi5-8gb:pi-b")]
    table = model_cost_table(config_from_file(GEMMA3_1B), seq_len=64, name="gemma-3-1b")
    assert table.num_blocks == 26 and len(set(table.block_param_bytes)) == 1
    assert table.head_end.param_bytes == 262144 * 1152 * 4  # the tied embedding, counted once
    plan = partition(table, devices, "pi-a", RunShape())
    assert plan.stages[-1].layers[1] == 26
    assert all(used <= 7e9 for used in plan.predicted["memory_bytes"].values())


def test_llama_7b_on_two_pi4_fails_with_a_clear_error():
    table = model_cost_table(config_from_file(LLAMA_7B), seq_len=64, name="llama-2-7b")
    devices = [resolve_device("rpi4-4gb:pi-a"), resolve_device("rpi4-4gb:pi-b")]
    with pytest.raises(DoesNotFitError) as error:
        partition(table, devices, "pi-a", RunShape())
    message = str(error.value)
    for part in ("pi-a 3.0 GB", "pi-b 3.0 GB", "needs at least 29.", "runtime 0.90 GB", "add devices", "--micro-batch-size",
                 "--seq-len"):
        assert part in message
