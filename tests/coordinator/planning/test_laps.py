"""Rings of several laps: each device keeps its blocks in several ranges; the step is simulated."""
from __future__ import annotations

import pytest

from coordinator.planning.costs import CostTable, EndCost
from coordinator.planning.laps import lap_stages, looped_plan, sim_stages
from coordinator.planning.memory import DoesNotFitError, check_fits, plan_memory
from coordinator.planning.pipeline_sim import simulate_step
from device_profiles import DeviceProfile
from ringtune.plan import Plan, PlanError, StageSpec, validate_plan
from ringtune.privacy_spec import PrivacySpec
from ringtune.run_shape import RunShape

BLOCKS = 30
TABLE = CostTable(model="uniform", seq_len=4, block_param_bytes=(100,) * BLOCKS, block_trainable_bytes=(10,) * BLOCKS,
                  block_activation_bytes=(5.0,) * BLOCKS, block_workspace_bytes=(1.0,) * BLOCKS,
                  block_forward_flops=(1e6,) * BLOCKS, block_backward_flops=(1e6,) * BLOCKS, cut_bytes=16.0,
                  head_end=EndCost(50, 0, 1.0, 1e5, 0.0), tail_end=EndCost(50, 0, 1.0, 1e5, 1e5),
                  scored_end=EndCost(0, 0, 1.0, 1e6, 1e6))
SHAPE = RunShape(micro_batch_size=1, seq_len=4, micro_batches=8)
ONE_LAP = Plan("uniform", "a", (StageSpec("a", (0, 1), "head"), StageSpec("b", (1, 11)), StageSpec("c", (11, 21)),
                                 StageSpec("a", (21, 30), "tail")), micro_batches=8)


def devices(ram: int = 10**6) -> list[DeviceProfile]:
    return [DeviceProfile(name, ram, 4, 1.0, 1e9, baseline_bytes=1) for name in "abc"]


def blocks_per_device(stages) -> dict[str, int]:
    counts: dict[str, int] = {}
    for stage in stages:
        counts[stage.device] = counts.get(stage.device, 0) + stage.num_layers
    return counts


@pytest.mark.parametrize("laps", [2, 3])
def test_every_device_keeps_its_blocks_in_more_ranges(laps):
    stages = lap_stages(ONE_LAP, laps)
    validate_plan(Plan("uniform", "a", stages), BLOCKS)
    assert blocks_per_device(stages) == blocks_per_device(ONE_LAP.stages)
    assert [s.device for s in stages] == ["a", *(["b", "c", "a"] * laps)]
    assert [s.role for s in stages] == ["head", *["middle"] * (3 * laps - 1), "tail"]


def test_the_owner_tail_is_never_its_largest_range():
    # 10 owner blocks in 3 ranges: the head and the tail get 3, the range between the laps 4.
    assert [s.num_layers for s in lap_stages(ONE_LAP, 2) if s.device == "a"] == [3, 4, 3]


def test_too_few_blocks_for_the_laps_is_refused():
    with pytest.raises(PlanError, match="4 laps need at least 4 blocks per device and 5 on the owner; b has 3"):
        lap_stages(Plan("m", "a", (StageSpec("a", (0, 3), "head"), StageSpec("b", (3, 6)),
                                   StageSpec("a", (6, 9), "tail"))), 4)


def test_two_laps_predict_a_faster_step_that_fits():
    plan = looped_plan(TABLE, devices(), SHAPE, ONE_LAP, 2)
    one_lap = simulate_step(sim_stages(TABLE, SHAPE, ONE_LAP, {d.name: d for d in devices()}), "1f1b", 8)
    assert plan.predicted["laps"] == 2
    assert plan.predicted["step_seconds"] < 0.95 * one_lap
    assert set(plan.predicted["memory_bytes"]) == {"a", "b", "c"}


def test_one_lap_is_the_plan_itself():
    assert looped_plan(TABLE, devices(), SHAPE, ONE_LAP, 1) is ONE_LAP


def test_more_in_flight_must_fit():
    # Early-lap stages keep more micro-batches in flight: devices with just the room for one lap lack it.
    one_lap = plan_memory(TABLE, SHAPE, ONE_LAP, {d.name: 1 for d in devices()})
    tight = devices(ram=int(max(f.running for f in one_lap.values())))
    check_fits(TABLE, SHAPE, ONE_LAP, tight)
    with pytest.raises(DoesNotFitError, match="needs"):
        looped_plan(TABLE, tight, SHAPE, ONE_LAP, 2)


def test_privacy_keeps_one_lap():
    with pytest.raises(PlanError, match="--laps needs the privacy off"):
        looped_plan(TABLE, devices(), RunShape(1, 4, 8, privacy=PrivacySpec(gradient="maxnorm")), ONE_LAP, 2)
