"""One decoder block as two graphs: a forward that also returns what its backward needs, and that backward.

AOTAutograd traces the block (with its LoRA) forward and backward once and partitions the joint graph
(min-cut: matmul outputs are kept, cheap elementwise work is recomputed). The forward graph returns
the block's output and the saved tensors; the backward graph takes them and the output's gradient
and returns the input's and the LoRA tensors' gradients, so the backward never runs the forward
again. Frozen tensors (base weights, the rotary's buffers) are inputs of both graphs: the same two
graphs run every block of this structure, fed that block's weights, and whatever the backward needs
of them alone (a transposed weight) it recomputes from them instead of receiving a copy.

Calling convention (``BlockSignature`` records the counts):

- forward ``(*frozen, x, *lora) -> (y, *saved)``
- backward ``(*frozen, *saved, *kept, dy) -> (dx, *dlora)``, ``kept`` being those of ``(x, *lora)``
  the backward reads (``BlockSignature.kept``, indices into that tuple).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.func import functional_call

from edge_runtime.models.stage import StageModule
from ringtune.manifest import BlockSignature


@dataclass(frozen=True, slots=True)
class SplitBlock:
    forward: fx.GraphModule
    """``(*frozen, x, *lora) -> (y, *saved)``."""
    backward: fx.GraphModule
    """``(*frozen, *saved, *kept, dy) -> (dx, *dlora)``."""
    signature: BlockSignature
    """Names and counts of both graphs' inputs and outputs."""
    example_forward: tuple[torch.Tensor, ...]
    """Inputs the forward was traced with (contiguous, as the runtime passes them)."""
    example_backward: tuple[torch.Tensor, ...]
    """Inputs the backward was traced with."""


def split_block(stage: StageModule, lora_names: list[str], hidden: torch.Tensor) -> SplitBlock:
    """The two graphs of a one-block middle stage; hidden [B, T, d] is an example input (its shape is
    the programs' fixed shape). lora_names are the stage's LoRA parameter names. The model must use eager
    attention: AOTAutograd's decomposition of CPU SDPA gives wrong input gradients (torch 2.13)."""
    if stage.config._attn_implementation != "eager":
        raise ValueError("split_block needs eager attention: call model.set_attn_implementation('eager') first")
    from functorch.compile import aot_function, make_boxed_func, min_cut_rematerialization_partition
    from torch._decomp import core_aten_decompositions

    named = dict(stage.named_parameters()) | dict(stage.named_buffers())
    frozen_names = [n for n in named if n not in lora_names]
    frozen = [named[n].detach() for n in frozen_names]
    nf = len(frozen)

    def block(*args: torch.Tensor) -> torch.Tensor:
        tensors = dict(zip(frozen_names, args[:nf])) | dict(zip(lora_names, args[nf + 1:]))
        return functional_call(stage, tensors, (args[nf],), strict=False)

    graphs: dict[str, fx.GraphModule] = {}

    def keep(kind: str):
        def compiler(graph: fx.GraphModule, _):
            graphs[kind] = graph
            return make_boxed_func(graph)
        return compiler

    traced = aot_function(block, keep("forward"), keep("backward"), partition_fn=min_cut_rematerialization_partition,
                          decompositions=core_aten_decompositions())
    x = hidden.detach().clone().requires_grad_(True)
    lora = [named[n].detach().clone().requires_grad_(True) for n in lora_names]
    with torch.enable_grad():
        output = traced(*frozen, x, *lora)
        output.backward(torch.ones_like(output))
    forward, saved_kinds = _forward_graph(graphs["forward"], nf)
    backward, kept = _backward_graph(graphs["backward"], graphs["forward"], saved_kinds, nf)
    signature = BlockSignature(tuple(frozen_names), tuple(lora_names),
                               sum(kind == "saved" for kind, _ in saved_kinds), tuple(kept))
    inputs = (*frozen, x.detach(), *(t.detach() for t in lora))
    with torch.no_grad():
        y, *saved = forward(*inputs)
    example_backward = (*frozen, *(t.contiguous() for t in saved), *(inputs[nf + i] for i in kept),
                        torch.ones_like(y))
    return SplitBlock(forward, backward, signature, inputs, example_backward)


