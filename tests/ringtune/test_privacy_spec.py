"""--privacy / --grad-privacy parsing, the stated per-token epsilon, and the plain-data round trip."""
import math
from dataclasses import replace

import pytest

from ringtune.cli import build_parser, main
from ringtune.optimizer_spec import OptimizerSpec
from ringtune.plan import Plan, even_plan
from ringtune.privacy_spec import PRESETS, PrivacySpec, gaussian_epsilon


def test_parse_and_round_trip():
    spec = PrivacySpec.parse("dchi:epsilon=50,clip=10,seed=3", "maxnorm")
    assert (spec.hidden, spec.epsilon, spec.clip, spec.seed, spec.gradient) == ("dchi", 50.0, 10.0, 3, "maxnorm")
    assert PrivacySpec.from_dict(spec.to_dict()) == spec
    assert "seed" not in spec.public_dict() and PrivacySpec().public_dict() == {}
    assert PrivacySpec.parse(None) == PrivacySpec() and not PrivacySpec().active
    assert spec.token_epsilon() == 2 * 10 * 50


@pytest.mark.parametrize("text", ["dchi:epsilon=50,clip=10,public=2", "gaussian:sigma=0.5,clip=10,public=2"])
def test_public_prefix_parses_round_trips_and_is_described(text):
    spec = PrivacySpec.parse(text, "maxnorm")
    assert spec.public == 2
    assert PrivacySpec.from_dict(spec.to_dict()) == spec and spec.public_dict()["public"] == 2
    assert ", first 2 positions public (" in spec.describe()
    assert "first 1 position public" in PrivacySpec.parse(text.replace("public=2", "public=1")).describe()
    assert PrivacySpec.parse(text.replace("public=2", "public=0")) == PrivacySpec.parse(text.replace(",public=2", ""))


def test_without_public_the_serialized_form_is_as_before():
    spec = PrivacySpec.parse("dchi:epsilon=50,clip=10,seed=3", "maxnorm")
    assert list(spec.to_dict()) == ["hidden", "epsilon", "sigma", "clip", "delta", "gradient", "seed"]
    assert "public" not in spec.public_dict() and "public" not in spec.describe()


def test_public_must_leave_a_position_to_privatize():
    spec = PrivacySpec.parse("dchi:epsilon=1,clip=1,public=8")
    spec.check_seq_len(9)
    with pytest.raises(ValueError, match="public=8 leaves nothing to privatize in sequences of 8 tokens: lower "
                                         "public= or raise --seq-len"):
        spec.check_seq_len(8)
    PrivacySpec().check_seq_len(1)

@pytest.mark.parametrize("text,gradient,message", [
    ("laplace:b=1", None, "expected dchi:epsilon=E,clip=C"),
    ("dchi:epsilon=1", None, "needs clip=C > 0"),
    ("dchi:clip=1", None, "needs epsilon=E > 0"),
    ("dchi:epsilon=x,clip=1", None, "epsilon needs a number"),
    ("gaussian:epsilon=1,clip=1", None, "'epsilon=1' is not one of"),
    ("gaussian:sigma=1,clip=1,delta=2", None, "0 < delta < 1"),
    ("off", "marvell", "unknown gradient privacy"),
    ("dchi:epsilon=1,clip=1,public=1.5", None, "public needs a whole number, got '1.5'"),
    ("dchi:epsilon=1,clip=1,public=-1", None, r"public=-1: give the number of leading public template tokens as a "
                                              r"whole number >= 0"),
    ("off:public=2", None, "'public=2' is not one of nothing"),
])
def test_bad_input_says_what_to_do(text, gradient, message):
    with pytest.raises(ValueError, match=message):
        PrivacySpec.parse(text, gradient)


def test_public_needs_a_hidden_mechanism():
    with pytest.raises(ValueError, match="public=N only applies to a hidden-state mechanism: use it with dchi"):
        PrivacySpec(public=2, gradient="maxnorm")


def test_gaussian_epsilon_matches_the_classic_bound_where_it_holds():
    # Classic: sigma = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon is sufficient for epsilon < 1,
    # so the exact (analytic) epsilon at that sigma is at most the classic one, and not far below.
    delta, sensitivity, classic = 1e-5, 2.0, 0.5
    sigma = sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / classic
    exact = gaussian_epsilon(sensitivity, sigma, delta)
    assert 0.6 * classic < exact <= classic
    assert gaussian_epsilon(sensitivity, sigma / 10, delta) > 10 * exact / 2  # less noise, more epsilon
    assert PrivacySpec("gaussian", sigma=sigma, clip=1.0, delta=delta).token_epsilon() == exact


