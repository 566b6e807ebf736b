"""The schedule simulation that prices rings of several laps, against step times known in closed form."""
from __future__ import annotations

import pytest

from coordinator.planning.pipeline_sim import SimStage, simulate_step


def line(count: int, forward: float, backward: float, link: float = 0.0) -> list[SimStage]:
    """count equal stages, each on its own device."""
    return [SimStage(f"d{i}", forward, backward, link if i < count - 1 else 0.0) for i in range(count)]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("stages,micro_batches", [(1, 1), (1, 5), (3, 8), (4, 3)])
def test_equal_stages_take_fill_drain_and_steady_state(schedule, stages, micro_batches):
    # The partitioner's closed form for a line of equal stages: (M + S - 1) stage times.
    step = simulate_step(line(stages, 1.0, 2.0), schedule, micro_batches)
    assert step == pytest.approx((micro_batches + stages - 1) * 3.0)


def test_links_delay_each_frame():
    # F0, activation over the link, F1 then B1 on the tail, gradient back, B0.
    assert simulate_step(line(2, 1.0, 1.0, link=0.5), "1f1b", 1) == pytest.approx(5.0)


def test_stages_on_one_device_share_its_cpu():
    # Two stages on one device: it is never idle after the first forward, so the step is all its work.
    stages = [SimStage("a", 1.0, 1.0, 0.0), SimStage("a", 1.0, 1.0, 0.0)]
    assert simulate_step(stages, "1f1b", 4) == pytest.approx(16.0)


def test_a_second_lap_fills_the_bubbles():
    # Three equal devices, 30 blocks, 8 micro-batches (F = B per block, as for LoRA on frozen weights).
    def ring(owner_ranges, helper_ranges):
        stages = [SimStage("owner", owner_ranges[0], owner_ranges[0], 0.0)]
        for lap, owner_blocks in enumerate(owner_ranges[1:]):
            stages += [SimStage(d, helper_ranges[lap], helper_ranges[lap], 0.0) for d in ("b", "c")]
            stages.append(SimStage("owner", owner_blocks, owner_blocks, 0.0))
        return stages
    one = simulate_step(ring([1, 9], [10]), "1f1b", 8)
    two = simulate_step(ring([3, 4, 3], [5, 5]), "1f1b", 8)
    busy = 8 * 20.0  # each device's own work
    # The partitioner's closed form: sum of stage times + (M - 1) x the busiest device's, 60 + 7 x 20. The owner's
    # head runs while its tail waits for the first micro-batch: one block sooner.
    assert one == pytest.approx(busy + 40.0 - 1.0)
    assert busy < two < 0.95 * one
