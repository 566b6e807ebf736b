"""Held-out evaluation on the data owner: completion loss, and accuracy when completions are labels.

When a file's completions come from a small set (e.g. " positive"/" negative"/" neutral"), each
prompt is classified by the label whose tokens the model finds most likely.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_runtime.data.dataset import Record, encode_record
from edge_runtime.models.stage import IGNORE_INDEX, token_loss_sum
from edge_runtime.models.tokenizer import Tokenizer

MAX_LABELS = 10


@dataclass(frozen=True, slots=True)
class EvalResult:
    loss: float
    """Mean next-token loss over completion tokens."""
    accuracy: float | None
    """Share of prompts whose most likely label is the right one (None if completions are free text)."""
    examples: int
    """Records evaluated."""


def label_set(records: list[Record]) -> list[str] | None:
    labels = sorted({r.completion for r in records})
    return labels if len(labels) <= MAX_LABELS and all(r.prompt for r in records) else None


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer: Tokenizer, records: list[Record], seq_len: int,
             records_per_batch: int = 8) -> EvalResult:
    labels = label_set(records)
    loss_sum, scored, correct = 0.0, 0, 0
    for start in range(0, len(records), records_per_batch):
        chunk = records[start:start + records_per_batch]
        candidates = [labels if labels else [r.completion] for r in chunk]
        # One forward for every (record, candidate) row: right padding keeps each row's causal logits exact.
        ids, targets = _batch([Record(r.prompt, c) for r, cs in zip(chunk, candidates) for c in cs], tokenizer, seq_len)
        logits = model(input_ids=ids).logits  # [rows, T, V]
        row = 0
        for record, options in zip(chunk, candidates):
            per_option = torch.stack([token_loss_sum(logits[i:i + 1], targets[i:i + 1])
                                      for i in range(row, row + len(options))])
            truth = options.index(record.completion)
            loss_sum += float(per_option[truth])
            scored += int((targets[row + truth, 1:] != IGNORE_INDEX).sum())
            correct += int(int(per_option.argmin()) == truth)
            row += len(options)
    return EvalResult(loss_sum / max(scored, 1), correct / len(records) if labels else None, len(records))


def _batch(records: list[Record], tokenizer: Tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = [encode_record(r, tokenizer, seq_len) for r in records]
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(records), width), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long)
    for row, (token_ids, token_labels) in enumerate(encoded):
        ids[row, :len(token_ids)] = torch.tensor(token_ids)
        targets[row, :len(token_labels)] = torch.tensor(token_labels)
    return ids, targets


@torch.no_grad()
def greedy_completion(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    ids = tokenizer.encode(prompt)
    for _ in range(max_new_tokens):
        next_id = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if next_id == tokenizer.eos_token_id:
            break
        ids.append(next_id)
    return tokenizer.decode(ids[len(tokenizer.encode(prompt)):])
