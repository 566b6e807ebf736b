"""The memory model: each device's predicted peak from a plan, worked out by hand, and the refusals."""
from __future__ import annotations

from dataclasses import replace

import pytest

from coordinator.planning.cost_table import CostTable, EndCost
from coordinator.planning.memory import DoesNotFitError, check_fits, in_flight, plan_memory
from coordinator.planning.partitioner import partition
from ringtune.run_shape import RunShape
from device_profiles import DeviceProfile
from ringtune.plan import Plan, StageSpec

# Four identical blocks; per token: 3 bytes kept for backward, 5 of workspace, 1 byte of hidden state.
TABLE = CostTable(
    model="m", seq_len=1, block_param_bytes=(10,) * 4, block_trainable_bytes=(2,) * 4,
    block_activation_bytes=(3.0,) * 4, block_workspace_bytes=(5.0,) * 4, block_forward_flops=(1.0,) * 4,
    block_backward_flops=(1.0,) * 4, cut_bytes=1.0,
    head_end=EndCost(param_bytes=7, trainable_bytes=0, activation_bytes=0.0, forward_flops=0.0, backward_flops=0.0),
    tail_end=EndCost(param_bytes=11, trainable_bytes=0, activation_bytes=1.0, forward_flops=1.0, backward_flops=1.0,
                     workspace_bytes=8.0),
    # the LM head and loss: priced on every position (a micro-batch may score them all), whatever the data's share
    scored_end=EndCost(param_bytes=0, trainable_bytes=0, activation_bytes=3.0, forward_flops=9.0, backward_flops=9.0,
                       workspace_bytes=12.0))
RING = Plan("m", "owner", (StageSpec("owner", (0, 1), "head"), StageSpec("pi", (1, 3), "middle"),
                           StageSpec("owner", (3, 4), "tail")), "1f1b", 4)
BASELINE = 100


def shape(schedule: str) -> RunShape:
    return RunShape(micro_batch_size=2, seq_len=1, micro_batches=4, schedule=schedule)  # 2 tokens a micro-batch


def test_in_flight_follows_the_schedule():
    assert [in_flight("1f1b", 3, s, 4) for s in range(3)] == [3, 2, 1]  # S - s
    assert [in_flight("1f1b", 6, s, 4) for s in range(6)] == [4, 4, 4, 3, 2, 1]  # never more than M
    assert [in_flight("gpipe", 3, s, 4) for s in range(3)] == [4, 4, 4]
    assert [in_flight("sequential", 3, s, 4) for s in range(3)] == [1, 1, 1]


def test_footprints_by_hand_1f1b():
    memory = plan_memory(TABLE, shape("1f1b"), RING, {"owner": BASELINE, "pi": BASELINE})
    owner, pi = memory["owner"], memory["pi"]
    # head [0, 1) + embedding, 3 micro-batches in flight, each keeping 2 x 3 bytes and its 2-byte output;
    # tail [3, 4) + norm/head/loss, one in flight, keeping 2 x (3 + 4) bytes (its output is the loss)
    assert owner.weights == 10 + 7 + 10 + 11 and owner.trainable == 2 + 2
    assert owner.activations == (6 + 2) * 3 + 14 * 1
    assert owner.workspace == 2 * 5 + 2 * 20  # head and tail run at once, each at its own largest op
    assert owner.buffers == (3 + 3) * 2 + (1 + 3) * 2  # one edge each: frames waiting + 3 copies, 2 bytes a frame
    assert owner.total == BASELINE + 38 + 4 + 38 + 50 + 20
    # middle [1, 3): two blocks, two micro-batches in flight, two edges
    assert (pi.weights, pi.trainable, pi.activations, pi.workspace) == (20, 4, (12 + 2) * 2, 10)
    assert pi.buffers == 2 * (2 + 3) * 2
    assert pi.total == BASELINE + 20 + 4 + 28 + 10 + 20


def test_the_heap_slack_counts_once_per_device():
    """The owner's head and tail threads share one heap, so its slack counts once there as on the helper."""
    with_slack = replace(TABLE, heap_bytes=64)
    bare = plan_memory(TABLE, shape("1f1b"), RING, {"owner": BASELINE, "pi": BASELINE})
    memory = plan_memory(with_slack, shape("1f1b"), RING, {"owner": BASELINE, "pi": BASELINE})
    for device in ("owner", "pi"):
        assert memory[device].heap == 64 and memory[device].total == bare[device].total + 64


