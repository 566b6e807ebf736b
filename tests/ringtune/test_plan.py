import pytest

from ringtune.plan import Plan, PlanError, StageSpec, even_plan, validate_plan


def test_even_plan_covers_every_block_once_with_owner_at_both_ends():
    plan = even_plan("m", 30, ["a", "b", "c"], "a")
    assert [s.role for s in plan.stages] == ["head", "middle", "middle", "tail"]
    assert plan.stages[0].device == plan.stages[-1].device == "a"
    covered = [layer for s in plan.stages for layer in range(*s.layers)]
    assert covered == list(range(30))
    assert [s.num_layers for s in plan.stages[1:-1]] == [10, 10]
    assert plan.stages[0].num_layers + plan.stages[-1].num_layers == 10


def test_one_device_plan_is_a_full_stage():
    plan = even_plan("m", 4, ["a"], "a")
    assert plan.stages == (StageSpec("a", (0, 4), "full"),)


def test_more_devices_than_blocks_is_refused_with_advice():
    with pytest.raises(PlanError, match="only 4 blocks.*at most 4"):
        even_plan("m", 4, ["a", "b", "c", "d", "e"], "a")


def test_plan_json_round_trip():
    plan = even_plan("tiny-llama", 4, ["a", "b"], "a", schedule="gpipe", micro_batches=3)
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("stages, message", [
    ((StageSpec("a", (0, 2), "head"), StageSpec("b", (2, 4), "middle")), "last role 'tail'"),
    ((StageSpec("a", (0, 2), "head"), StageSpec("b", (3, 3), "middle"), StageSpec("a", (3, 4), "tail")),
     "expected a range starting at 2"),
    ((StageSpec("a", (0, 1), "head"), StageSpec("b", (1, 1), "middle"), StageSpec("a", (1, 4), "tail")),
     "at least one block"),
    ((StageSpec("a", (0, 1), "head"), StageSpec("b", (1, 3), "middle"), StageSpec("a", (3, 3), "tail")),
     "model has 4"),
    ((StageSpec("b", (0, 2), "head"), StageSpec("a", (2, 4), "tail")), "owner 'a' must run"),
])
def test_invalid_plans_are_refused(stages, message):
    with pytest.raises(PlanError, match=message):
        validate_plan(Plan("m", "a", stages), 4)
