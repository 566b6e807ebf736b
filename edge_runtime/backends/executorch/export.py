"""Export one stage to two ExecuTorch programs (XNNPACK), with the LoRA tensors as inputs.

- ``forward.pte``: head/middle ``(x, *lora) -> y``; tail/full ``(x, labels, step_tokens, *lora) -> loss``.
- ``vjp.pte``, the joint forward-backward graph of ``torch.export.experimental._export_forward_backward``:
  head ``(ids, dy, *lora) -> (loss, *dlora)``; middle ``(x, dy, *lora) -> (loss, dx, *dlora)``;
  tail ``(x, labels, step_tokens, *lora) -> (loss, dx, *dlora)``; full as tail without dx.
  On head/middle the "loss" is ``(stage(x) * dy).sum()``, whose gradients are the vector-Jacobian
  products the pipeline needs; on tail/full it is this micro-batch's share of the step loss.
- ``lora.safetensors``: the initial LoRA tensors, so a device needs no model weights to start.

Frozen base weights are baked into both programs (ExecuTorch does not share constants between
programs), the LoRA tensors are program inputs so the Python optimizer can feed updated values.
Shapes are fixed: micro-batch size x sequence length.

Lowering is slow (tens of seconds per block, all of it Python graph passes, one core) and each
stage's ``forward`` and ``vjp`` lower independently, so with ``workers > 1`` each program is lowered
in its own process, the biggest first.
"""
from __future__ import annotations

import contextlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call
from transformers import PreTrainedConfig

from edge_runtime.models.lora import LoraSpec
from edge_runtime.models.slices import cut_slice, materialize, skeleton
from edge_runtime.models.stage import StageModule, token_loss_sum
from edge_runtime.models.weights import WeightSource
from ringtune.lifetime import end_with_parent
from ringtune.manifest import (
    StageManifest,
    TensorSpec,
    dtype_name,
    sha256_file,
    stage_io,
)
from ringtune.plan import Plan, StageSpec
from ringtune.progress import Progress
from ringtune.quiet import quiet_libraries
from ringtune.run_shape import RunShape

LOSS_ROLES = ("tail", "full")
SCRATCH_SLICE = "slice.safetensors.tmp"
"""A stage's fp32 slice while its ExecuTorch programs are lowered (deleted after)."""


class ExportError(RuntimeError):
    """The stage could not be exported; the message says what to change."""


class _StageFunction(nn.Module):
    """The stage as a function of its inputs and its LoRA tensors (which replace the parameters).

    ``joint``: return a 1-tuple with the scalar to differentiate, as ``_export_forward_backward``
    wants; head/middle then take ``dy`` after ``x`` and return ``(stage(x) * dy).sum()``.
    """

    def __init__(self, stage: StageModule, lora_names: list[str], joint: bool) -> None:
        super().__init__()
        self.stage = stage
        self.lora_names = lora_names
        self.joint = joint
        self.num_inputs = 3 if stage.role in LOSS_ROLES else (2 if joint else 1)

    def forward(self, *args: torch.Tensor):
        inputs, lora = args[:self.num_inputs], args[self.num_inputs:]
        output = functional_call(self.stage, dict(zip(self.lora_names, lora)), (inputs[0],), strict=False)
        if self.stage.role in LOSS_ROLES:
            labels, step_tokens = inputs[1], inputs[2]
            result = token_loss_sum(output, labels) / step_tokens
        elif self.joint:
            result = (output * inputs[1]).sum()
        else:
            return output
        return (result,) if self.joint else result


def check_executorch_dtype(base_dtype: str) -> None:
    """ExecuTorch programs keep their frozen weights in fp32 for now: refuse other dtypes in one line."""
    if base_dtype != "fp32":
        raise ValueError(f"ExecuTorch stages take --base-dtype fp32 only (XNNPACK's int8 linears also quantize "
                         f"activations, which would break exactness): use --base-dtype fp32, or run the "
                         f"{base_dtype} stages with --runtime torch")