@pytest.mark.parametrize("ram", [10_000, 260, 246, 200])
def test_the_heap_gets_room_for_its_activations_where_the_device_has_it(ram):
    """With room_share 1, a device's heap may keep its activations in flight again beyond the slack, but never past its
    RAM: plenty of it gives the whole room, a tight device gets what is left (and its agent trims more often), one
    without any left keeps the slack only, and one that does not fit is still refused."""
    table = replace(TABLE, heap_bytes=64, heap_room_share=1.0)
    devices = [DeviceProfile("owner", 10_000, 1, 1.0, 1.0, baseline_bytes=BASELINE),
               DeviceProfile("pi", ram, 1, 1.0, 1.0, baseline_bytes=BASELINE)]
    bare = plan_memory(table, shape("1f1b"), RING, {"owner": BASELINE, "pi": BASELINE})
    pi = bare["pi"]
    assert pi.running == BASELINE + 20 + 4 + 28 + 10 + 20 + 64 == 246
    if ram < pi.total:
        with pytest.raises(DoesNotFitError, match="^pi needs"):
            check_fits(table, shape("1f1b"), RING, devices)
        return
    checked = check_fits(table, shape("1f1b"), RING, devices)
    assert checked["owner"].heap_room == bare["owner"].activations  # the owner's RAM has room for it all
    assert checked["pi"].heap_room == min(pi.activations, ram - pi.running)
    assert checked["pi"].heap == 64  # the slack, which fitting counts
    assert checked["pi"].total == min(ram, pi.total + pi.activations)
    # the planner's own prediction for the plan it picks gives the same room as the pre-run check
    planned = partition(table, devices, "owner", shape("1f1b"))
    assert planned.predicted["memory"]["owner"]["heap_room"] > 0
    assert planned.predicted["memory_bytes"] == {
        n: int(f.total) for n, f in check_fits(table, shape("1f1b"), planned, devices).items()}


def test_withheld_gradients_keep_nothing_before_the_tail_and_every_frame_may_wait():
    """The owner withholds its tail's gradients: head and middle run forward only (no activations kept, no
    LoRA gradients or AdamW), and every edge may hold all 4 micro-batches' frames (the forward-only stages run
    ahead)."""
    withheld = replace(RING, privacy={"gradient": "withhold"})
    memory = plan_memory(TABLE, shape("1f1b"), withheld, {"owner": BASELINE, "pi": BASELINE})
    owner, pi = memory["owner"], memory["pi"]
    assert owner.weights == 10 + 7 + 10 + 11 and owner.trainable == 2  # the tail's
    assert owner.activations == 14 * 1  # the tail's one micro-batch in flight
    assert owner.workspace == 2 * 5 + 2 * 20
    assert owner.buffers == (4 + 3) * 2 + (4 + 3) * 2
    assert (pi.weights, pi.trainable, pi.activations, pi.workspace) == (20, 0, 0, 10)
    assert pi.buffers == 2 * (4 + 3) * 2


def test_the_lm_head_is_priced_on_every_position_whatever_the_scored_share():
    few = RunShape(micro_batch_size=2, seq_len=1, micro_batches=4, scored_share=0.05)
    baselines = {"owner": BASELINE, "pi": BASELINE}
    assert plan_memory(TABLE, few, RING, baselines) == plan_memory(TABLE, shape("1f1b"), RING, baselines)


def test_gpipe_keeps_every_micro_batch_in_flight():
    one, all_ = (plan_memory(TABLE, shape(s), RING, {"owner": BASELINE, "pi": BASELINE}) for s in ("1f1b", "gpipe"))
    assert all_["pi"].activations == (12 + 2) * 4 and one["pi"].activations == (12 + 2) * 2
    assert all_["owner"].activations == (6 + 2) * 4 + 14 * 4
    assert all_["owner"].weights == one["owner"].weights


def test_calibration_counts_when_it_is_the_larger_peak():
    tiny_slice = Plan("m", "owner", (StageSpec("owner", (0, 4), "full"),), "1f1b", 1)
    (owner,) = plan_memory(TABLE, RunShape(200, 1, 1, "1f1b"), tiny_slice, {"owner": BASELINE}).values()
    assert owner.calibration == 10 + 2 + (3 + 5) * 200 + 2 * 200
    assert owner.total == BASELINE + max(owner.running - BASELINE, owner.calibration)


def test_a_plan_that_does_not_fit_names_the_device_and_what_would_help():
    need = plan_memory(TABLE, shape("gpipe"), RING, {"owner": BASELINE, "pi": BASELINE})["pi"].total
    devices = [DeviceProfile("owner", 10_000, 1, 1.0, 1.0, baseline_bytes=BASELINE),
               DeviceProfile("pi", int(need) - 1, 1, 1.0, 1.0, baseline_bytes=BASELINE)]
    check_fits(TABLE, shape("1f1b"), RING, devices)  # 1F1B keeps fewer micro-batches in flight: it fits
    with pytest.raises(DoesNotFitError) as refused:
        check_fits(TABLE, shape("gpipe"), RING, devices)
    message = str(refused.value)
    assert message.startswith("pi needs 0.00 GB (") and "but has 0.00 GB" in message
    assert "owner" not in message.split(":")[0] and "activations" in message
    assert "--schedule 1f1b" in message and "more devices" in message


def test_a_device_whose_runtime_alone_is_too_big_is_refused():
    devices = [DeviceProfile("owner", 10_000, 1, 1.0, 1.0, baseline_bytes=BASELINE),
               DeviceProfile("pi", 10_000, 1, 1.0, 1.0, baseline_bytes=10_000)]
    with pytest.raises(DoesNotFitError, match=r"^pi needs .*runtime"):
        check_fits(TABLE, shape("1f1b"), RING, devices)
