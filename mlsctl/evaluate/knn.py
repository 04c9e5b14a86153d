"""Weighted k-NN classification on global features (the DINO protocol).

Features are L2-normalised; each query takes its ``max(ks)`` nearest training features by cosine
similarity once, and for every ``k`` the classes of its first ``k`` neighbours vote with weight
``exp(cos / T)`` (T = 0.07). Top-1 and top-5 accuracy are reported for each k. Queries are
processed in chunks, so memory is bounded by ``chunk × n_train``.

Labels come from the folder names of the files (``cat/001.jpg`` → ``cat``) or from a labels file:
CSV (``path,label`` with an optional header) or JSONL (``{"path": ..., "label": ...}``), paths
relative to the features' input root (or absolute).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mlsctl.errors import UserError

DEFAULT_KS = (10, 20, 100, 200)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07, num_classes: Optional[int] = None,
                 chunk: int = 1024) -> dict[int, torch.Tensor]:
    """Class scores [q, C] for each k in ``ks`` (weighted votes of the k nearest neighbours)."""
    train = F.normalize(train_features.float(), dim=1)
    num_classes = num_classes or int(train_labels.max()) + 1
    k_max = min(max(ks), len(train))
    out = {k: [] for k in ks}
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        similarity, index = (q @ train.T).topk(k_max, dim=1)
        weights = (similarity / temperature).exp()
        neighbour_labels = train_labels[index]
        for k in ks:
            kk = min(k, k_max)
            votes = torch.zeros(len(q), num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            out[k].append(votes)
    return {k: torch.cat(v) if v else torch.zeros(0, num_classes) for k, v in out.items()}


def accuracy(scores: torch.Tensor, labels: torch.Tensor, top: int) -> float:
    if len(labels) == 0:
        return float("nan")
    top = min(top, scores.shape[1])
    hits = (scores.topk(top, dim=1).indices == labels[:, None]).any(1)
    return float(hits.float().mean())


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file, or one sentence saying it is missing or not one."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text (a binary or damaged file?); give a CSV or JSONL file") from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def csv_rows(text: str, path: Path):
    """(line number, row) of a CSV text; a row the csv module refuses (a field over its 128 KiB
    limit, a NUL byte) is one sentence naming the file and the line."""
    reader = csv.reader(text.splitlines())
    number = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{path}:{reader.line_num} is not a CSV row mlsctl can read ({exc}); a labels file holds "
                            f"short path and label fields") from None
        number = reader.line_num
        yield number, row


def read_labels_file(path: Path) -> dict[str, str]:
    labels: dict[str, str] = {}
    text = read_text_file(path, "labels file")
    if path.suffix.lower() in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                labels[str(record["path"])] = str(record["label"])
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                raise UserError(f"{path}:{number} is not a JSON object with 'path' and 'label'") from None
    else:
        for number, row in csv_rows(text, path):
            if not row or (number == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]):
                continue
            if len(row) < 2:
                raise UserError(f"{path}:{number} needs two columns, path and label")
            labels[row[0].strip()] = row[1].strip()
    if not labels:
        raise UserError(f"labels file {path} holds no labels")
    return labels


def labels_for(features, labels_file: Optional[Path], what: str) -> list[str]:
    """The label of each row of a feature folder."""
    return labels_of(features.files, Path(features.input_root), labels_file, f"{what} {features.path}")


def labels_of(files: Sequence[str], root: Path, labels_file: Optional[Path], what: str) -> list[str]:
    """The label of each file (relative to ``root``): its folder name, or its row of ``labels_file``
    (keyed by the relative or the absolute path)."""
    if labels_file is None:
        names = [Path(f).parent.as_posix() for f in files]
        if any(n in ("", ".") for n in names):
            example = next(f for f, n in zip(files, names) if n in ("", "."))
            raise UserError(f"{what}: {example} is not inside a class folder; images outside class folders need a "
                            f"labels file (CSV or JSONL of path,label)")
        return names
    table = read_labels_file(Path(labels_file))
    out, missing = [], []
    for relpath in files:
        label = table.get(relpath, table.get(str(root / relpath)))
        if label is None:
            missing.append(relpath)
        out.append(label)
    if missing:
        raise UserError(f"labels file {labels_file} has no label for {len(missing)} images of {what} (first: {missing[0]})")
    return out


def evaluate_knn(train_features, val_features, train_labels: Optional[Path] = None, val_labels: Optional[Path] = None,
                 ks: Sequence[int] = DEFAULT_KS, temperature: float = 0.07) -> dict:
    """Top-1/top-5 of every k for two feature folders (labels from folders or files) → a JSON-ready dict.
    Validation classes never seen in training count as errors and are listed."""
    train_features.check_same_model(val_features)
    train_names = labels_for(train_features, train_labels, "train features")
    val_names = labels_for(val_features, val_labels, "val features")
    classes = sorted(set(train_names))
    lookup = {c: i for i, c in enumerate(classes)}
    train_y = torch.tensor([lookup[c] for c in train_names])
    val_y = torch.tensor([lookup.get(c, -1) for c in val_names])
    ks = sorted(set(ks))
    scores = knn_classify(train_features.global_features(), train_y, val_features.global_features(), ks, temperature,
                          num_classes=len(classes))
    return {"train": str(train_features.path), "val": str(val_features.path), "train_images": len(train_features),
            "val_images": len(val_features), "classes": len(classes),
            "val_classes_unseen_in_train": sorted(set(val_names) - set(classes)), "temperature": temperature,
            "model": train_features.model,
            "results": [{"k": k, "top1": accuracy(scores[k], val_y, 1), "top5": accuracy(scores[k], val_y, 5)}
                        for k in ks]}
