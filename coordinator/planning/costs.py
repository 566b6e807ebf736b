"""The model cost table as plain data (no torch): what the partitioner prices and the cache stores.

``cost_table.py`` traces it from a config; ``table_cache.py`` keeps traced tables on disk.

Time is priced in fp32 matmul FLOPs (a device's GFLOP/s turns them into seconds): a part's matmuls, plus,
for frozen weights stored compactly, their dequantization in FLOP equivalents (``DEQUANTIZE_FLOPS``).
"""
from __future__ import annotations

from dataclasses import dataclass

DEQUANTIZE_FLOPS = {"fp32": 0.0, "bf16": 6.0, "int8": 5.5, "int4": 500.0}
"""What one pass (a forward, or a backward) over one compactly stored frozen weight element costs on top of
the fp32 matmul, in fp32 matmul FLOPs: each pass dequantizes every weight tile by tile (CompactWeight.tiles).
Derived from benchmarks/base_dtype.py (one thread, x86, three runs on 2026-11-26, benchmarks/README.md):
(block time at the dtype / at fp32 - 1) x the block's FLOPs / (2 x its compact weights), at 1 x 32
tokens, where dequantizing weighs most against the matmuls (at 4 x 64 it drowns in the machine's noise);
SmolLM2's and a 1B-class block gave bf16 0.3-17 (median 6.4), int8 1.6-9.7 (5.6), int4 456-659 (529,
its nibbles unpacked through an index lookup): about their medians.
bf16 weights are upcast to fp32 tiles and multiplied in fp32 like the others (never by bf16 instructions,
which Raspberry Pis lack), so no x86 bf16 speed-up enters any device's price. Devices whose
blocks are timed at the chosen dtype (agents calibrate) are priced by that measurement instead."""


def dequantize_flops(base_dtype: str, compact_weights: int, trains: bool = True) -> float:
    """FLOP equivalent of dequantizing compact_weights elements for one forward and one backward (for one
    forward when the stage does not train)."""
    return (1 + trains) * DEQUANTIZE_FLOPS[base_dtype] * compact_weights


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
    workspace_bytes: float = 0.0
    """Bytes per token live at the peak of one forward + backward beyond those kept for backward
    (gradients on their way through, temporaries of the largest op)."""
    compact_weights: int = 0
    """Frozen linear weight elements stored compactly (dequantized on every forward and backward); an
    embedding's are not counted (a lookup dequantizes only the rows it reads)."""


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
    block_workspace_bytes: tuple[float, ...]
    """Transient bytes per token of each block's forward + backward beyond what it keeps."""
    block_forward_flops: tuple[float, ...]
    """Forward FLOPs per token of each block."""
    block_backward_flops: tuple[float, ...]
    """Backward FLOPs per token of each block (input gradients + LoRA gradients)."""
    cut_bytes: float
    """Bytes per token of the hidden state that crosses a cut (the same for its gradient), in fp32."""
    head_end: EndCost
    """Embedding (and learned position embedding) on the owner's first stage."""
    tail_end: EndCost
    """Final norm on the owner's last stage, per token; its parameters include the LM head's."""
    scored_end: EndCost
    """LM head and loss per scored position: the tail runs them only where a label is scored
    (``StageModule.scored_loss_sum``), so the compute model prices them by the data's share of scored
    positions (the memory model by every position: a micro-batch may score them all)."""
    base_dtype: str = "fp32"
    """Storage dtype of the frozen base weights the table prices (fp32, bf16, int8, int4)."""
    block_compact_weights: tuple[int, ...] = ()
    """Frozen linear weight elements of each block stored compactly (none at fp32; empty: none)."""
    heap_bytes: int = 0
    """Freed memory an agent's heap keeps between trims, once per device (the runtime's HEAP_SLACK_BYTES)."""
    heap_room_share: float = 0.0
    """Freed memory an agent's heap may keep beyond that, as a share of its activations in flight, where its device
    has the room (the runtime's HEAP_ROOM_SHARE); fitting never counts on it."""

    @property
    def hidden_size(self) -> int:
        """Width of the hidden state that crosses a cut (a wire codec's bytes per token follow from it)."""
        return round(self.cut_bytes / 4)

    @property
    def num_blocks(self) -> int:
        return len(self.block_param_bytes)

    def block_flops(self, tokens: int, trains: bool = True) -> list[float]:
        """Priced FLOPs of each block's forward + backward of a micro-batch of tokens (matmuls + dequantization);
        its forward only in a stage that does not train (PrivacySpec.trains)."""
        compact = self.block_compact_weights or (0,) * self.num_blocks
        return [(f + b * trains) * tokens + dequantize_flops(self.base_dtype, w, trains)
                for f, b, w in zip(self.block_forward_flops, self.block_backward_flops, compact)]

    def end_flops(self, end: EndCost, tokens: float, trains: bool = True) -> float:
        """Priced FLOPs of one of the owner's ends (head_end, tail_end, or scored_end for the scored positions)
        for a micro-batch of tokens; its forward only in a stage that does not train."""
        return ((end.forward_flops + end.backward_flops * trains) * tokens
                + dequantize_flops(self.base_dtype, end.compact_weights, trains))
