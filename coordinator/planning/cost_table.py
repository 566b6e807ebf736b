"""Model cost table: memory and FLOPs of every block and of the owner's two ends, from a config.

Nothing is loaded: the model is built on the meta device, wrapped with LoRA as in training, and
one block of each distinct structure is traced forward and backward on meta tensors. Torch's
FlopCounterMode counts the FLOPs and a saved-tensors hook sees every tensor autograd keeps for
backward, so the numbers follow the real modules (LLaMA family, GPT-2, ...) instead of formulas.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from edge_runtime.models.lora import LoraSpec, apply_lora
from edge_runtime.models.quantization import compact_model
from edge_runtime.models.registry import load_config
from edge_runtime.models.stage import token_loss_sum
from edge_runtime.models.structure import DecoderParts, find_parts

# A trainable fp32 tensor costs itself, its gradient and AdamW's two moments.
TRAINABLE_COPIES = 4


class ModelConfigError(ValueError):
    """The model config file cannot be read; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class EndCost:
    """Cost of one part of the model: a block, or one of the owner's ends (embedding; norm + LM head + loss)."""
    param_bytes: int
    """Frozen and trainable parameter bytes (a tied embedding is counted on the head end only)."""
    trainable_bytes: int
    """LoRA tensors + their gradients + AdamW state."""
    activation_bytes: float
    """Bytes kept for backward per token."""
    forward_flops: float
    """Forward FLOPs per token."""
    backward_flops: float
    """Backward FLOPs per token."""


@dataclass(frozen=True, slots=True)
class CostTable:
    """Per-block and per-end costs of one model under one LoRA spec, at one sequence length."""
    model: str
    """Model name or path, as the plan records it."""
    seq_len: int
    """Sequence length the per-token numbers were traced at (attention grows with it)."""
    block_param_bytes: tuple[int, ...]
    """Parameter bytes of each block (frozen base weights + LoRA)."""
    block_trainable_bytes: tuple[int, ...]
    """LoRA tensors + gradients + AdamW state of each block."""
    block_activation_bytes: tuple[float, ...]
    """Bytes each block keeps for backward, per token of a micro-batch."""
    block_forward_flops: tuple[float, ...]
    """Forward FLOPs per token of each block."""
    block_backward_flops: tuple[float, ...]
    """Backward FLOPs per token of each block (input gradients + LoRA gradients)."""
    cut_bytes: float
    """Bytes per token of the hidden state that crosses a cut (the same for its gradient)."""
    head_end: EndCost
    """Embedding (and learned position embedding) on the owner's first stage."""
    tail_end: EndCost
    """Final norm, LM head and loss on the owner's last stage."""
    base_dtype: str = "fp32"
    """Storage dtype of the frozen base weights the table prices (fp32, bf16, int8, int4)."""

    @property
    def num_blocks(self) -> int:
        return len(self.block_param_bytes)


def config_from_file(path: str | Path) -> PreTrainedConfig:
    """A Hugging Face config from a config.json file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise ModelConfigError(f"cannot read the model config {path} ({error!r}): give a Hugging Face "
                               f"config.json with a model_type") from None


def model_cost_table(model: str | PreTrainedConfig, lora: LoraSpec = LoraSpec(), seq_len: int = 64,
                     name: str | None = None, base_dtype: str = "fp32") -> CostTable:
    """The cost table of a built-in model name, a local model directory, or a config, with its frozen
    weights stored as base_dtype (compact layers as on the devices: their bytes are priced as stored;
    their FLOPs are those of the fp32 matmuls they compute with)."""
    config = load_config(model) if isinstance(model, str) else model
    name = name or (model if isinstance(model, str) else config.name_or_path or config.model_type)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers API
        causal_lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        peft_model = apply_lora(causal_lm, lora)
        compact_model(peft_model, base_dtype)
    parts = find_parts(peft_model)
    blocks = [_block_cost(parts, i, seq_len) for i in _distinct_blocks(parts.blocks)]
    per_block = [blocks[j] for j in _block_kinds(parts.blocks)]
    head_modules = [parts.embed] + ([parts.position_embed] if parts.position_embed is not None else [])
    return CostTable(
        model=name, base_dtype=base_dtype, seq_len=seq_len,
        block_param_bytes=tuple(b.param_bytes for b in per_block),
        block_trainable_bytes=tuple(b.trainable_bytes for b in per_block),
        block_activation_bytes=tuple(b.activation_bytes for b in per_block),
        block_forward_flops=tuple(b.forward_flops for b in per_block),
        block_backward_flops=tuple(b.backward_flops for b in per_block),
        cut_bytes=float(config.hidden_size * 4),
        head_end=EndCost(*_param_bytes(head_modules), 0.0, 0.0, 0.0),
        tail_end=_tail_cost(parts, seq_len, exclude=head_modules))


def _signature(block: nn.Module) -> tuple:
    return type(block).__name__, tuple((n, tuple(t.shape), t.dtype) for n, t in
                                       (*block.named_parameters(), *block.named_buffers()))


def _block_kinds(blocks: nn.ModuleList) -> list[int]:
    """For each block, the index (into the distinct kinds) of its structure."""
    signatures: list[tuple] = []
    kinds = []
    for block in blocks:
        signature = _signature(block)
        if signature not in signatures:
            signatures.append(signature)
        kinds.append(signatures.index(signature))
    return kinds


def _distinct_blocks(blocks: nn.ModuleList) -> list[int]:
    """Index of the first block of each distinct structure (usually just block 0)."""
    kinds = _block_kinds(blocks)
    return [kinds.index(k) for k in range(max(kinds) + 1)]


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers: compact weights are buffers."""
    return [*module.parameters(), *module.buffers()]


