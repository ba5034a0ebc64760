"""Retrieval metrics, computed by ranx (a well-known, trec_eval-validated library).

Metric names are written the way papers write them (``nDCG@10``, ``P@10``, ``MRR@10``, ``Recall@100``)
and parsed case-insensitively; any ``@k`` is accepted. Runs are ranked once here (score descending,
ties broken by document id ascending) and handed to ranx as rank-derived scores, so that the metric
values, the TREC run files and the ranking are the same thing even when two scores tie.
"""

from __future__ import annotations

import os
import re
import warnings

from .errors import UserInputError

DEFAULT_METRICS = ("nDCG@10", "P@10", "MRR@10", "Recall@100")

# display name -> ranx name
_KINDS = {
    "ndcg": ("nDCG", "ndcg"),
    "p": ("P", "precision"),
    "precision": ("P", "precision"),
    "mrr": ("MRR", "mrr"),
    "recall": ("Recall", "recall"),
    "r": ("Recall", "recall"),
    "map": ("MAP", "map"),
    "hit_rate": ("Hit_rate", "hit_rate"),
    "hits": ("Hit_rate", "hit_rate"),
}
_METRIC_RE = re.compile(r"^([A-Za-z_]+)@(\d+)$")


def parse_metric(name: str) -> tuple[str, str, int]:
    """``"ndcg@5"`` -> ``("nDCG@5", "ndcg@5", 5)``; unknown names raise :class:`UserInputError`."""
    match = _METRIC_RE.match(name.strip())
    if not match or match.group(1).lower() not in _KINDS:
        known = ", ".join(sorted({display for display, _ in _KINDS.values()}))
        raise UserInputError(f"unknown metric '{name}': use NAME@K with NAME one of {known} (e.g. nDCG@10)")
    k = int(match.group(2))
    if k < 1:
        raise UserInputError(f"metric '{name}': k must be at least 1")
    display, ranx_name = _KINDS[match.group(1).lower()]
    return f"{display}@{k}", f"{ranx_name}@{k}", k


def metric_list(extra: list[str] | None = None) -> list[str]:
    """The default metrics plus any extra ones, canonical names, no duplicates, in order."""
    names: list[str] = []
    for name in list(DEFAULT_METRICS) + list(extra or []):
        display = parse_metric(name)[0]
        if display not in names:
            names.append(display)
    return names


def max_cutoff(metrics: list[str]) -> int:
    return max(parse_metric(m)[2] for m in metrics)


def rank(scores: dict[str, float], top_k: int | None = None) -> list[tuple[str, float]]:
    """Order documents by score descending, then by id ascending; keep the first ``top_k``."""
    ordered = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
    return ordered if top_k is None else ordered[:top_k]


def evaluate(
    qrels: dict[str, dict[str, int]],
    run: dict[str, list[tuple[str, float]]],
    metrics: list[str],
    per_query: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Mean of each metric over the judged queries (a query with no retrieved document scores 0).

    ``run`` maps query id -> ranked list of ``(doc_id, score)`` as produced by :func:`rank`.
    """
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "nova", "numba"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ranx import Qrels, Run
        from ranx import evaluate as ranx_evaluate

    parsed = [parse_metric(m) for m in metrics]
    judged = {qid: {d: int(r) for d, r in docs.items()} for qid, docs in qrels.items() if docs}
    run_dict: dict[str, dict[str, float]] = {}
    for qid in judged:
        ranking = run.get(qid) or []
        n = len(ranking)
        # rank-derived scores: ranx sees exactly our order, ties already broken
        run_dict[qid] = {doc_id: float(n - i) for i, (doc_id, _score) in enumerate(ranking)}
    empty = [qid for qid, docs in run_dict.items() if not docs]
    for qid in empty:  # ranx needs at least one entry per query; a non-judged id scores 0 everywhere
        run_dict[qid] = {"__nova_no_result__": 0.0}
    ranx_run = Run(run_dict)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranx_evaluate(Qrels(judged), ranx_run, [r for _, r, _ in parsed], return_mean=True, make_comparable=True)
    by_query = {
        qid: {display: float(ranx_run.scores[ranx_name][qid]) for display, ranx_name, _ in parsed} for qid in judged
    }
    means = {display: sum(q[display] for q in by_query.values()) / len(by_query) for display, _, _ in parsed}
    return (means, by_query) if per_query else means
