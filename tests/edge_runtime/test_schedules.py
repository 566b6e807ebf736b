import pytest

from edge_runtime.schedules import Action, SCHEDULES, forward_only, max_in_flight, one_f_one_b, schedule_for


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("stages, micro_batches", [(1, 1), (2, 3), (4, 8), (5, 2)])
def test_every_microbatch_forwarded_then_backpropagated_once(name, stages, micro_batches):
    for stage in range(stages):
        actions = schedule_for(name, stages, stage, micro_batches)
        assert sorted(a for a in actions if a.kind == "F") == [Action("F", m) for m in range(micro_batches)]
        assert sorted(a for a in actions if a.kind == "B") == [Action("B", m) for m in range(micro_batches)]
        for m in range(micro_batches):
            assert actions.index(Action("F", m)) < actions.index(Action("B", m))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_a_stage_that_does_not_train_forwards_every_microbatch_in_order(name):
    assert forward_only(schedule_for(name, 3, 0, 4)) == [Action("F", m) for m in range(4)]


@pytest.mark.parametrize("stages, micro_batches", [(3, 8), (4, 4), (4, 2)])
def test_memory_bound_in_flight(stages, micro_batches):
    for stage in range(stages):
        assert max_in_flight(one_f_one_b(stages, stage, micro_batches)) == min(stages - stage, micro_batches)
        assert max_in_flight(schedule_for("gpipe", stages, stage, micro_batches)) == micro_batches
        assert max_in_flight(schedule_for("sequential", stages, stage, micro_batches)) == 1


def simulate_ring(name: str, stages: int, micro_batches: int) -> int:
    """Run all stages' action lists with blocking receives and unbounded sends; return rounds needed.

    Raises if no stage can make progress (a deadlock)."""
    pending = [list(schedule_for(name, stages, s, micro_batches)) for s in range(stages)]
    sent = set()  # (kind, from_stage, microbatch)
    rounds = 0
    while any(pending):
        progressed = False
        for s in range(stages):
            if not pending[s]:
                continue
            action = pending[s][0]
            if action.kind == "F":
                ready = s == 0 or ("act", s - 1, action.microbatch) in sent
                message = ("act", s, action.microbatch)
            else:
                ready = s == stages - 1 or ("grad", s + 1, action.microbatch) in sent
                message = ("grad", s, action.microbatch)
            if ready:
                sent.add(message)
                pending[s].pop(0)
                progressed = True
        assert progressed, f"{name} deadlocks with {stages} stages and {micro_batches} micro-batches"
        rounds += 1
    return rounds


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("stages, micro_batches", [(2, 1), (3, 4), (4, 8), (6, 3)])
def test_schedules_never_deadlock(name, stages, micro_batches):
    simulate_ring(name, stages, micro_batches)


def test_pipelining_overlaps_micro_batches():
    assert simulate_ring("1f1b", 4, 8) < simulate_ring("sequential", 4, 8)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="unknown schedule 'zigzag'"):
        schedule_for("zigzag", 2, 0, 2)
