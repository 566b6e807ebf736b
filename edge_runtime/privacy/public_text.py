"""Public text for training inversion attacks: never the owner's private data.

Python's own documentation (``pydoc_data.topics``, shipped with every CPython) is English prose and
code available offline on any machine, so the attacker's training text is reproducible and disjoint
from any user data.
"""
from __future__ import annotations

import torch

from edge_runtime.models.tokenizer import Tokenizer


def public_token_batches(tokenizer: Tokenizer, sequences: int, seq_len: int) -> torch.Tensor:
    """[sequences, seq_len] token ids cut from the Python documentation."""
    from pydoc_data.topics import topics

    ids: list[int] = []
    for name in sorted(topics):
        ids += tokenizer.encode(topics[name])
        if len(ids) >= sequences * seq_len:
            break
    if len(ids) < sequences * seq_len:
        raise ValueError(f"the public text has only {len(ids)} tokens; ask for fewer than {sequences} sequences")
    return torch.tensor(ids[:sequences * seq_len]).view(sequences, seq_len)
