"""The action order the torch.distributed.pipelining peer runs: ringtune's per-stage schedules,
with the owner's two stages merged into one order that tdp's own checks accept."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torch.distributed.pipelining.schedules import (_Action, _add_send_recv, _ComputationType,
                                                    _simulate_comms_compute, _validate_schedule)

from edge_runtime.schedules import schedule_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
import tdp_ring  # noqa: E402

KINDS = {"F": _ComputationType.FORWARD, "B": _ComputationType.FULL_BACKWARD}


def ring(devices: int) -> list[int]:
    """Stage -> rank of ringtune's ring: the owner (rank 0) holds the first and the last stage."""
    return [0, *range(1, devices), 0]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "sequential"])
@pytest.mark.parametrize("devices,micro_batches", [(2, 1), (2, 4), (3, 8), (4, 3)])
def test_rank_orders_keep_each_stage_schedule_and_pass_tdp_checks(schedule, devices, micro_batches):
    stage_ranks = ring(devices)
    orders = tdp_ring.rank_orders(stage_ranks, schedule, micro_batches)
    for stage, rank in enumerate(stage_ranks):
        own = [(kind, mb) for kind, s, mb in orders[rank] if s == stage]
        expected = schedule_for(schedule, len(stage_ranks), stage, micro_batches)
        assert own == [(a.kind, a.microbatch) for a in expected]
    actions = {rank: [_Action(s, KINDS[k], m) for k, s, m in order] for rank, order in orders.items()}
    mapping = _validate_schedule(actions, devices, len(stage_ranks), micro_batches)
    assert mapping == dict(enumerate(stage_ranks))
    lowered = _add_send_recv(actions, stage_to_rank=lambda s: stage_ranks[s], num_stages=len(stage_ranks))
    _simulate_comms_compute(lowered, lambda s: stage_ranks[s], len(stage_ranks))  # raises on a deadlock


def test_owner_drains_the_tail_first():
    """With both of its stages ready, the owner runs the tail: micro-batches finish (and free their
    activations) soonest, as ringtune's 1F1B intends."""
    order = tdp_ring.rank_orders(ring(2), "1f1b", 2)[0]
    assert order[:4] == [("F", 0, 0), ("F", 0, 1), ("F", 2, 0), ("B", 2, 0)]


def brute_force_cuts(blocks: list[float], count: int, head: float, tail: float) -> float:
    """The smallest largest-range cost over every split into count contiguous non-empty ranges."""
    from itertools import combinations

    best = float("inf")
    for inner in combinations(range(1, len(blocks)), count - 1):
        cuts = [0, *inner, len(blocks)]
        costs = [sum(blocks[a:b]) for a, b in zip(cuts, cuts[1:])]
        costs[0] += head
        costs[-1] += tail
        best = min(best, max(costs))
    return best


@pytest.mark.parametrize("blocks,count,head,tail", [
    ([1.0] * 6, 3, 0.0, 0.0), ([1.0] * 30, 3, 0.0, 2.5), ([1.0] * 30, 6, 0.1, 4.0),
    ([5.0, 1.0, 1.0, 1.0, 1.0, 5.0], 2, 0.0, 0.0), ([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0], 4, 1.0, 3.0),
    ([2.0, 7.0, 1.0], 3, 0.0, 0.0), ([1.0], 1, 0.5, 0.5)])
def test_balanced_cuts_minimise_the_costliest_range(blocks, count, head, tail):
    cuts = tdp_ring.balanced_cuts(blocks, count, head, tail)
    assert cuts[0] == 0 and cuts[-1] == len(blocks) and len(cuts) == count + 1
    assert all(a < b for a, b in zip(cuts, cuts[1:]))  # every range holds a block
    costs = [sum(blocks[a:b]) for a, b in zip(cuts, cuts[1:])]
    costs[0] += head
    costs[-1] += tail
    assert max(costs) == pytest.approx(brute_force_cuts(blocks, count, head, tail))


def test_balanced_cuts_give_the_loss_end_fewer_blocks():
    """30 equal blocks on 3 ranks, the LM head and loss worth 3 blocks: 11, 11 and 8 blocks (11 each)."""
    assert tdp_ring.balanced_cuts([1.0] * 30, 3, 0.0, 3.0) == [0, 11, 22, 30]


@pytest.mark.parametrize("layout,stages_per_rank", [("line", 1), ("interleaved", 2)])
def test_line_plan_puts_embedding_first_and_loss_last(layout, stages_per_rank):
    from coordinator.planning import model_cost_table

    table = model_cost_table("tiny-llama", seq_len=16)
    devices = ["owner", "dev1"]
    plan = tdp_ring.line_plan(table, devices, layout, 0.1, 2, 4)
    count = len(devices) * stages_per_rank
    assert [s.device for s in plan.stages] == [devices[s % len(devices)] for s in range(count)]
    assert [s.role for s in plan.stages] == ["head"] + ["middle"] * (count - 2) + ["tail"]
    assert plan.stages[-1].device == "dev1"  # the loss, and so the labels, leave the owner
    assert [s.layers[0] for s in plan.stages[1:]] == [s.layers[1] for s in plan.stages[:-1]]
    assert (plan.stages[0].layers[0], plan.stages[-1].layers[1]) == (0, table.num_blocks)
    assert all(s.num_layers >= 1 for s in plan.stages)
    assert plan.micro_batches == 4


def test_line_plan_refuses_more_stages_than_blocks():
    from coordinator.planning import model_cost_table

    with pytest.raises(ValueError, match="at least 6 blocks"):
        tdp_ring.line_plan(model_cost_table("tiny-llama", seq_len=16), ["a", "b", "c"], "interleaved", 1.0, 1, 3)
