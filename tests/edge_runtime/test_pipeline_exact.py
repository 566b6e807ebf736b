"""In-process ring (threads + in-memory edges): split, pipelined training equals single-process training."""
import threading

import pytest
import torch

from helpers import ARCHITECTURES, write_text_data
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from edge_runtime.models.stage import build_stage
from edge_runtime.runners.base import OptimizerSpec
from edge_runtime.runners.torch_runner import TorchStageRunner
from edge_runtime.schedules import schedule_for
from edge_runtime.transport.base import EdgeConfig
from edge_runtime.transport.memory import InMemoryEdge
from edge_runtime.worker import LocalStage, run_stage_step
from reference import max_difference, reference_adapter
from ringtune.plan import even_plan
from ringtune.security import new_key

LORA = LoraSpec(r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSpec(lr=1e-2, weight_decay=0.01)
B, T, M, STEPS = 2, 24, 4, 3


def train_ring(model_name, devices, schedule, data):
    plan = even_plan(model_name, load_config(model_name).num_hidden_layers, devices, devices[0], schedule, M)
    peft_model = apply_lora(load_model(model_name), LORA)
    runners = [TorchStageRunner(*build_stage(peft_model, s.layers, s.role), OPTIMIZER) for s in plan.stages]
    shape = (B, T, load_config(model_name).hidden_size)
    key = new_key()
    edges = [InMemoryEdge.pair(EdgeConfig.for_link("r", key, i, i + 1, shape, 10.0),
                               EdgeConfig.for_link("r", key, i + 1, i, shape, 10.0))
             for i in range(len(runners) - 1)]
    stages = [LocalStage(i, runner, edges[i - 1][1] if i else None, edges[i][0] if i < len(edges) else None)
              for i, runner in enumerate(runners)]
    losses = []
    for step in range(STEPS):
        batch = data.step_batch(step)
        results = {}

        def work(stage):
            actions = schedule_for(schedule, len(stages), stage.index, M)
            results[stage.index] = run_stage_step(stage, step, actions, batch)

        threads = [threading.Thread(target=work, args=(stage,)) for stage in stages]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert len(results) == len(stages), "a stage failed or hung"
        losses.append(results[len(stages) - 1].loss)
    state = {}
    for runner in runners:
        state.update({adapter_key(n): t for n, t in runner.lora_state().items()})
    return state, losses


@pytest.fixture(scope="module")
def data_for(tmp_path_factory):
    path = write_text_data(tmp_path_factory.mktemp("d") / "data.jsonl")
    return lambda model: OwnerData(read_records(path), load_tokenizer(model), B, T, M, seed=5)


@pytest.mark.parametrize("model_name", ARCHITECTURES)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "sequential"])
@pytest.mark.parametrize("devices", [["a"], ["a", "b"], ["a", "b", "c"]])
def test_ring_equals_single_process_training(model_name, schedule, devices, data_for):
    torch.manual_seed(0)
    data = data_for(model_name)
    ring, losses = train_ring(model_name, devices, schedule, data)
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS)
    assert max_difference(ring, reference) < 1e-5
    assert any(float(t.abs().max()) > 0 for k, t in ring.items() if "lora_B" in k), "training changed nothing"
    assert losses[-1] < losses[0]
