"""Export a model's decoder blocks to ExecuTorch (XNNPACK): one program pair per distinct block structure.

A decoder's blocks share one structure (LLaMA, GPT-2) or a few (Gemma-3: sliding and full
attention). For each, one block is split (``block_split``) into

- ``block{k}/forward.pte``: ``(*frozen, x, *lora) -> (y, *saved)``, the block's output and what its
  backward needs (AOTAutograd's min-cut choice: matmul outputs kept, cheap elementwise work redone);
- ``block{k}/backward.pte``: ``(*frozen, *saved, *kept, dy) -> (dx, *dlora)``, no forward inside.

Frozen weights are program inputs, not constants baked in: the same two programs run every block
of that structure, fed each block's weights from the agent's slice, so a model is lowered once per
structure whatever its depth and whatever the plan (the programs depend on the config, the LoRA
shape and the micro-batch shape only), and an agent holds its weights once. XNNPACK packs the
weights of its matrix products at each call. Shapes are fixed: micro-batch size x sequence length.
The model's ends (embedding; final norm, LM head, loss) run in eager torch on the agent.

Lowering is slow (tens of seconds of one core per program, all of it Python graph passes), so with
``workers > 1`` each program is lowered in its own process, the backward (the larger) first.
"""
from __future__ import annotations

import json
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from transformers import PreTrainedConfig

from edge_runtime.backends.executorch.block_split import split_block
from edge_runtime.calibration import one_block_stage
from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.structure import block_kinds, find_parts, sliceable_meta_model
from ringtune.lifetime import end_with_parent
from ringtune.manifest import BlockProgram, sha256_file
from ringtune.progress import Progress
from ringtune.quiet import quiet_libraries
from ringtune.run_shape import RunShape

METHODS = ("forward", "backward")
SIGNATURE = "signature.json"


def check_executorch_dtype(base_dtype: str) -> None:
    """ExecuTorch programs take their frozen weights in fp32 for now: refuse other dtypes in one line."""
    if base_dtype != "fp32":
        raise ValueError(f"ExecuTorch stages take --base-dtype fp32 only (XNNPACK's int8 linears also quantize "
                         f"activations, which would break exactness): use --base-dtype fp32, or run the "
                         f"{base_dtype} stages with --runtime torch")


def structures(config: PreTrainedConfig) -> dict[int, list[int]]:
    """The model's distinct block structures: structure index -> its blocks (the first one is exported)."""
    kinds = block_kinds(find_parts(sliceable_meta_model(config)))
    return {kind: [b for b, k in enumerate(kinds) if k == kind] for kind in sorted(set(kinds))}


def export_executorch_programs(config: PreTrainedConfig, out_dir: Path, shape: RunShape, lora_spec: LoraSpec,
                               workers: int, progress: Progress, kinds: list[int] | None = None
                               ) -> tuple[BlockProgram, ...]:
    """Write the programs of the model's block structures (``kinds``: some of them) under out_dir/block{k}/.
    The weights are not in them: only the config is read."""
    blocks = structures(config)
    kinds = sorted(blocks) if kinds is None else kinds
    jobs = [(config.to_dict(), lora_spec.to_dict(), blocks[k][0], k, shape, str(out_dir), method)
            for k in kinds for method in reversed(METHODS)]  # the backward graph is the larger: start it first
    with progress.task(f"exporting ExecuTorch programs of {len(kinds)} block structure(s)", len(jobs),
                       "programs") as task:
        if workers > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")  # no forked torch/executorch state
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                     initializer=_start_worker) as pool:
                for future in as_completed([pool.submit(_lower_job, *job) for job in jobs]):
                    future.result()
                    task.advance(1)
        else:
            for job in jobs:
                _lower_job(*job)
                task.advance(1)
    return tuple(block_program_entry(k, blocks[k], Path(out_dir)) for k in kinds)


def _start_worker() -> None:
    """A lowering worker: library warnings filtered, and it ends with the coordinator (even a killed one)."""
    quiet_libraries()
    end_with_parent()


def _lower_job(config: dict, lora: dict, block: int, kind: int, shape: RunShape, out_dir: str, method: str) -> None:
    torch.set_num_threads(1)  # one lowering per core; the passes are single-threaded Python anyway
    write_block_program(config, LoraSpec.from_dict(lora), block, kind, shape, Path(out_dir), method)


def program_files(kind: int) -> dict[str, str]:
    return {method: f"block{kind}/{method}.pte" for method in METHODS}


def write_block_program(config: dict, lora: LoraSpec, block: int, kind: int, shape: RunShape, out_dir: Path,
                        method: str) -> None:
    """Lower ``method`` (forward or backward) of the structure of ``block`` to ``out_dir/block{kind}/``, with
    the signature both programs share beside it."""
    stage, names = one_block_stage(config, lora, block, attn_implementation="eager")  # SDPA does not lower
    hidden = torch.randn(shape.micro_batch_size, shape.seq_len, stage.config.hidden_size,
                         generator=torch.Generator().manual_seed(0))
    split = split_block(stage, names, hidden)
    graph, example = (split.forward, split.example_forward) if method == "forward" else \
        (split.backward, split.example_backward)
    _explicit_tanh_gelu(graph)
    with torch.no_grad():
        program = torch.export.export(graph, tuple(example), strict=False).run_decompositions()
    _replace_empty_permuted(program)
    _drop_noop_copies(program)
    _mm_as_bmm(program)
    path = Path(out_dir) / program_files(kind)[method]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_lower(program))
    (path.parent / SIGNATURE).write_text(json.dumps(split.signature.to_dict()))


