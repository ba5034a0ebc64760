"""Similarity scores, rankings and rank movement (pure numpy, no model needed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nova.maxsim import maxsim as _maxsim


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def cosine(query: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of two pooled vectors (the model's vectors are already unit length)."""
    return float(np.dot(_unit(query), _unit(candidate)))


def token_similarities(query: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """[n_query_tokens, n_candidate_tokens] dot products of two multi-vector embeddings."""
    q = np.asarray(query, dtype=np.float64)
    d = np.asarray(candidate, dtype=np.float64)
    if q.ndim != 2 or d.ndim != 2:
        raise ValueError("multi-vector embeddings must be 2-D [n_tokens, dim]")
    return q @ d.T


def maxsim(query: np.ndarray, candidate: np.ndarray) -> float:
    """Late-interaction score (nova.maxsim: the one definition) of two multi-vector embeddings."""
    return _maxsim(np.asarray(query, dtype=np.float64), np.asarray(candidate, dtype=np.float64))


def score(query: np.ndarray, candidate: np.ndarray, multivector: bool) -> float:
    return maxsim(query, candidate) if multivector else cosine(query, candidate)


@dataclass(frozen=True)
class Match:
    """For one query token: the candidate token it matched best and how well."""

    query_index: int
    candidate_index: int
    similarity: float


def best_matches(query: np.ndarray, candidate: np.ndarray) -> list[Match]:
    sims = token_similarities(query, candidate)
    best = sims.argmax(axis=1)
    return [Match(i, int(j), float(sims[i, j])) for i, j in enumerate(best)]


def ranks(scores: list[float] | np.ndarray) -> list[int]:
    """1-based rank of each candidate (highest score first; ties keep input order)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    out = [0] * len(scores)
    for position, index in enumerate(order, start=1):
        out[index] = position
    return out


def rank_movement(baseline_ranks: list[int], variant_ranks: list[int]) -> list[int]:
    """Positive: the candidate moved up (towards rank 1) against the baseline."""
    return [b - v for b, v in zip(baseline_ranks, variant_ranks, strict=True)]


def movement_label(delta: int) -> str:
    if delta > 0:
        return f"▲{delta}"
    if delta < 0:
        return f"▼{-delta}"
    return "="
