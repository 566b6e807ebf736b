"""What the agents' allocator settings cost per block: forward + backward of SmolLM2-shaped blocks under
glibc's default, the old fixed 256 KB mmap threshold, a 4 MB threshold with a heap trim after each forward
and each backward (before), and today's 4 MB threshold with a trim once RSS grew by the slack the plan
counts (edge_runtime/memory.py, edge_runtime/worker.py).

    python benchmarks/allocator.py [--rounds 3] [--steps 15] [--blocks 4] [--batch 4] [--seq-len 64]

Each setting runs in its own process (mallopt must come before the allocations it governs), one torch
thread, the settings alternating round by round so a change in the machine's load hits them all.
Measured: CPU seconds per micro-batch (forward + backward, LoRA-free frozen blocks, input gradient as a
middle stage computes it) and the process's peak RSS. Writes benchmarks/results/allocator.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTINGS = {
    "glibc default": {"threshold": None, "trim": False},
    "256 KB threshold (before)": {"threshold": 256 * 1024, "trim": False},
    "4 MB threshold + trim per action (before)": {"threshold": "agent", "trim": "always"},
    "4 MB threshold + trim past the slack (agents now)": {"threshold": "agent", "trim": "past slack"},
}


def measure(setting: str, steps: int, blocks: int, batch: int, seq_len: int) -> dict:
    """In this process: apply the setting, then time forward + backward of the blocks."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from edge_runtime.memory import HEAP, configure_allocator, set_mmap_threshold

    spec = SETTINGS[setting]
    if spec["threshold"] == "agent":
        configure_allocator()
    elif spec["threshold"] is not None:
        set_mmap_threshold(spec["threshold"])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=blocks)  # SmolLM2-135M's block
    layers = [LlamaDecoderLayer(config, i).requires_grad_(False) for i in range(blocks)]
    x0 = torch.randn(batch, seq_len, config.hidden_size)  # (B, T, C)
    rope = LlamaRotaryEmbedding(config)(x0, torch.arange(seq_len)[None])

    after_action = {False: lambda: None, "always": HEAP.trim, "past slack": HEAP.after_action}[spec["trim"]]

    def micro_batch() -> None:
        x = x0.clone().requires_grad_(True)
        h = x
        for layer in layers:
            out = layer(h, position_embeddings=rope)
            h = out[0] if isinstance(out, tuple) else out
        after_action()  # the worker may trim after the forward ...
        h.backward(torch.ones_like(h))
        after_action()  # ... and after the backward

    for _ in range(3):
        micro_batch()
    cpu = time.process_time()
    for _ in range(steps):
        micro_batch()
    return {"cpu_seconds_per_micro_batch": (time.process_time() - cpu) / steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this setting and print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.blocks, args.batch, args.seq_len)))
        return
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(args.steps),
                                  "--blocks", str(args.blocks), "--batch", str(args.batch), "--seq-len",
                                  str(args.seq_len)], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    default = statistics.median(r["cpu_seconds_per_micro_batch"] for r in runs["glibc default"])
    summary = {name: {"median_cpu_seconds": statistics.median(r["cpu_seconds_per_micro_batch"] for r in rs),
                      "over_default": statistics.median(r["cpu_seconds_per_micro_batch"] for r in rs) / default,
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)} for name, rs in runs.items()}
    result = {"args": vars(args), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "runs": runs, "summary": summary}
    (RESULTS / "allocator.json").write_text(json.dumps(result, indent=1) + "\n")
    print("| setting | CPU s per micro-batch (median) | vs glibc default | peak RSS MB |\n|---|---|---|---|")
    for name, row in summary.items():
        print(f"| {name} | {row['median_cpu_seconds']:.3f} | {row['over_default']:.2f} | {row['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
