"""DINO's loss and center as pure functions (docs/methods.md#dino): the teacher's centered,
sharpened distribution, the cross-view cross-entropy, and the center's EMA over every process.
CrIBo and MILE reuse them."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mlsctl import dist


def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax((t - center) / tau_t)``: the centered, sharpened teacher distribution."""
    return F.softmax((teacher_logits - center) / temperature, dim=-1)


def cross_entropy(target_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Mean over rows of ``H(p, q) = -sum p log q`` with ``q = softmax(s / tau_s)``."""
    return torch.sum(-target_probs * F.log_softmax(student_logits / student_temp, dim=-1), dim=-1).mean()


def dino_loss(student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temp: float) -> torch.Tensor:
    """Cross-view DINO loss: every teacher view ``i`` against every student view ``v != i``,
    averaged over those pairs. Student views are ordered global crops first, as the teacher's."""
    total = student_logits[0].new_zeros(())
    pairs = 0
    for i, target in enumerate(teacher_probs):
        for v, logits in enumerate(student_logits):
            if v == i:
                continue
            total = total + cross_entropy(target, logits, student_temp)
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least one cross-view pair (two views)")
    return total / pairs


@torch.no_grad()
def center_statistics(teacher_logits: torch.Tensor) -> torch.Tensor:
    """[K + 1]: the sum of the rows of ``teacher_logits`` [n, K] (float32) and their number; sums
    of several batches' statistics are the statistics of their union."""
    # filled on the device: new_tensor would copy from the host, which waits for the device on CUDA
    rows = teacher_logits.new_full((1,), len(teacher_logits), dtype=torch.float32)
    return torch.cat([teacher_logits.float().sum(dim=0), rows])


@torch.no_grad()
def center_from_statistics(center: torch.Tensor, statistics: torch.Tensor, momentum: float) -> torch.Tensor:
    """EMA of the mean teacher logits over every process's rows (:func:`center_statistics`).
    Processes may hold different numbers of rows (CrIBo's objects), even none; when no process
    holds any, the center stays. Every process must call it."""
    total = dist.all_reduce_sum(statistics)
    count = total[-1]  # stays on the device: no host synchronisation
    updated = center * momentum + (total[None, :-1] / count.clamp_min(1.0)) * (1 - momentum)
    return torch.where(count > 0, updated, center)


def updated_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """The center after one batch of ``teacher_logits`` (:func:`center_from_statistics`)."""
    return center_from_statistics(center, center_statistics(teacher_logits), momentum)
