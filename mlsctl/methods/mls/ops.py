"""MLS's losses as pure functions (docs/methods.md#mls-and-moco-v2): InfoNCE against the queue, the top-k
pseudo-labels from the label queue, the multi-label loss, and their sum :func:`mls_loss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, positive_key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: ``-log exp(q·k+/τ) / (exp(q·k+/τ) + Σ_j exp(q·Q_j/τ))`` averaged over the
    batch; ``query`` [B, d], ``positive_key`` [B, d], ``queue`` [D, d], all L2-normalised."""
    positive = (query * positive_key).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, query @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def pseudo_labels(features: torch.Tensor, queue: torch.Tensor, k: int) -> torch.Tensor:
    """``y`` [B, D]: 1 at the k queue entries most similar to each feature (cosine of normalised
    vectors: a dot product), 0 elsewhere — exactly k ones per row (ties broken by topk)."""
    if not 1 <= k <= queue.shape[0]:
        raise ValueError(f"k must be in [1, {queue.shape[0]}], got {k}")
    top = (features @ queue.T).topk(k, dim=1).indices
    return torch.zeros(len(features), queue.shape[0], dtype=features.dtype, device=features.device).scatter_(1, top, 1.0)


def multi_label_loss(query: torch.Tensor, queue: torch.Tensor, labels: torch.Tensor, temperature: float,
                     kind: str = "bce") -> torch.Tensor:
    """``L_ml`` of logits ``p = query · queueᵀ`` [B, D] against multi-hot ``labels`` [B, D]:

    * ``bce`` (MLS, Eq. 9): ``-1/D Σ_i [y_i log σ(p_i/τ) + (1 - y_i) log(1 - σ(p_i/τ))]``;
    * ``bce_pos`` (supplement Eq. 15): ``-1/D Σ_i y_i log σ(p_i/τ)``;
    * ``knn_softmax`` (supplement Eq. 10): ``-1/N_pos Σ_{i: y_i=1} log softmax(p/τ)_i``, a mean of logs as
      its Eq. 14 expands it (its Eq. 11's log of a sum differs for k > 1);

    each averaged over the batch."""
    logits = (query @ queue.T) / temperature
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels)
    if kind == "bce_pos":
        return (labels * F.softplus(-logits)).mean()
    if kind == "knn_softmax":
        log_p = F.log_softmax(logits, dim=1)
        return (-(labels * log_p).sum(dim=1) / labels.sum(dim=1).clamp_min(1)).mean()
    raise ValueError(f"unknown multi-label loss {kind!r}")


def mls_loss(z1: torch.Tensor, z2: torch.Tensor, label_features: torch.Tensor, label_queue: torch.Tensor,
             z_queue: torch.Tensor, *, k: int, temperature: float, weight: float,
             kind: str = "bce") -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """``L = InfoNCE(z1, z2, Q_z) + λ · L_ml(z1, Q_z, y)``, y = top-k of ``label_features ·
    label_queueᵀ`` (g1 and Q_g in MLS). Returns (loss, detached terms, labels). λ = 0 skips the
    multi-label term: MoCo-v2's loss, InfoNCE alone."""
    contrastive = info_nce(z1, z2, z_queue, temperature)
    labels = pseudo_labels(label_features.detach(), label_queue, k)
    if weight == 0:
        return contrastive, {"info_nce": contrastive.detach()}, labels
    ml = multi_label_loss(z1, z_queue, labels, temperature, kind)
    return contrastive + weight * ml, {"info_nce": contrastive.detach(), "multi_label": ml.detach()}, labels
