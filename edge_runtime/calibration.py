"""Time one decoder block of the run's model, forward and backward, at the run's micro-batch shape.

A matmul benchmark (device_profiles.live) measures what the CPU sustains on large products; a block
at a small micro-batch (1 x 32 tokens) runs many small matmuls and elementwise ops with per-op
overhead, and measured about half that here. The planner gets the block's real speed instead
(Asteroid profiles layers on each device before planning for the same reason). The weights are
random: the time does not depend on their values.
"""
from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig

from edge_runtime.memory import release_free_memory, rss
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.quantization import compact_model
from edge_runtime.models.registry import TINY_CONFIGS
from edge_runtime.models.stage import StageModule
from edge_runtime.models.structure import find_parts, sliceable_meta_model
from ringtune.run_shape import RunShape


def block_seconds(config_dict: dict, lora: LoraSpec, micro_batch_size: int, seq_len: int, base_dtype: str = "fp32",
                  export_dir: Path | None = None, min_seconds: float = 1.0, min_calls: int = 3, max_calls: int = 100,
                  windows: int = 3, clock=time.perf_counter) -> float:
    """Seconds of one forward + backward (input and LoRA gradients) of block 0 for one micro-batch, its frozen
    weights stored as base_dtype (dequantizing costs time on the device itself), in eager torch or, given an
    ExecuTorch export_dir, through its programs on torch's threads: the median of the windows' means, each over
    min_seconds, or over max_calls when those take less (a tiny model). clock: wall time (what a step takes), or
    time.process_time for comparisons on a shared machine (benchmarks/base_dtype.py)."""
    stage, _ = one_block_stage(config_dict, lora, base_dtype=base_dtype)
    x = torch.randn(micro_batch_size, seq_len, stage.config.hidden_size)  # [B, T, d]
    forward_backward = (_eager_block(stage, x) if export_dir is None else
                        _program_block(stage, x, export_dir, lora))
    forward_backward()  # warm-up: first-call allocations and kernel selection
    forward_backward()
    # Wall time over a second or more: on a CPU quota (a cgroup, an emulated device) a shorter window
    # lands on a few scheduler periods and can miss the device's average speed by a quarter. The median of a few
    # windows: one window of three identical emulated devices, calibrating at once beside the coordinator, still
    # put them 7% apart, and the planner gave the "faster" one a block more.
    return statistics.median(_mean_seconds(forward_backward, min_seconds, min_calls, max_calls, clock)
                             for _ in range(windows))


def _eager_block(stage: StageModule, x: torch.Tensor) -> Callable[[], None]:
    x = x.requires_grad_(True)

    def forward_backward() -> None:
        out = stage(x)
        out.backward(torch.ones_like(out))
    return forward_backward


def _program_block(stage: StageModule, x: torch.Tensor, export_dir: Path, lora: LoraSpec) -> Callable[[], None]:
    from edge_runtime.backends.executorch.load import block_runner  # only an ExecuTorch agent has the runtime

    runner = block_runner(export_dir, stage, lora, RunShape(*x.shape[:2]), torch.get_num_threads())
    dy = torch.ones_like(x)

    def forward_backward() -> None:
        runner.forward(0, x)
        runner.backward(0, dy)
    return forward_backward


def _mean_seconds(call, min_seconds: float, min_calls: int, max_calls: int, clock) -> float:
    """Mean seconds of call() over min_seconds (at least min_calls, at most max_calls calls)."""
    calls, start = 0, clock()
    while calls < min_calls or (clock() - start < min_seconds and calls < max_calls):
        call()
        calls += 1
    return (clock() - start) / calls


def runtime_baseline() -> int:
    """Bytes this process keeps resident once the training runtime has run: a tiny LoRA block's
    forward, backward and AdamW step start autograd, the thread pool and the model, peft and optimizer
    code, then everything the block held is freed. The planner adds it to every stage's own memory."""
    stage, _ = one_block_stage(TINY_CONFIGS["tiny-llama"]().to_dict(), LoraSpec())
    trainable = [p for p in stage.parameters() if p.requires_grad]
    out = stage(torch.randn(1, 8, stage.config.hidden_size, requires_grad=True))  # [1, 8, d]
    out.backward(torch.ones_like(out))
    torch.optim.AdamW(trainable).step()
    del stage, trainable, out
    release_free_memory()
    return rss()


def one_block_stage(config_dict: dict, lora: LoraSpec, index: int = 0, attn_implementation: str | None = None,
                    base_dtype: str = "fp32") -> tuple[StageModule, list[str]]:
    """Block ``index`` of the model a config describes, as a middle stage with LoRA and seeded random weights
    (frozen ones stored as base_dtype), and its LoRA tensors' names in the stage. Only that block is allocated
    (the model is built on the meta device), so a block of a 7B model costs what the block costs."""
    config = AutoConfig.for_model(**config_dict)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers API
        with torch.device("meta"):
            model = apply_lora(sliceable_meta_model(config), lora)
    stage = StageModule(find_parts(model), model.config, (index, index + 1), "middle").to_empty(device="cpu")
    generator = torch.Generator().manual_seed(index)
    with torch.no_grad():
        for tensor in [*stage.parameters(), *stage.buffers()]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    compact_model(stage, base_dtype)
    return stage, [name for name, p in stage.named_parameters() if p.requires_grad]
