"""Per-stage benchmark: ExecuTorch (XNNPACK) vs eager PyTorch for one slice of a model.

Exports the stage for both runtimes, then measures each runtime in its own process (so peak RSS
is that runtime's alone; the torch side loads only its slice via the torch export): forward time,
forward + backward time (ExecuTorch: forward.pte then vjp.pte, which recomputes the forward),
peak RSS. Also records export time, file sizes, and which ops of each program run outside
XNNPACK (portable kernels), the usual reason a program is slower than eager.

    python benchmarks/executorch_stage.py [--model smollm2-135m --layers 10 20 -B 4 -T 128]
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

RESULTS = Path(__file__).parent / "results" / "executorch_stage.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, nargs=2, default=(10, 20), help="half-open block range")
    parser.add_argument("-B", "--micro-batch-size", type=int, default=4)
    parser.add_argument("-T", "--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--measure", choices=("executorch", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.export_dir, args.repeats)))
        return 0
    with tempfile.TemporaryDirectory(prefix="ringtune-bench-") as tmp:
        result = {"model": args.model, "layers": list(args.layers), "micro_batch_size": args.micro_batch_size,
                  "seq_len": args.seq_len, "torch_threads": torch.get_num_threads(),
                  "load_average_before": os.getloadavg()}
        result["export"] = export_both(args, Path(tmp))
        for runtime in ("torch", "executorch"):
            command = [sys.executable, __file__, "--measure", runtime, "--export-dir", str(Path(tmp) / runtime),
                       "--repeats", str(args.repeats)]
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
    from edge_runtime.backends.executorch.export import export_executorch_stage
    from edge_runtime.backends.torch.export import export_torch_stage
    from edge_runtime.models.lora import LoraSpec, apply_lora
    from edge_runtime.models.registry import load_config, load_model, weight_source
    from edge_runtime.models.slices import skeleton
    from edge_runtime.models.stage import build_stage
    from ringtune.manifest import ExportManifest, toolchain_versions
    from ringtune.plan import StageSpec
    from ringtune.run_shape import RunShape

    spec = StageSpec("bench", tuple(args.layers), "middle")
    shape = RunShape(args.micro_batch_size, args.seq_len)
    report = {}
    for runtime in ("torch", "executorch"):
        started = time.perf_counter()
        if runtime == "torch":
            skel = skeleton(load_config(args.model), LoraSpec(), initial_lora=True)
            stage = export_torch_stage(weight_source(args.model), skel, spec, 0, shape, root / runtime)
        else:
            model = load_model(args.model)
            model.set_attn_implementation("eager")
            started = time.perf_counter()
            stage = export_executorch_stage(*build_stage(apply_lora(model, LoraSpec()), spec.layers, spec.role), spec,
                                            0, shape, root / runtime)
        seconds = time.perf_counter() - started
        ExportManifest(args.model, runtime, shape.micro_batch_size, shape.seq_len, LoraSpec().to_dict(),
                       toolchain_versions("torch", "executorch"), (stage,)).write(root / runtime)
        report[runtime] = {"seconds": seconds,
                           "file_mb": {kind: (root / runtime / path).stat().st_size / 1e6
                                       for kind, path in stage.files.items()}}
        if runtime == "executorch":
            report[runtime]["non_delegated_ops"] = {
                kind: non_delegated_ops(root / runtime / stage.files[kind]) for kind in ("forward", "vjp")}
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


def measure(runtime: str, export_dir: Path, repeats: int) -> dict:
    from ringtune.manifest import ExportManifest

    manifest = ExportManifest.read(export_dir)
    stage = manifest.stage(0)
    started = time.perf_counter()
    runner = _runner(runtime, export_dir)
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


def _runner(runtime: str, export_dir: Path):
    from ringtune.optimizer_spec import OptimizerSpec

    if runtime == "executorch":
        from edge_runtime.backends.executorch.runner import ExecuTorchStageRunner
        return ExecuTorchStageRunner(export_dir, 0, OptimizerSpec())
    from edge_runtime.backends.torch.load import load_torch_stage
    from edge_runtime.backends.torch.runner import TorchStageRunner
    module, lora = load_torch_stage(export_dir, 0)
    return TorchStageRunner(module, lora, OptimizerSpec())


if __name__ == "__main__":
    sys.exit(main())