def block_program_entry(kind: int, blocks: list[int], out_dir: Path) -> BlockProgram:
    """Describe a structure's programs (written already by write_block_program)."""
    files = program_files(kind)
    signature = json.loads((Path(out_dir) / f"block{kind}" / SIGNATURE).read_text())
    return BlockProgram(kind=kind, blocks=tuple(blocks), files=files,
                        sha256={path: sha256_file(Path(out_dir) / path) for path in files.values()},
                        signature=signature)


def _explicit_tanh_gelu(graph: torch.fx.GraphModule) -> None:
    """Write ``gelu(x, approximate="tanh")`` (Gemma's gelu_pytorch_tanh) out as the ops of its formula.

    ExecuTorch 1.5.1's XNNPACK partitioner takes every ``aten.gelu`` and XNNPACK computes the exact,
    erf-based GELU whatever ``approximate`` says: the two differ by up to 4.7e-4, which gave gradients
    of every tensor upstream of the MLP a relative error of ~1e-5 (50x float noise) and let AdamW's
    first steps, which move each weight by about lr * sign(gradient), flip weights whose gradients are
    near zero. The formula's ops (mul, add, tanh) lower to XNNPACK as they are."""
    for node in graph.graph.nodes:
        if (node.op == "call_function" and node.target == torch.ops.aten.gelu.default
                and node.kwargs.get("approximate", "none") == "tanh"):
            node.target, node.kwargs = _tanh_gelu, {}
    graph.recompile()


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """``gelu(x, approximate="tanh")`` as ATen computes it."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x)))


def _lower(program) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    except RuntimeError as error:
        if "pass through" not in str(error):
            raise
        # One delegate per op never has a pass-through output, but lowers ~5x slower.
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner(per_op_mode=True)])
    return lowered.to_executorch().buffer


def _drop_noop_copies(program) -> None:
    """Remove alias nodes and clones of contiguous tensors from the (functional) graph.

    AOTAutograd keeps values through alias/clone nodes. XNNPACK drops them inside a delegate, which
    leaves a delegate returning its own input ("pass through arguments") and fails the default
    partitioner; without them whole regions lower together. A clone that makes a layout stays."""
    graph = program.graph_module.graph
    outputs = set(next(n for n in graph.nodes if n.op == "output").args[0])
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.alias.default,
                                                             torch.ops.aten.clone.default):
            continue
        source = node.args[0]
        relayout = (not source.meta["val"].is_contiguous()
                    or node.kwargs.get("memory_format", torch.contiguous_format) != torch.contiguous_format)
        if (node.target == torch.ops.aten.clone.default and relayout) or (node in outputs and source.op == "placeholder"):
            continue  # this clone makes a layout a later op needs, or an output would alias an input
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    program.graph_module.recompile()


def _mm_as_bmm(program) -> None:
    """Rewrite ``mm(a, b)`` as a one-batch ``bmm``: the weights are program inputs, and XNNPACK takes a
    product of two inputs only as a batch matrix multiply; every other mm fell to the portable (naive)
    kernel, which dominated the programs."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.mm.default:
            continue
        a, b = node.args
        # view, not unsqueeze/squeeze: XNNPACK takes view_copy, so the bmm joins its neighbours' delegate.
        with graph.inserting_before(node):
            a3 = graph.call_function(torch.ops.aten.view.default, (a, [1, *a.meta["val"].shape]))
            b3 = graph.call_function(torch.ops.aten.view.default, (b, [1, *b.meta["val"].shape]))
            product = graph.call_function(torch.ops.aten.bmm.default, (a3, b3))
            result = graph.call_function(torch.ops.aten.view.default, (product, list(node.meta["val"].shape)))
        for new, value in ((a3, a.meta["val"].unsqueeze(0)), (b3, b.meta["val"].unsqueeze(0)),
                           (product, node.meta["val"].unsqueeze(0)), (result, node.meta["val"])):
            new.meta = {"val": value}  # no source_fn: XNNPACK would re-fuse it as a linear
        node.replace_all_uses_with(result)
        graph.erase_node(node)
    program.graph_module.recompile()


def _replace_empty_permuted(program) -> None:
    """aten.empty_permuted has no ExecuTorch kernel; rewrite it as empty + permute (same layout)."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.empty_permuted.default:
            continue
        size, layout = node.args[0], node.args[1]
        physical = [size[i] for i in layout]
        inverse = sorted(range(len(layout)), key=lambda i: layout[i])
        kwargs = {k: v for k, v in node.kwargs.items() if k in ("dtype", "device", "pin_memory")}
        with graph.inserting_before(node):
            empty = graph.call_function(torch.ops.aten.empty.memory_format, (physical,), kwargs)
            permuted = graph.call_function(torch.ops.aten.permute.default, (empty, inverse))
        permuted.meta = dict(node.meta)
        empty.meta = {"val": node.meta["val"].new_empty(physical)} if "val" in node.meta else {}
        node.replace_all_uses_with(permuted)
        graph.erase_node(node)
    program.graph_module.recompile()