def export_executorch_stages(config: PreTrainedConfig, source: WeightSource, plan: Plan, indices: list[int],
                             out_dir: Path, shape: RunShape, lora_spec: LoraSpec, workers: int,
                             progress: Progress) -> tuple[StageManifest, ...]:
    """Write the programs of the plan stages at ``indices`` under out_dir/stage{i}/. Each stage is cut from the
    model's weights into a scratch slice of its own (mapped, so no process holds the whole model)."""
    check_executorch_dtype(plan.base_dtype)
    skel = skeleton(config, lora_spec, initial_lora=True, attn_implementation="eager")
    slices = {}
    for i in indices:
        (out_dir / f"stage{i}").mkdir(exist_ok=True)
        slices[i] = out_dir / f"stage{i}" / SCRATCH_SLICE
        cut_slice(source, skel, {i: plan.stages[i]}, slices[i])
    try:
        return _export_programs(config.to_dict(), plan, indices, slices, out_dir, shape, lora_spec, workers, progress)
    finally:
        for path in slices.values():
            path.unlink(missing_ok=True)


def _export_programs(config: dict, plan: Plan, indices: list[int], slices: dict[int, Path], out_dir: Path,
                     shape: RunShape, lora_spec: LoraSpec, workers: int, progress) -> tuple[StageManifest, ...]:
    stages = {i: _stage(slices[i], config, lora_spec, plan.stages[i], i) for i in indices}
    jobs = [(i, kind) for i in indices for kind in stage_programs(plan.stages[i], bool(stages[i][1]))]
    # Lowering time grows with the graph: blocks, and the joint graph is about twice the forward.
    jobs.sort(key=lambda job: -(plan.stages[job[0]].num_layers + 1) * (2 if job[1] == "vjp" else 1))
    blocks = sum(plan.stages[i].num_layers for i, _ in jobs)
    with progress.task(f"exporting ExecuTorch programs of stages {indices}", blocks, "blocks") as task:
        if workers > 1 and len(jobs) > 1:
            context = multiprocessing.get_context("spawn")  # no forked torch/executorch state
            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context,
                                     initializer=_start_worker) as pool:
                futures = {pool.submit(_write_program_job, str(slices[i]), config, lora_spec.to_dict(),
                                       plan.to_dict(), i, shape, str(out_dir), kind): i for i, kind in jobs}
                for future in as_completed(futures):
                    future.result()
                    task.advance(plan.stages[futures[future]].num_layers)
        else:
            for i, kind in jobs:
                write_program(*stages[i], plan.stages[i], i, shape, out_dir, kind)
                task.advance(plan.stages[i].num_layers)
    return tuple(write_stage_manifest(*stages[i], plan.stages[i], i, shape, out_dir) for i in indices)


def _start_worker() -> None:
    """A lowering worker: library warnings filtered, and it ends with the coordinator (even a killed one)."""
    quiet_libraries()
    end_with_parent()


def _stage(slice_path: Path, config: dict, lora_spec: LoraSpec, spec, index: int):
    """(stage module, LoRA tensors) mapped from the stage's slice, with eager attention (SDPA does not lower to
    XNNPACK; eager attention computes the same function)."""
    return materialize(slice_path, config, lora_spec, {index: spec}, attn_implementation="eager")[index]


def _write_program_job(slice_path: str, config: dict, lora: dict, plan: dict, index: int, shape: RunShape,
                       out_dir: str, kind: str) -> None:
    """One program, in a worker process."""
    torch.set_num_threads(1)  # one lowering per core; the passes are single-threaded Python anyway
    spec = Plan.from_dict(plan).stages[index]
    write_program(*_stage(Path(slice_path), config, LoraSpec.from_dict(lora), spec, index), spec, index, shape,
                  Path(out_dir), kind)


def stage_programs(spec: StageSpec, has_lora: bool) -> tuple[str, ...]:
    """The programs a stage needs: a head with no blocks has nothing to differentiate."""
    return ("forward", "vjp") if has_lora or spec.role != "head" else ("forward",)


