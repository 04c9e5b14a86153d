"""Weighted k-NN classification on global features (the DINO protocol; docs/methods.md#eval-knn).

Features are L2-normalised; each query takes its ``max(ks)`` nearest training features by cosine
similarity once, and for every ``k`` the classes of its first ``k`` neighbours vote with weight
``exp(cos / T)`` (T = 0.07). Top-1 and top-5 accuracy are reported for each k.

The search is exact (:func:`exact_search`: matmul + top-k in float32, in chunks of queries and of
training features so memory stays bounded) and runs where the training features are put:
the GPU when one is available (:func:`search_device`), else the CPU. The k-NN segmentation of
:mod:`mlsctl.evaluate.knn_seg` uses the same search.

Labels come from each file's own folder, however deep (``cat/001.jpg`` → ``cat``, ``img/MEN/id_1/a.jpg`` →
``img/MEN/id_1``), or from a labels file:
CSV (``path,label`` with an optional header) or JSONL (``{"path": ..., "label": ...}``), paths
relative to the features' input root (or absolute), read by :mod:`mlsctl.data.labels`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from mlsctl.data.labels import csv_rows, labels_of, read_labels_file, read_text_file  # noqa: F401 - re-exported
from mlsctl.data.labels import nested_split_hint
from mlsctl.evaluate.baselines import interval_text, majority_class, wilson_interval
from mlsctl.device import full_float32
from mlsctl.errors import UserError

DEFAULT_KS = (10, 20, 100, 200)
DEVICES = ("auto", "cpu", "cuda")
# float32 similarities held at once by exact_search: 128 MiB on the CPU, 1 GiB on a GPU (fewer,
# larger products and top-k calls; a 10-million-patch memory is then 153 slices per query chunk)
SCORES_PER_CHUNK = {"cpu": 1 << 25, "cuda": 1 << 28}


def search_device(requested: str = "auto") -> torch.device:
    """The device of the neighbour search: ``auto`` is the GPU when CUDA is available, else the CPU."""
    if requested not in DEVICES:
        raise UserError(f"--device {requested} is not one of {', '.join(DEVICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu or auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@torch.no_grad()
def exact_search(memory: torch.Tensor, queries: torch.Tensor, k: int, *, query_chunk: int = 4096,
                 scores_per_chunk: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest inner products of each query with the rows of ``memory`` (exact, like
    faiss ``IndexFlatIP``): float32 scores [q, k] in descending order and int64 row indices [q, k],
    both on the CPU. Runs on ``memory``'s device; queries are moved there a chunk at a time, and
    a memory larger than ``scores_per_chunk / query_chunk`` rows is scanned in slices whose
    top-k are merged, so at most ``scores_per_chunk`` similarities exist at once [default:
    :data:`SCORES_PER_CHUNK` of the device]."""
    if k > len(memory):
        raise ValueError(f"k={k} exceeds the {len(memory)} rows of the memory")
    device = memory.device
    if scores_per_chunk is None:
        scores_per_chunk = SCORES_PER_CHUNK["cuda" if device.type == "cuda" else "cpu"]
    memory = memory.float()
    with full_float32(device.type):  # full float32 products, whatever the process set for training
        return _exact_search_chunks(memory, queries, k, query_chunk, scores_per_chunk)


