"""Which agents get exported programs, one runtime per local agent, and what the program cache keys on."""
import pytest

from coordinator.local import agent_runtimes
from coordinator.stage_exports import needs_export, program_key
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_config
from ringtune.run_shape import RunShape

from helpers import hello_reply

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


def test_program_key_changes_with_what_the_programs_depend_on():
    config = load_config("tiny-llama").to_dict()
    key = program_key(config, 0, SHAPE, LoraSpec())
    assert key == program_key(config, 0, SHAPE, LoraSpec())
    assert key == program_key(config, 0, SHAPE, LoraSpec(seed=5)), "LoRA values are inputs: the seed does not matter"
    others = [program_key(config, 1, SHAPE, LoraSpec()),
              program_key(load_config("tiny-gpt2").to_dict(), 0, SHAPE, LoraSpec()),
              program_key(config, 0, RunShape(2, 32), LoraSpec()),
              program_key(config, 0, SHAPE, LoraSpec(r=4))]
    assert len({key, *others}) == 5
