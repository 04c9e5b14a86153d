"""The Multi-Similarity loss (Wang et al., CVPR 2019) with its miner, as one pure function: what the
``ms`` method trains a backbone with and context refinement trains its refiner with
(docs/methods.md#multi-similarity), so it sits beside the methods rather than in one of them.

pytorch-metric-learning's ``MultiSimilarityMiner(epsilon)`` picks, for every anchor i, the
positives with ``S_ip − ε < max_n S_in`` and the negatives with ``S_in + ε > min_p S_ip`` (cosine
similarities S); ``MultiSimilarityLoss(alpha, beta, base)`` is then, averaged over the anchors of
the batch (an anchor with no mined pair adds 0),
``1/α · log(1 + Σ_P exp(−α (S_ip − λ))) + 1/β · log(1 + Σ_N exp(β (S_in − λ)))`` with α = 2,
β = 40, λ = ``base`` = 0.5, ε = 0.1: the MS authors' released code's values, which the refinement
supplement's setup follows (the MS paper's text gives β = 50 and λ = 1); the library's defaults differ,
so they are always passed.

With several processes, :func:`ms_loss_over_processes` mines and scores the step's whole batch, as one
process holding it would (pytorch-metric-learning's ``DistributedLossWrapper`` does the same, scaling
the loss's value by the processes; here only its gradient is scaled, so the logged value is the loss).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def ms_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5,
            epsilon: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-Similarity loss of ``embeddings`` [B, D] (L2-normalised here) with labels [B], on the
    pairs the Multi-Similarity miner keeps; returns the loss and the mined pair counts. The
    similarities are float32 under any autocast: in bf16 (steps of ~0.004 near 1) β = 40 turns one
    rounding step into a factor of e^0.16, and mining decisions within ε = 0.1 flip."""
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    from mlsctl.device import full_float32

    with full_float32(embeddings.device.type):
        x = F.normalize(embeddings.float(), dim=-1)
        pairs = MultiSimilarityMiner(epsilon=epsilon)(x, labels)
        loss = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(x, labels, pairs)
    return loss, {"mined_positive_pairs": float(len(pairs[0])), "mined_negative_pairs": float(len(pairs[2]))}


def ms_loss_over_processes(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 40.0,
                           base: float = 0.5, epsilon: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`ms_loss` of the batch of every process together (in rank order), so that pairs are mined across
    processes and W processes of batch b compute what one process of batch W·b computes (without gradient
    accumulation; with it, micro-batch m of every process is one pool: docs/accumulation.md). The other processes'
    rows take part without gradient; this process's rows get W times the gradient the whole batch's loss has at
    them, so DDP's mean over the W processes is one process's gradient. The value is the whole batch's loss
    (the same on every process), and so are the mined pair counts. One process: :func:`ms_loss`."""
    from mlsctl import dist

    world = dist.world_size()
    if world == 1:
        return ms_loss(embeddings, labels, alpha, beta, base, epsilon)
    with torch.no_grad():
        everything, counts = dist.gather_cat_with_counts(embeddings.detach())  # the counts travel on the host
        all_labels = dist.gather_cat(labels.to(embeddings.device))
    start = sum(counts[:dist.rank()])
    rows = torch.cat([everything[:start], embeddings, everything[start + len(embeddings):]])
    loss, mined = ms_loss(rows, all_labels, alpha, beta, base, epsilon)
    return loss + (world - 1) * (loss - loss.detach()), mined


class MiningCount:
    """The optimiser steps of this session whose loss was 0 because of what the Multi-Similarity miner found
    in their batches (every micro-batch, every process: the miner sees the whole step's pool): no pair, or at
    most one positive and one negative pair, which pytorch-metric-learning's loss scores 0 (its pair losses
    need more than one pair to count: :func:`mined_too_little`). Such steps teach nothing, which a run's last
    loss alone does not tell (a new user's probe, 2026-12-07: 7 of 15 steps, and "final loss 0.0000")."""

    def __init__(self):
        self.steps, self.empty, self._step, self._taught = 0, 0, None, False

    def add(self, step: int, mined: dict[str, float]) -> None:
        """One batch's mined pair counts (host numbers: the miner's index lists' lengths)."""
        if step != self._step:
            self._close()
            self.steps, self._step = self.steps + 1, step
        self._taught = self._taught or not mined_too_little(mined)

    def _close(self) -> None:
        if self._step is not None and not self._taught:
            self.empty += 1
        self._taught = False

    def notes(self) -> list[str]:
        self._close()
        self._step = None
        if not self.empty:
            return []
        return [f"the Multi-Similarity miner found too few pairs for a loss (none, or at most one positive and one "
                f"negative pair) in {self.empty} of the {self.steps} steps of this session (loss 0, metrics "
                f"mined_positive_pairs and mined_negative_pairs): those steps taught nothing; batches of more classes "
                f"(a larger optim.batch_size) or classes of more distinct images give it pairs"]


def mined_too_little(mined: dict[str, float]) -> bool:
    """Whether pytorch-metric-learning's Multi-Similarity loss is 0 for a batch of these mined pair counts: at
    most one positive and one negative pair (``GenericPairLoss`` returns zero losses when every index list of
    the pairs has at most one entry), where the paper's formula is not 0 for a single anchor's pair of each."""
    return mined["mined_positive_pairs"] <= 1 and mined["mined_negative_pairs"] <= 1


def short_classes_note(labels: torch.Tensor, m: int, batch_size: int, per_class: str = "method.m_per_class",
                       crops: bool = False) -> Optional[str]:
    """A note where classes hold fewer images than a batch takes of each (``m``): the m-per-class sampler
    draws their images again. With ``crops`` (MS) a repeat is another crop of the image (each draw's crop is
    seeded by the draw: :mod:`mlsctl.data.mperclass`), a positive pair of one photo, which teaches only
    the crops' differences; without (refinement) it is the same features and neighbours, two equal
    embeddings from which the miner gets nothing (a new user's probe, 2026-12-07: In-shop's query split of 2
    photos per item at m 4 mined no pair in 7 of 15 steps, when a repeat was still the same crop)."""
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    short = counts[counts < m]
    if not len(short):
        return None
    fewest = int(short.min())
    fix = ("give classes of two images or more" if fewest < 2 else
           f"set {per_class}={fewest} (optim.batch_size a multiple of it)" if batch_size % fewest == 0 else
           f"set {per_class}={fewest} and optim.batch_size a multiple of it")
    singles = int((short == 1).sum())
    alone = "no positive but crops of that image" if crops else "no positive pair at all"
    lone = f", {singles} of a single image ({alone})" if singles else ""
    repeat = ("a repeat is another crop of the same image, a positive pair that teaches only the crops' differences"
              if crops else "an image drawn twice in a step gives two equal embeddings, which give the miner no pair")
    return (f"{len(short)} of the {len(counts)} classes have fewer images than {per_class}={m} "
            f"(fewest: {fewest}{lone}): a batch takes {m} of each class, drawing its images again, and {repeat}; {fix}")


def labelled_data(recipe) -> str:
    """Where a Multi-Similarity run's classes come from, as a note names it: its labels file, or ``data.root``."""
    labels_file = recipe.method.labels_file
    return f"method.labels_file {labels_file}" if labels_file else f"data.root {recipe.data.root}"