def _param_bytes(modules: list[nn.Module], exclude: list[nn.Module] = ()) -> tuple[int, int]:
    """(bytes of the distinct parameters and buffers of the modules, trainable bytes with their training state)."""
    excluded = {id(t) for m in exclude for t in _tensors(m)}
    tensors = {id(t): t for m in modules for t in _tensors(m) if id(t) not in excluded}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    trainable = sum(t.numel() * t.element_size() for t in tensors.values() if t.requires_grad)
    return total, trainable * TRAINABLE_COPIES


def _trace(forward, inputs: torch.Tensor, params: set[int]) -> tuple[float, float, float]:
    """(forward FLOPs, backward FLOPs, bytes saved for backward except parameters) of one call."""
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        if id(tensor) not in params and id(base) not in params:
            saved[id(base)] = base  # views of one tensor share its memory
        return tensor

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward(inputs)
        forward_flops = counter.get_total_flops()
        output.backward(torch.ones_like(output))
        backward_flops = counter.get_total_flops() - forward_flops
    saved_bytes = sum(t.numel() * t.element_size() for t in saved.values())
    return float(forward_flops), float(backward_flops), float(saved_bytes)


def _block_cost(parts: DecoderParts, index: int, seq_len: int) -> EndCost:
    block = parts.blocks[index]
    hidden = torch.empty(1, seq_len, parts.embed.embedding_dim, device="meta", requires_grad=True)
    position_ids = torch.arange(seq_len, device="meta").unsqueeze(0)

    def forward(x: torch.Tensor) -> torch.Tensor:
        # No mask: the causal-mask helper reads tensor values, which meta tensors do not have;
        # attention without a mask is causal by default and costs the same.
        kwargs = {"position_ids": position_ids, "attention_mask": None}
        if parts.rotary is not None:
            kwargs["position_embeddings"] = parts.rotary(x, position_ids)
        out = block(x, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    forward_flops, backward_flops, saved = _trace(forward, hidden, {id(t) for t in _tensors(block)})
    param_bytes, trainable_bytes = _param_bytes([block])
    return EndCost(param_bytes, trainable_bytes, saved / seq_len, forward_flops / seq_len,
                   backward_flops / seq_len)


def _tail_cost(parts: DecoderParts, seq_len: int, exclude: list[nn.Module]) -> EndCost:
    hidden = torch.empty(1, seq_len, parts.embed.embedding_dim, device="meta", requires_grad=True)
    labels = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    modules = [parts.final_norm, parts.head]
    params = {id(t) for m in modules for t in _tensors(m)}
    forward_flops, backward_flops, saved = _trace(
        lambda x: token_loss_sum(parts.head(parts.final_norm(x)), labels), hidden, params)
    param_bytes, trainable_bytes = _param_bytes(modules, exclude)
    return EndCost(param_bytes, trainable_bytes, saved / seq_len, forward_flops / seq_len,
                   backward_flops / seq_len)
