"""Held-out evaluation on the data owner: completion loss, and accuracy when completions are labels.

When a file's completions come from a small set (e.g. " positive"/" negative"/" neutral"), each
prompt is classified by the label whose tokens the model finds most likely.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_runtime.data.dataset import Record, pad_records
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
             records_per_batch: int = 8, hide_labels: bool = False) -> EvalResult:
    """hide_labels: score each candidate's one token after the prompt alone, as a run that hid its labels
    trained it (edge_runtime.data.dataset)."""
    labels = label_set(records)
    loss_sum, scored, correct = 0.0, 0, 0
    for start in range(0, len(records), records_per_batch):
        chunk = records[start:start + records_per_batch]
        candidates = [labels if labels else [r.completion] for r in chunk]
        # One forward for every (record, candidate) row: right padding keeps each row's causal logits exact.
        ids, targets, _ = pad_records([Record(r.prompt, c) for r, cs in zip(chunk, candidates) for c in cs], tokenizer,
                                      seq_len, to_longest=True, hide_labels=hide_labels)
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


@torch.no_grad()
def greedy_completion(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """The model's greedy continuation of prompt (transformers' generate, with its KV cache)."""
    ids = torch.tensor([tokenizer.encode(prompt)])  # [1, P]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # [1, P + new]
    new = [int(i) for i in out[0, ids.shape[1]:]]
    return tokenizer.decode(new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new)
