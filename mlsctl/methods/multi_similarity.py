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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_loss(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0, beta: float = 40.0, base: float = 0.5,
            epsilon: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Multi-Similarity loss of ``embeddings`` [B, D] (L2-normalised here) with labels [B], on the
    pairs the Multi-Similarity miner keeps; returns the loss and the mined pair counts."""
    from pytorch_metric_learning.losses import MultiSimilarityLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    x = F.normalize(embeddings.float(), dim=-1)
    pairs = MultiSimilarityMiner(epsilon=epsilon)(x, labels)
    loss = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)(x, labels, pairs)
    return loss, {"mined_positive_pairs": float(len(pairs[0])), "mined_negative_pairs": float(len(pairs[2]))}
