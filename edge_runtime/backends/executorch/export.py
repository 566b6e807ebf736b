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
    _rewrite_for_xnnpack(program)
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

    # The weights are program inputs: XNNPACK takes products with them as fully connected layers with dynamic
    # weights (it packs them at each call) only when told to; otherwise every mm fell to the portable (naive) kernel.
    options = {"force_non_static_weights_for_f32_linear": True}
    try:
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner(**options)])
    except RuntimeError as error:
        if "pass through" not in str(error):
            raise
        # One delegate per op never has a pass-through output, but lowers ~5x slower.
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner(per_op_mode=True, **options)])
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


def _rewrite_for_xnnpack(program) -> None:
    """Rewrite what XNNPACK would copy, or leave to ExecuTorch's portable kernels, into what it runs well; the
    rewritten graph computes bit for bit what the traced one did."""
    graph = program.graph_module.graph
    for rewrite in (_fold_permutes, _products_as_linear, _pow_as_mul, _broadcast_instead_of_expand, _scatters_as_cat):
        rewrite(graph)
    graph.eliminate_dead_code()  # the inputs the rewrites stopped reading (inner transposes, zeros)
    program.graph_module.recompile()


def _replace(node: torch.fx.Node, target, args: tuple) -> None:
    """Compute node's value as target(*args) instead."""
    with node.graph.inserting_before(node):
        new = node.graph.call_function(target, args)
    new.meta = {"val": node.meta["val"]}
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _fold_permutes(graph: torch.fx.Graph) -> None:
    """permute(permute(x, p), q) -> permute(x, p[q]), or x where that is the identity.

    AOTAutograd's backward reads a frozen weight as the transpose of the forward's transpose: XNNPACK copied
    both, 14 MB a smollm2 block, for a product that needs the weight as it is."""
    for node in list(graph.nodes):
        if not (_is(node, torch.ops.aten.permute.default) and _is(node.args[0], torch.ops.aten.permute.default)):
            continue
        inner = node.args[0]
        source, order = inner.args[0], [inner.args[1][i] for i in node.args[1]]
        if order == sorted(order):
            node.replace_all_uses_with(source)
            graph.erase_node(node)
        else:
            _replace(node, torch.ops.aten.permute.default, (source, order))


def _products_as_linear(graph: torch.fx.Graph) -> None:
    """mm(a, permute(w, [1, 0])) -> linear(a, w): XNNPACK's fully connected layer reads w [out, in] as it is,
    where the mm made it copy every weight transposed at every call."""
    for node in list(graph.nodes):
        if not _is(node, torch.ops.aten.mm.default):
            continue
        a, b = node.args
        if _is(b, torch.ops.aten.permute.default) and list(b.args[1]) == [1, 0]:
            _replace(node, torch.ops.aten.linear.default, (a, b.args[0]))


def _pow_as_mul(graph: torch.fx.Graph) -> None:
    """pow(x, 1) -> x, pow(x, 2) -> x * x, pow(x, 3) -> x * x * x, as ATen's eager kernel computes them. The RMS
    norm's backward has them; ExecuTorch's portable pow called std::pow per element (4 ms of a 46 ms backward)."""
    for node in list(graph.nodes):
        if not _is(node, torch.ops.aten.pow.Tensor_Scalar) or node.args[1] not in (1, 2, 3):
            continue
        x, exponent = node.args
        result = x
        with graph.inserting_before(node):
            for _ in range(int(exponent) - 1):
                result = graph.call_function(torch.ops.aten.mul.Tensor, (result, x))
                result.meta = {"val": node.meta["val"]}
        node.replace_all_uses_with(result)
        graph.erase_node(node)


_SCALING_OPS = (torch.ops.aten.div.Scalar, torch.ops.aten.mul.Scalar, torch.ops.aten.div.Tensor, torch.ops.aten.mul.Tensor)
_BROADCASTING_OPS = (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.aten.sub.Tensor)


def _broadcast_instead_of_expand(graph: torch.fx.Graph) -> None:
    """expand(x) whose every use is a scalar op feeding binary ops with a tensor of the expanded shape: the scalar
    ops take x, and the binary ops broadcast it. The RMS norm's backward has it; the portable expand_copy
    materialized [B, T, d] twice a block (2 ms of a 46 ms backward)."""
    for node in list(graph.nodes):
        if not (_is(node, torch.ops.aten.expand.default) and all(_scaled_then_broadcast(use, node) for use in node.users)):
            continue
        source = node.args[0]
        for use in list(node.users):
            use.replace_input_with(node, source)
            use.meta = {"val": use.meta["val"].new_empty(source.meta["val"].shape)}
        graph.erase_node(node)


def _scaled_then_broadcast(use: torch.fx.Node, expand: torch.fx.Node) -> bool:
    """Whether ``use`` scales ``expand`` by a number and every op reading the result broadcasts it against a tensor of
    the expanded shape (so reading the unexpanded tensor gives the same values and shapes)."""
    shape = expand.meta["val"].shape
    return _scales(use, expand) and all(
        _is_any(binary, _BROADCASTING_OPS) and all(_shape(arg) == shape for arg in binary.args if arg is not use)
        for binary in use.users)


def _scales(node: torch.fx.Node, tensor: torch.fx.Node) -> bool:
    """Whether node multiplies or divides ``tensor`` by a number."""
    return (_is_any(node, _SCALING_OPS) and len(node.args) == 2 and node.args[0] is tensor
            and isinstance(node.args[1], (int, float)))


def _scatters_as_cat(graph: torch.fx.Graph) -> None:
    """add(slice_scatter(zeros, a, dim, k, end), slice_scatter(zeros, b, dim, 0, k)) -> cat([b, a], dim): the
    rotary's backward (rotate_half's gradient) writes its halves into zeros and adds them; XNNPACK concatenates,
    where ExecuTorch's portable slice_scatter filled and copied [B, H, T, d] four times a block."""
    for node in list(graph.nodes):
        if not _is(node, torch.ops.aten.add.Tensor) or len(node.args) != 2:
            continue
        pieces = [_zero_scatter(arg) for arg in node.args]
        if None in pieces or pieces[0][0] != pieces[1][0]:
            continue
        dim = pieces[0][0]
        size = node.meta["val"].shape[dim]
        (_, first_start, first_end, first), (_, second_start, second_end, second) = sorted(pieces, key=lambda p: p[1])
        if first_start != 0 or first_end != second_start or min(second_end, size) != size:
            continue
        _replace(node, torch.ops.aten.cat.default, ([first, second], dim))


def _zero_scatter(node) -> tuple[int, int, int, torch.fx.Node] | None:
    """(dim, start, end, source) of slice_scatter(zeros, source, dim, start, end) used once, else None."""
    if not _is(node, torch.ops.aten.slice_scatter.default) or len(node.users) != 1 or len(node.args) != 5 or node.kwargs:
        return None  # step 1: the five positional arguments AOTAutograd writes
    zeros, source, dim, start, end = node.args
    if not (_is(zeros, torch.ops.aten.full.default) and zeros.args[1] == 0):
        return None
    return dim % node.meta["val"].dim(), start, end, source


def _shape(arg) -> torch.Size | None:
    return arg.meta["val"].shape if isinstance(arg, torch.fx.Node) else None


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _is_any(node, targets) -> bool:
    return any(_is(node, target) for target in targets)
