"""With privacy on, the ring trains exactly like one process that privatizes at the same cuts with the
same noise; with privacy off nothing changes."""
import json
import math
from dataclasses import replace

import pytest
import torch

from helpers import ARCHITECTURES, write_text_data
from edge_runtime.backends.torch.runner import TorchStageRunner
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.local_ring import train_ring_in_process
from edge_runtime.models.lora import LoraSpec, adapter_key, apply_lora, lora_parameters
from edge_runtime.models.registry import load_config, load_model, load_tokenizer
from edge_runtime.models.stage import build_stage
from edge_runtime.privacy.base import NoiseStream
from edge_runtime.privacy.runner import check_public_prefix, privatize, ring_runner
from ringtune.optimizer_spec import OptimizerSpec
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
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS, privacy, plan)
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
    plan = even_plan("tiny-llama", 4, ["a", "b"], "a")
    assert ring_runner(runner, plan, 0, PrivacySpec(), NoiseStream(0)) is runner
    data = data_for("tiny-llama")
    adapter = ring("tiny-llama", ["a", "b"], "1f1b", data, PrivacySpec())[1].adapter
    assert max_difference(adapter, reference_adapter("tiny-llama", LORA, OPTIMIZER, data, STEPS)) < 1e-5


PUBLIC = len("Tweet: ")  # bytes: the tiny models' tokens
PREFIXED = PrivacySpec("dchi", epsilon=40.0, clip=4.0, gradient="maxnorm", seed=11, public=PUBLIC)


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("p") / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"Tweet: {text} {i}\nSentiment:", "completion": f" {label}"})
             for i, (text, label) in enumerate([("i love it", "positive"), ("awful day", "negative"),
                                                ("so so", "neutral")] * 6)]
    path.write_text("\n".join(lines) + "\n")
    return OwnerData(read_records(path), load_tokenizer("tiny-llama"), B, 48, M, seed=5)  # no prompt is cut


def test_check_public_prefix_names_the_micro_batch_row_and_both_prefixes():
    expected = torch.tensor([1, 2, 3])
    check_public_prefix(expected, torch.tensor([[1, 2, 3, 9], [1, 2, 3, 8]]), step=0, microbatch=0)
    with pytest.raises(ValueError, match=r"public=3: step 4 micro-batch 1 row 1 starts with token ids \[1, 5, 3\], "
                                         r"not \[1, 2, 3\] .* lower public= or put the fixed public prompt first "
                                         r"\(a prompt longer than --seq-len is cut from the left"):
        check_public_prefix(expected, torch.tensor([[1, 2, 3, 9], [1, 5, 3, 8]]), step=4, microbatch=1)


def head_runner(spec):
    runner = TorchStageRunner(*build_stage(apply_lora(load_model("tiny-llama"), LORA), (0, 2), "head"), OPTIMIZER)
    return privatize(runner, spec, NoiseStream(spec.seed))


def test_the_head_sends_public_positions_as_they_are_and_refuses_another_prefix(prompt_data):
    ids = prompt_data.step_batch(0).input_ids[0]  # [B, T]
    plain = head_runner(PrivacySpec()).forward(0, ids)
    private = head_runner(PREFIXED)
    sent = private.forward(0, ids)
    assert torch.equal(sent[:, :PUBLIC], plain[:, :PUBLIC])
    assert bool((sent[:, PUBLIC:] != plain[:, PUBLIC:]).all(dim=-1).all())
    assert private.backward(0, torch.ones_like(sent)) is None  # the head returns no input gradient
    other = ids.clone()
    other[1, 0] += 1
    with pytest.raises(ValueError, match=r"micro-batch 1 row 1 starts with token ids \[85, "):
        private.forward(1, other)
    with pytest.raises(ValueError, match=f"public={PUBLIC} leaves nothing to privatize in sequences of {PUBLIC}"):
        private.forward(1, ids[:, :PUBLIC])


