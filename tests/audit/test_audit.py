"""``ringtune audit`` end to end on a tiny model: sane attack numbers, outputs written, bad input refused."""
import json

import pytest

from audit.attacks import label_auc
from ringtune.cli import main


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


def test_label_auc_sees_separable_norms_and_not_equalized_ones():
    import torch

    generator = torch.Generator().manual_seed(0)
    positive = torch.tensor([True, False] * 8)
    separable = torch.randn(16, 4, generator=generator) * torch.where(positive, 10.0, 1.0)[:, None]
    assert label_auc(separable, positive)["norm_auc"] > 0.9
    equal = torch.nn.functional.normalize(torch.randn(16, 4, generator=generator), dim=1)
    assert label_auc(equal, positive)["norm_auc"] < 0.9  # all norms tie: no signal


@pytest.mark.parametrize("args,message", [
    (["--owner-blocks", "2"], "use 1 <= K < 2"),
    (["--owner-blocks", "a"], "comma-separated numbers"),
    (["--privacy", "dchi:epsilon=1"], "needs clip=C > 0"),
    (["--privacy", "laplace:b=1"], "expected dchi:epsilon=E,clip=C"),
])
def test_audit_refuses_bad_input_with_one_line(sentiment_files, tmp_path, capsys, args, message):
    code = main(["audit", "--model", "tiny-llama", "--data", str(sentiment_files / "train.jsonl"),
                 "--out", str(tmp_path), *args])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error
