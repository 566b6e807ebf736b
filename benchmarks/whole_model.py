"""The whole model in one process on one device: ringtune's own stage runner over a single `full`
stage (embedding, every block, norm, head, loss), no ring, no agent. The baseline that pipelining
across devices has to beat; benchmarks/cluster_peers.py runs it inside one emulated device.

    python benchmarks/whole_model.py --data train.jsonl --out result.json [--model smollm2-135m]
        [--micro-batches 8] [--micro-batch-size 1] [--seq-len 32] [--steps 4] [--threads 1]

Same batches (OwnerData, seed 0), LoRA and AdamW as `ringtune train`, so its losses equal a ring's.
Writes the losses, the wall time of every step and the process's peak RSS as JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edge_runtime.backends.torch.runner import TorchStageRunner
from edge_runtime.data.dataset import OwnerData, read_records
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.registry import load_model, load_tokenizer
from edge_runtime.models.stage import build_stage
from edge_runtime.memory import peak_rss
from ringtune.optimizer_spec import OptimizerSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", required=True, help="JSONL training data (as the owner's --data)")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="result JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peft_model = apply_lora(load_model(args.model), LoraSpec())
    stage, lora = build_stage(peft_model, (0, peft_model.config.num_hidden_layers), "full")
    runner = TorchStageRunner(stage, lora, OptimizerSpec())
    data = OwnerData(read_records(args.data), load_tokenizer(args.model), args.micro_batch_size, args.seq_len,
                     args.micro_batches, seed=0)
    losses, step_seconds, tokens = [], [], []
    for step in range(args.steps):
        batch = data.step_batch(step)
        started = time.perf_counter()
        loss = 0.0
        for mb in range(args.micro_batches):
            loss += float(runner.forward(mb, batch.input_ids[mb], batch.labels[mb], batch.scored_tokens))
            runner.backward(mb)
        runner.step()
        step_seconds.append(time.perf_counter() - started)
        losses.append(loss)
        tokens.append(batch.tokens)
    args.out.write_text(json.dumps({"losses": losses, "step_seconds": step_seconds, "tokens": tokens,
                                    "peak_rss": peak_rss()}))


if __name__ == "__main__":
    main()
