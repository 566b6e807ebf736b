"""With privacy on, the ring trains exactly like one process that privatizes at the same cuts with the
same noise; with privacy off nothing changes."""
import pytest

from helpers import ARCHITECTURES, write_text_data
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from edge_runtime.models.stage import build_stage
from edge_runtime.privacy.base import NoiseStream
from edge_runtime.privacy.runner import privatize
from edge_runtime.runners.base import OptimizerSpec
from edge_runtime.runners.torch_runner import TorchStageRunner
from reference import max_difference, reference_adapter
from ringtune.plan import even_plan
from ringtune.privacy_spec import PrivacySpec

LORA = LoraSpec(r=4, alpha=8, seed=3)
OPTIMIZER = OptimizerSpec(lr=1e-2)
B, T, M, STEPS = 2, 24, 2, 2
PRIVACY = [PrivacySpec("dchi", epsilon=40.0, clip=4.0, gradient="maxnorm", seed=11),
           PrivacySpec("gaussian", sigma=0.05, clip=4.0, seed=12)]


@pytest.fixture(scope="module")
def data_for(tmp_path_factory):
    path = write_text_data(tmp_path_factory.mktemp("d") / "data.jsonl", records=16)
    return lambda model: OwnerData(read_records(path), load_tokenizer(model), B, T, M, seed=5)


def ring(model_name, devices, schedule, data, privacy):
    plan = even_plan(model_name, load_config(model_name).num_hidden_layers, devices, devices[0], schedule, M)
    return plan, train_ring_in_process(apply_lora(load_model(model_name), LORA), plan, data, OPTIMIZER, STEPS,
                                       privacy, timeout=60)


@pytest.mark.parametrize("model_name", ARCHITECTURES)
@pytest.mark.parametrize("privacy", PRIVACY, ids=["dchi+maxnorm", "gaussian"])
def test_private_ring_equals_single_process_with_the_same_cuts_and_noise(model_name, privacy, data_for):
    data = data_for(model_name)
    plan, result = ring(model_name, ["a", "b"], "1f1b", data, privacy)
    cuts = (plan.stages[0].layers[1], plan.stages[-1].layers[0])
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS, privacy, cuts)
    assert max_difference(result.adapter, reference) < 1e-5
    plain = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS)
    assert max_difference(result.adapter, plain) > 1e-4, "the noise changed nothing"


def test_private_runs_repeat_under_a_seed_and_schedule_does_not_matter(data_for):
    data = data_for("tiny-llama")
    first = ring("tiny-llama", ["a", "b", "c"], "1f1b", data, PRIVACY[0])[1].adapter
    again = ring("tiny-llama", ["a", "b", "c"], "gpipe", data, PRIVACY[0])[1].adapter
    assert max_difference(first, again) < 1e-6


def test_privacy_off_leaves_the_runners_as_they_were(data_for):
    runner = TorchStageRunner(*build_stage(apply_lora(load_model("tiny-llama"), LORA), (0, 2), "head"), OPTIMIZER)
    assert privatize(runner, PrivacySpec(), NoiseStream(0)) is runner  # not a single operation added
    assert privatize(runner, PrivacySpec(gradient="maxnorm"), NoiseStream(0)) is runner  # the head sends no gradient
    data = data_for("tiny-llama")
    adapter = ring("tiny-llama", ["a", "b"], "1f1b", data, PrivacySpec())[1].adapter
    assert max_difference(adapter, reference_adapter("tiny-llama", LORA, OPTIMIZER, data, STEPS)) < 1e-5