def export_executorch_stage(stage: StageModule, lora: dict[str, nn.Parameter], spec: StageSpec, index: int,
                            shape: RunShape, out_dir: Path) -> StageManifest:
    """Write ``stage{index}/{forward,vjp}.pte`` and ``lora.safetensors`` under out_dir.

    stage and lora are ``build_stage``'s (or ``materialize``'s) result for spec; the model must use eager
    attention (``model.set_attn_implementation("eager")`` before ``apply_lora``): SDPA does not lower to
    XNNPACK.
    """
    for kind in stage_programs(spec, bool(lora)):
        write_program(stage, lora, spec, index, shape, out_dir, kind)
    return write_stage_manifest(stage, lora, spec, index, shape, out_dir)


def write_program(stage: StageModule, lora: dict[str, nn.Parameter], spec: StageSpec, index: int, shape: RunShape,
                  out_dir: Path, kind: str) -> None:
    """Lower one of the stage's programs (``forward`` or ``vjp``) to ``stage{index}/{kind}.pte``."""
    if stage.config._attn_implementation != "eager":
        raise ExportError("export for ExecuTorch needs eager attention: call "
                          "model.set_attn_implementation('eager') before apply_lora")
    relative = _relative_names(stage, lora)
    inputs, outputs = stage_io(spec.role, stage.config.hidden_size, shape)
    examples = _example_inputs(inputs, stage.config.vocab_size)
    lora_values = [p.detach().clone() for p in lora.values()]
    path = Path(out_dir) / f"stage{index}" / f"{kind}.pte"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _frozen(stage):
        if kind == "forward":
            program = _lower_forward(stage, relative, examples, lora_values)
        else:
            dy = [] if spec.role in LOSS_ROLES else _example_inputs(outputs, stage.config.vocab_size)
            program = _lower_vjp(stage, relative, examples, dy, lora_values)
    path.write_bytes(program)


def write_stage_manifest(stage: StageModule, lora: dict[str, nn.Parameter], spec: StageSpec, index: int,
                         shape: RunShape, out_dir: Path) -> StageManifest:
    """Write the initial LoRA tensors and describe the stage (its programs must be written already)."""
    inputs, outputs = stage_io(spec.role, stage.config.hidden_size, shape)
    lora_specs = tuple(TensorSpec(name, tuple(p.shape), dtype_name(p.dtype)) for name, p in lora.items())
    files = {kind: f"stage{index}/{kind}.pte" for kind in stage_programs(spec, bool(lora))}
    files["lora"] = f"stage{index}/lora.safetensors"
    save_file({name: p.detach().contiguous() for name, p in lora.items()}, str(Path(out_dir) / files["lora"]))
    hashes = {path: sha256_file(Path(out_dir) / path) for path in files.values()}
    return StageManifest(index=index, device=spec.device, role=spec.role, layers=spec.layers, files=files,
                         sha256=hashes, inputs=inputs, outputs=outputs, lora=lora_specs)


def _relative_names(stage: StageModule, lora: dict[str, nn.Parameter]) -> list[str]:
    """The LoRA tensors' names inside the stage module (what functional_call replaces)."""
    by_id = {id(p): name for name, p in stage.named_parameters()}
    return [by_id[id(p)] for p in lora.values()]


