"""A preset's numbers come from public text's hidden states at the cut: noise relative to the median norm."""
import pytest
import torch

from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.privacy.calibration import calibrate, calibrated, head_stage, head_states
from edge_runtime.privacy.runner import hidden_mechanism
from ringtune.privacy_spec import PRESETS, PrivacySpec


def test_noise_is_a_ratio_of_the_median_norm_and_the_clip_a_quantile_after_the_public_positions():
    norms = torch.arange(1.0, 101.0)  # token norms 1..100 after 2 public positions of norm 1000
    states = torch.zeros(1, 102, 4)
    states[0, :2, 0] = 1000.0
    states[0, 2:, 0] = norms
    spec = calibrated(PrivacySpec("dchi", epsilon=1.0, clip=1.0, public=2), states, noise_ratio=0.5,
                      clip_quantile=0.9)
    assert spec.clip == 90.0  # the 0.9 quantile (lower) of 1..100, the public positions left out
    assert hidden_mechanism(spec).mean_noise_norm(4) == pytest.approx(0.5 * 50.0)  # 0.5 x the median
    assert calibrated(spec, states, 0.5, 0.5).clip == 50.0  # q0.5 is the median itself


def test_a_preset_is_calibrated_at_the_cut_and_refused_by_the_owner_before():
    model, tokenizer = load_model("tiny-llama"), load_tokenizer("tiny-llama")
    spec = PrivacySpec.parse("strong,public=2")
    with pytest.raises(ValueError, match="preset strong has no clip and noise yet"):
        hidden_mechanism(spec)
    done = calibrate(spec, head_stage(model, 1), tokenizer, seq_len=16)
    assert done.calibrated and done.preset == "strong" and done.public == 2 and calibrate(done, None, None, 16) == done
    ids = torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog.")[:16]])
    norms = head_states(model, ids, [1])[1][:, 2:].norm(dim=-1)
    ratio = hidden_mechanism(done).mean_noise_norm(model.config.hidden_size) / float(norms.median())
    assert 0.5 * PRESETS["strong"].noise_ratio < ratio < 2 * PRESETS["strong"].noise_ratio  # public text, not this
    assert calibrate(spec, head_stage(model, 2), tokenizer, seq_len=16) != done  # another cut, other numbers
