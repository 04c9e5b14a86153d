"""What the self-distillation methods share (DINO, CrIBo, MILE, SOVE; docs/methods.md#dino): a
student network and its EMA teacher, DINO's loss and center as pure functions, and the center's
once-per-step update.

* :func:`teacher_probabilities` — ``P_t = softmax((g_t(x) − C) / τ_t)``, the centered, sharpened
  teacher distribution (DINO's eq. 1 with the center ``C`` of section 3.1);
* :func:`cross_entropy` — ``H(P_t, P_s) = −Σ P_t log P_s`` with ``P_s = softmax(g_s(x′) / τ_s)``;
* :func:`dino_loss` — DINO's eq. 3: every teacher view against every *other* student view;
* :func:`center_statistics`, :func:`center_from_statistics`, :func:`updated_center` — the center
  ``C ← m·C + (1 − m)·mean g_t(x)`` over every process's rows;
* :class:`StepCenters` — that update once per optimiser step under gradient accumulation;
* :func:`build_student_teacher` — the two networks (:class:`StudentTeacherNet`: backbone + head),
  the teacher an exact, frozen copy of the student.

The methods' own parts stay in their packages (``mlsctl/methods/<name>/``); a method package
imports this module and :mod:`mlsctl.methods.base`, never another method's package
(``scripts/layers.py`` checks it).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlsctl import dist
from mlsctl.models.backbone import build_backbone


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


class StepCenters:
    """The center updates of one optimiser step. With gradient accumulation every micro-batch
    adds its teacher logits (:meth:`add`) and reads the center as it was at the start of the step;
    :meth:`apply` (from the method's ``end_step``) updates each center once, with the mean over
    the step's whole batch — every micro-batch of every process — exactly as one batch of all
    of them would (DINO's center is an EMA over optimiser steps of the batch mean: one update per
    micro-batch would make it forget A times faster and let later micro-batches see earlier ones)."""

    def __init__(self):
        self.pending: dict[str, list] = {}

    def add(self, name: str, center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> None:
        statistics = center_statistics(teacher_logits)
        if name in self.pending:
            self.pending[name][2] = self.pending[name][2] + statistics
        else:
            self.pending[name] = [center, momentum, statistics]

    @torch.no_grad()
    def apply(self) -> None:
        for center, momentum, statistics in self.pending.values():
            center.copy_(center_from_statistics(center, statistics, momentum))
        self.pending.clear()


class StudentTeacherNet(nn.Module):
    """Backbone + projection head (DINO's, or the method's own: CrIBo's, MILE's, SOVE's)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head


def build_student_teacher(recipe, head_factory, mask_token: bool = False) -> tuple[StudentTeacherNet, StudentTeacherNet]:
    """Student (with drop path) and teacher (without), the teacher a frozen copy of the student;
    ``mask_token`` gives both backbones the token of masked image modelling."""
    student_backbone = build_backbone(recipe.model, mask_token=mask_token)
    student = StudentTeacherNet(student_backbone, head_factory(student_backbone.embed_dim))
    teacher_backbone = build_backbone(recipe.model, drop_path_rate=0.0, load_weights=False, mask_token=mask_token)
    teacher = StudentTeacherNet(teacher_backbone, copy.deepcopy(student.head))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher
