"""Pricing time by base dtype: a compact weight's dequantization is priced on every forward and backward (on the
forward alone in a stage that does not train)."""
from __future__ import annotations

from dataclasses import replace

import pytest

from coordinator.commands.plan import print_plan
from coordinator.planning.costs import DEQUANTIZE_FLOPS, CostTable, EndCost
from coordinator.planning.partitioner import partition
from device_profiles import resolve_device
from ringtune.run_shape import RunShape

SHAPE = RunShape(micro_batch_size=2, seq_len=16, micro_batches=4)
WEIGHTS = 1_000_000  # compact weight elements per block


def table(base_dtype: str, blocks: int = 4) -> CostTable:
    """Blocks of 1M compact weights whose matmuls cost 2 FLOPs per weight per token forward, 4 backward."""
    compact = WEIGHTS if base_dtype != "fp32" else 0
    return CostTable(model="synthetic", seq_len=SHAPE.seq_len, base_dtype=base_dtype,
                     block_param_bytes=(10_000_000,) * blocks, block_trainable_bytes=(100_000,) * blocks,
                     block_activation_bytes=(1000.0,) * blocks, block_workspace_bytes=(1000.0,) * blocks,
                     block_forward_flops=(2.0 * WEIGHTS,) * blocks, block_backward_flops=(4.0 * WEIGHTS,) * blocks,
                     block_compact_weights=(compact,) * blocks, cut_bytes=1000.0,
                     head_end=EndCost(1_000_000, 0, 0.0, 0.0, 0.0), tail_end=EndCost(1_000_000, 0, 10.0, 10.0, 10.0),
                     scored_end=EndCost(0, 0, 100.0, 2.0 * WEIGHTS, 2.0 * WEIGHTS, 0.0, compact))


@pytest.mark.parametrize("dtype", ["bf16", "int8", "int4"])
def test_a_compact_block_costs_its_matmuls_plus_one_dequantization_per_pass(dtype):
    tokens = SHAPE.tokens
    assert table("fp32").block_flops(tokens) == [6.0 * WEIGHTS * tokens] * 4
    assert table(dtype).block_flops(tokens) == [6.0 * WEIGHTS * tokens + 2 * DEQUANTIZE_FLOPS[dtype] * WEIGHTS] * 4
    # a stage that does not train (the owner withholds gradients) runs one pass: the forward
    assert table(dtype).block_flops(tokens, trains=False) == [2.0 * WEIGHTS * tokens + DEQUANTIZE_FLOPS[dtype] * WEIGHTS] * 4
    head = table(dtype).scored_end  # dequantized once per pass however few positions are scored
    assert table(dtype).end_flops(head, 3) == 4.0 * WEIGHTS * 3 + 2 * DEQUANTIZE_FLOPS[dtype] * WEIGHTS
    assert table(dtype).end_flops(table(dtype).head_end, tokens) == 0.0  # a lookup dequantizes only its rows


def test_no_compact_dtype_is_priced_faster_than_fp32_on_any_device():
    """Compute is fp32 matmuls for every dtype (bf16 too: upcast, never bf16 instructions, which Pis lack),
    so dequantizing only ever adds time; int4's nibble unpacking costs more than int8's cast."""
    assert DEQUANTIZE_FLOPS["fp32"] == 0
    assert 0 < DEQUANTIZE_FLOPS["int8"] < DEQUANTIZE_FLOPS["int4"] and DEQUANTIZE_FLOPS["bf16"] > 0
    for profile in ("rpi4-4gb", "rpi5-8gb", "laptop"):
        devices = [resolve_device(f"{profile}:a"), resolve_device(f"{profile}:b")]
        step = {d: partition(table(d), devices, "a", SHAPE).predicted["step_seconds"] for d in DEQUANTIZE_FLOPS}
        assert step["fp32"] < step["int8"] < step["int4"] and step["fp32"] < step["bf16"]


def test_the_plan_says_how_it_priced_a_compact_dtype(capsys):
    devices = [resolve_device("rpi4-4gb:a"), resolve_device("rpi4-4gb:b")]
    for dtype in ("fp32", "int8"):
        plan = replace(partition(table(dtype), devices, "a", SHAPE), base_dtype=dtype, base_dtype_reason="test")
        print_plan(plan, devices)
    out = capsys.readouterr().out
    assert out.count("time at") == 1
    assert (f"time at int8: fp32 matmuls + dequantizing every frozen weight on each forward and backward, priced "
            f"at {DEQUANTIZE_FLOPS['int8']:g} FLOPs per weight per pass") in out
