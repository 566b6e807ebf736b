"""``ringtune audit`` end to end on a tiny model: sane attack numbers, outputs written, bad input refused."""
import json

import pytest
import torch

from audit.attacks import label_auc
from ringtune.cli import main
from ringtune.privacy_spec import PRESETS, PrivacySpec


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sentiment")
    lines = [json.dumps({"prompt": f"Tweet: {text} {i}\nSentiment:", "completion": f" {label}"})
             for i, (text, label) in enumerate([("i love it", "positive"), ("awful day", "negative"),
                                                ("it is a plane", "neutral")] * 12)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    return folder


def test_audit_reports_recovery_falling_with_noise_and_utility(sentiment_files, tmp_path):
    out = tmp_path / "audit"
    code = main(["audit", "--model", "tiny-llama", "--data", str(sentiment_files / "train.jsonl"),
                 "--test", str(sentiment_files / "test.jsonl"), "--owner-blocks", "1", "--steps", "2",
                 "--micro-batch-size", "2", "--seq-len", "32", "--dchi-ratios", "4", "--grad-privacy", "maxnorm",
                 "--threads", "1", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "audit.json").read_text())["rows"]
    off, noisy = rows
    assert off["privacy"]["hidden"] == "off" and noisy["privacy"]["hidden"] == "dchi"
    assert off["nn_recovery"] > 0.95 and off["learned_recovery"] > 0.9  # one block barely hides tokens
    assert noisy["nn_recovery"] < 0.5 * off["nn_recovery"]
    assert noisy["learned_recovery"] < 0.5 * off["learned_recovery"]
    assert 3.5 < noisy["noise_to_signal"] < 4.5
    assert 0.5 <= off["norm_auc"] <= 1 and 0.5 <= noisy["direction_auc"] <= 1
    assert all(r["accuracy"] is not None and r["eval_loss"] > 0 and len(r["train_losses"]) == 2 for r in rows)
    assert (out / "audit.png").stat().st_size > 0 and "| 1 |" in (out / "audit.md").read_text()


def test_withheld_gradients_leave_no_gradient_to_attack_and_the_adapter_is_kept_for_evaluate(sentiment_files, tmp_path,
                                                                                             capsys):
    """--grad-privacy withhold: the gradient attacks have nothing to attack; the fine-tuned adapter is written with the settings ringtune evaluate scores it under, and a second audit of the same
    run reuses it."""
    args = ["audit", "--model", "tiny-llama", "--data", str(sentiment_files / "train.jsonl"), "--test",
            str(sentiment_files / "test.jsonl"), "--owner-blocks", "1", "--steps", "2", "--micro-batch-size", "2",
            "--seq-len", "32", "--dchi-ratios", "4", "--grad-privacy", "withhold", "--no-baseline", "--threads", "1",
            "--adapters", str(tmp_path / "adapters")]
    assert main([*args, "--out", str(tmp_path / "first")]) == 0
    (row,) = json.loads((tmp_path / "first" / "audit.json").read_text())["rows"]
    assert row["privacy"]["gradient"] == "withhold" and row["accuracy"] is not None and len(row["train_losses"]) == 2
    assert (row["norm_auc"], row["direction_auc"], row["aligned_direction_auc"]) == (None, None, None)
    assert "| no gradient sent | no gradient sent | no gradient sent |" in (tmp_path / "first" / "audit.md").read_text()
    (adapter,) = (tmp_path / "adapters").iterdir()
    assert json.loads((adapter / "ringtune.json").read_text())["settings"]["privacy"]["gradient"] == "withhold"
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert f"reusing the adapter fine-tuned in {adapter}" in capsys.readouterr().out


def test_held_out_evaluation_with_hidden_labels_is_privatized_as_trained(sentiment_files, tmp_path):
    """Noise at the cut and hidden labels: the held-out records are scored through the same noise hook (one draw per
    record, its labels' rows together), as `ringtune audit --privacy strong` evaluates."""
    one_token = {" positive": "+", " negative": "-", " neutral": "0"}  # hidden labels: one token each (bytes here)
    records = [json.loads(line) for line in (sentiment_files / "train.jsonl").read_text().splitlines()]
    for name, chosen in (("train", records), ("test", records[:8])):  # 8: a whole batch of evaluate()'s
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({**r, "completion": one_token[r["completion"]]})
                                                        + "\n" for r in chosen))
    out = tmp_path / "audit"
    code = main(["audit", "--model", "tiny-llama", "--data", str(tmp_path / "train.jsonl"),
                 "--test", str(tmp_path / "test.jsonl"), "--owner-blocks", "1", "--steps", "2",
                 "--micro-batch-size", "2", "--seq-len", "32", "--privacy", "dchi:epsilon=5,clip=10,hide_labels=1",
                 "--grad-privacy", "withhold", "--no-baseline", "--threads", "1", "--out", str(out)])
    assert code == 0
    (row,) = json.loads((out / "audit.json").read_text())["rows"]
    assert row["privacy"]["hide_labels"] and row["accuracy"] is not None and row["eval_loss"] > 0


def test_label_auc_sees_separable_norms_and_not_equalized_ones():
    generator = torch.Generator().manual_seed(0)
    positive = torch.tensor([True, False] * 8)
    separable = torch.randn(16, 4, generator=generator) * torch.where(positive, 10.0, 1.0)[:, None]
    assert label_auc(separable, positive)["norm_auc"] > 0.9
    equal = torch.nn.functional.normalize(torch.randn(16, 4, generator=generator), dim=1)
    assert label_auc(equal, positive)["norm_auc"] < 0.9  # all norms tie: no signal


