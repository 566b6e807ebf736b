"""How the emulated-cluster benchmark turns measured steps into ratios between systems."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # scripts, not a package
import cluster_peers  # noqa: E402

TOKENS = [1368, 1368, 1454, 1226]  # non-pad tokens of each step: the same batches on every system


def system(step_seconds: list[float]) -> dict:
    return cluster_peers.summarize(step_seconds, TOKENS)


def test_ratios_pair_the_same_steps_not_per_step_medians():
    # Equal speed, one slow step each, on steps with different token counts: the medians of per-step tokens/s
    # pick different steps and put the ring at 0.90x; over the same steps the two are level.
    ring = system([30.0, 26.0, 20.0, 20.0])
    line = system([30.0, 20.0, 20.0, 26.0])
    assert ring["tokens_per_s"] / line["tokens_per_s"] == pytest.approx((1226 / 20) / (1368 / 20))
    ratios = cluster_peers.ratios({"1f1b": ring, "tdp_line_1f1b": line, "whole_model": system([60, 60, 60, 60])})
    assert ratios["1f1b_over_tdp_natural_best"] == pytest.approx(1.0)
    assert ratios["1f1b_over_whole_model"] == pytest.approx(180 / 66)


def test_the_best_natural_split_is_the_faster_one():
    ratios = cluster_peers.ratios({"1f1b": system([9, 10, 10, 10]), "tdp_line_1f1b": system([9, 12, 12, 12]),
                                   "tdp_interleaved_zb": system([9, 15, 15, 15])})
    assert ratios["1f1b_over_tdp_natural_best"] == pytest.approx(1.2)


def test_systems_that_trained_different_batches_are_not_compared():
    other = cluster_peers.summarize([10, 10, 10, 10], [1, 2, 3, 4])
    with pytest.raises(AssertionError, match="different batches"):
        cluster_peers.ratios({"1f1b": system([10, 10, 10, 10]), "whole_model": other})


def test_repetitions_report_each_ratio_and_the_median():
    points = [{"devices": 3, "micro_batches": 8, "ratios": {"1f1b_over_whole_model": r}} for r in (2.1, 2.4, 2.3)]
    points.append({"devices": 2, "micro_batches": 8, "ratios": {"1f1b_over_whole_model": 1.6}})
    summary = cluster_peers.over_repetitions(points)
    assert [(s["devices"], s["micro_batches"]) for s in summary] == [(2, 8), (3, 8)]
    assert summary[1]["ratios"]["1f1b_over_whole_model"] == {"median": 2.3, "repetitions": [2.1, 2.4, 2.3]}
