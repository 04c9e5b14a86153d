"""DINO: self-distillation with no labels (Caron et al., 2021) — the baseline of every method
(docs/methods.md#dino).

A student network (ViT + :class:`~mlsctl.models.heads.DINOHead`) sees every crop; its EMA copy,
the teacher, sees the two global crops. The teacher's output, centered and sharpened
(:func:`~mlsctl.methods.self_distillation.teacher_probabilities`), is the target of the student's
output on every *other* crop (:func:`~mlsctl.methods.self_distillation.dino_loss`). The center is
an EMA (momentum 0.9) of the batch-mean teacher logits over all processes
(:func:`~mlsctl.methods.self_distillation.updated_center`), updated once per optimiser step
(:class:`~mlsctl.methods.self_distillation.StepCenters`: with gradient accumulation, from the mean
over every micro-batch of the step). The teacher temperature warms up linearly over epochs, the
teacher momentum follows a cosine from ``momentum_teacher`` to 1. These pieces are CrIBo's, MILE's
and SOVE's too, so they live in :mod:`mlsctl.methods.self_distillation`.

Besides the paper: a monitor bank (``cls``) of recent teacher CLS embeddings (image id, step and
the box of global view 1 as payload) so ``mlsctl bank`` commands can look inside a DINO run; it
plays no part in the loss (``monitor_bank_size: 0`` turns it off).
"""

from __future__ import annotations

import torch

from mlsctl.bank import Column, MemoryBank, QueryFeature
from mlsctl.methods.base import Method, StepOutput
from mlsctl.methods.dino.config import DINOConfig
from mlsctl.methods.self_distillation import StepCenters, build_student_teacher, dino_loss, teacher_probabilities
from mlsctl.models.heads import DINOHead


class DINO(Method):
    Config = DINOConfig

    def __init__(self, recipe, schedule):
        super().__init__(recipe, schedule)
        cfg = self.cfg

        def head(dim: int) -> DINOHead:
            return DINOHead(dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.norm_last_layer)

        self.student, self.teacher = build_student_teacher(recipe, head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.step_centers = StepCenters()
        self.n_global = recipe.data.global_crops.count
        self.monitor = None
        if cfg.monitor_bank_size:
            self.monitor = MemoryBank(cfg.monitor_bank_size, self.student.backbone.embed_dim,
                                      {"image_id": Column((), torch.long), "box": Column((4,), torch.float32)},
                                      query_feature=QueryFeature("cls"))

    @classmethod
    def check_recipe(cls, recipe):
        if recipe.data.global_crops.count != 2:
            return [("data.global_crops.count", f"must be 2 for DINO (two teacher views), got {recipe.data.global_crops.count}")]
        return []

    def ema_pairs(self):
        return [(self.student, self.teacher)]

    def end_step(self, step):
        self.step_centers.apply()

    def banks(self):
        return {"cls": self.monitor} if self.monitor is not None else {}

    def last_layer_parameters(self):
        return list(self.student.head.last_layer.parameters())

    def teacher_backbone(self):
        return self.teacher.backbone

    def teacher_temperature(self, step: int) -> float:
        return self.cfg.teacher_temperature_at(self.schedule.epoch(step))

    def training_step(self, batch, step):
        cfg = self.cfg
        crops = batch.crops
        with torch.no_grad():
            teacher_out = self.teacher.backbone(torch.cat(crops[: self.n_global]))
            teacher_logits = self.teacher.head(teacher_out.cls).float()
        student_cls = torch.cat([o.cls for o in self.student.backbone.forward_crops(crops)])
        student_logits = self.student.head(student_cls).float()

        temperature = self.teacher_temperature(step)
        targets = teacher_probabilities(teacher_logits, self.center, temperature)
        loss = dino_loss(student_logits.chunk(len(crops)), targets.chunk(self.n_global), cfg.student_temp)

        self.step_centers.add("center", self.center, teacher_logits, cfg.center_momentum)
        if self.monitor is not None:
            b = len(batch)
            self.monitor.enqueue(teacher_out.cls[:b].float(), step=step, image_id=batch.image_ids,
                                 box=batch.boxes[:, 0].float())
        entropy = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()
        return StepOutput(loss, terms={"dino": loss.detach()},
                          metrics={"teacher_temp": temperature, "teacher_entropy": entropy.detach()})
