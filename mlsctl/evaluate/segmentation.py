"""Segmentation metrics as pure functions: a streaming confusion matrix, IoU, and the
Hungarian-matched mIoU (for predictions whose class ids are arbitrary, e.g. clusters).

Conventions: ``confusion[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p``;
pixels whose ground truth is ``ignore_index`` are not counted. A class takes part in the mean IoU
when it occurs in the ground truth or in the predictions (its union is not empty).
"""

from __future__ import annotations

import numpy as np


def confusion_update(confusion: np.ndarray, target: np.ndarray, prediction: np.ndarray,
                     ignore_index: int = 255) -> np.ndarray:
    """Add one image (or any batch of pixels) to ``confusion`` [C, C] int64; it grows when a
    class id ≥ C appears. Returns the (possibly new) matrix."""
    target = np.asarray(target).reshape(-1).astype(np.int64)
    prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
    if target.shape != prediction.shape:
        raise ValueError(f"target has {target.size} pixels, prediction {prediction.size}")
    keep = target != ignore_index
    target, prediction = target[keep], prediction[keep]
    if target.size == 0:
        return confusion
    if (target < 0).any() or (prediction < 0).any():
        raise ValueError("class ids must be non-negative")
    size = max(confusion.shape[0], int(target.max()) + 1, int(prediction.max()) + 1)
    if size > confusion.shape[0]:
        grown = np.zeros((size, size), dtype=np.int64)
        grown[:confusion.shape[0], :confusion.shape[1]] = confusion
        confusion = grown
    confusion += np.bincount(target * size + prediction, minlength=size * size).reshape(size, size)
    return confusion


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class; NaN where the class is in neither ground truth nor predictions."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    iou = iou_per_class(confusion)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def pixel_accuracy(confusion: np.ndarray) -> float:
    total = confusion.sum()
    return float(np.trace(confusion) / total) if total else float("nan")


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of a square matrix (Hungarian algorithm with potentials, O(n³)).
    Returns ``column[i]`` for each row ``i``."""
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError("cost matrix must be square")
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j]: row (1-based) assigned to column j; 0 = free
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        match[0] = row
        j0 = 0
        min_slack = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            slack = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            way[1:][better] = j0
            candidates = np.where(free, min_slack[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            min_slack[~used] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    column = np.zeros(n, dtype=np.int64)
    for j in range(1, n + 1):
        column[match[j] - 1] = j - 1
    return column


BACKGROUND_NAMES = ("background", "_background_", "__background__", "bg")


def foreground_scores(confusion: np.ndarray, names) -> dict[str, float]:
    """:func:`foreground_background_iou` where class 0 is a background — its name says so, or there are
    no names (fmnist-scenes' masks) — else nothing: ADE20K's class 0 is "wall", Cityscapes' "road" (a
    review, 2026-12-06)."""
    if names and names[0].strip().lower() not in BACKGROUND_NAMES:
        return {}
    return foreground_background_iou(confusion)


def foreground_background_iou(confusion: np.ndarray, background: int = 0) -> dict[str, float]:
    """IoU of foreground and background with every class but ``background`` merged into one
    foreground (fmnist-scenes: class 0 is the background, 1..10 the items), and their mean. At small
    training budgets this moves before the per-class mIoU does."""
    confusion = np.asarray(confusion, dtype=np.int64)
    is_fg = np.arange(confusion.shape[0]) != background
    binary = np.array([[confusion[~is_fg][:, ~is_fg].sum(), confusion[~is_fg][:, is_fg].sum()],
                       [confusion[is_fg][:, ~is_fg].sum(), confusion[is_fg][:, is_fg].sum()]])
    background_iou, foreground_iou = iou_per_class(binary)
    return {"foreground_iou": float(foreground_iou), "background_iou": float(background_iou),
            "binary_miou": float(np.nanmean([background_iou, foreground_iou]))}


def hungarian_mean_iou(confusion: np.ndarray) -> float:
    """mIoU after re-labelling predictions by the one-to-one matching of predicted to ground-truth
    classes that maximises the summed IoU (cost 1 − IoU, as open-hummingbird-eval's ``PredsmIoU``, whose
    headline number it is). Only meaningful when prediction ids are arbitrary (clusters); for label
    transfer the identity is one of the matchings, so it is at least the plain mIoU wherever the same
    classes are scored."""
    confusion = np.asarray(confusion, dtype=np.float64)
    union = confusion.sum(1, keepdims=True) + confusion.sum(0, keepdims=True) - confusion
    iou = np.divide(confusion, union, out=np.zeros_like(confusion), where=union > 0)
    column = linear_assignment(1.0 - iou)
    return mean_iou(confusion[:, column])


CONSTANT_RULE = "every val pixel called the training patches' most frequent class"  # what `chance` records


def constant_rule(confusion: np.ndarray, predicted_class: int, names=None) -> dict:
    """What calling every labelled val pixel ``predicted_class`` scores — the **constant rule**, with the
    training masks' most frequent class the segmentation's counterpart of the classifiers' majority class
    (docs/methods.md#what-a-score-is-measured-against): ``miou``, ``pixel_accuracy`` and, where class 0 is a
    background, :func:`foreground_scores`. The val pixels' true classes are ``confusion``'s row sums, so the
    rule is scored on exactly the pixels the model was: the predicted class's IoU is its share of the val
    pixels, every other class present in the val masks scores 0, and the mean runs over the classes the
    model's own mIoU runs over but those only the model predicted."""
    truth = np.asarray(confusion, dtype=np.int64).sum(1)
    size = max(len(truth), int(predicted_class) + 1)
    constant = np.zeros((size, size), dtype=np.int64)
    constant[:len(truth), int(predicted_class)] = truth
    return {"miou": mean_iou(constant), "pixel_accuracy": pixel_accuracy(constant),
            **foreground_scores(constant, names)}


def constant_rule_text(chance: dict) -> str:
    """``every pixel background: mIoU 6.4%, foreground IoU 0.0%, pixel accuracy 70.2%`` — a :func:`constant_rule`
    as recorded (with its ``majority_class``), in words."""
    from mlsctl.console import percent

    scores = [f"mIoU {percent(chance.get('miou'))}%"]
    if "foreground_iou" in chance:
        scores.append(f"foreground IoU {percent(chance.get('foreground_iou'))}%")
    scores.append(f"pixel accuracy {percent(chance.get('pixel_accuracy'))}%")
    return f"every pixel {chance.get('majority_class')}: {', '.join(scores)}"
