"""Model cost table: memory and FLOPs of every block and of the owner's two ends, from a config.

Nothing is loaded: the model is built on the meta device, wrapped with LoRA as in training, and
one block of each distinct structure and attention type is traced forward and backward on meta
tensors, as the one-block stage an agent runs (rotary, mask and all). Torch's FlopCounterMode
counts the FLOPs, a saved-tensors hook sees every tensor autograd keeps for backward, and a
dispatch mode follows every tensor the trace allocates until it is freed (the transient peak), so
the numbers follow the real modules (LLaMA family, Gemma-3, GPT-2, ...) instead of formulas. Meta
tensors have no data but real sizes and lifetimes: on real agents the traced bytes matched what a
block kept per micro-batch to 3% (benchmarks/agent_memory.py).
"""
from __future__ import annotations

import json
import warnings
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from coordinator.planning.costs import CostTable, EndCost
from edge_runtime.memory import HEAP_ROOM_SHARE, HEAP_SLACK_BYTES
from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.quantization import CompactLinear, compact_model, compact_weights
from edge_runtime.models.registry import load_config
from edge_runtime.models.stage import StageModule, rows_loss_sum
from edge_runtime.models.structure import DecoderParts, block_kinds, find_parts, sliceable_meta_model

# A trainable fp32 tensor costs itself, its gradient and AdamW's two moments.
TRAINABLE_COPIES = 4


class ModelConfigError(ValueError):
    """The model config file cannot be read; the message says how to fix it."""


def config_from_file(path: str | Path) -> PreTrainedConfig:
    """A Hugging Face config from a config.json file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise ModelConfigError(f"cannot read the model config {path} ({error!r}): give a Hugging Face "
                               f"config.json with a model_type") from None
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as error:  # for an unknown type, transformers lists every type it knows
        reason = str(error).splitlines()[0] if model_type in CONFIG_MAPPING else "transformers does not know it"
        raise ModelConfigError(f"the model config {path} (model_type {model_type!r}) cannot be used: "
                               f"{reason}") from None


def model_cost_table(model: str | PreTrainedConfig, lora: LoraSpec = LoraSpec(), seq_len: int = 64,
                     name: str | None = None, base_dtype: str = "fp32") -> CostTable:
    """The cost table of a built-in model name, a local model directory, or a config, with its frozen
    weights stored as base_dtype (compact layers as on the devices: their bytes are priced as stored;
    their FLOPs are those of the fp32 matmuls they compute with, and their weight elements are counted
    for pricing dequantization, ``CostTable.block_flops``)."""
    config = load_config(model) if isinstance(model, str) else model
    name = name or (model if isinstance(model, str) else config.name_or_path or config.model_type)
    causal_lm = sliceable_meta_model(config)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers API
        peft_model = apply_lora(causal_lm, lora)
        compact_model(peft_model, base_dtype)
    parts = find_parts(peft_model)
    blocks = [_block_cost(parts, peft_model.config, i, seq_len) for i in _distinct_blocks(parts)]
    per_block = [blocks[j] for j in block_kinds(parts)]
    head_modules = [parts.embed] + ([parts.position_embed] if parts.position_embed is not None else [])
    return CostTable(
        model=name, base_dtype=base_dtype, seq_len=seq_len,
        block_param_bytes=tuple(b.param_bytes for b in per_block),
        block_trainable_bytes=tuple(b.trainable_bytes for b in per_block),
        block_activation_bytes=tuple(b.activation_bytes for b in per_block),
        block_workspace_bytes=tuple(b.workspace_bytes for b in per_block),
        block_forward_flops=tuple(b.forward_flops for b in per_block),
        block_backward_flops=tuple(b.backward_flops for b in per_block),
        block_compact_weights=tuple(b.compact_weights for b in per_block),
        heap_bytes=HEAP_SLACK_BYTES,
        heap_room_share=HEAP_ROOM_SHARE,
        cut_bytes=float(config.hidden_size * 4),
        head_end=EndCost(*_param_bytes(head_modules), 0.0, 0.0, 0.0),
        tail_end=_tail_cost(parts, peft_model.config, seq_len, exclude=head_modules),
        scored_end=_scored_cost(parts, peft_model.config, seq_len))


def _distinct_blocks(parts: DecoderParts) -> list[int]:
    """Index of the first block of each distinct kind (usually just block 0; Gemma-3: one per attention type)."""
    kinds = block_kinds(parts)
    return [kinds.index(k) for k in range(max(kinds) + 1)]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters, and compact weights (buffers)."""
    return [*module.parameters(), *compact_weights(module)]