def test_a_ring_with_public_positions_trains_exactly_and_repeats_under_a_seed(prompt_data):
    plan, result = ring("tiny-llama", ["a", "b"], "1f1b", prompt_data, PREFIXED)
    reference = reference_adapter("tiny-llama", LORA, OPTIMIZER, prompt_data, STEPS, PREFIXED, plan)
    assert max_difference(result.adapter, reference) < 1e-5 and all(map(math.isfinite, result.losses))
    again = ring("tiny-llama", ["a", "b"], "gpipe", prompt_data, PREFIXED)[1].adapter
    assert max_difference(result.adapter, again) < 1e-6
    everything = ring("tiny-llama", ["a", "b"], "1f1b", prompt_data, replace(PREFIXED, public=0))[1].adapter
    assert max_difference(result.adapter, everything) > 1e-4, "public= changed nothing"


def test_a_ring_refuses_public_positions_that_differ_between_sequences(data_for):
    with pytest.raises(ValueError, match="lower public= or put the fixed public prompt first"):
        ring("tiny-llama", ["a", "b"], "1f1b", data_for("tiny-llama"), replace(PREFIXED, public=3))


def test_a_private_ring_restored_on_another_split_replays_the_same_noise(data_for):
    """What recovery does: the state of step 2 taken on a 3-device ring, restored on a 2-device ring (the tail's
    ring index changes), steps 2 and 3 replayed: the adapter equals the uninterrupted 3-device ring's."""
    data, spec = data_for("tiny-llama"), PRIVACY[0]
    plan_of = lambda devices: even_plan("tiny-llama", 4, devices, devices[0], "1f1b", M)
    three, two = plan_of(["a", "b", "c"]), plan_of(["a", "c"])
    whole = train_ring_in_process(apply_lora(load_model("tiny-llama"), LORA), three, data, OPTIMIZER, 4, spec).adapter
    first = train_ring_in_process(apply_lora(load_model("tiny-llama"), LORA), three, data, OPTIMIZER, 2, spec)
    rest = train_ring_in_process(apply_lora(load_model("tiny-llama"), LORA), two, data, OPTIMIZER, range(2, 4), spec,
                                 restore=first.training_state)
    assert max_difference(rest.adapter, whole) < 1e-6


HIDDEN = replace(PREFIXED, hide_labels=True)
TWEETS = [f"Tweet: {text} {i}\nSentiment:" for i, text in enumerate(["i love it", "awful day", "so so"] * 6)]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """OwnerData of TWEETS with one-token labels (bytes here): labels[i] is tweet i's, rotated by `shift`."""
    folder = tmp_path_factory.mktemp("labels")

    def make(shift: int, hide_labels: bool) -> OwnerData:
        path = folder / f"labels-{shift}.jsonl"
        path.write_text("".join(json.dumps({"prompt": tweet, "completion": "+-0"[(i + shift) % 3]}) + "\n"
                                for i, tweet in enumerate(TWEETS)))
        return OwnerData(read_records(path), load_tokenizer("tiny-llama"), B, 48, M, seed=5, hide_labels=hide_labels)
    return make


def tail_runner(spec):
    runner = TorchStageRunner(*build_stage(apply_lora(load_model("tiny-llama"), LORA), (2, 4), "tail"), OPTIMIZER)
    return privatize(runner, spec, NoiseStream(spec.seed))