def test_train_refuses_bad_privacy_before_any_agent_starts(tmp_path, capsys):
    code = main(["train", "--model", "tiny-llama", "--local", "2", "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "out"), "--privacy", "dchi:epsilon=1"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "needs clip=C > 0" in error and "\n" not in error
    assert not (tmp_path / "out").exists()
    code = main(["train", "--model", "tiny-llama", "--local", "2", "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "out"), "--seq-len", "16", "--privacy", "dchi:epsilon=1,clip=1,public=16"])
    assert code == 2 and "lower public= or raise --seq-len" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_preset_parses_uncalibrated_round_trips_and_takes_only_seed_and_public():
    spec = PrivacySpec.parse("strong,public=3,seed=7", "off")
    preset = PRESETS["strong"]
    assert (spec.preset, spec.hidden, spec.gradient, spec.public, spec.seed) == ("strong", "dchi", preset.gradient, 3, 7)
    assert not spec.calibrated and spec.token_epsilon() is None and "calibrated on public text" in spec.describe()
    assert PrivacySpec.parse("strong:public=3,seed=7") == spec  # either separator after the name
    assert PrivacySpec.from_dict(spec.to_dict()) == spec and spec.public_dict()["preset"] == "strong"
    done = replace(spec, clip=40.0, epsilon=2.0)
    assert done.calibrated and done.token_epsilon() == 160 and done.describe().startswith("preset strong: d_chi")
    assert "preset" not in PrivacySpec.parse("dchi:epsilon=1,clip=1").to_dict()
    assert spec.hide_labels and "labels never sent" in spec.describe()  # a preset always hides labels
    # the owner keeps at least the preset's blocks at each end (train and plan raise --min-owner-blocks to it)
    more = preset.owner_blocks + 2
    assert (spec.owner_blocks(1), spec.owner_blocks(more), PrivacySpec().owner_blocks(1)) == (preset.owner_blocks, more, 1)
    with pytest.raises(ValueError, match="the preset strong takes only public=N and seed=N"):
        PrivacySpec.parse("strong,epsilon=3")
    with pytest.raises(ValueError, match="unknown privacy preset 'loose'"):
        PrivacySpec.from_dict({"hidden": "dchi", "preset": "loose"})
    with pytest.raises(ValueError, match="calibrated with both clip and epsilon, or neither"):
        replace(spec, clip=4.0)


def test_a_preset_trains_at_its_own_learning_rate_unless_lr_is_given():
    """Only the owner's tail trains under withheld gradients: the preset's runs default to its measured lr."""
    strong = PrivacySpec.parse("strong")
    assert strong.learning_rate(None) == PRESETS["strong"].lr > OptimizerSpec().lr
    assert strong.learning_rate(1e-4) == 1e-4  # --lr wins
    assert PrivacySpec().learning_rate(None) == PrivacySpec.parse("dchi:epsilon=1,clip=1").learning_rate(None) \
        == OptimizerSpec().lr


def test_train_takes_the_presets_learning_rate_when_lr_is_not_given():
    from coordinator.commands.train import settings_from_args

    def lr(*flags):
        args = build_parser().parse_args(["train", "--local", "2", "--model", "tiny-llama", "--out", "out", *flags])
        return settings_from_args(args, "owner").optimizer.lr

    assert (lr("--privacy", "strong"), lr("--privacy", "strong", "--lr", "2e-4"), lr()) == \
        (PRESETS["strong"].lr, 2e-4, OptimizerSpec().lr)


def test_hide_labels_is_opt_in_for_a_mechanism_and_serializes_only_when_on():
    plain = PrivacySpec.parse("dchi:epsilon=1,clip=1")
    assert not plain.hide_labels and "hide_labels" not in plain.to_dict()  # specs without it serialize as before
    hidden = PrivacySpec.parse("gaussian:sigma=1,clip=1,hide_labels=1", "maxnorm")
    assert hidden.hide_labels and hidden.public_dict()["hide_labels"] is True
    assert PrivacySpec.from_dict(hidden.to_dict()) == hidden
    with pytest.raises(ValueError, match="hide_labels takes 1 .* or 0"):
        PrivacySpec.parse("dchi:epsilon=1,clip=1,hide_labels=2")
    with pytest.raises(ValueError, match="'hide_labels=1' is not one of"):
        PrivacySpec.parse("strong,hide_labels=1")  # a preset always hides them


def test_withheld_gradients_train_only_the_tail_and_the_plan_says_which_blocks():
    spec = PrivacySpec.parse("off", "withhold")
    assert spec.active and spec.gradient == "withhold" and PRESETS["strong"].gradient == "withhold"
    assert [spec.trains(role) for role in ("head", "middle", "tail", "full")] == [False, False, True, True]
    assert all(PrivacySpec(gradient="maxnorm").trains(role) for role in ("head", "middle", "tail"))
    assert "gradients withheld (only the owner's tail trains)" in spec.describe()
    assert PrivacySpec.from_dict(spec.public_dict()) == spec
    plan = even_plan("m", 6, ["a", "b"], "a")  # head, middle, tail
    withheld = replace(plan, privacy=spec.public_dict())
    assert [withheld.trains(i) for i in range(3)] == [False, False, True] and plan.trains_every_stage()
    assert not Plan.from_json(withheld.to_json()).trains_every_stage()
