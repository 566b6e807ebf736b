"""The owner's private data: JSONL read, tokenized and batched on the owner, never sent anywhere.

Records are ``{"text": ...}`` (every token scored) or ``{"prompt": ..., "completion": ...}``
(only completion tokens scored). Sequences are right-padded to ``seq_len``.

With ``hide_labels`` (privacy presets, ``--privacy ...,hide_labels=1``) a prompt/completion record is
the prompt alone as input and its one-token completion as the only label, scored at the prompt's last
position: teacher forcing would feed the completion (the label) as an input token, and the hidden
states of its positions would leave the owner. Under causal attention nothing sent then depends on
the label, and the prompt's last position still learns to predict it. Plain text records (every token
both input and target) are encoded as without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_runtime.models.stage import IGNORE_INDEX, scored_tokens
from edge_runtime.models.tokenizer import Tokenizer


class DataError(ValueError):
    """The data file is missing or malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Record:
    prompt: str
    """Context that is not scored (empty for plain text)."""
    completion: str
    """Text whose tokens are scored."""


@dataclass(frozen=True, slots=True)
class StepBatch:
    input_ids: list[torch.Tensor]
    """Per micro-batch token ids [B, T]."""
    labels: list[torch.Tensor]
    """Per micro-batch labels [B, T]; IGNORE_INDEX where not scored."""
    scored_tokens: int
    """Positions scored in the whole step (the loss is their mean)."""
    tokens: int
    """Non-pad tokens in the step (for throughput)."""


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                records.append(_parse_record(line, path, number))
    if not records:
        raise DataError(f"data file {path} has no records; expected JSON lines with 'text' or 'prompt'/'completion'")
    return records


def _parse_record(line: str, path: Path, number: int) -> Record:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    if isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"]:
        return Record("", item["text"])
    if (isinstance(item, dict) and isinstance(item.get("prompt"), str)
            and isinstance(item.get("completion"), str) and item["completion"]):
        return Record(item["prompt"], item["completion"])
    raise DataError(f"{path}:{number}: expected an object with a non-empty 'text', or 'prompt' and a "
                    f"non-empty 'completion' (strings)")


def encode_record(record: Record, tokenizer: Tokenizer, seq_len: int,
                  hide_labels: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record, at most seq_len long; the prompt is cut from the left. With
    hide_labels and a prompt, the ids are the prompt alone and the labels one longer (the completion's
    token after it)."""
    if hide_labels and record.prompt:
        return _label_hidden(record, tokenizer, seq_len)
    completion = (tokenizer.encode(record.completion) + [tokenizer.eos_token_id])[:seq_len]
    prompt = tokenizer.encode(record.prompt) if record.prompt else []
    room = seq_len - len(completion)
    prompt = prompt[-room:] if room > 0 else []  # the prompt's last `room` tokens (all of a shorter one)
    ids = prompt + completion
    labels = [IGNORE_INDEX] * len(prompt) + completion
    return ids, labels


def _label_hidden(record: Record, tokenizer: Tokenizer, seq_len: int) -> tuple[list[int], list[int]]:
    """The prompt's last seq_len - 1 tokens as input; the completion's one token as the label after them."""
    completion = tokenizer.encode(record.completion)
    if len(completion) != 1:
        raise DataError(f"completion {record.completion!r} is {len(completion)} tokens: with hidden labels "
                        f"(a --privacy preset or hide_labels=1) each completion must be one token, the label "
                        f"predicted from the prompt, since no completion token may be fed to the model; map the "
                        f"labels to one-token words (e.g. ' positive'), or train without hidden labels (labels "
                        f"are then readable from what the owner sends: README, threat model)")
    prompt = tokenizer.encode(record.prompt)[-(seq_len - 1):]
    return prompt, [IGNORE_INDEX] * len(prompt) + completion


def pad_records(records: list[Record], tokenizer: Tokenizer, seq_len: int, to_longest: bool = False,
                hide_labels: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids and labels [n, W] and each record's input length [n], from encode_record.

    W is seq_len, or with ``to_longest`` the longest record's labels (evaluation batches). Right
    padding plus a causal mask keeps every real position's logits exact."""
    encoded = [encode_record(record, tokenizer, seq_len, hide_labels) for record in records]
    lengths = torch.tensor([len(token_ids) for token_ids, _ in encoded], dtype=torch.long)
    width = max(len(token_labels) for _, token_labels in encoded) if to_longest and encoded else seq_len
    ids = torch.full((len(records), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE_INDEX, dtype=torch.long)
    for row, (token_ids, token_labels) in enumerate(encoded):
        ids[row, :len(token_ids)] = torch.tensor(token_ids)
        labels[row, :len(token_labels)] = torch.tensor(token_labels)
    return ids, labels, lengths


def scored_share(records: list[Record], tokenizer: Tokenizer, seq_len: int) -> float:
    """Share of the positions of the padded sequences [N, seq_len] whose next token the loss scores: what
    the owner tells the planner (one number about its data) so it prices the tail's LM head and loss."""
    _, labels, _ = pad_records(records, tokenizer, seq_len)
    return max(scored_tokens(labels), 1) / labels.numel()


def common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading token ids every sequence shares (0 without sequences)."""
    if not sequences:
        return 0
    first, length = sequences[0], min(len(s) for s in sequences)
    for other in sequences[1:]:
        length = next((i for i, (a, b) in enumerate(zip(first[:length], other)) if a != b), length)
    return length


class OwnerData:
    """Deterministic micro-batches: epoch e visits records in a permutation seeded by (seed, e); hide_labels
    as in encode_record."""

    def __init__(self, records: list[Record], tokenizer: Tokenizer, micro_batch_size: int, seq_len: int,
                 micro_batches: int, seed: int, hide_labels: bool = False) -> None:
        if seq_len < 2:
            raise DataError(f"--seq-len must be at least 2, got {seq_len}")
        self._ids, self._labels, self._lengths = pad_records(records, tokenizer, seq_len, hide_labels=hide_labels)
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.micro_batches = micro_batches
        self.seed = seed
        self._permutations: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self._ids.shape[0]

    def step_batch(self, step: int) -> StepBatch:
        rows = self._rows(step * self.micro_batches * self.micro_batch_size,
                          self.micro_batches * self.micro_batch_size)
        ids = [self._ids[chunk] for chunk in rows.split(self.micro_batch_size)]
        labels = [self._labels[chunk] for chunk in rows.split(self.micro_batch_size)]
        scored = sum(scored_tokens(mb) for mb in labels)
        if scored == 0:
            raise DataError(f"step {step} has no scored tokens: completions are empty or cut off; "
                            f"raise --seq-len")
        return StepBatch(ids, labels, scored, int(self._lengths[rows].sum()))

    def _rows(self, start: int, count: int) -> torch.Tensor:
        positions = torch.arange(start, start + count)
        epochs, offsets = positions // len(self), positions % len(self)
        return torch.stack([self._permutation(int(e))[int(o)] for e, o in zip(epochs, offsets)])

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations[epoch] = torch.randperm(len(self), generator=generator)
        return self._permutations[epoch]
