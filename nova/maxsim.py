"""MaxSim (ColBERT / Jina V4 late interaction), defined once: for every query token the best candidate token's
dot product, summed over the query's tokens. Used by training (with gradients), evaluation and the playground."""

from __future__ import annotations

import numpy as np
import torch


def maxsim_scores(queries: torch.Tensor, query_mask: torch.Tensor, candidates: torch.Tensor,
                  candidate_mask: torch.Tensor) -> torch.Tensor:
    """[B, Lq, d] x [P, Lp, d] (masks [B, Lq], [P, Lp]: real tokens) -> [B, P] summed MaxSim scores."""
    sim = torch.einsum("bqd,pld->bpql", queries, candidates)
    sim = sim.masked_fill(~candidate_mask[None, :, None, :], float("-inf")).amax(-1)
    return (sim * query_mask[:, None, :]).sum(-1)


def padded(arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-vectors of different lengths -> ([N, L, d] zero-padded, [N, L] mask of real tokens)."""
    length = max(len(a) for a in arrays)
    out = torch.zeros(len(arrays), length, arrays[0].shape[1], dtype=torch.from_numpy(arrays[0][:0]).dtype)
    mask = torch.zeros(len(arrays), length, dtype=torch.bool)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = torch.from_numpy(np.ascontiguousarray(a))
        mask[i, : len(a)] = True
    return out, mask


def maxsim(query: np.ndarray, candidate: np.ndarray) -> float:
    """The score of one query/candidate pair of multi-vectors ([n, d] each)."""
    q, qmask = padded([np.asarray(query)])
    c, cmask = padded([np.asarray(candidate, dtype=np.asarray(query).dtype)])
    return float(maxsim_scores(q, qmask, c, cmask)[0, 0])
