"""Find the parts of a Hugging Face decoder-only causal LM by structure, not by a table of names.

Every supported model has: a token embedding, optionally a learned absolute position embedding
(GPT-2), optionally a rotary embedding module (LLaMA family), one ModuleList of identical blocks,
a final norm after the blocks, and an output head.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from edge_runtime.models.quantization import CompactEmbedding


class UnsupportedModelError(ValueError):
    """The model does not have the decoder-only structure ringtune slices."""


@dataclass(frozen=True, slots=True)
class DecoderParts:
    decoder: nn.Module
    """The inner decoder (e.g. ``LlamaModel``, ``GPT2Model``)."""
    embed: nn.Embedding
    """Token embedding."""
    position_embed: nn.Embedding | None
    """Learned absolute position embedding, added on the head stage (GPT-2); None with rotary."""
    rotary: nn.Module | None
    """Rotary embedding module: ``rotary(hidden, position_ids) -> (cos, sin)``; every stage needs it."""
    blocks: nn.ModuleList
    """The transformer blocks, sliced into stages by half-open ranges."""
    blocks_path: str
    """Dotted name of the block list inside the causal LM (for LoRA key names)."""
    final_norm: nn.Module
    """Norm applied after the last block (tail stage)."""
    head: nn.Module
    """Output projection to the vocabulary (tail stage)."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def find_parts(model: nn.Module) -> DecoderParts:
    """Locate embedding, blocks, final norm and head of a causal LM (plain or peft-wrapped)."""
    causal_lm = _unwrap(model)
    head = causal_lm.get_output_embeddings()
    embed = causal_lm.get_input_embeddings()
    num_layers = causal_lm.config.num_hidden_layers
    blocks_path, blocks = _find_block_list(causal_lm, num_layers)
    decoder = causal_lm.get_submodule(blocks_path.rsplit(".", 1)[0]) if "." in blocks_path else causal_lm
    rotary = next((m for n, m in decoder.named_children() if "rotary" in type(m).__name__.lower()), None)
    position_embed = next(
        (m for _, m in decoder.named_children() if isinstance(m, (nn.Embedding, CompactEmbedding)) and m is not embed),
        None)
    norms = [m for _, m in decoder.named_children() if _is_norm(m)]
    if head is None or embed is None or len(norms) != 1:
        raise UnsupportedModelError(
            f"{type(causal_lm).__name__} is not a decoder-only causal LM with one embedding, one block "
            f"list, one final norm and an LM head; ringtune supports LLaMA-family and GPT-2 models")
    return DecoderParts(decoder, embed, position_embed, rotary, blocks, blocks_path, norms[0], head)


def _find_block_list(causal_lm: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = [(name, m) for name, m in causal_lm.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(candidates) != 1:
        raise UnsupportedModelError(
            f"expected one list of {num_layers} blocks in {type(causal_lm).__name__}, "
            f"found {[n for n, _ in candidates]}")
    return candidates[0]
