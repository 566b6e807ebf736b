"""Held-out evaluation: batching rows of several prompts changes nothing; accuracy follows the label losses."""
import pytest
import torch

from helpers import ARCHITECTURES
from edge_runtime.data.dataset import Record, encode_record
from edge_runtime.evaluation import evaluate, greedy_completion, label_set
from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.models.stage import IGNORE_INDEX, token_loss_sum

LABELS = [" negative", " neutral", " positive"]
RECORDS = [Record(f"Tweet: {'so ' * (i % 5)}good day {i}\nSentiment:", LABELS[i % 3]) for i in range(11)]


def unbatched_label_losses(model, tokenizer, record: Record) -> list[float]:
    """Each label scored alone, without padding: the definition the batched path must match."""
    losses = []
    for label in LABELS:
        ids, targets = encode_record(Record(record.prompt, label), tokenizer, 64)
        logits = model(input_ids=torch.tensor([ids])).logits
        losses.append(float(token_loss_sum(logits, torch.tensor([targets]))))
    return losses


@pytest.mark.parametrize("model_name", ARCHITECTURES)
@torch.no_grad()
def test_batched_evaluation_equals_scoring_each_label_alone(model_name):
    model, tokenizer = load_model(model_name), load_tokenizer(model_name)
    assert label_set(RECORDS) == LABELS
    result = evaluate(model, tokenizer, RECORDS, seq_len=64, records_per_batch=4)
    losses = [unbatched_label_losses(model, tokenizer, r) for r in RECORDS]
    truth = [LABELS.index(r.completion) for r in RECORDS]
    tokens = sum(int((torch.tensor(encode_record(r, tokenizer, 64)[1][1:]) != IGNORE_INDEX).sum()) for r in RECORDS)
    expected_loss = sum(row[t] for row, t in zip(losses, truth)) / tokens
    expected_accuracy = sum(min(range(3), key=row.__getitem__) == t for row, t in zip(losses, truth)) / len(RECORDS)
    assert result.loss == pytest.approx(expected_loss, rel=1e-5)
    assert result.accuracy == pytest.approx(expected_accuracy)
    assert result.examples == len(RECORDS)


@pytest.mark.parametrize("model_name", ARCHITECTURES)
def test_greedy_completion_takes_the_argmax_token_each_step(model_name):
    """generate with its KV cache continues exactly as a full forward per token would."""
    model, tokenizer = load_model(model_name).eval(), load_tokenizer(model_name)
    prompt = "Tweet: what a day\nSentiment:"
    ids = tokenizer.encode(prompt)
    expected = []
    with torch.no_grad():
        for _ in range(12):
            next_id = int(model(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            expected.append(next_id)
    assert greedy_completion(model, tokenizer, prompt, max_new_tokens=12) == tokenizer.decode(expected)


@pytest.mark.parametrize("model_name", ARCHITECTURES)
@torch.no_grad()
def test_with_hidden_labels_each_label_is_scored_as_one_token_after_the_prompt_alone(model_name):
    """As a run that hid its labels trained it: the prompt's last position predicts the label; no end-of-text."""
    model, tokenizer = load_model(model_name).eval(), load_tokenizer(model_name)
    labels = ["+", "-", "0"]  # one token each for the tiny models' byte tokenizer
    records = [Record(r.prompt, labels[i % 3]) for i, r in enumerate(RECORDS)]
    result = evaluate(model, tokenizer, records, seq_len=64, records_per_batch=4, hide_labels=True)
    candidates = torch.tensor([tokenizer.encode(label)[0] for label in labels])  # [3]
    last = torch.stack([model(input_ids=torch.tensor([tokenizer.encode(r.prompt)])).logits[0, -1]
                        for r in records])  # [n, V]: the next-token logits after each prompt
    truth = torch.tensor([labels.index(r.completion) for r in records])
    expected_loss = torch.nn.functional.cross_entropy(last, candidates[truth])
    assert result.loss == pytest.approx(float(expected_loss), rel=1e-5)
    assert result.accuracy == pytest.approx(float((last[:, candidates].argmax(dim=1) == truth).float().mean()))


@pytest.mark.slow
def test_ringtune_evaluate_scores_an_adapter_trained_with_hidden_labels_as_it_was_trained(tmp_path):
    """The adapter's ringtune.json says hide_labels: the CLI scores one label token after the prompt, as the run did."""
    import json
    import subprocess

    from helpers import ringtune_command
    from edge_runtime.data.dataset import read_records
    from edge_runtime.models.lora import LoraSpec, apply_lora
    from ringtune.adapter_metadata import ADAPTER_METADATA_FILE
    from ringtune.privacy_spec import PrivacySpec

    tuned = apply_lora(load_model("tiny-llama"), LoraSpec(4, 8, seed=3))
    tuned.save_pretrained(tmp_path / "adapter")
    privacy = PrivacySpec.parse("gaussian:sigma=1,clip=1,hide_labels=1", "off").to_dict()
    (tmp_path / "adapter" / ADAPTER_METADATA_FILE).write_text(json.dumps({"settings": {"privacy": privacy}}))
    data = tmp_path / "test.jsonl"
    labels = ["+", "-", "0"]  # one token each for the tiny models' byte tokenizer
    data.write_text("".join(json.dumps({"prompt": r.prompt, "completion": labels[i % 3]}) + "\n"
                            for i, r in enumerate(RECORDS)))
    run = subprocess.run(ringtune_command("evaluate", "--model", "tiny-llama", "--adapter", str(tmp_path / "adapter"),
                                          "--data", str(data), "--json"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    expected = evaluate(tuned.eval(), load_tokenizer("tiny-llama"), read_records(data), 64, hide_labels=True)
    assert result["hide_labels"] is True
    assert result["loss_after"] == pytest.approx(expected.loss, rel=1e-5)
    assert result["accuracy_after"] == pytest.approx(expected.accuracy)
