"""Attacks a curious middle device can run on what it receives, and their scores.

Token recovery from the hidden states leaving the owner's head (top-1 accuracy over real tokens):
- nearest neighbour: the closest row of the (public) input embedding table, by cosine;
- learned inverter: a linear decoder trained on public text's privatized hidden states to predict
  each token's input embedding (ridge regression, closed form), decoded by the nearest embedding row,
  i.e. an nn.Linear(d, vocab) whose weight is E @ A, fitted by least squares instead of cross-entropy.
Label inference, as ROC-AUC of positive against the other labels (0.5 = no leak; reported as
max(AUC, 1 - AUC)):
- from the gradients the owner's tail sends back: their norm; their cosine to a known positive example's
  gradient; the same cosine after aligning every sequence at its end (the attacker sees where the gradient
  stops, so it can compare the positions that predict the label);
- from the hidden states the head sends: in causal LM fine-tuning the completion (the label) is also an
  input token, so its position's state carries it; the learned inverter scores the candidate labels there.
"""
from __future__ import annotations

import torch

CHUNK = 2048


def nearest_neighbour_recovery(states: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor) -> float:
    """states [N, d] received, tokens [N] true ids, embeddings [V, d]: share recovered by cosine NN."""
    table = torch.nn.functional.normalize(embeddings, dim=-1)
    guesses = _argmax_rows(torch.nn.functional.normalize(states, dim=-1), table.T)
    return float((guesses == tokens).float().mean())


class LinearInverter:
    """Hidden state -> predicted input embedding -> nearest token."""

    def __init__(self, states: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor,
                 ridge: float = 1e-3) -> None:
        """Fit on public text: states [N, d] (privatized like the run's), tokens [N]."""
        x = _with_bias(states.double())  # [N, d+1]
        target = embeddings[tokens].double()  # [N, d]
        gram = x.T @ x
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        self.weight = torch.linalg.solve(gram, x.T @ target).float()  # [d+1, d]
        self.embeddings = embeddings
        self.bias = -0.5 * embeddings.pow(2).sum(dim=-1)  # [V]: argmax of e.y - |e|^2/2 is the L2-nearest row

    def recovery(self, states: torch.Tensor, tokens: torch.Tensor) -> float:
        guesses = _argmax_rows(self._predicted(states), self.embeddings.T, self.bias)
        return float((guesses == tokens).float().mean())

    def scores(self, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """[N, C] how strongly each state [N, d] decodes to each candidate token id [C] (higher: nearer)."""
        return self._predicted(states) @ self.embeddings[candidates].T + self.bias[candidates]

    def _predicted(self, states: torch.Tensor) -> torch.Tensor:
        return _with_bias(states.double()).float() @ self.weight  # [N, d]: the predicted input embeddings


def label_auc(gradients: torch.Tensor, positive: torch.Tensor) -> dict[str, float]:
    """gradients [n, T, d] per example as the middle device receives them, positive [n] bool.

    The direction attacks know one positive example (the first) and score the others by cosine to it: over
    the positions as sent, and with every example shifted so that its last position with a gradient comes
    last (right-padded sequences end at different positions; the zero rows after the end show where)."""
    flat = gradients.flatten(1).double()
    known = int(positive.nonzero()[0])
    rest = torch.arange(len(flat)) != known

    def cosine_auc(rows: torch.Tensor) -> float:
        return _leak_auc(torch.nn.functional.cosine_similarity(rows[rest], rows[known].unsqueeze(0), dim=1),
                         positive[rest])

    return {"norm_auc": _leak_auc(flat.norm(dim=1), positive), "direction_auc": cosine_auc(flat),
            "aligned_direction_auc": cosine_auc(_end_aligned(gradients).flatten(1).double())}


def _end_aligned(gradients: torch.Tensor) -> torch.Tensor:
    """[n, T, d] each example's rows rolled so that its last nonzero row is row T - 1 ([n, d]: as is)."""
    if gradients.dim() < 3:
        return gradients
    received = gradients.flatten(2).abs().sum(dim=-1) > 0  # [n, T]
    after_last = received.flip(1).int().argmax(dim=1)  # [n]: zero rows after the last one received
    return torch.stack([g.roll(int(shift), dims=0) for g, shift in zip(gradients, after_last)])


def forward_label_auc(scores: torch.Tensor, positive_column: int, positive: torch.Tensor) -> float:
    """Label inference from the hidden state at each example's label position: scores [n, C] of the
    candidate labels there (LinearInverter.scores); the positive label's margin over the best other."""
    others = torch.cat([scores[:, :positive_column], scores[:, positive_column + 1:]], dim=1)
    return _leak_auc((scores[:, positive_column] - others.max(dim=1).values).double(), positive)


def _leak_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC-AUC by the rank statistic (ties share ranks); max(AUC, 1 - AUC) as the attacker picks the sign."""
    ranks = _average_ranks(score)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the label attack needs examples of both the positive label and others")
    auc = float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return max(auc, 1 - auc)


def _average_ranks(score: torch.Tensor) -> torch.Tensor:
    order = score.argsort()
    ranks = torch.empty(len(score), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    for value in score.unique():
        tied = score == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _argmax_rows(queries: torch.Tensor, keys_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over columns of queries @ keys_t (+ bias), in chunks to bound memory ([CHUNK, V] at a time)."""
    out = []
    for chunk in queries.split(CHUNK):
        scores = chunk @ keys_t
        out.append((scores if bias is None else scores + bias).argmax(dim=1))
    return torch.cat(out)


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