def _placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def _outputs(graph: fx.Graph) -> list[fx.Node]:
    return list(next(n for n in graph.nodes if n.op == "output").args[0])


def _classify_saved(forward: fx.GraphModule, nf: int) -> list[tuple[str, int | fx.Node]]:
    """For each tensor AOTAutograd saves: ("input", i) for a forward input, ("frozen", node) for a
    value computed from frozen inputs alone (recomputed in the backward), ("saved", node) otherwise."""
    inputs = _placeholders(forward.graph)
    frozen_only: dict[fx.Node, bool] = {}
    for node in forward.graph.nodes:
        if node.op == "placeholder":
            frozen_only[node] = inputs.index(node) < nf
        elif node.op != "output":
            frozen_only[node] = bool(node.all_input_nodes) and all(frozen_only[n] for n in node.all_input_nodes)
    kinds = []
    for node in _outputs(forward.graph)[1:]:
        if node.op == "placeholder":
            kinds.append(("input", inputs.index(node)))
        else:
            kinds.append(("frozen" if frozen_only[node] else "saved", node))
    return kinds


def _forward_graph(traced: fx.GraphModule, nf: int) -> tuple[fx.GraphModule, list]:
    kinds = _classify_saved(traced, nf)
    graph = fx.Graph()
    env = {node: graph.placeholder(node.name) for node in _placeholders(traced.graph)}
    for node in traced.graph.nodes:
        if node.op not in ("placeholder", "output"):
            env[node] = graph.node_copy(node, env.__getitem__)
    outputs = _outputs(traced.graph)
    # Saved tensors leave the program, which hands out contiguous tensors: make the layout explicit.
    saved = [graph.call_function(torch.ops.aten.clone.default, (env[node],),
                                 {"memory_format": torch.contiguous_format})
             for kind, node in kinds if kind == "saved"]
    graph.output((env[outputs[0]], *saved))
    return fx.GraphModule(nn.Module(), graph), kinds


def _backward_graph(traced: fx.GraphModule, forward: fx.GraphModule, kinds: list, nf: int) -> tuple[fx.GraphModule, list[int]]:
    graph = fx.Graph()
    forward_inputs = _placeholders(forward.graph)
    frozen = [graph.placeholder(f"frozen_{i}") for i in range(nf)]
    placeholders = _placeholders(traced.graph)
    saved_inputs, tangents = placeholders[:len(kinds)], placeholders[len(kinds):]
    env: dict[fx.Node, fx.Node] = {}
    for node, (kind, _) in zip(saved_inputs, kinds):
        if kind == "saved":
            env[node] = graph.placeholder(node.name)
    kept = []
    for node, (kind, source) in zip(saved_inputs, kinds):
        if kind == "input" and source >= nf:
            env[node] = graph.placeholder(node.name)
            kept.append(source - nf)
    for node in tangents:
        env[node] = graph.placeholder(node.name)
    recomputed: dict[fx.Node, fx.Node] = {}

    def from_frozen(node: fx.Node) -> fx.Node:
        if node not in recomputed:
            recomputed[node] = (frozen[forward_inputs.index(node)] if node.op == "placeholder"
                                else graph.node_copy(node, from_frozen))
        return recomputed[node]

    for node, (kind, source) in zip(saved_inputs, kinds):
        if kind == "frozen":
            env[node] = from_frozen(source)
        elif kind == "input" and source < nf:
            env[node] = frozen[source]
    for node in traced.graph.nodes:
        if node.op == "output":
            graph.output(tuple(env[g] for g in node.args[0][nf:]))  # gradients of x and the LoRA tensors
        elif node.op != "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    return fx.GraphModule(nn.Module(), graph), kept
