"""One stage of a sliced decoder: a half-open block range, plus the model's ends on the owner."""
from __future__ import annotations

import torch
from torch import nn

from edge_runtime.models.structure import ATTENTION_MASKS, DecoderParts, find_parts
from ringtune.plan import Role

IGNORE_INDEX = -100


class StageModule(nn.Module):
    """Blocks [start, end) of a (peft-wrapped) causal LM; head/full stages also embed, tail/full
    stages also apply the final norm and the LM head.

    Every stage rebuilds position ids, the rotary embeddings and the causal (or sliding-window)
    masks of its blocks' attention types locally from the sequence length, so only hidden states
    travel between stages. Sequences are right-padded: under a causal mask no real token attends
    to a pad, so no padding mask is needed.
    """

    def __init__(self, parts: DecoderParts, config, layers: tuple[int, int], role: Role) -> None:
        super().__init__()
        self.role = role
        self.layers = layers
        self.config = config
        self.blocks = nn.ModuleList(parts.blocks[layers[0]:layers[1]])
        self.attention_types = parts.attention_types[layers[0]:layers[1]]
        self.rotary = parts.rotary
        self.rotary_takes_type = parts.rotary_takes_type
        self.logit_softcap = parts.logit_softcap
        embeds = role in ("head", "full")
        self.embed = parts.embed if embeds else None
        self.position_embed = parts.position_embed if embeds else None
        ends = role in ("tail", "full")
        self.final_norm = parts.final_norm if ends else None
        self.head = parts.head if ends else None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs: token ids [B, T] (head/full) or hidden [B, T, d]; returns hidden [B, T, d] or
        logits [B, T, V] (tail/full)."""
        hidden = self._blocks_forward(inputs)
        if self.head is not None:
            return self.logits(self.final_norm(hidden))
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on normed hidden states [..., d] -> [..., V], soft-capped where the model caps."""
        logits = self.head(hidden)
        if self.logit_softcap is None:
            return logits
        return torch.tanh(logits / self.logit_softcap) * self.logit_softcap

    def loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token loss (tail/full). The LM head runs only where a label is scored: on
        prompt/completion data that is a few positions per sequence, and the head is the largest
        matmul of a small model."""
        return self.scored_loss_sum(self.normed_hidden(inputs), labels)

    def normed_hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """The final norm's output [B, T, d] (tail/full): what the LM head reads."""
        return self.final_norm(self._blocks_forward(inputs))

    def scored_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token loss from the normed hidden [B, T, d] (tail/full)."""
        targets = labels[:, 1:]  # [B, T-1]
        scored = targets != IGNORE_INDEX
        return rows_loss_sum(hidden[:, :-1][scored], targets[scored], self.logits)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding (head/full): token ids [B, T] -> hidden [B, T, d]."""
        hidden = self.embed(ids)
        if self.position_embed is not None:
            hidden = hidden + self.position_embed(torch.arange(ids.shape[1], device=ids.device).unsqueeze(0))
        return hidden

    def _blocks_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        seq_len = inputs.shape[1]
        position_ids = torch.arange(seq_len, device=inputs.device).unsqueeze(0)  # [1, T]
        hidden = self.embed_tokens(inputs) if self.embed is not None else inputs
        per_type = {kind: self._block_inputs(kind, hidden, position_ids) for kind in set(self.attention_types)}
        for block, kind in zip(self.blocks, self.attention_types):
            out = block(hidden, **per_type[kind])
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _block_inputs(self, kind: str, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """What a block of attention type `kind` takes besides the hidden state [B, T, d]: position
        ids [1, T], the rotary's (cos, sin) [1, T, head_dim] and the mask (None where attention is
        causal by itself)."""
        inputs = {"position_ids": position_ids}
        if self.rotary is not None:
            extra = (kind,) if self.rotary_takes_type else ()
            inputs["position_embeddings"] = self.rotary(hidden, position_ids, *extra)
        # No position ids for the mask: they are 0..T-1 in every sequence (nothing is packed), and
        # without them the mask needs no tensor values, so the cost table traces it on meta tensors.
        inputs["attention_mask"] = ATTENTION_MASKS[kind](
            config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None, position_ids=None)
        return inputs


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over scored positions. logits [B, T, V], labels [B, T]."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # [B*(T-1), V]
    shifted_labels = labels[:, 1:].reshape(-1)  # [B*(T-1)]
    return nn.functional.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX,
                                       reduction="sum")


def rows_loss_sum(rows: torch.Tensor, targets: torch.Tensor, to_logits) -> torch.Tensor:
    """Summed cross-entropy of scored rows [N, d] (normed hidden states) against their next tokens [N]:
    the tail's LM head and loss, which the cost table prices per scored position."""
    logits = to_logits(rows)  # [N, V]
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def scored_tokens(labels: torch.Tensor) -> int:
    """Number of positions the loss scores (the next token is not ignored)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def build_stage(peft_model: nn.Module, layers: tuple[int, int], role: Role) -> tuple[StageModule, dict[str, nn.Parameter]]:
    """The stage module and its trainable LoRA tensors by full peft name (ordered by name)."""
    stage = StageModule(find_parts(peft_model), peft_model.config, layers, role)
    return stage, stage_lora(peft_model, stage)


def stage_lora(peft_model: nn.Module, stage: StageModule) -> dict[str, nn.Parameter]:
    """The stage's trainable tensors by their full name in the peft model."""
    stage_params = {id(p) for p in stage.parameters()}
    return {name: p for name, p in sorted(peft_model.named_parameters())
            if p.requires_grad and id(p) in stage_params}
