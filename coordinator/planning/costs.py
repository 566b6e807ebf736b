"""The model cost table as plain data (no torch): what the partitioner prices and the cache stores.

``cost_table.py`` traces it from a config; ``table_cache.py`` keeps traced tables on disk.
"""
from __future__ import annotations

from dataclasses import dataclass


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
    """Bytes per token of the hidden state that crosses a cut (the same for its gradient)."""
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

    @property
    def num_blocks(self) -> int:
        return len(self.block_param_bytes)
