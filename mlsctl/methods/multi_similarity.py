"""The Multi-Similarity loss (Wang et al., CVPR 2019) with its miner, as one pure function: what the
``ms`` method trains a backbone with and context refinement trains its refiner with
(docs/methods.md#multi-similarity), so it sits beside the methods rather than in one of them.

pytorch-metric-learning's ``MultiSimilarityMiner(epsilon)`` picks, for every anchor i, the
positives with ``S_ip − ε < max_n S_in`` and the negatives with ``S_in + ε > min_p S_ip`` (cosine
similarities S); ``MultiSimilarityLoss(alpha, beta, base)`` is then, averaged over the anchors of
the batch (an anchor with no mined pair adds 0),
``1/α · log(1 + Σ_P exp(−α (S_ip − λ))) + 1/β · log(1 + Σ_N exp(β (S_in − λ)))`` with α = 2,
β = 40, λ = ``base`` = 0.5 (the refinement supplement's values; the MS paper's text has λ = 1),
ε = 0.1 (the MS authors' code); the library's defaults differ, so they are always passed.

With several processes, :func:`ms_loss_over_processes` mines and scores the step's whole batch, as one
process holding it would (pytorch-metric-learning's ``DistributedLossWrapper`` does the same, scaling
the loss's value by the processes; here only its gradient is scaled, so the logged value is the loss).
"""

from __future__ import annotations

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
