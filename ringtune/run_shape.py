"""The run shape: what one optimizer step processes, and how; one definition for the planner, the
exporters and the runtimes.

ExecuTorch programs have fixed tensor shapes: the exporters and the runtimes read the micro-batch's
(B, T) only; the planner reads all of it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ringtune.plan import Schedule
from ringtune.privacy_spec import PrivacySpec
from ringtune.wire import WireSpec


@dataclass(frozen=True, slots=True)
class RunShape:
    """What one optimizer step processes, and how."""
    micro_batch_size: int = 2
    """Sequences per micro-batch (B)."""
    seq_len: int = 64
    """Tokens per sequence (T); shorter sequences are right-padded to it."""
    micro_batches: int = 4
    """Micro-batches per optimizer step (M)."""
    schedule: Schedule = "1f1b"
    """Pipeline schedule: 1f1b (S - s micro-batches in flight on stage s) or gpipe (all M)."""
    min_owner_blocks: int = 1
    """Blocks the owner keeps at each end (its head and its tail), so raw embeddings never leave it."""
    scored_share: float = 1.0
    """Share of the positions the loss scores (the owner reports it from its data: 1 for plain text, a few
    percent for short labels). The tail runs the LM head and the loss only there."""
    wire: WireSpec = WireSpec()
    """Codecs of the frames: a link carries the hidden state's and the gradient's encoded bytes."""
    privacy: PrivacySpec = PrivacySpec()
    """The owner's privatization. The planner reads which stages train (PrivacySpec.trains): when the owner
    withholds gradients (--grad-privacy withhold, --privacy strong) the stages before its tail run forward only,
    keep nothing for a backward and get no gradient back; the plan records it (Plan.privacy)."""

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len
