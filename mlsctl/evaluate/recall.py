"""Recall@K with the deep-metric-learning protocol (CUB, Cars, Stanford Online Products;
docs/methods.md#eval-recall).

Every embedding of the evaluation set is a query against all the others (the set is its own
gallery, the query itself excluded); Recall@K is the share of queries with at least one embedding of
their class among their K nearest neighbours by cosine. K = 1, 2, 4, 8, and for large sets
(more than :data:`LARGE_SET` embeddings, as SOP's 60,502) also 10, 100, 1000.

The metrics are pytorch-metric-learning's ``AccuracyCalculator`` functions: Recall@K is added to
it as one more calculator function per K (:func:`recall_calculator`); its own ``precision_at_1``
(equal to R@1) and ``mean_average_precision_at_r`` (MAP@R) come along. Queries whose class has no
other embedding cannot be retrieved and are left out, as the library leaves them out (counted in
``lone_queries``). The neighbours are an exact faiss inner-product search on L2-normalised
embeddings (cosine), each query removed from its own neighbours by index, as the library's
``FaissKNN`` does.

Where this departs from calling ``AccuracyCalculator.get_accuracy`` on the whole set: the queries
go through it :data:`QUERY_CHUNK` at a time (with a progress bar on a terminal) and every metric,
a mean over the chunk's retrievable queries, is weighted by their number. The whole-set call holds
several n × k arrays and a classes × n matrix at once (SOP's 60,502 embeddings with k = 1,000:
about 4.5 GB; ImageNet's 1.28 M: about 60 GB); a chunk holds QUERY_CHUNK × k. The values are the
same to rounding (tested against the whole-set call and against brute force).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mlsctl import threads
from mlsctl.errors import UserError

DEFAULT_KS = (1, 2, 4, 8)
LARGE_KS = (10, 100, 1000)
LARGE_SET = 10_000
QUERY_CHUNK = 8192  # queries through the calculator at a time: 8,192 × (k + 1) neighbours


def default_ks(n: int) -> list[int]:
    return list(DEFAULT_KS) + (list(LARGE_KS) if n > LARGE_SET else [])


def chance_recall(class_sizes: Sequence[int], K: int) -> float:
    """R@K of a random ranking, exactly: a query of a class of c embeddings (of n) has c - 1 of its class
    among the n - 1 others, and K of them drawn at random miss all of those with probability
    C(n - c, K) / C(n - 1, K) (0 where K > n - c: R@K is 1 by construction); the mean over the queries
    that have another of their class (c ≥ 2). Printed beside the scores, since on few classes a high R@K
    is no finding (a new user's probe, 2026-12-07)."""
    n = sum(class_sizes)
    hits = total = 0.0
    for c in class_sizes:
        if c < 2:
            continue
        if K > n - c:
            missed = 0.0
        else:  # the ratio of binomials through log-gamma: exact to rounding for any n and K
            missed = math.exp(math.lgamma(n - c + 1) - math.lgamma(n - c - K + 1) - math.lgamma(n) + math.lgamma(n - K))
        hits += c * (1.0 - missed)
        total += c
    return hits / total if total else float("nan")


def chance_map_at_r(class_sizes: Sequence[int]) -> float:
    """MAP@R of a random ranking, exactly. A query of a class of c embeddings (of n) has R = c - 1 of its class
    among the N = n - 1 others; in a random order the i-th is one of them with probability R / N and, given that,
    each earlier one is with probability (R - 1) / (N - 1), so the expected precision at i counted where the i-th
    is of the class is (R / N)(1 + (i - 1)(R - 1) / (N - 1)) / i. MAP@R, the mean of that over i = 1..R, is
    H_R / N + (R - 1)(R - H_R) / (N (N - 1)) with H_R = 1 + 1/2 + ... + 1/R: about each class's share of the
    others, R / N, more on few classes. The mean over the queries that have another of their class, as
    :func:`chance_recall` (a new user's probe, 2026-12-07, found MAP@R without one)."""
    n = sum(class_sizes)
    total = weight = 0.0
    for c in class_sizes:
        if c < 2:
            continue
        relevant, others = c - 1, n - 1
        harmonic = sum(1.0 / i for i in range(1, relevant + 1))
        value = harmonic / others
        if relevant > 1:  # then others > 1 too
            value += (relevant - 1) * (relevant - harmonic) / (others * (others - 1))
        total += c * value
        weight += c
    return total / weight if weight else float("nan")


def certain_ks(class_sizes: Sequence[int], ks: Sequence[int]) -> list[int]:
    """The K of ``ks`` whose R@K is 1 by construction: more than the embeddings of other classes than any
    query's own, so every query's K nearest hold one of its class."""
    n = sum(class_sizes)
    fewest = min(c for c in class_sizes if c >= 2)
    return [K for K in ks if K > n - fewest]


def certain_note(ks: Sequence[int]) -> Optional[str]:
    """The note on the R@K of ``ks`` that are 100 % by construction (:func:`certain_ks`), or None: said by
    eval recall and by the report."""
    if not ks:
        return None
    return (f"note: R@{', R@'.join(map(str, ks))} {'are' if len(ks) > 1 else 'is'} 100 % by construction: any "
            f"{ks[0]} embeddings other than a query hold one of its class")


def recall_calculator(ks: Sequence[int], k: int):
    """A pytorch-metric-learning AccuracyCalculator with ``recall_at_K`` for every K of ``ks``,
    searching ``k`` neighbours (exact inner product) for every query."""
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    faiss = threads.faiss()

    def recall_at(K: int):
        def calculate(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            if not bool(not_lone_query_mask.any()):
                return float("nan")
            hits = knn_labels[not_lone_query_mask][:, :K] == query_labels[not_lone_query_mask][:, None]
            return float(hits.any(dim=1).double().mean())
        return calculate

    names = [f"recall_at_{K}" for K in ks]

    class RecallCalculator(AccuracyCalculator):
        def requires_knn(self):
            return super().requires_knn() + names

    for K, name in zip(ks, names):
        setattr(RecallCalculator, f"calculate_{name}", recall_at(K))
    return RecallCalculator(include=(*names, "precision_at_1", "mean_average_precision_at_r"), k=k,
                            knn_func=FaissKNN(index_init_fn=faiss.IndexFlatIP), device=torch.device("cpu"))


def chunked_accuracy(calculator, x: torch.Tensor, labels: torch.Tensor, k: int, chunk: int = QUERY_CHUNK,
                     progress: bool = False) -> dict[str, float]:
    """``calculator.get_accuracy(x, labels)`` (every row a query against all the others, itself
    excluded), ``chunk`` queries at a time: each metric is the mean over the retrievable queries,
    so the chunks' values are weighted by their number of them. The neighbours come from the one
    exact search with self-exclusion (:func:`mlsctl.methods.refine.neighbours.neighbour_chunks`:
    ``k + 1`` searched, the query's own row dropped by index, the last one on ties, as the library),
    one chunk's neighbours held at a time."""
    from mlsctl.methods.refine.neighbours import neighbour_chunks

    labels = labels.float()  # as the library compares them
    unique, counts = torch.unique(labels, return_counts=True)  # the library's label counts, reference = all
    lone = unique[counts < 2]  # a query of these has no other of its class
    functions = calculator.get_function_dict()
    totals, weight = dict.fromkeys(functions, 0.0), 0
    for start, rows, distances in neighbour_chunks(x, x, k, torch.arange(len(x)), chunk=chunk, progress=progress):
        query_labels = labels[start:start + chunk]
        retrievable = ~torch.isin(query_labels, lone)
        present = torch.isin(unique, query_labels)
        values = calculator._get_accuracy(
            functions, query=x[start:start + chunk], reference=x, query_labels=query_labels, reference_labels=labels,
            ref_includes_query=True, label_comparison_fn=calculator.label_comparison_fn,
            label_counts=(unique[present], counts[present]), knn_labels=labels[rows], knn_distances=distances,
            lone_query_labels=lone, not_lone_query_mask=retrievable)
        n = int(retrievable.sum())
        if n:
            for name, value in values.items():
                totals[name] += value * n
            weight += n
    return {name: total / weight if weight else float("nan") for name, total in totals.items()}


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: Optional[Sequence[int]] = None,
                chunk: int = QUERY_CHUNK, progress: bool = False) -> dict:
    """R@K of every K (each embedding a query against all others) → a JSON-ready dict, ``chunk``
    queries at a time (:func:`chunked_accuracy`). Exact duplicate vectors tie, and the search
    orders tied neighbours by row: with duplicates of different classes, R@K depends on the rows'
    order (deduplicate first)."""
    n = len(embeddings)
    finite = torch.isfinite(embeddings).all(dim=-1) if n else torch.ones(0, dtype=torch.bool)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise UserError(f"{len(bad)} of the {n} embeddings hold NaN or inf (first: row {bad[0]}); Recall@K needs finite "
                        f"vectors: embed again (a diverged model or a damaged file)")
    classes, counts = torch.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise UserError(f"the {n} embeddings all have one class; Recall@K needs at least two classes")
    if bool((counts < 2).all()):
        raise UserError(f"each of the {len(classes)} classes has one embedding: no query has another of its class "
                        f"to find, so Recall@K is undefined")
    ks = sorted(set(ks or default_ks(n)))
    if ks[0] < 1:
        raise UserError(f"Recall@K needs K of 1 or more, got {ks[0]}")
    kept = [K for K in ks if K <= n - 1]
    if not kept:
        raise UserError(f"{n} embeddings are too few for Recall@{ks[0]} (each query needs {ks[0]} others)")
    k = min(n - 1, max(max(kept), int(counts.max())))  # MAP@R needs R = class size - 1 (the library asks one more)
    x = F.normalize(embeddings.float(), dim=-1)
    values = chunked_accuracy(recall_calculator(kept, k), x, labels, k, chunk, progress)
    lone = int(counts[counts < 2].sum())
    sizes = counts.tolist()
    return {"embeddings": n, "classes": len(classes), "queries": n - lone, "lone_queries": lone,
            "recall": {str(K): values[f"recall_at_{K}"] for K in kept}, "ks_too_large": [K for K in ks if K not in kept],
            "chance": {str(K): chance_recall(sizes, K) for K in kept}, "ks_certain": certain_ks(sizes, kept),
            "precision_at_1": values["precision_at_1"], "map_at_r": values["mean_average_precision_at_r"],
            "chance_map_at_r": chance_map_at_r(sizes)}


def evaluate_recall(features, labels_file: Optional[Path] = None, ks: Optional[Sequence[int]] = None) -> dict:
    """Recall@K of a feature folder (labels from the images' own folders or a labels file)."""
    from mlsctl.data.labels import FOLDER_LABELS, class_ids
    from mlsctl.evaluate.knn import labels_for

    names = labels_for(features, labels_file, "", "--labels")
    labels, _ = class_ids(names, f"features {features.path}")
    embeddings = features.finite_global_features()
    result = recall_at_k(embeddings, labels, ks, progress=sys.stderr.isatty())
    # the images' root and labels as absolute paths: what the report and compare name the data by, whatever the
    # working directory then (a review, 2026-12-07: read from the feature folder at report time, it split tables)
    return {"features": str(features.path), "input_root": os.path.abspath(features.input_root),
            "labels": os.path.abspath(labels_file) if labels_file else FOLDER_LABELS,
            "protocol": "every embedding a query against all the others (itself excluded), cosine, exact faiss search",
            "model": features.model, **result}
