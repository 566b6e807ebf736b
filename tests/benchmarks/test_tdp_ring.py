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