def test_with_hidden_labels_nothing_the_owner_sends_depends_on_a_label(labelled):
    """The same tweets with other labels: the head sends identical hidden states, and the gradients the tail
    sends back are zero wherever the helpers computed from padding (they exist only at prompt positions)."""
    for step in range(2):
        first, other = labelled(0, True).step_batch(step), labelled(1, True).step_batch(step)
        assert not any(torch.equal(a, b) for a, b in zip(first.labels, other.labels))
        for m, (ids, other_ids) in enumerate(zip(first.input_ids, other.input_ids)):
            assert torch.equal(head_runner(HIDDEN).forward(m, ids), head_runner(HIDDEN).forward(m, other_ids))
            tail = tail_runner(HIDDEN)
            tail.forward(m, torch.randn(B, 48, 64), first.labels[m], first.scored_tokens)
            prompt = ids != load_tokenizer("tiny-llama").pad_token_id  # [B, T]
            sent_back = tail.backward(m)  # [B, T, d]
            assert (sent_back[~prompt] == 0).all() and (sent_back[prompt] != 0).any(dim=-1).all()
    # without hidden labels the label is an input token: the head's states differ after it
    first, other = labelled(0, False).step_batch(0), labelled(1, False).step_batch(0)
    assert not torch.equal(head_runner(PREFIXED).forward(0, first.input_ids[0]),
                           head_runner(PREFIXED).forward(0, other.input_ids[0]))


def test_a_ring_with_hidden_labels_trains_exactly(labelled):
    """At lr 1e-3: with one scored token per tweet some LoRA gradients are near AdamW's epsilon, where its update
    (about lr x their sign) turns float rounding into differences of lr x 1e-3."""
    data, optimizer = labelled(0, True), OptimizerSpec(lr=1e-3)
    plan = even_plan("tiny-llama", 4, ["a", "b"], "a", "1f1b", M)
    result = train_ring_in_process(apply_lora(load_model("tiny-llama"), LORA), plan, data, optimizer, STEPS, HIDDEN)
    reference = reference_adapter("tiny-llama", LORA, optimizer, data, STEPS, HIDDEN, plan)
    assert max_difference(result.adapter, reference) < 1e-5 and all(map(math.isfinite, result.losses))
    assert all(batch.scored_tokens == B * M for batch in map(data.step_batch, range(STEPS)))  # one label a tweet


WITHHELD = [PrivacySpec(gradient="withhold", seed=11), replace(PRIVACY[0], gradient="withhold")]


@pytest.mark.parametrize("model_name", ARCHITECTURES)
@pytest.mark.parametrize("privacy", WITHHELD, ids=["withhold", "dchi+withhold"])
def test_a_ring_that_withholds_gradients_trains_only_the_tail_exactly(model_name, privacy, data_for):
    """No gradient leaves the owner: the adapter is the tail's LoRA trained as one process trains it with only
    those blocks' LoRA trainable; the head's and the helpers' LoRA stay as initialized, with no AdamW state;
    only hidden states travel (half the frames of a ring that trains every stage)."""
    data = data_for(model_name)
    plan, result = ring(model_name, ["a", "b", "c"], "1f1b", data, privacy)
    reference = reference_adapter(model_name, LORA, OPTIMIZER, data, STEPS, privacy, plan)
    assert max_difference(result.adapter, reference) < 1e-5
    initial = {name: p.detach() for name, p in lora_parameters(apply_lora(load_model(model_name), LORA)).items()}
    frozen = {name for name in initial if adapter_key(name) not in result.adapter}
    assert frozen and len(frozen) + len(result.adapter) == len(initial)
    assert all(torch.equal(result.training_state[f"lora/{name}"], initial[name]) for name in frozen)
    assert not [key for key in result.training_state if key.split("/", 1)[1] in frozen and key.startswith("exp_avg")]
    plain = ring(model_name, ["a", "b", "c"], "1f1b", data, replace(privacy, gradient="off"))[1]
    assert abs(result.bytes_sent / plain.bytes_sent - 0.5) < 0.01


def test_a_ring_that_withholds_gradients_repeats_under_any_schedule(data_for):
    data = data_for("tiny-llama")
    first = ring("tiny-llama", ["a", "b", "c"], "1f1b", data, WITHHELD[1])[1].adapter
    for schedule in ("gpipe", "sequential"):
        assert max_difference(first, ring("tiny-llama", ["a", "b", "c"], schedule, data, WITHHELD[1])[1].adapter) < 1e-6
