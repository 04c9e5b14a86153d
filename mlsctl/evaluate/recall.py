"""Recall@K with the deep-metric-learning protocol (CUB, Cars, Stanford Online Products;
docs/methods.md#eval-recall).

Every embedding of the evaluation set is a query against all the others (the set is its own
gallery, the query itself excluded); Recall@K is the share of queries with at least one embedding of
their class among their K nearest neighbours by cosine. K = 1, 2, 4, 8, and for large sets
(more than :data:`LARGE_SET` embeddings, as SOP's 60,502) also 10, 100, 1000.

The computation is pytorch-metric-learning's ``AccuracyCalculator`` with its faiss k-NN
(``FaissKNN`` over an exact inner-product index, on L2-normalised embeddings: cosine), which
removes each query from its own neighbours by index. Recall@K is added to it as one more
calculator function per K (:func:`recall_calculator`); its own ``precision_at_1`` (equal to
R@1) and ``mean_average_precision_at_r`` (MAP@R) come along. Queries whose class has no other
embedding cannot be retrieved and are left out by the library (counted in ``lone_queries``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mlsctl import threads
from mlsctl.errors import UserError

DEFAULT_KS = (1, 2, 4, 8)
LARGE_KS = (10, 100, 1000)
LARGE_SET = 10_000


def default_ks(n: int) -> list[int]:
    return list(DEFAULT_KS) + (list(LARGE_KS) if n > LARGE_SET else [])


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


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks: Optional[Sequence[int]] = None) -> dict:
    """R@K of every K (each embedding a query against all others) → a JSON-ready dict. Exact
    duplicate vectors tie, and the search orders tied neighbours by row: with duplicates of
    different classes, R@K depends on the rows' order (deduplicate first)."""
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
    calculator = recall_calculator(kept, k)
    values = calculator.get_accuracy(x, labels.float())
    lone = int(counts[counts < 2].sum())
    return {"embeddings": n, "classes": len(classes), "queries": n - lone, "lone_queries": lone,
            "recall": {str(K): values[f"recall_at_{K}"] for K in kept}, "ks_too_large": [K for K in ks if K not in kept],
            "precision_at_1": values["precision_at_1"], "map_at_r": values["mean_average_precision_at_r"]}


def evaluate_recall(features, labels_file: Optional[Path] = None, ks: Optional[Sequence[int]] = None) -> dict:
    """Recall@K of a feature folder (labels from the files' folders or a labels file)."""
    from mlsctl.data.labels import class_ids
    from mlsctl.evaluate.knn import labels_for

    names = labels_for(features, labels_file, "features", "--labels")
    labels, _ = class_ids(names, f"features {features.path}")
    embeddings = features.global_features()
    finite = torch.isfinite(embeddings).all(dim=-1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise UserError(f"features {features.path}: {len(bad)} of {len(finite)} embeddings hold NaN or inf (first: "
                        f"{features.files[bad[0]]}); embed the folder again (a diverged model or a damaged shard)")
    result = recall_at_k(embeddings, labels, ks)
    return {"features": str(features.path), "labels": str(labels_file) if labels_file else "folder names",
            "protocol": "every embedding a query against all the others (itself excluded), cosine, exact faiss search",
            "model": features.model, **result}