def _example_inputs(inputs: tuple[TensorSpec, ...], vocab_size: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    examples = []
    for spec in inputs:
        if spec.dtype == "int64":
            examples.append(torch.randint(0, vocab_size, spec.shape, generator=generator))
        elif spec.name == "step_tokens":
            examples.append(torch.tensor(1.0))
        else:
            examples.append(torch.randn(spec.shape, generator=generator))
    return examples


@contextlib.contextmanager
def _frozen(stage: StageModule):
    """Stop gradients to the stage's own parameters while exporting (LoRA comes in as inputs)."""
    flags = [(p, p.requires_grad) for p in stage.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _lower_forward(stage, names, examples, lora_values) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower

    with torch.no_grad():
        program = torch.export.export(_StageFunction(stage, names, joint=False),
                                      (*examples, *lora_values), strict=False).run_decompositions()
    _mm_as_bmm(program, keep_linears=True)
    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _lower_vjp(stage, names, examples, dy, lora_values) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
        XnnpackPartitioner,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torch.export.experimental import _export_forward_backward

    differentiable = [t.detach().requires_grad_(t.is_floating_point() and t.dim() > 0)
                      for t in examples[:1]] + examples[1:] + dy
    lora_inputs = [t.clone().requires_grad_(True) for t in lora_values]
    program = torch.export.export(_StageFunction(stage, names, joint=True),
                                  (*differentiable, *lora_inputs), strict=False)
    joint = _export_forward_backward(program)
    first_lora = len(differentiable)
    expected = [0] * differentiable[0].requires_grad + [first_lora + i for i in range(len(lora_inputs))]
    _check_gradient_order(joint, expected)
    _replace_empty_permuted(joint)
    _drop_noop_copies(joint)
    _mm_as_bmm(joint, keep_linears=False)
    try:
        lowered = to_edge_transform_and_lower(joint, partitioner=[XnnpackPartitioner()])
    except RuntimeError as error:
        if "pass through" not in str(error):
            raise
        # One delegate per op never has a pass-through output, but lowers ~5x slower.
        lowered = to_edge_transform_and_lower(joint, partitioner=[XnnpackPartitioner(per_op_mode=True)])
    return lowered.to_executorch().buffer


def _check_gradient_order(joint, expected: list[int]) -> None:
    """The runner reads (loss, grads...) positionally: the gradients must be those of the user
    inputs at ``expected`` positions, in order. The joint graph names a gradient's target after the
    flat placeholder it belongs to (``arg{N}_1``, parameters first)."""
    from torch.export.graph_signature import InputKind, OutputKind

    lifted = sum(s.kind != InputKind.USER_INPUT for s in joint.graph_signature.input_specs)
    specs = joint.graph_signature.output_specs
    targets = [s.target for s in specs if s.kind == OutputKind.GRADIENT_TO_USER_INPUT]
    found = [int(t.removeprefix("arg").split("_")[0]) - lifted for t in targets]
    if specs[0].kind != OutputKind.LOSS_OUTPUT or found != expected:
        raise ExportError(f"joint graph gives gradients for inputs {found}, expected {expected}: "
                          f"_export_forward_backward changed; use torch==2.13.0")


def _drop_noop_copies(program) -> None:
    """Remove alias nodes and clones of contiguous tensors from the (functional) joint graph.

    The joint graph keeps forward values for the backward through alias/clone nodes. XNNPACK
    drops them inside a delegate, which leaves a delegate returning its own input ("pass through
    arguments") and fails the default partitioner; without them whole regions lower together.
    """
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.alias.default,
                                                             torch.ops.aten.clone.default):
            continue
        source = node.args[0]
        relayout = (not source.meta["val"].is_contiguous()
                    or node.kwargs.get("memory_format", torch.contiguous_format) != torch.contiguous_format)
        if node.target == torch.ops.aten.clone.default and relayout:
            continue  # this clone makes a layout a later op needs
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    program.graph_module.recompile()


def _mm_as_bmm(program, keep_linears: bool) -> None:
    """Rewrite ``mm(a, b)`` as a 1-batch ``bmm``, except (``keep_linears``) where ``b`` is a
    transposed weight: XNNPACK takes that as a linear with packed weights. XNNPACK leaves every
    other mm (the LoRA products, in the joint graph all of them, as the linears' weights there also
    feed the backward) to the portable mm kernel, a naive loop that dominated both programs."""
    signature = program.graph_signature
    constants = {*signature.inputs_to_parameters, *signature.inputs_to_buffers,
                 *signature.inputs_to_lifted_tensor_constants}
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.mm.default:
            continue
        a, b = node.args
        if keep_linears and _is_transposed_constant(b, constants):
            continue
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


def _is_transposed_constant(node, constants: set[str]) -> bool:
    """Whether the value is an odd number of transposes of a parameter/buffer/constant."""
    transposes = 0
    while node.op == "call_function" and node.target in (torch.ops.aten.permute.default, torch.ops.aten.t.default):
        transposes += 1
        node = node.args[0]
    return node.op == "placeholder" and node.name in constants and transposes % 2 == 1


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
