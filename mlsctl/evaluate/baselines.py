"""What a classification score is measured against: the majority class, a random ranking, and the
uncertainty of a score on a finite val set (docs/methods.md#what-a-score-is-measured-against).

A top-1 of 12 % on ten classes reads as learning until one knows that the val set's largest class
is 12 % of it, and a gain of 3 points on 100 val images is within the noise of the val sample. The
k-NN and linear evaluations therefore record, beside their scores:

* ``chance`` — the **majority-class rule**: every val image is called the training set's most frequent
  class (ties: the first name in sorted order), so its top-1 is that class's share of the val images;
  its top-5 is the share of val images in the five most frequent training classes. For multi-label
  probes, the mAP of a **random ranking**, exactly (:func:`random_ranking_ap`);
* ``top1_interval95`` — the 95 % **Wilson score interval** of the top-1 as a binomial proportion of the val
  images (:func:`wilson_interval`). It is the uncertainty of one model's score over the draw of val
  images; two models on the *same* val images differ more reliably than two such intervals suggest (a
  paired comparison), so non-overlapping intervals are a conservative test, overlapping ones no verdict.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

Z_95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson_interval(share: float, n: int, z: float = Z_95) -> Optional[list[float]]:
    """The Wilson score interval [low, high] of a proportion ``share`` observed on ``n`` trials (95 % by
    default); None for no trials or a share that is not a finite number in [0, 1]. Unlike share ± z·√(p(1-p)/n),
    it stays inside [0, 1] and is not empty at 0 % or 100 % (Wilson 1927; Brown, Cai & DasGupta 2001)."""
    if n <= 0 or share is None or not math.isfinite(share) or not 0.0 <= share <= 1.0:
        return None
    z2 = z * z
    centre = (share + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def majority_class(train_labels: Sequence[str], val_labels: Sequence[str]) -> dict:
    """The majority-class rule's scores: ``majority_class`` (the most frequent training label, ties by
    name), ``top1`` (the share of val images of that class) and ``top5`` (the share of val images in the five
    most frequent training classes; None with fewer than 5 classes, where top-5 is 100 % by construction)."""
    counts = Counter(train_labels)
    ranked = sorted(counts, key=lambda name: (-counts[name], name))
    n = len(val_labels)
    val_counts = Counter(val_labels)

    def share(names) -> float:
        return sum(val_counts[name] for name in names) / n if n else float("nan")

    return {"rule": "every val image called the most frequent training class", "majority_class": ranked[0],
            "top1": share(ranked[:1]), "top5": share(ranked[:5]) if len(ranked) >= 5 else None}


def random_ranking_ap(positives: int, n: int) -> float:
    """The expected average precision of a random ranking of ``n`` items of which ``positives`` are relevant,
    exactly. The item at rank r is relevant with probability P/N and, given that, each of the r - 1 before it
    is with probability (P - 1)/(N - 1), so AP = (1/P) Σ_r prec@r·[r relevant] has the expectation
    (1/N) Σ_r (1 + (r - 1)(P - 1)/(N - 1)) / r = H_N / N + (P - 1)(N - H_N) / (N (N - 1)), with
    H_N = 1 + 1/2 + ... + 1/N: about P/N, more for few items. NaN without a positive (no AP, as
    :func:`mlsctl.evaluate.linear.average_precision`)."""
    if positives <= 0 or n <= 0:
        return float("nan")
    harmonic = sum(1.0 / r for r in range(1, n + 1))
    value = harmonic / n
    if positives > 1:  # then n > 1 too
        value += (positives - 1) * (n - harmonic) / (n * (n - 1))
    return value


def random_ranking_map(positives_per_class: Sequence[int], n: int) -> float:
    """The mAP of a random ranking over the classes with at least one positive among ``n`` val images, as
    :func:`mlsctl.evaluate.linear.mean_average_precision` averages them."""
    values = [random_ranking_ap(p, n) for p in positives_per_class if p > 0]
    return sum(values) / len(values) if values else float("nan")


def interval_text(interval: Optional[Sequence[float]]) -> str:
    """``8.3–20.1`` (in %), or "–" where there is none."""
    if not interval:
        return "–"
    return f"{100 * interval[0]:.1f}–{100 * interval[1]:.1f}"