def _compact_linear_weights(modules: list[nn.Module]) -> int:
    """Weight elements of the compact linear layers in modules (each dequantized on every pass)."""
    layers = {id(m): m for module in modules for m in module.modules() if isinstance(m, CompactLinear)}
    return sum(m.in_features * m.out_features for m in layers.values())


def _param_bytes(modules: list[nn.Module], exclude: list[nn.Module] = ()) -> tuple[int, int]:
    """(bytes of the distinct parameters and buffers of the modules, trainable bytes with their training state)."""
    excluded = {id(t) for m in exclude for t in _tensors(m)}
    tensors = {id(t): t for m in modules for t in _tensors(m) if id(t) not in excluded}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = sum(t.numel() * t.element_size() for t in tensors.values() if t.requires_grad)
    return total, trainable * TRAINABLE_COPIES


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors allocated under this mode that are still alive, and their peak.

    A storage counts from the op that creates it until it is freed (views and in-place results share
    their input's storage and are not counted again); tensors made before the mode (parameters, the
    traced input) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in inputs and key not in self.live:
                self.live[key] = storage.nbytes()
                self.now += self.live[key]
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def _trace(forward, inputs: torch.Tensor, params: set[int]) -> tuple[float, float, float, float]:
    """(forward FLOPs, backward FLOPs, bytes saved for backward except parameters, peak bytes live)
    of one call, forward and backward."""
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(tensor) not in params and id(base) not in params:
            saved[id(base)] = base  # views of one tensor share its memory
        return tensor

    with _LiveBytes() as live, FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward(inputs)
        forward_flops = counter.get_total_flops()
        saved_bytes = sum(t.untyped_storage().nbytes() for t in saved.values())
        saved.clear()  # from here on only the graph keeps them, and backward frees them
        output.backward(torch.ones_like(output))
        del output
        backward_flops = counter.get_total_flops() - forward_flops
    return float(forward_flops), float(backward_flops), float(saved_bytes), float(live.peak)


def _block_cost(parts: DecoderParts, config: PreTrainedConfig, index: int, seq_len: int) -> EndCost:
    block = parts.blocks[index]
    stage = StageModule(parts, config, (index, index + 1), "middle")
    hidden = torch.empty(1, seq_len, parts.embed.embedding_dim, device="meta", requires_grad=True)
    forward_flops, backward_flops, saved, peak = _trace(stage, hidden, {id(t) for t in _tensors(block)})
    param_bytes, trainable_bytes = _param_bytes([block])
    return EndCost(param_bytes, trainable_bytes, saved / seq_len, forward_flops / seq_len,
                   backward_flops / seq_len, max(peak - saved, 0.0) / seq_len, _compact_linear_weights([block]))


def _tail_cost(parts: DecoderParts, config: PreTrainedConfig, seq_len: int, exclude: list[nn.Module]) -> EndCost:
    """The final norm over every position; the parameters of the norm and the LM head."""
    hidden = torch.empty(1, seq_len, parts.embed.embedding_dim, device="meta", requires_grad=True)
    modules = [parts.final_norm, parts.head]
    tail = StageModule(parts, config, (len(parts.blocks), len(parts.blocks)), "tail")
    forward_flops, backward_flops, saved, peak = _trace(tail.normed_hidden, hidden,
                                                        {id(t) for m in modules for t in _tensors(m)})
    param_bytes, trainable_bytes = _param_bytes(modules, exclude)
    return EndCost(param_bytes, trainable_bytes, saved / seq_len, forward_flops / seq_len,
                   backward_flops / seq_len, max(peak - saved, 0.0) / seq_len)


def _scored_cost(parts: DecoderParts, config: PreTrainedConfig, rows: int) -> EndCost:
    """LM head and loss per scored position, traced on rows normed hidden states [N, d] as the tail runs them."""
    normed = torch.empty(rows, parts.embed.embedding_dim, device="meta", requires_grad=True)  # [N, d]
    targets = torch.zeros(rows, dtype=torch.long, device="meta")
    tail = StageModule(parts, config, (len(parts.blocks), len(parts.blocks)), "tail")
    forward_flops, backward_flops, saved, peak = _trace(lambda x: rows_loss_sum(x, targets, tail.logits), normed,
                                                        {id(t) for t in _tensors(parts.head)})
    return EndCost(0, 0, saved / rows, forward_flops / rows, backward_flops / rows, max(peak - saved, 0.0) / rows,
                   _compact_linear_weights([parts.head]))  # dequantized once per pass, however many rows
