"""InfoNCE over in-batch and hard negatives.

For a micro-batch of B queries, the candidates are the B positives followed by every hard negative of
the batch (P candidates in all). Query i's target is candidate i; every other candidate, including the
other queries' positives and hard negatives, is a negative. Candidates that are the same passage as
query i's positive (duplicates across rows) are masked out instead of being counted as negatives.

    loss = mean_i  -log( exp(s(q_i, p_i)/t) / sum_j exp(s(q_i, c_j)/t) )

A larger batch holds more candidates that answer query i as well as its positive does (another query's
positive or hard negative about the same thing). Counted as negatives they push the right answers apart, more
so the larger the batch. With a false-negative margin m, a candidate scoring above s(q_i, p_i) + m is dropped
from query i's row, as Qwen3-Embedding's and GTE's training do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nova.maxsim import maxsim_scores as summed_maxsim


@dataclass(frozen=True)
class Contrast:
    """How a batch's candidates are contrasted: the InfoNCE temperature, and the false-negative margin (None:
    every candidate but the positive and its duplicates is a negative)."""

    temperature: float = 0.05
    false_negative_margin: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")
        if self.false_negative_margin is not None and self.false_negative_margin < 0:
            raise ValueError("the false-negative margin must not be negative")

    def loss(self, scores: torch.Tensor, ignore: torch.Tensor | None = None,
             positives: torch.Tensor | None = None) -> torch.Tensor:
        return self.rows(scores, ignore, positives).loss

    def rows(self, scores: torch.Tensor, ignore: torch.Tensor | None = None,
             positives: torch.Tensor | None = None) -> ContrastedRows:
        """The loss and how many negatives the rows kept: the margin's drops depend on the scores, so the
        count is taken where they are decided."""
        return contrasted_rows(scores, self.temperature, ignore, positives, self.false_negative_margin)


@dataclass(frozen=True)
class ContrastedRows:
    """Some rows' InfoNCE and what it contrasted them with: `negatives` counts, summed over the rows, the
    candidates that are neither a row's positive nor masked as its duplicate nor dropped by the margin. It
    is a 0-dim tensor without a gradient on the scores' device, so counting costs no host sync."""

    loss: torch.Tensor
    negatives: torch.Tensor


def info_nce(scores: torch.Tensor, temperature: float, ignore: torch.Tensor | None = None,
             positives: torch.Tensor | None = None, false_negative_margin: float | None = None) -> torch.Tensor:
    """``scores`` [B, P]; ``positives`` [B]: each row's positive column (default: column i for row i, P >= B);
    ``ignore`` [B, P] bool: columns to drop; ``false_negative_margin``: also drop the columns scoring above the
    row's positive by more than this (decided without a gradient). Mean over the rows.

    A process that holds some of the queries of a larger batch passes its rows of the score matrix and their
    positives' columns in the whole batch's candidate list."""
    return contrasted_rows(scores, temperature, ignore, positives, false_negative_margin).loss


def contrasted_rows(scores: torch.Tensor, temperature: float, ignore: torch.Tensor | None = None,
                    positives: torch.Tensor | None = None,
                    false_negative_margin: float | None = None) -> ContrastedRows:
    """`info_nce`'s loss, with the number of negatives it kept (see `ContrastedRows`)."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    batch = scores.shape[0]
    if positives is None:
        if scores.shape[1] < batch:
            raise ValueError("need at least one candidate per query (its positive)")
        positives = torch.arange(batch)
    positives = positives.to(scores.device)
    if false_negative_margin is not None:
        with torch.no_grad():
            above = scores > scores.gather(1, positives[:, None]) + false_negative_margin
        ignore = above if ignore is None else ignore.to(scores.device) | above
    logits = scores.float() / temperature
    negatives = torch.full((), batch * (scores.shape[1] - 1), dtype=torch.long, device=logits.device)
    if ignore is not None:
        ignore = ignore.clone().to(logits.device)
        ignore[torch.arange(batch, device=logits.device), positives] = False  # never drop the positive itself
        logits = logits.masked_fill(ignore, float("-inf"))
        negatives = negatives - ignore.sum()  # a bool mask: no gradient
    return ContrastedRows(F.cross_entropy(logits, positives), negatives)


def cosine_scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Both L2-normalized: [B, D] x [P, D] -> [B, P]."""
    return queries @ candidates.T


def maxsim_scores(queries: torch.Tensor, query_mask: torch.Tensor, candidates: torch.Tensor,
                  candidate_mask: torch.Tensor) -> torch.Tensor:
    """Late interaction (nova.maxsim) normalized by the number of query tokens, so that the temperature means
    the same as for cosine scores: [B, Lq, d] x [P, Lp, d] -> [B, P]."""
    return summed_maxsim(queries, query_mask, candidates, candidate_mask) / query_mask.sum(-1, keepdim=True).clamp(min=1)


def duplicate_mask(positive_keys: list, candidate_keys: list) -> torch.Tensor:
    """[B, P] True where candidate j is the same passage as row i's positive (but j != i). Keys become integer
    ids first, so a batch of thousands of candidates costs one tensor comparison, not B x P Python steps."""
    ids: dict = {}
    positives = torch.tensor([ids.setdefault(key, len(ids)) for key in positive_keys], dtype=torch.long)
    candidates = torch.tensor([ids.setdefault(key, len(ids)) for key in candidate_keys], dtype=torch.long)
    mask = positives[:, None] == candidates[None, :]
    diagonal = torch.arange(min(len(positive_keys), len(candidate_keys)))
    mask[diagonal, diagonal] = False
    return mask
