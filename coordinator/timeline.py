"""Where a step goes: each stage's compute, waiting and sending, and a picture of one step (``ringtune train
--timeline``), from the timings the agents report with every step.

A step line of metrics.jsonl carries, per device and per stage it holds, the fields of ``StageTiming``: its
compute, wait, send and wall seconds, and its spans (every forward and backward, in seconds from that agent's
step start). Each agent's clock starts when the coordinator's step command reaches it, so lanes of different
devices line up to within a control round trip (milliseconds on a LAN).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ringtune.protocol import Span, StageTiming

SECONDS_FIELDS = ("compute_seconds", "wait_seconds", "send_seconds", "wall_seconds")
"""StageTiming's totals, in its field order: each a map by stage index in a device's metrics."""
COLORS = {"F": "#4c78a8", "B": "#f58518"}
AFTER_COLOR = "#d9d9d9"


@dataclass(frozen=True, slots=True)
class Lane:
    """One stage's row of the timeline."""

    label: str
    """The device (with head or tail for the owner's two stages)."""
    stage: int
    """Position in the ring."""
    timing: StageTiming
    """What the stage's agent measured."""


def stage_timings(stages: dict[int, StageTiming]) -> dict:
    """A device's fields of a metrics step line: each total and the spans, by stage index."""
    totals = {name: {i: getattr(timing, name) for i, timing in stages.items()} for name in SECONDS_FIELDS}
    return {**totals, "spans": {i: [dataclasses.asdict(s) for s in timing.spans] for i, timing in stages.items()}}


def lanes(record: dict) -> list[Lane]:
    """One lane per stage in ring order, from a metrics step line (JSON made its stage keys strings)."""
    stages = {}
    for device, fields in record["devices"].items():
        for key, spans in fields["spans"].items():
            totals = (fields[name][key] for name in SECONDS_FIELDS)
            stages[int(key)] = device, StageTiming(*totals, tuple(Span(**span) for span in spans))
    owner, tail = stages[0][0], max(stages)
    return [Lane(_label(device, stage, owner, tail), stage, timing)
            for stage, (device, timing) in sorted(stages.items())]


def _label(device: str, stage: int, owner: str, tail: int) -> str:
    if tail == 0 or device != owner:  # a ring of one device runs its one stage whole
        return device
    return f"{device} head" if stage == 0 else f"{device} tail"


def typical_step(records: list[dict]) -> dict:
    """The step to show: the median step time after the first step (its warm-up), or the only step."""
    steady = records[1:] or records
    return sorted(steady, key=lambda record: record["step_seconds"])[len(steady) // 2]


def require_matplotlib() -> None:
    """Fail before a run, not after it, when its timeline could not be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--timeline draws with matplotlib: pip install 'ringtune[bench]'")


def draw_timeline(record: dict, path: Path) -> Path:
    """Write the picture of the step in ``record`` (a metrics step line) to ``path``: a lane per stage, a box per
    forward (F) and backward (B) of each micro-batch, and each lane's compute / wait / send seconds."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.patches import Patch

    rows = lanes(record)
    seconds = record["step_seconds"]
    figure, axis = pyplot.subplots(figsize=(12, 1.6 + 0.7 * len(rows)))
    for row, lane in enumerate(rows):
        y = len(rows) - 1 - row  # the head on top
        for span in lane.timing.spans:
            axis.broken_barh([(span.start, span.end - span.start)], (y - 0.35, 0.7), facecolors=COLORS[span.kind],
                             edgecolor="white")
            if span.end - span.start > 0.025 * seconds:  # a label only where it fits
                axis.text((span.start + span.end) / 2, y, f"{span.kind}{span.microbatch}", ha="center",
                          va="center", fontsize=7, color="white")
        t = lane.timing
        axis.broken_barh([(t.wall_seconds, max(seconds - t.wall_seconds, 0.0))], (y - 0.35, 0.7),
                         facecolors=AFTER_COLOR)
        axis.text(seconds * 1.01, y, f"compute {t.compute_seconds:.2f} s\nwait {t.wait_seconds:.2f} s, "
                  f"send {t.send_seconds:.2f} s", va="center", fontsize=7)
    axis.set_yticks(range(len(rows)), [lane.label for lane in reversed(rows)], fontsize=8)
    axis.set_xlim(0, seconds * 1.2)
    axis.set_xlabel("seconds from the step's start (each agent's clock)")
    axis.set_title(f"step {record['step']}: {seconds:.2f} s, {record['tokens_per_s']:.0f} tokens/s "
                   f"(F forward, B backward of micro-batch N; compute also holds the optimizer step)", fontsize=9)
    axis.legend(handles=[Patch(color=COLORS["F"], label="forward"), Patch(color=COLORS["B"], label="backward"),
                         Patch(color=AFTER_COLOR, label="stage done, the coordinator's step not yet (the agent frees "
                                                        "memory, status polls)")],
                loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3, fontsize=7, frameon=False)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path
