"""Which agents get exported programs, one runtime per local agent, and what the export cache keys on."""
import pytest

from coordinator.local import agent_runtimes
from coordinator.stage_exports import needs_export, stage_key
from edge_runtime.models.lora import LoraSpec
from ringtune.plan import even_plan
from ringtune.run_shape import RunShape

from helpers import hello_reply

PLAN = even_plan("tiny-llama", 4, ["owner", "node1", "node2"], "owner")
SHAPE = RunShape(2, 24)


def test_only_executorch_agents_without_their_own_export_get_programs():
    assert needs_export(hello_reply(runtime="executorch", export_dir=False))
    assert not needs_export(hello_reply(runtime="executorch", export_dir=True))
    assert not needs_export(hello_reply(runtime="torch"))


def test_one_runtime_for_all_or_one_per_agent():
    assert agent_runtimes(("executorch",), 3) == ("executorch",) * 3
    assert agent_runtimes(("torch", "executorch", "torch"), 3) == ("torch", "executorch", "torch")
    with pytest.raises(ValueError, match="lists 2 runtimes for 3 local agents"):
        agent_runtimes(("torch", "executorch"), 3)


def test_stage_key_changes_with_what_the_programs_depend_on():
    key = stage_key("tiny-llama", PLAN, 1, SHAPE, LoraSpec())
    assert key == stage_key("tiny-llama", PLAN, 1, SHAPE, LoraSpec())
    renamed = even_plan("tiny-llama", 4, ["owner", "a", "b"], "owner")
    assert key == stage_key("tiny-llama", renamed, 1, SHAPE, LoraSpec()), "device names do not matter"
    others = [stage_key("tiny-llama", PLAN, 2, SHAPE, LoraSpec()),
              stage_key("tiny-gpt2", PLAN, 1, SHAPE, LoraSpec()),
              stage_key("tiny-llama", PLAN, 1, RunShape(2, 32), LoraSpec()),
              stage_key("tiny-llama", PLAN, 1, SHAPE, LoraSpec(r=4))]
    assert len({key, *others}) == 5