def _exact_search_chunks(memory: torch.Tensor, queries: torch.Tensor, k: int, query_chunk: int,
                         scores_per_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = memory.device
    query_chunk = max(1, min(query_chunk, scores_per_chunk // max(k, 1)))
    memory_chunk = max(k, scores_per_chunk // query_chunk)
    all_scores, all_indices = [], []
    for start in range(0, len(queries), query_chunk):
        q = queries[start:start + query_chunk].to(device, torch.float32, non_blocking=True)
        best_scores = best_indices = None
        for offset in range(0, len(memory), memory_chunk):
            similarity = q @ memory[offset:offset + memory_chunk].T
            scores, indices = similarity.topk(min(k, similarity.shape[1]), dim=1)
            indices += offset
            if best_scores is not None:
                scores, order = torch.cat([best_scores, scores], 1).topk(k, dim=1)
                indices = torch.cat([best_indices, indices], 1).gather(1, order)
            best_scores, best_indices = scores, indices
        all_scores.append(best_scores.cpu())
        all_indices.append(best_indices.cpu())
    if not all_scores:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.long)
    return torch.cat(all_scores), torch.cat(all_indices)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07, num_classes: Optional[int] = None,
                 chunk: int = 1024, device: Optional[torch.device] = None) -> dict[int, torch.Tensor]:
    """Class scores [q, C] for each k in ``ks`` (weighted votes of the k nearest neighbours, relative to
    the nearest one's weight; -inf for a class none of them voted for), searched on ``device``
    [default: the training features' device]."""
    if len(train_features) == 0 or len(train_features) != len(train_labels):
        raise ValueError(f"knn_classify needs training features and one label each, got {len(train_features)} features "
                         f"and {len(train_labels)} labels")
    if min(ks, default=0) < 1:
        raise ValueError(f"knn_classify needs every k of 1 or more, got {list(ks)}")
    if num_classes is not None and int(train_labels.max()) >= num_classes:
        raise ValueError(f"a training label is {int(train_labels.max())}, beyond num_classes {num_classes}")
    train = F.normalize(train_features.float(), dim=1)
    if device is not None:
        train = train.to(device)
    train_labels = train_labels.cpu()
    num_classes = num_classes or int(train_labels.max()) + 1
    k_max = min(max(ks), len(train))
    out = {k: [] for k in ks}
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        similarity, index = exact_search(train, q, k_max, query_chunk=chunk)
        # exp(cos / T) relative to the query's nearest neighbour: the same votes up to a factor per query,
        # which no ranking sees, and no overflow (exp(1 / 0.01) is inf in float32: a probe, 2026-12-06)
        weights = ((similarity - similarity.amax(1, keepdim=True)) / temperature).exp()
        neighbour_labels = train_labels[index]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(q), num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            voted = torch.zeros(len(q), num_classes, dtype=torch.bool)
            voted.scatter_(1, neighbour_labels[:, :kk], True)
            # a class no neighbour voted for scores -inf: never in a top 5, even where a voter's weight underflows
            # to 0 (at T = 0.001 a neighbour 0.15 below the nearest weighs exp(-150))
            out[k].append(votes.masked_fill_(~voted, float("-inf")))
    return {k: torch.cat(v) if v else torch.zeros(0, num_classes) for k, v in out.items()}


def accuracy(scores: torch.Tensor, labels: torch.Tensor, top: int) -> Optional[float]:
    """The share of queries whose label is among their ``top`` highest-scoring classes; a class no
    neighbour voted for (score -inf, :func:`knn_classify`) is never a hit, though DINO's ``eval_knn.py``
    fills its top 5 with such classes in arbitrary order (with 10 classes and every neighbour wrong it
    scored top-5 50 %).
    None (no top-5) when there are fewer than ``top`` classes: it would be 100 % by construction."""
    if len(labels) == 0:
        return float("nan")
    if top > scores.shape[1]:
        return None
    found = scores.topk(top, dim=1)
    hits = ((found.indices == labels[:, None]) & (found.values > float("-inf"))).any(1)
    return float(hits.double().mean())


def labels_for(features, labels_file, what: str, option: str = "a labels option") -> list[str]:
    """The label of each row of a feature folder: from its images' own folders, a labels file, or the
    split of a benchmark it was embedded from (:class:`mlsctl.data.datasets.ClassificationSplit`). Its
    notes and refusals name the images folder (``what``: whose, such as ``train``, or ""), where the labels'
    paths are read from: the features of a folder of images lie in a cache folder the user never named (a new
    user's probe, 2026-12-07)."""
    from mlsctl.data.datasets import ClassificationSplit

    if isinstance(labels_file, ClassificationSplit):
        return [labels_file.label_of(f) for f in features.files]
    return labels_of(features.files, Path(features.input_root), labels_file, images_folder(features, what), option)


def images_folder(features, what: str) -> str:
    """The images folder a feature folder was embedded from, as its labels' and tags' notes and refusals name
    it: ``train images /data/train`` (``what``: whose, or "")."""
    return " ".join(filter(None, (what, "images", str(features.input_root))))


def evaluate_knn(train_features, val_features, train_labels=None, val_labels=None,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07, device: str = "auto") -> dict:
    """Top-1/top-5 of every k for two feature folders (labels from folders or files) → a JSON-ready dict.
    Validation classes never seen in training count as errors and are listed. The search runs on
    ``device`` (:func:`search_device`)."""
    search_on = search_device(device)
    train_features.check_same_model(val_features)
    train_names = labels_for(train_features, train_labels, "train", "--train-labels")
    val_names = labels_for(val_features, val_labels, "val", "--val-labels")
    classes = sorted(set(train_names))
    # one class scored 100 %, and val classes none of which train holds 0 % for every k (a new user's probe, 2026-12-07)
    if len(classes) < 2:
        raise UserError(f"the training labels name 1 class ({classes[0]}): every val image would be called it; k-NN "
                        f"classification needs at least 2")
    if not set(val_names) & set(classes):
        # val/Boots/ against train/Boots/sub0/: labels files, not eval recall, are the fix (a new user's probe)
        nested = nested_split_hint(classes, val_names, "--train-labels and --val-labels")
        raise UserError(f"none of the {len(set(val_names))} val classes occurs in training (e.g. {val_names[0]}; "
                        f"training has {classes[0]}): " + (nested or "k-NN classification can only name training "
                                                           "classes; for unseen classes (retrieval splits such as "
                                                           "SOP's) use mlsctl eval recall"))
    lookup = {c: i for i, c in enumerate(classes)}
    train_y = torch.tensor([lookup[c] for c in train_names])
    val_y = torch.tensor([lookup.get(c, -1) for c in val_names])
    ks = sorted(set(ks))
    scores = knn_classify(train_features.finite_global_features(), train_y, val_features.finite_global_features(), ks,
                          temperature,
                          num_classes=len(classes), device=search_on)
    return {"train": str(train_features.path), "val": str(val_features.path), "train_images": len(train_features),
            "val_images": len(val_features), "classes": len(classes),
            "val_classes_unseen_in_train": sorted(set(val_names) - set(classes)),
            "val_classes_unseen_hint": nested_split_hint(classes, val_names, "--train-labels and --val-labels"),
            "temperature": temperature,
            "search": f"exact (torch matmul + top-k) on {search_on.type}", "model": train_features.model,
            # a k above the training set's size votes with all of it: "neighbours" says how many voted
            "chance": majority_class(train_names, val_names),
            "results": [{"k": k, "neighbours": min(k, len(train_features)), "top1": accuracy(scores[k], val_y, 1),
                         "top1_interval95": wilson_interval(accuracy(scores[k], val_y, 1), len(val_y)),
                         "top5": accuracy(scores[k], val_y, 5)} for k in ks]}


def score_table(result: dict, pct: Callable[[Optional[float]], str]) -> tuple[list[str], list[list[str]]]:
    """The headers and rows of an ``eval knn`` result as the console and the report show them (``pct`` formats a
    share in %): a row per k with the top-1's 95 % interval (:func:`~mlsctl.evaluate.baselines.wilson_interval`),
    then the majority-class rule's row, where the result records them (since 2026-12-07: a new user could not
    tell 12 % on ten classes from the share of the val set's largest class)."""
    rows = [[k_text(r, result.get("train_images")), pct(r["top1"]), interval_text(r.get("top1_interval95")),
             pct(r["top5"])] for r in result.get("results", [])]
    chance = result.get("chance")
    if isinstance(chance, dict):
        rows.append([f"majority class: {chance.get('majority_class')}", pct(chance.get("top1")), "",
                     pct(chance.get("top5"))])
    return ["k", "top-1 %", "top-1 95 % interval", "top-5 %"], rows


def k_text(row: dict, train_images: Optional[int]) -> str:
    """A result's ``k`` as the tables show it: ``100 (all 80)`` where it is more than the training images,
    which then all vote (``neighbours``; results from before it was recorded: ``train_images``), so that a
    k of 100 and 200 do not read as two neighbour counts (a new user's probe, 2026-12-07: the report left
    it out). A row that records neither is shown as it is."""
    neighbours = row.get("neighbours", min(row["k"], train_images) if isinstance(train_images, int) else row["k"])
    return str(row["k"]) if neighbours == row["k"] else f"{row['k']} (all {neighbours})"
