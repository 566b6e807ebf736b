"""Find the parts of a Hugging Face decoder-only causal LM by structure, not by a table of names.

Every supported model has: a token embedding (which may scale its own output, as Gemma's does),
optionally a learned absolute position embedding (GPT-2), optionally a rotary embedding module
(LLaMA family; Gemma-3's takes the attention type, for its local and global bases), one ModuleList
of blocks, a final norm after the blocks, and an output head. Blocks attend causally, either over
the whole sequence or within a sliding window; a model may mix both (Gemma-3, Qwen2).
Anything else is refused with one line naming the model type and what is missing.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from edge_runtime.models.quantization import CompactEmbedding

SUPPORTED_FAMILIES = "LLaMA family (LLaMA, SmolLM2, Qwen2, Mistral), Gemma-3 text and GPT-2"
ATTENTION_MASKS = {"full_attention": create_causal_mask,
                   "sliding_attention": create_sliding_window_causal_mask}
"""The mask each attention type needs (Hugging Face's functions, so stages mask as the model does)."""

class UnsupportedModelError(ValueError):
    """The model does not have the decoder-only structure ringtune slices."""


@dataclass(frozen=True, slots=True)
class DecoderParts:
    decoder: nn.Module
    """The inner decoder (e.g. ``LlamaModel``, ``GPT2Model``)."""
    embed: nn.Embedding
    """Token embedding (including any scaling of its output: Gemma multiplies by sqrt(d))."""
    position_embed: nn.Embedding | None
    """Learned absolute position embedding, added on the head stage (GPT-2); None with rotary."""
    rotary: nn.Module | None
    """Rotary embedding module: ``rotary(hidden, position_ids[, attention_type]) -> (cos, sin)``;
    every stage needs it."""
    rotary_takes_type: bool
    """The rotary takes the block's attention type (Gemma-3: one base frequency per type)."""
    blocks: nn.ModuleList
    """The transformer blocks, sliced into stages by half-open ranges."""
    blocks_path: str
    """Dotted name of the block list inside the causal LM (for LoRA key names)."""
    attention_types: tuple[str, ...]
    """Each block's attention, a key of ATTENTION_MASKS (causal over the sequence or a sliding window)."""
    final_norm: nn.Module
    """Norm applied after the last block (tail stage)."""
    head: nn.Module
    """Output projection to the vocabulary (tail stage)."""
    logit_softcap: float | None
    """Logits become ``cap * tanh(logits / cap)`` after the head (Gemma's final_logit_softcapping)."""


def sliceable_meta_model(config: PreTrainedConfig) -> nn.Module:
    """The causal LM a config describes, on the meta device (structure and names, no memory), once
    its parts are found: a model ringtune cannot split is refused here, in one line."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError:  # transformers lists every causal LM class it knows, hundreds of them
        raise UnsupportedModelError(
            f"model type {config.model_type!r} ({type(config).__name__}) is not a causal LM transformers can "
            f"build; ringtune splits decoder-only causal LMs: {SUPPORTED_FAMILIES}") from None
    find_parts(model)
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def find_parts(model: nn.Module) -> DecoderParts:
    """Locate embedding, blocks, final norm and head of a causal LM (plain or peft-wrapped)."""
    causal_lm = _unwrap(model)
    config = causal_lm.config
    refuse = _refusal(causal_lm)
    embed, head = _ends(causal_lm)
    if embed is None or head is None:
        raise refuse("no input embedding and output head to put on the owner")
    num_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(num_layers, int):
        raise refuse("its config has no num_hidden_layers (a multimodal or encoder-decoder config), where a "
                     "text decoder's config is expected")
    blocks_path, blocks = _find_block_list(causal_lm, num_layers, refuse)
    decoder = causal_lm.get_submodule(blocks_path.rsplit(".", 1)[0]) if "." in blocks_path else causal_lm
    rotaries = [m for _, m in decoder.named_children() if "rotary" in type(m).__name__.lower()]
    if len(rotaries) > 1:
        raise refuse(f"{len(rotaries)} rotary embeddings beside the blocks, where one is expected")
    rotary = rotaries[0] if rotaries else None
    position_embed = next(
        (m for _, m in decoder.named_children() if isinstance(m, (nn.Embedding, CompactEmbedding)) and m is not embed),
        None)
    norms = [name for name, m in decoder.named_children() if _is_norm(m)]
    if len(norms) != 1:
        raise refuse(f"norms {norms} beside the blocks, where one final norm is expected" if norms
                     else "no final norm after the blocks")
    return DecoderParts(decoder, embed, position_embed, rotary,
                        rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters,
                        blocks, blocks_path, tuple(_attention_type(b, config, refuse) for b in blocks),
                        decoder.get_submodule(norms[0]), head, getattr(config, "final_logit_softcapping", None))


def _refusal(causal_lm: nn.Module):
    """A function making the one-line error for what this model lacks."""
    model_type = getattr(causal_lm.config, "model_type", "") or "?"

    def refuse(missing: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"model type {model_type!r} ({type(causal_lm).__name__}) cannot be split into stages: {missing}; "
            f"ringtune splits decoder-only causal LMs: {SUPPORTED_FAMILIES}")
    return refuse


def _ends(causal_lm: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input embedding, output head), None where the model has none."""
    try:
        return causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return None, None


def _find_block_list(causal_lm: nn.Module, num_layers: int, refuse) -> tuple[str, nn.ModuleList]:
    candidates = [(name, m) for name, m in causal_lm.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if len(candidates) != 1:
        raise refuse(f"{len(candidates)} lists of {num_layers} blocks "
                     f"({', '.join(n for n, _ in candidates) or 'none'}), where one is expected")
    return candidates[0]


def _attention_type(block: nn.Module, config, refuse) -> str:
    """The block's attention: the layer type its attention module declares (Gemma-3, Qwen2), else
    a sliding window when the config gives one for every layer (Mistral), else full causal."""
    declared = {m.layer_type for m in block.modules() if isinstance(getattr(m, "layer_type", None), str)}
    if any(getattr(m, "is_causal", True) is False for m in block.modules()):
        raise refuse("its blocks have attention that is not causal (bidirectional or cross-attention), "
                     "where causal self-attention is expected")
    if len(declared) > 1:
        raise refuse(f"a block declares several attention types {sorted(declared)}")
    kind = declared.pop() if declared else (
        "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention")
    if kind not in ATTENTION_MASKS:
        raise refuse(f"blocks with {kind!r} attention, where {' or '.join(map(repr, ATTENTION_MASKS))} is expected")
    return kind


def _block_signature(block: nn.Module, attention_type: str) -> tuple:
    return type(block).__name__, attention_type, tuple((n, tuple(t.shape), t.dtype) for n, t in
                                                       (*block.named_parameters(), *block.named_buffers()))


def block_kinds(parts: DecoderParts) -> list[int]:
    """For each block, the index (into the model's distinct structures, in order of first use) of its structure:
    its class, attention type and tensors' names, shapes and dtypes. Blocks of one structure compute the same
    function of their weights (LLaMA: one structure; Gemma-3: sliding and full attention)."""
    signatures: list[tuple] = []
    kinds = []
    for block, attention_type in zip(parts.blocks, parts.attention_types):
        signature = _block_signature(block, attention_type)
        if signature not in signatures:
            signatures.append(signature)
        kinds.append(signatures.index(signature))
    return kinds
