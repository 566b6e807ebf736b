"""Per-stage benchmark: ExecuTorch (XNNPACK) vs eager PyTorch for one slice of a model.

Exports the stage's slice (torch) and the model's block programs (ExecuTorch: one forward/backward
pair per block structure, the weights as inputs), then measures each runtime in its own process (so
peak RSS is that runtime's alone; both load only the slice): forward time, forward + backward time
(ExecuTorch: each block's forward program keeps what its backward program needs), peak RSS, with
--threads threads for torch and XNNPACK alike. Also records export time, file sizes, and which ops
of each program run outside XNNPACK (portable kernels), the usual reason a program is slower.

    python benchmarks/executorch_stage.py [--model smollm2-135m --layers 10 20 -B 4 -T 128 --threads 2]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ringtune.run_shape import RunShape

RESULTS = Path(__file__).parent / "results" / "executorch_stage.json"
MEASURED_STAGE = 1
"""The middle stage of the three-stage plan export_both writes."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs=2, default=(10, 20), help="half-open block range")
    parser.add_argument("-B", "--micro-batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and XNNPACK threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure", choices=("executorch", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.export_dir, args.repeats, args.threads)))
        return 0
    with tempfile.TemporaryDirectory(prefix="ringtune-bench-") as tmp:
        result = {"model": args.model, "layers": list(args.layers), "micro_batch_size": args.micro_batch_size,
                  "seq_len": args.seq_len, "threads": args.threads,
                  "load_average_before": os.getloadavg()}
        result["export"] = export_both(args, Path(tmp))
        for runtime in ("torch", "executorch"):
            command = [sys.executable, __file__, "--measure", runtime, "--export-dir", str(Path(tmp)),
                       "--repeats", str(args.repeats), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result[runtime] = json.loads(output.strip().splitlines()[-1])
        result["load_average_after"] = os.getloadavg()
        result["ratios"] = {key: result["executorch"][key] / result["torch"][key]
                            for key in ("forward_s", "forward_backward_s", "peak_rss_mb")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def export_both(args, root: Path) -> dict:
    from edge_runtime.models.lora import LoraSpec
    from edge_runtime.models.registry import load_config
    from exporters.export import export_manifest, export_programs, export_stages
    from ringtune.plan import Plan, StageSpec

    shape = RunShape(args.micro_batch_size, args.seq_len)
    start, end = args.layers
    # A valid ring around the measured middle stage (index 1); only that stage is exported.
    plan = Plan(args.model, "owner", (StageSpec("owner", (0, start), "head"), StageSpec("bench", (start, end), "middle"),
                                      StageSpec("owner", (end, load_config(args.model).num_hidden_layers), "tail")),
                "1f1b", 1)
    started = time.perf_counter()
    stage = export_stages(args.model, plan, [MEASURED_STAGE], root / "torch", "torch", shape, LoraSpec())[0]
    export_manifest(args.model, "torch", shape, LoraSpec(), (stage,)).write(root / "torch")
    report = {"torch": {"seconds": time.perf_counter() - started,
                        "file_mb": {kind: (root / "torch" / path).stat().st_size / 1e6 for kind, path in stage.files.items()}}}
    started = time.perf_counter()
    programs = export_programs(args.model, root / "executorch", shape, LoraSpec(), workers=2)
    export_manifest(args.model, "executorch", shape, LoraSpec(), (), programs).write(root / "executorch")
    report["executorch"] = {"seconds": time.perf_counter() - started,
                            "file_mb": {path: (root / "executorch" / path).stat().st_size / 1e6
                                        for p in programs for path in p.files.values()},
                            "non_delegated_ops": {path: non_delegated_ops(root / "executorch" / path)
                                                  for p in programs for path in p.files.values()}}
    return report


def non_delegated_ops(path: Path) -> dict:
    """Kernel calls outside XNNPACK, by operator, and the number of delegate calls."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import DelegateCall, KernelCall

    plan = deserialize_pte_binary(path.read_bytes()).program.execution_plan[0]
    counts = collections.Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if isinstance(call, KernelCall):
                counts[plan.operators[call.op_index].name] += 1
            elif isinstance(call, DelegateCall):
                counts["<xnnpack delegate>"] += 1
    return dict(counts.most_common())


def measure(runtime: str, root: Path, repeats: int, threads: int) -> dict:
    from ringtune.manifest import ExportManifest

    torch.set_num_threads(threads)
    manifest = ExportManifest.read(root / "torch")
    stage = manifest.stage(MEASURED_STAGE)
    started = time.perf_counter()
    runner = _runner(runtime, root, threads)
    load_s = time.perf_counter() - started
    rss_loaded = _peak_rss_mb()
    x = torch.randn(stage.inputs[0].shape, generator=torch.Generator().manual_seed(0))
    dy = torch.randn(stage.outputs[0].shape, generator=torch.Generator().manual_seed(1))
    forward, forward_backward, backward = [], [], []
    for i in range(repeats + 1):  # the first round warms up
        t0 = time.perf_counter()
        runner.forward(i, x)
        t1 = time.perf_counter()
        runner.backward(i, dy)
        t2 = time.perf_counter()
        if i:
            forward.append(t1 - t0)
            backward.append(t2 - t1)
            forward_backward.append(t2 - t0)
    runner.step()
    return {"load_s": load_s, "forward_s": statistics.median(forward), "backward_s": statistics.median(backward),
            "forward_backward_s": statistics.median(forward_backward),
            "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _peak_rss_mb()}


def _peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over exec from the
    parent, so every child would report at least the exporting parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _runner(runtime: str, root: Path, threads: int):
    from edge_runtime.backends.torch.load import load_torch_stage
    from edge_runtime.backends.torch.runner import TorchStageRunner
    from ringtune.optimizer_spec import OptimizerSpec

    module, lora = load_torch_stage(root / "torch", MEASURED_STAGE)
    if runtime == "executorch":
        from edge_runtime.backends.executorch.runner import ExecuTorchStageRunner, load_block_programs
        return ExecuTorchStageRunner(module, lora, load_block_programs(root / "executorch", threads), OptimizerSpec())
    return TorchStageRunner(module, lora, OptimizerSpec())


if __name__ == "__main__":
    sys.exit(main())
