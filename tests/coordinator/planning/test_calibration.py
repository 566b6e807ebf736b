"""Calibrating a device's speed from a measured block time."""
from __future__ import annotations

import pytest

from helpers import ARCHITECTURES
from coordinator.planning import model_cost_table, partition
from coordinator.planning.calibration import calibrated_profile
from device_profiles import DeviceProfile
from edge_runtime.calibration import block_seconds
from edge_runtime.models.registry import load_config
from ringtune.lora_spec import LoraSpec
from ringtune.run_shape import RunShape

SHAPE = RunShape(micro_batch_size=2, seq_len=16, micro_batches=4)


def device(name: str, gflops: float = 100.0) -> DeviceProfile:
    return DeviceProfile(name, ram_bytes=8_000_000_000, cores=1, gflops=gflops, link_bytes_per_s=1e9)


@pytest.mark.parametrize("model, base_dtype", [(m, "fp32") for m in ARCHITECTURES] + [("tiny-llama", "int8")])
def test_calibrated_speed_predicts_the_measured_block_time(model, base_dtype):
    """The block's time measured at its dtype already holds dequantization: the partitioner, which prices it
    in FLOPs, predicts exactly the measured time again."""
    table = model_cost_table(model, LoraSpec(), SHAPE.seq_len, base_dtype=base_dtype)
    profile = calibrated_profile(device("a"), table, SHAPE, block_seconds=0.004)
    assert table.block_flops(SHAPE.tokens)[0] / (profile.gflops * 1e9) == pytest.approx(0.004)
    assert "measured: one" in profile.sources["gflops"] and "2 x 16 tokens" in profile.sources["gflops"]
    assert (profile.ram_bytes, profile.link_bytes_per_s) == (device("a").ram_bytes, device("a").link_bytes_per_s)


def test_a_slower_measured_block_moves_blocks_to_the_faster_device():
    table = model_cost_table("tiny-llama-2l", LoraSpec(), SHAPE.seq_len)
    owner, helper = device("owner"), device("helper")
    slow_helper = calibrated_profile(helper, table, SHAPE, block_seconds=10.0)
    fast_owner = calibrated_profile(owner, table, SHAPE, block_seconds=0.001)
    plan = partition(table, [fast_owner, slow_helper], "owner", SHAPE)
    assert plan.devices() == ["owner"]  # a helper 10^4 x slower only makes the step longer


def test_a_non_positive_block_time_is_refused():
    table = model_cost_table("tiny-llama", LoraSpec(), SHAPE.seq_len)
    with pytest.raises(ValueError, match="must be > 0"):
        calibrated_profile(device("a"), table, SHAPE, block_seconds=0.0)


@pytest.mark.parametrize("model", ARCHITECTURES)
def test_block_seconds_times_a_real_block(model):
    seconds = block_seconds(load_config(model).to_dict(), LoraSpec(), 2, 16, min_seconds=0.05)
    assert 0 < seconds < 5


def test_block_seconds_is_the_median_of_its_windows():
    """A window that lands on a busy moment (here 10x slower) does not move the device's speed."""
    # per window of 3 calls: the clock at its start, at the check after the third call, at its end
    ticks = iter([0, 0, 3, 3, 3, 33, 33, 33, 36])
    seconds = block_seconds(load_config("tiny-llama").to_dict(), LoraSpec(), 1, 4, min_seconds=0, min_calls=3,
                            windows=3, clock=lambda: next(ticks))
    assert seconds == 1.0
