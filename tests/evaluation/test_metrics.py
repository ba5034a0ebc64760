"""Metrics: a hand-computed example exactly, and ranx's own numbers (plus an independent reference
implementation) on random runs."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest

from nova.evaluation.errors import UserInputError
from nova.evaluation.metrics import evaluate, metric_list, parse_metric, rank
from nova.evaluation.runner import rank_matrix

QRELS = {"q1": {"d1": 1, "d3": 2}, "q2": {"d2": 1}, "q3": {"d9": 1}}
RUN = {
    "q1": rank({"d3": 0.9, "d2": 0.8, "d1": 0.7}),  # relevant at ranks 1 (grade 2) and 3 (grade 1)
    "q2": rank({"d1": 0.9, "d4": 0.5, "d2": 0.4}),  # relevant at rank 3
    "q3": [],  # judged, nothing retrieved
}


def test_hand_computed_example():
    got, per_query = evaluate(QRELS, RUN, ["nDCG@10", "P@10", "MRR@10", "Recall@100", "Recall@2", "nDCG@1"],
                              per_query=True)
    # q1: DCG = 2/log2(2) + 1/log2(4) = 2.5; ideal = 2/log2(2) + 1/log2(3)
    ndcg_q1 = 2.5 / (2 + 1 / math.log2(3))
    # q2: DCG = 1/log2(4) = 0.5; ideal = 1
    assert per_query["q1"] == pytest.approx(
        {"nDCG@10": ndcg_q1, "P@10": 0.2, "MRR@10": 1.0, "Recall@100": 1.0, "Recall@2": 0.5, "nDCG@1": 1.0}, abs=1e-12)
    assert per_query["q2"] == pytest.approx(
        {"nDCG@10": 0.5, "P@10": 0.1, "MRR@10": 1 / 3, "Recall@100": 1.0, "Recall@2": 0.0, "nDCG@1": 0.0}, abs=1e-12)
    assert per_query["q3"] == {"nDCG@10": 0.0, "P@10": 0.0, "MRR@10": 0.0, "Recall@100": 0.0, "Recall@2": 0.0,
                               "nDCG@1": 0.0}
    assert got["nDCG@10"] == pytest.approx((ndcg_q1 + 0.5) / 3, abs=1e-12)
    assert got["P@10"] == pytest.approx(0.1, abs=1e-12)
    assert got["MRR@10"] == pytest.approx((1 + 1 / 3) / 3, abs=1e-12)
    assert got["Recall@100"] == pytest.approx(2 / 3, abs=1e-12)
    # exactly, to the last bit, where the arithmetic is exact
    assert per_query["q2"]["nDCG@10"] == 0.5 and per_query["q1"]["MRR@10"] == 1.0


def test_hand_computed_map_and_hit_rate():
    """Average precision (trec_eval: divided by every judged relevant document, also at a cutoff) and hit rate,
    worked out by hand on the same example."""
    got, per_query = evaluate(QRELS, RUN, ["MAP@10", "MAP@2", "Hit_rate@2", "Hit_rate@3"], per_query=True)
    # q1: relevant at ranks 1 and 3 -> (1/1 + 2/3) / 2; at @2 only rank 1 counts -> (1/1) / 2
    # q2: relevant at rank 3 -> 1/3; none in the top 2
    assert per_query["q1"] == pytest.approx({"MAP@10": 5 / 6, "MAP@2": 0.5, "Hit_rate@2": 1.0, "Hit_rate@3": 1.0},
                                            abs=1e-12)
    assert per_query["q2"] == pytest.approx({"MAP@10": 1 / 3, "MAP@2": 0.0, "Hit_rate@2": 0.0, "Hit_rate@3": 1.0},
                                            abs=1e-12)
    assert per_query["q3"] == {"MAP@10": 0.0, "MAP@2": 0.0, "Hit_rate@2": 0.0, "Hit_rate@3": 0.0}
    assert got == pytest.approx({"MAP@10": 7 / 18, "MAP@2": 1 / 6, "Hit_rate@2": 1 / 3, "Hit_rate@3": 2 / 3},
                                abs=1e-12)


def test_cutoff_applies():
    qrels = {"q": {"d11": 1}}
    run = {"q": [(f"d{i:02d}", 1.0 - i / 100) for i in range(12)]}  # the relevant doc at rank 12
    got = evaluate(qrels, run, ["nDCG@10", "MRR@10", "Recall@100", "Recall@11", "nDCG@12"])
    assert got["nDCG@10"] == 0.0 and got["MRR@10"] == 0.0 and got["Recall@11"] == 0.0
    assert got["Recall@100"] == 1.0
    assert got["nDCG@12"] == pytest.approx(1 / math.log2(13), abs=1e-12)


def test_ties_are_broken_by_document_id():
    assert rank({"b": 0.5, "a": 0.5, "c": 0.9}) == [("c", 0.9), ("a", 0.5), ("b", 0.5)]
    scores = np.array([[0.5, 0.5, 0.9, 0.5]], dtype=np.float32)
    run = rank_matrix(scores, ["q"], ["z", "a", "m", "b"], top_k=3, ignore_identical_ids=True)
    assert [d for d, _ in run["q"]] == ["m", "a", "b"]


def test_identical_ids_are_dropped_like_beir():
    scores = np.array([[0.9, 0.1]], dtype=np.float32)
    run = rank_matrix(scores, ["x"], ["x", "y"], top_k=10, ignore_identical_ids=True)
    assert [d for d, _ in run["x"]] == ["y"]
    run = rank_matrix(scores, ["x"], ["x", "y"], top_k=10, ignore_identical_ids=False)
    assert [d for d, _ in run["x"]] == ["x", "y"]


def _reference(qrels, run, kind, k):
    """Independent textbook implementation (trec_eval conventions: linear gain, rel > 0 is relevant)."""
    values = []
    for qid, judged in qrels.items():
        ranking = [d for d, _ in run.get(qid, [])][:k]
        relevant = {d for d, r in judged.items() if r > 0}
        if kind == "ndcg":
            dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranking))
            ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
            idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
            values.append(dcg / idcg if idcg else 0.0)
        elif kind == "precision":
            values.append(sum(d in relevant for d in ranking) / k)
        elif kind == "mrr":
            values.append(next((1 / (i + 1) for i, d in enumerate(ranking) if d in relevant), 0.0))
        elif kind == "recall":
            values.append(sum(d in relevant for d in ranking) / len(relevant))
        elif kind == "map":
            hits, precisions = 0, []
            for i, d in enumerate(ranking):
                if d in relevant:
                    hits += 1
                    precisions.append(hits / (i + 1))
            values.append(sum(precisions) / len(relevant))
        elif kind == "hit_rate":
            values.append(float(any(d in relevant for d in ranking)))
    return sum(values) / len(values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_runs_match_ranx_and_reference(seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from ranx import Qrels, Run
        from ranx import evaluate as ranx_evaluate

    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(300)]
    qrels, raw = {}, {}
    for q in range(40):
        qid = f"q{q}"
        qrels[qid] = {d: rng.choice([1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 8))}
        raw[qid] = {d: rng.random() for d in rng.sample(docs, rng.randint(50, 300))}  # distinct scores
    run = {qid: rank(scores) for qid, scores in raw.items()}
    names = metric_list(["nDCG@5", "Recall@20", "MAP@100", "MAP@10", "P@1", "MRR@100", "Hit_rate@3"])
    ours = evaluate(qrels, run, names)
    ranx_names = [parse_metric(n)[1] for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ranx_evaluate(Qrels(qrels), Run(raw), ranx_names, make_comparable=True)
    for name, ranx_name in zip(names, ranx_names, strict=True):
        assert ours[name] == pytest.approx(float(theirs[ranx_name]), abs=1e-12), name
    for name in names:
        display, _, k = parse_metric(name)
        kind = {"nDCG": "ndcg", "P": "precision", "MRR": "mrr", "Recall": "recall", "MAP": "map",
                "Hit_rate": "hit_rate"}[display.split("@")[0]]
        assert ours[name] == pytest.approx(_reference(qrels, run, kind, k), abs=1e-12), name


def test_metric_names():
    assert parse_metric("ndcg@10")[0] == "nDCG@10"
    assert parse_metric("precision@5")[0] == "P@5"
    assert parse_metric("R@100")[0] == "Recall@100"
    assert metric_list(["nDCG@10", "ndcg@5"]) == ["nDCG@10", "P@10", "MRR@10", "Recall@100", "nDCG@5"]
    with pytest.raises(UserInputError, match="unknown metric 'bleu@4'"):
        parse_metric("bleu@4")
    with pytest.raises(UserInputError, match="k must be at least 1"):
        parse_metric("ndcg@0")
