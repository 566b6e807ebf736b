"""Turn a device's measured block time into the speed the planner's cost model uses."""
from __future__ import annotations

from dataclasses import replace

from coordinator.planning.costs import CostTable
from device_profiles.profile import DeviceProfile
from ringtune.run_shape import RunShape


def calibrated_profile(profile: DeviceProfile, table: CostTable, shape: RunShape,
                       block_seconds: float) -> DeviceProfile:
    """The profile whose GFLOP/s makes the cost model predict block 0's measured forward + backward time
    for one micro-batch; every block and the owner's ends are then costed at that speed."""
    if not block_seconds > 0:
        raise ValueError(f"device {profile.name!r}: a measured block time must be > 0 s, got {block_seconds}")
    flops = table.block_flops(shape.tokens)[0]  # priced as the partitioner prices it, dequantization included
    source = (f"measured: one {table.model} block, forward + backward of {shape.micro_batch_size} x "
              f"{shape.seq_len} tokens in {block_seconds * 1e3:.1f} ms")
    return replace(profile, gflops=flops / block_seconds / 1e9, sources={**profile.sources, "gflops": source})
