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

    .venv/bin/python benchmarks/base_dtype.py [--reps 5] [--seconds 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = ("fp32", "bf16", "int8", "int4")
SHAPES = ((1, 32), (4, 64))


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per block measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "base_dtype.json")
    args = parser.parse_args()
    import torch

    from edge_runtime.memory import configure_allocator

    torch.set_num_threads(1)
    configure_allocator()  # as in an agent: blocks of 256 KB or more mapped afresh, so per-call buffers cost
    started = os.getloadavg()
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": 1, "clock": "CPU time",
              "torch": torch.__version__, "load_average_before": started,
              "blocks": blocks(args.reps, args.seconds), "lm_head": head(args.reps),
              "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
