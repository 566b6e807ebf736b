"""The timeline's lanes come from a metrics step line as the coordinator writes it (through JSON)."""
import json
import sys

import pytest

from coordinator.timeline import draw_timeline, lanes, require_matplotlib, stage_timings, typical_step
from ringtune.protocol import Span, StageTiming

OWNER = {0: StageTiming(0.5, 1.0, 0.1, 1.8, (Span("F", 0, 0.0, 0.2), Span("B", 0, 1.4, 1.7))),
         3: StageTiming(0.4, 1.2, 0.0, 1.9, (Span("F", 0, 0.9, 1.1), Span("B", 0, 1.1, 1.3)))}
HELPERS = {"node1": {1: StageTiming(0.6, 0.9, 0.2, 1.7, (Span("F", 0, 0.3, 0.6), Span("B", 0, 1.3, 1.4)))},
           "node2": {2: StageTiming(0.7, 0.8, 0.1, 1.6, (Span("F", 0, 0.6, 0.9), Span("B", 0, 1.2, 1.3)))}}


def step_line(step: int, seconds: float, devices: dict[str, dict[int, StageTiming]]) -> dict:
    """A metrics step line as session.run_step writes it, read back from JSON."""
    return json.loads(json.dumps({"step": step, "step_seconds": seconds, "tokens_per_s": 100.0, "devices": {
        name: {**stage_timings(stages), "bytes_sent": 1, "rss": 1, "peak_rss": 1} for name, stages in devices.items()}}))


def test_lanes_follow_the_ring_with_the_owners_head_and_tail_as_two_lanes():
    record = step_line(2, 2.0, {"owner": OWNER, **HELPERS})
    found = lanes(record)
    assert [(lane.label, lane.stage) for lane in found] == [("owner head", 0), ("node1", 1), ("node2", 2),
                                                            ("owner tail", 3)]
    assert [lane.timing for lane in found] == [OWNER[0], HELPERS["node1"][1], HELPERS["node2"][2], OWNER[3]]


def test_a_ring_of_one_device_is_one_lane_named_after_it():
    whole = StageTiming(1.0, 0.0, 0.0, 1.0, (Span("F", 0, 0.0, 0.4), Span("B", 0, 0.4, 0.9)))
    assert [(lane.label, lane.timing) for lane in lanes(step_line(1, 1.0, {"owner": {0: whole}}))] == [("owner", whole)]


def test_the_typical_step_is_the_median_after_the_warm_up():
    records = [step_line(step, seconds, {"owner": OWNER}) for step, seconds in [(1, 9.0), (2, 3.0), (3, 1.0), (4, 2.0)]]
    assert typical_step(records)["step"] == 4
    assert typical_step(records[:1])["step"] == 1


def test_the_picture_is_a_png(tmp_path):
    path = draw_timeline(step_line(2, 2.0, {"owner": OWNER, **HELPERS}), tmp_path / "timeline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_it_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # how Python marks a module as not importable
    with pytest.raises(ValueError, match=r"pip install 'ringtune\[bench\]'"):
        require_matplotlib()
