"""The audit's report: targets against the default split, the frontier, the preset, and a plot of what was measured."""
from dataclasses import replace

import pytest

from audit.report import assess, plot, targets_note
from audit.simulation import AuditRow
from ringtune.privacy_spec import PrivacySpec

OFF = AuditRow(1, PrivacySpec(), None, None, 0.01, 0.80, 0.70, 0.52, 0.45, 0.700, setting="off")


def private(k, recovery, accuracy, auc=0.55, preset=""):
    spec = PrivacySpec("dchi", epsilon=1.0, clip=1.0, gradient="maxnorm", preset=preset)
    return AuditRow(k, spec, 0.5, 2.0, 0.0, recovery, auc, 0.51, 0.5, accuracy, setting=preset or f"d_chi {recovery}")


def test_targets_are_against_the_default_split_and_the_frontier_is_the_undominated_settings():
    rows = [OFF, replace(OFF, owner_blocks=4, learned_recovery=0.5),
            private(1, 0.40, 0.60), private(4, 0.30, 0.695, preset="strong"), private(4, 0.15, 0.65),
            private(4, 0.31, 0.68), private(2, 0.20, 0.69, auc=0.65)]
    found = {(a.row.owner_blocks, a.row.learned_recovery): a for a in assess(rows)}
    strong = found[(4, 0.30)]
    assert strong.recovery_cut == pytest.approx(1 - 0.30 / 0.80) and strong.accuracy_change == pytest.approx(-0.005)
    assert strong.meets and strong.frontier
    assert not found[(1, 0.40)].meets and not found[(1, 0.40)].frontier  # too little cut, dominated
    assert found[(4, 0.15)].frontier and not found[(4, 0.15)].meets  # the lowest recovery, but 5 points lost
    assert not found[(4, 0.31)].frontier  # (4, 0.30) recovers less and keeps more
    assert found[(2, 0.20)].frontier and not found[(2, 0.20)].meets  # the label attack's AUC is 0.65
    note = targets_note(rows)
    assert "(K=1: 80.0%, accuracy 70.0%)" in note and "Preset `strong` (K=4): meets every target." in note
    missed = targets_note([OFF, private(4, 0.5, 0.6, auc=0.7, preset="strong")])
    assert "misses the recovery cut (38% < 60%), the accuracy target (-10.0 points), the label AUC target (0.700)" in missed
    assert targets_note([private(4, 0.3, 0.6)]) == ""  # nothing to compare against
    aligned = replace(private(4, 0.30, 0.695, preset="strong"), aligned_direction_auc=0.94)
    assert assess([OFF, aligned])[0].label_auc == 0.94  # the strongest label attack counts


@pytest.mark.parametrize("accuracy", [None, 0.65])
def test_the_plot_shows_what_was_measured_and_nothing_is_drawn_without_rows(tmp_path, accuracy):
    pytest.importorskip("matplotlib")
    from matplotlib import pyplot

    rows = [OFF, replace(OFF, owner_blocks=2, learned_recovery=0.6), private(1, 0.4, accuracy), private(2, 0.3, accuracy)]
    if accuracy is None:
        rows = [replace(r, accuracy=None, eval_loss=None) for r in rows]
    drawn = []
    original = pyplot.Figure.savefig
    pyplot.Figure.savefig = lambda figure, *a, **k: (drawn.append(figure), original(figure, *a, **k))[1]
    try:
        assert plot(rows, tmp_path / "audit.png") == tmp_path / "audit.png"
    finally:
        pyplot.Figure.savefig = original
    points = [(x, y) for axes in drawn[0].axes for line in axes.get_lines() for x, y in zip(*line.get_data())]
    if accuracy is None:  # recovery per K and label AUC per K, for every setting
        assert (1, 80.0) in points and (2, 60.0) in points and (1, 0.70) in points and (2, 0.51) in points
    else:  # recovery against accuracy
        assert (80.0, 70.0) in points and (40.0, 65.0) in points and (30.0, 65.0) in points
    assert (tmp_path / "audit.png").stat().st_size > 10_000
    assert plot([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
