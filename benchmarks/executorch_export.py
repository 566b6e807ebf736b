"""Export time and program sizes: a whole model's plan lowered to ExecuTorch, serially or in parallel.

Exports the even plan of ``--devices`` devices (the owner's share split into head and tail) with
``export_plan`` and records the wall time, the CPU seconds of this process and its lowering
workers (the load-independent cost: other work on a shared machine stretches the wall time), the
machine's load average, and every file's size.

    python benchmarks/executorch_export.py [--model smollm2-135m --devices 3 --workers 2 -B 4 -T 128]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.registry import load_config
from exporters.export import export_plan
from ringtune.plan import even_plan
from ringtune.run_shape import RunShape

RESULTS = Path(__file__).parent / "results" / "executorch_export.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="lowering processes")
    parser.add_argument("-B", "--micro-batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    devices = ["owner"] + [f"node{i}" for i in range(1, args.devices)]
    plan = even_plan(args.model, load_config(args.model).num_hidden_layers, devices, "owner")
    result = {"model": args.model, "stages": [[s.device, s.role, list(s.layers)] for s in plan.stages],
              "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "workers": args.workers,
              "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="ringtune-export-bench-") as tmp:
        started = time.perf_counter()
        manifest = export_plan(args.model, plan, Path(tmp), "executorch",
                               RunShape(args.micro_batch_size, args.seq_len), LoraSpec(), workers=args.workers)
        result["export_seconds"] = round(time.perf_counter() - started, 1)
        result["cpu_seconds"] = round(sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
                                          for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)), 1)
        result["load_average_after"] = os.getloadavg()
        result["files_mb"] = {path: round((Path(tmp) / path).stat().st_size / 1e6, 1)
                              for stage in manifest.stages for path in stage.files.values()}
    result["total_mb"] = round(sum(result["files_mb"].values()), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
