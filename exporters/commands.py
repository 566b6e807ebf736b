"""``ringtune export``: write a plan's artifacts for a runtime (torch: each stage; ExecuTorch: the model's block
programs, which serve any plan), plus the manifest."""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from edge_runtime.discovery.advert import RUNTIMES
from ringtune.base_dtype import BASE_DTYPES
from ringtune.lora_spec import LoraSpec
from ringtune.plan import Plan
from ringtune.run_shape import RunShape

DEFAULT_LORA = LoraSpec()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export the plan's model (ExecuTorch block programs) or stages (torch safetensors) and a "
                       "manifest",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="model name or local directory (default: the plan's model)")
    parser.add_argument("--plan", required=True, type=Path, help="plan JSON, as the coordinator writes it")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--runtime", choices=RUNTIMES, default="executorch")
    parser.add_argument("--micro-batch-size", type=int, default=1,
                        help="sequences per micro-batch (ExecuTorch programs have fixed shapes)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (padded to it)")
    parser.add_argument("--lora-r", type=int, default=DEFAULT_LORA.r, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=DEFAULT_LORA.alpha, help="LoRA alpha")
    parser.add_argument("--seed", type=int, default=DEFAULT_LORA.seed, help="seed of the LoRA initialisation")
    parser.add_argument("--base-dtype", choices=BASE_DTYPES,
                        help="how the stages store frozen base weights (default: the plan's); ExecuTorch takes fp32")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes lowering ExecuTorch programs in parallel (one core each)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from exporters.export import export_plan
    from ringtune.progress import progress_for_terminal

    if not args.plan.is_file():
        raise ValueError(f"no plan file {args.plan}: write one (see `ringtune train --help`) or give its path")
    if args.micro_batch_size < 1 or args.seq_len < 2 or args.workers < 1:
        raise ValueError("--micro-batch-size and --workers must be >= 1 and --seq-len >= 2")
    plan = Plan.from_json(args.plan.read_text())
    if args.base_dtype:
        plan = replace(plan, base_dtype=args.base_dtype, base_dtype_reason=f"asked for with --base-dtype {args.base_dtype}")
    started = time.perf_counter()
    progress = progress_for_terminal()  # bars on a terminal, plain lines otherwise
    try:
        manifest = export_plan(args.model or plan.model, plan, args.out, args.runtime,
                               RunShape(args.micro_batch_size, args.seq_len),
                               LoraSpec(r=args.lora_r, alpha=args.lora_alpha, seed=args.seed), workers=args.workers,
                               progress=progress)
    finally:
        progress.close()
    entries = [(program.label, program.files) for program in manifest.programs] + \
        [(f"stage {s.index} {s.role} {list(s.layers)} on {s.device}", s.files) for s in manifest.stages]
    for label, files in entries:
        print(f"{label}: " + ", ".join(f"{path} {(args.out / path).stat().st_size / 1e6:.1f} MB"
                                       for path in files.values()))
    what = "block structures" if manifest.programs else "stages"
    print(f"exported {len(entries)} {what} for {args.runtime} ({plan.base_dtype} base weights) in "
          f"{time.perf_counter() - started:.0f} s to {args.out}")
    return 0