def test_the_aligned_direction_attack_finds_a_label_signal_at_sequence_ends_of_any_length():
    """The label's gradient sits at the end of each sequence; right padding puts the end at different
    positions, which hides it from a cosine over positions as sent, not from one aligned at the end."""
    generator = torch.Generator().manual_seed(0)
    positive = torch.tensor([True, False] * 12)
    gradients = torch.zeros(24, 10, 8)
    for row, is_positive in enumerate(positive):
        end = 4 + row % 6  # sequence lengths 4..9, then padding (no gradient)
        gradients[row, :end] = 0.3 * torch.randn(end, 8, generator=generator)
        gradients[row, end - 1, 0] += 1.0 if is_positive else -1.0  # the label's direction at the last position
    aucs = label_auc(gradients, positive)
    assert aucs["aligned_direction_auc"] > 0.95 and aucs["direction_auc"] < 0.8


@pytest.mark.parametrize("args,message", [
    (["--owner-blocks", "2"], "use 1 <= K < 2"),
    (["--owner-blocks", "a"], "comma-separated numbers"),
    (["--privacy", "dchi:epsilon=1"], "needs clip=C > 0"),
    (["--privacy", "laplace:b=1"], "expected dchi:epsilon=E,clip=C"),
    (["--privacy", "strong"], f"--privacy strong keeps {PRESETS['strong'].owner_blocks} blocks at each end and a "
                              "neighbour needs one: this model has 4; audit it with --owner-blocks and --dchi-ratios "
                              "instead"),
    (["--public-prefix", "8"], "the training records share only their first 7 token(s), so later positions may "
                               "be private: use --public-prefix auto or at most 7"),
    (["--public-prefix", "two"], "expected a whole number of leading positions, or auto"),
])
def test_audit_refuses_bad_input_with_one_line(sentiment_files, tmp_path, capsys, args, message):
    code = main(["audit", "--model", "tiny-llama", "--data", str(sentiment_files / "train.jsonl"),
                 "--out", str(tmp_path), *args])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error


def test_audit_with_public_prefix_auto_sends_the_template_and_counts_only_private_tokens(sentiment_files, tmp_path,
                                                                                       capsys):
    out = tmp_path / "audit"
    code = main(["audit", "--model", "tiny-llama", "--data", str(sentiment_files / "train.jsonl"),
                 "--owner-blocks", "1", "--seq-len", "48", "--dchi-ratios", "4", "--public-prefix", "auto",
                 "--threads", "1", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    shared = len("Tweet: ")  # bytes: the tiny models' tokens
    assert f"send the first {shared} position(s) unprivatized (public={shared})" in printed
    off, noisy = json.loads((out / "audit.json").read_text())["rows"]
    assert noisy["privacy"]["public"] == shared and "public" not in off["privacy"]
    assert off["shared_prefix"] == noisy["shared_prefix"] == shared
    assert f"the first {shared} token(s), shared by every attacked record" in (out / "audit.md").read_text()
    assert noisy["learned_recovery"] < 0.5 * off["learned_recovery"]


def test_token_recovery_leaves_out_the_prefix_every_attacked_record_shares():
    from audit.simulation import AuditSettings, CutViews, _attack_row, _private_positions

    embeddings = torch.eye(10)  # token t's state is its embedding: every attack recovers it ...
    public_tokens = torch.arange(40).remainder(10).view(8, 5)
    private_tokens = torch.tensor([[5, 5, 1, 2, 3], [5, 5, 4, 6, 9], [5, 5, 7, 8, 0]])
    states = embeddings[private_tokens]
    states[:, :2] = -embeddings[5]  # ... except at the shared prefix, where none would
    shared, counted = _private_positions(private_tokens, torch.ones_like(private_tokens, dtype=torch.bool))
    assert shared == 2 and not counted[:, :2].any() and counted[:, 2:].all()
    view = CutViews(embeddings[public_tokens], public_tokens, states, private_tokens, counted, shared, None, None)
    row = _attack_row(AuditSettings("tiny-llama", [], []), 1, PrivacySpec(), view, [view.public], embeddings, None)
    assert (row.nn_recovery, row.learned_recovery, row.shared_prefix) == (1.0, 1.0, 2)


def test_private_positions_refuse_records_with_nothing_private():
    from audit.simulation import _private_positions

    ids = torch.tensor([[1, 2, 0], [1, 2, 0]])
    with pytest.raises(ValueError, match="raise --attack-records or audit records that differ"):
        _private_positions(ids, ids > 0)


def test_inference_privatization_leaves_public_positions_alone():
    from audit.simulation import _privatize_output
    from edge_runtime.privacy.dchi import DChiMechanism

    hidden = torch.randn(2, 6, 8)
    out, extra = _privatize_output((hidden, "cache"), DChiMechanism(5.0, 1.0), torch.Generator().manual_seed(0), 3, 1)
    assert extra == "cache" and torch.equal(out[:, :3], hidden[:, :3])
    assert bool((out[:, 3:] != hidden[:, 3:]).all())


def test_inference_privatization_draws_one_noise_per_record_for_its_candidate_labels():
    """evaluate() scores a record's candidate labels in consecutive rows: they must see the same noise, as one
    forward pass over the ring would, or the labels are compared under different noise."""
    from audit.simulation import _privatize_output
    from edge_runtime.privacy.dchi import DChiMechanism

    hidden = torch.randn(6, 8).expand(6, 6, 8)  # 2 records x 3 candidates, all the same states
    out = _privatize_output(hidden, DChiMechanism(5.0, 100.0), torch.Generator().manual_seed(0), 0, 3)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2]) and torch.equal(out[3], out[5])
    assert not torch.equal(out[0], out[3]) and not torch.allclose(out, hidden)
