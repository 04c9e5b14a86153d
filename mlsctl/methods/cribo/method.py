"""CrIBo: cross-image object-level bootstrapping (Lebailly et al., ICLR 2024; docs/methods.md#cribo).

Per image, two global views with their crop boxes. The teacher's last-layer tokens of both views
are clustered jointly (:func:`~mlsctl.methods.cribo.ops.joint_clustering`, semantic + positional
cost, Sinkhorn); each cluster present in both views is an *object*, represented per view by the
mean of its tokens (``c_1^k``, ``c_2^k``; :func:`~mlsctl.methods.cribo.ops.pool_objects`). The
student's objects reuse the teacher's assignment. Three losses (docs/methods.md#cribo-losses),
summed with weights 1 : 1 : 1, each the mean of its two directions (the authors' convention for
all three):

* global: DINO's cross-view loss on the CLS token (head last layer ``last_layer``);
* cross-view object (:func:`cross_view_object_loss`): ``1/2 · [H(p_t(c_1^k), p_s(c_2^k)) +
  H(p_t(c_2^k), p_s(c_1^k))]`` averaged over the valid objects, through the same head MLP with its
  own last layer (``object_layer``), its own center and temperatures. The paper's eq. 6 writes the
  sum; the authors' code halves it, and so do we (a sum would weigh this term twice);
* cross-image object (:func:`cross_image_object_loss`): the teacher distribution of an object's
  nearest neighbour in the object bank (``M1``/``M2``: the stored view-1/view-2 teacher vectors)
  against the student's object of the other view, for the pairs that pass the cycle check
  (:func:`~mlsctl.methods.cribo.ops.cycle_consistent_neighbours`); each direction averaged over
  its own valid pairs, then the two directions averaged. The authors divide both directions by
  the first direction's count, a slip we do not copy. On once S images have been written.

The object bank (``objects``) stores pre-head teacher object vectors of both views side by side
([2D]) with payload image id, both view boxes (``box`` is view 1's), the object's bounding box in
view 1 (``region``, original pixels) and cluster id; it is queried before the batch is
enqueued and gathered across processes. The bootstrapping ratio (cycle-consistent pairs over
2 × objects) is logged every step, with the valid objects per image, and the seconds spent in
clustering, retrieval and the bank update.

With gradient accumulation "the batch" is the optimiser step's: every micro-batch retrieves from
the bank as it was at the start of the step, the step's objects are written at its end, and both
centres move once per step (:class:`~mlsctl.methods.self_distillation.StepCenters`); the object losses stay
means over each micro-batch's own objects, as over each process's (docs/accumulation.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from mlsctl import dist
from mlsctl.bank import Column, MemoryBank, QueryFeature
from mlsctl.device import full_float32
from mlsctl.methods.base import Method, StepOutput, metric_ratio
from mlsctl.methods.cribo.config import CrIBoConfig
from mlsctl.methods.cribo.ops import (clustering_seeds, cycle_consistent_neighbours, joint_clustering, object_boxes,
                                      patch_positions, pool_objects)
from mlsctl.methods.self_distillation import (StepCenters, build_student_teacher, cross_entropy, dino_loss,
                                              teacher_probabilities)
from mlsctl.models.heads import DINOHead, WeightNormLinear
from mlsctl.schedules import linear_warmup_epochs


def cross_view_object_loss(p1: torch.Tensor, p2: torch.Tensor, s1_logits: torch.Tensor, s2_logits: torch.Tensor,
                           student_temp: float) -> torch.Tensor:
    """``1/2 · [H(p1, q(s2)) + H(p2, q(s1))]``, each H averaged over the objects: teacher targets
    ``p1``/``p2`` [V, K] of view 1/2, student logits of the other view."""
    return 0.5 * (cross_entropy(p1, s2_logits, student_temp) + cross_entropy(p2, s1_logits, student_temp))


def cross_image_object_loss(q1: torch.Tensor, q2: torch.Tensor, s1_logits: torch.Tensor, s2_logits: torch.Tensor,
                            valid1: torch.Tensor, valid2: torch.Tensor, student_temp: float) -> torch.Tensor:
    """The mean over the two directions of ``H(q1, q(s2))`` over the pairs ``valid1`` and
    ``H(q2, q(s1))`` over ``valid2`` (a direction without a valid pair contributes 0): ``q1``/``q2``
    [V, K] are the teacher distributions of the bank neighbours of view-1/view-2 objects."""
    h12 = -(q1 * torch.log_softmax(s2_logits / student_temp, -1)).sum(-1)
    h21 = -(q2 * torch.log_softmax(s1_logits / student_temp, -1)).sum(-1)
    first = (h12 * valid1).sum() / valid1.sum().clamp_min(1)
    second = (h21 * valid2).sum() / valid2.sum().clamp_min(1)
    return 0.5 * (first + second)


class CrIBoHead(nn.Module):
    """DINO head whose MLP is shared by the CLS token and the objects, with one output layer each."""

    def __init__(self, in_dim: int, cfg: CrIBoConfig):
        super().__init__()
        self.head = DINOHead(in_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                             cfg.norm_last_layer)
        self.object_layer = WeightNormLinear(cfg.bottleneck_dim, cfg.out_dim, fixed_gain=cfg.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def objects(self, x: torch.Tensor) -> torch.Tensor:
        return self.object_layer(self.head.project(x))


class CrIBo(Method):
    Config = CrIBoConfig
    find_unused_parameters: ClassVar[bool] = True  # the loss ablations leave an output layer unused

    def __init__(self, recipe, schedule):
        super().__init__(recipe, schedule)
        cfg = self.cfg
        self.student, self.teacher = build_student_teacher(recipe, lambda dim: CrIBoHead(dim, cfg))
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("object_center", torch.zeros(1, cfg.out_dim))
        self.step_centers = StepCenters()
        dim = self.student.backbone.embed_dim
        self.dim = dim
        # vectors: [c_1^k | c_2^k]; box and region: view 1's crop and the object's part of it
        self.bank = MemoryBank(cfg.bank_images * cfg.n_clusters, 2 * dim, {
            "image_id": Column((), torch.long), "box": Column((4,), torch.float32),
            "box_view2": Column((4,), torch.float32), "region": Column((4,), torch.float32),
            "cluster_id": Column((), torch.long)}, query_feature=QueryFeature("patch_mean", 0, dim))

    @classmethod
    def check_recipe(cls, recipe):
        errors = []
        if recipe.data.global_crops.count != 2:
            errors.append(("data.global_crops.count", f"must be 2 for CrIBo (two views per image), got "
                                                      f"{recipe.data.global_crops.count}"))
        cfg = recipe.method
        if not (cfg.global_loss or cfg.cross_view_loss or cfg.cross_image_loss):
            errors.append(("method.global_loss", "at least one of the three CrIBo losses must be on"))
        tokens = 2 * (recipe.data.global_crops.size // recipe.model.patch_size) ** 2
        if cfg.n_clusters > tokens:
            errors.append(("method.n_clusters", f"{cfg.n_clusters} clusters for {tokens} tokens per image; lower it"))
        return errors

    def run_notes(self, elements: int) -> list[str]:
        steps = self.schedule.total_steps
        per_step = elements // max(steps, 1)
        if self.cfg.cross_image_loss and (steps - 1) * per_step < self.cfg.bank_images:
            return [f"the cross-image loss comes on once method.bank_images={self.cfg.bank_images} images have been "
                    f"written; this run writes {(steps - 1) * per_step} before its last step ({steps} steps of "
                    f"{per_step} images), so it stays off: lower method.bank_images or train longer"]
        return []

    def ema_pairs(self):
        return [(self.student, self.teacher)]

    def end_step(self, step):
        self.step_centers.apply()

    def banks(self):
        return {"objects": self.bank}

    def last_layer_parameters(self):
        return [*self.student.head.head.last_layer.parameters(), *self.student.head.object_layer.parameters()]

    def teacher_backbone(self):
        return self.teacher.backbone

    def _temperature(self, step: int, start: float, end: float) -> float:
        return linear_warmup_epochs(self.schedule.epoch(step), self.cfg.warmup_teacher_temp_epochs, start, end)

    def training_step(self, batch, step):
        cfg = self.cfg
        timer = self.timer(batch.crops[0].device)  # time/...: on the logged steps only
        objects = self._teacher_objects(batch, step, timer)
        student_cls_logits, s1_logits, s2_logits = self._student_logits(batch.crops, objects)

        temperature = self._temperature(step, cfg.warmup_teacher_temp, cfg.teacher_temp)
        object_temperature = self._temperature(step, cfg.object_warmup_teacher_temp, cfg.object_teacher_temp)
        terms = {}
        targets = teacher_probabilities(objects.teacher_cls_logits, self.center, temperature)
        terms["global"] = dino_loss(student_cls_logits.chunk(len(batch.crops)), targets.chunk(2), cfg.student_temp)
        object_targets = teacher_probabilities(objects.teacher_object_logits, self.object_center, object_temperature)
        p1, p2 = object_targets.chunk(2)
        zero = student_cls_logits.new_zeros(())
        terms["cross_view"] = (cross_view_object_loss(p1, p2, s1_logits, s2_logits, cfg.object_student_temp)
                               if objects.count else zero)
        with timer("time/retrieval"):
            accumulate = self.micro_batch[1]
            terms["cross_image"], ratio = self._cross_image_term(objects, s1_logits, s2_logits, object_temperature,
                                                                 zero, step, len(batch) * accumulate * dist.world_size())
        loss = zero
        for name, on in (("global", cfg.global_loss), ("cross_view", cfg.cross_view_loss),
                         ("cross_image", cfg.cross_image_loss)):
            if on:
                loss = loss + terms[name]

        with torch.no_grad(), timer("time/bank"):
            self._remember(batch, step, objects)
        metrics = {"bootstrap_ratio": ratio, "objects_per_image": objects.count / len(batch),
                   "teacher_temp": temperature, "object_teacher_temp": object_temperature, **timer.seconds}
        return StepOutput(loss, terms={k: v.detach() for k, v in terms.items()}, metrics=metrics)

    @torch.no_grad()
    def _teacher_objects(self, batch, step: int, timer) -> "_Objects":
        """The teacher's view of the step: both global views' tokens clustered jointly into K clusters,
        the clusters present in both views its objects (``c_1^k``, ``c_2^k``), and the teacher's logits."""
        cfg, crops, b, k = self.cfg, batch.crops, len(batch), self.cfg.n_clusters
        device_type = crops[0].device.type
        teacher_out = self.teacher.backbone(torch.cat(crops[:2]))
        h, w = teacher_out.patches.shape[1:3]
        n = h * w
        teacher_tokens = teacher_out.patches.reshape(2, b, n, -1).transpose(0, 1).reshape(b, 2 * n, -1).float()
        positions = torch.cat([patch_positions(batch.boxes[:, v], batch.flips[:, v], (h, w)) for v in (0, 1)], 1)
        # the clustering, the objects and the bank's neighbours in full float32 under bf16/fp16 (docs/methods.md)
        with timer("time/clustering"), full_float32(device_type):
            seeds = clustering_seeds(self.recipe.seed, step, self.global_rows(b), 2 * n, k)
            assignment = joint_clustering(teacher_tokens, positions, k, iterations=cfg.cluster_iterations,
                                          lambda_pos=cfg.lambda_pos, sinkhorn_strength=cfg.sinkhorn_strength,
                                          sinkhorn_iterations=cfg.sinkhorn_iterations,
                                          normalize_per_image=cfg.cost_normalization == "image",
                                          seed_indices=seeds)
            teacher_objects, valid = pool_objects(teacher_tokens, assignment, k)  # [B, 2, K, D], [B, K]
        # the valid objects as (image, cluster) rows, in valid's row-major order: the step's one host
        # synchronisation for their number (indexing by them, forward and backward, needs none)
        image_rows, cluster_ids = valid.nonzero(as_tuple=True)
        t1 = teacher_objects[image_rows, 0, cluster_ids]  # [V, D]
        t2 = teacher_objects[image_rows, 1, cluster_ids]
        return _Objects(assignment=assignment, positions=positions, grid=(h, w), image_rows=image_rows,
                        cluster_ids=cluster_ids, t1=t1, t2=t2,
                        teacher_cls_logits=self.teacher.head(teacher_out.cls).float(),
                        teacher_object_logits=self.teacher.head.objects(torch.cat([t1, t2])).float())

    def _student_logits(self, crops, objects: "_Objects") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's CLS logits of every crop, and its object logits of view 1 and view 2: its tokens
        pooled by the teacher's assignment."""
        k, (h, w) = self.cfg.n_clusters, objects.grid
        student_outs = self.student.backbone.forward_crops(crops)
        student_cls_logits = self.student.head(torch.cat([o.cls for o in student_outs])).float()
        b = len(objects.assignment)
        student_tokens = torch.stack([student_outs[0].patches, student_outs[1].patches], 1).reshape(b, 2 * h * w, -1)
        with full_float32(crops[0].device.type):
            student_objects, _ = pool_objects(student_tokens.float(), objects.assignment, k)
        rows, ids = objects.image_rows, objects.cluster_ids
        s1, s2 = student_objects[rows, 0, ids], student_objects[rows, 1, ids]
        s1_logits, s2_logits = self.student.head.objects(torch.cat([s1, s2])).float().chunk(2)
        return student_cls_logits, s1_logits, s2_logits

    def _cross_image_term(self, objects: "_Objects", s1_logits, s2_logits, object_temperature: float, zero,
                          step: int, images_per_step: int):
        """The cross-image object loss against the cycle-consistent neighbours among the objects of the
        newest S images in the bank (:meth:`_newest_images`), as it was before this batch enters it, and the
        bootstrapping ratio (pairs over 2 × objects; 0.0 with no bank). On once S images have been written."""
        filled = self.bank.filled
        if not (filled and objects.count):
            return zero, 0.0
        t1, t2 = objects.t1, objects.t2
        with torch.no_grad():
            with full_float32(t1.device.type):
                stored = self.bank.vectors[:filled].float()
                bank1, bank2 = stored[:, :self.dim], stored[:, self.dim:]
                pool = self._newest_images(step, images_per_step)[:filled]
                nearest1, ok1 = cycle_consistent_neighbours(t1, t2, bank1, bank2, pool)
                nearest2, ok2 = cycle_consistent_neighbours(t2, t1, bank2, bank1, pool)
            ratio = metric_ratio(ok1.sum() + ok2.sum(), 2 * objects.count)  # on the device, read where logged
            # on once S images have been written; where no pair passed the cycle check the loss below is 0
            # (each direction's sum over no pair), as the term's zero would be
            if not (self.cfg.cross_image_loss and step * images_per_step >= self.cfg.bank_images):
                return zero, ratio
            neighbour_logits = self.teacher.head.objects(torch.cat([bank1[nearest1], bank2[nearest2]])).float()
            q1, q2 = teacher_probabilities(neighbour_logits, self.object_center, object_temperature).chunk(2)
        return cross_image_object_loss(q1, q2, s1_logits, s2_logits, ok1.float(), ok2.float(),
                                       self.cfg.object_student_temp), ratio

    def _newest_images(self, step: int, images_per_step: int) -> torch.Tensor:
        """[bank size] bool: the slots holding the objects of the newest S images (``method.bank_images``),
        the paper's M_1, M_2 ("the size of the queues in terms of the number of images", as the authors'
        queue keeps them). The bank has room for S·K objects, more than S images leave (only the clusters
        present in both views are objects), so older images' objects may still be there: they are left
        out. Every step writes ``images_per_step`` images, its objects in the order of the step's global
        batch: steps ``step − q .. step − 1`` are in whole, with ``q, r = divmod(S, images_per_step)``, and
        of step ``step − q − 1`` the first r images that have objects, as the authors' queue keeps the
        first images of its oldest batch — of those still in the bank: where nearly every image has all K
        objects, the newest (q + 1) steps outgrow the S·K slots and that step's first images are
        overwritten first, so its later ones stand in (still S images; a review, 2026-12-06). No host
        synchronisation."""
        bank, (q, r) = self.bank, divmod(self.cfg.bank_images, images_per_step)
        order = bank.order()  # oldest first; one step's objects lie together, in its batch's order
        steps, ids = bank.payload["step"][order], bank.payload["image_id"][order]
        keep = steps >= max(step - q, 0)
        if r:
            oldest = steps == step - q - 1
            same_image = torch.zeros_like(oldest)
            same_image[1:] = oldest[:-1] & (ids[1:] == ids[:-1])
            image = torch.cumsum((oldest & ~same_image).long(), 0)  # 1, 2, ... along the oldest step's objects
            keep |= oldest & (image <= r)
        pool = torch.zeros(bank.size, dtype=torch.bool, device=order.device)
        pool[order] = keep
        return pool

    def _remember(self, batch, step: int, objects: "_Objects") -> None:
        """The step's centres and its objects into the bank, with their payload (view boxes, the object's
        box in view 1, cluster id)."""
        cfg, (h, w) = self.cfg, objects.grid
        self.step_centers.add("center", self.center, objects.teacher_cls_logits, cfg.center_momentum)
        self.step_centers.add("object_center", self.object_center, objects.teacher_object_logits,
                              cfg.object_center_momentum)
        n = h * w
        view1_boxes = batch.boxes[:, 0].float()
        extent = torch.stack([view1_boxes[:, 2] - view1_boxes[:, 0], view1_boxes[:, 3] - view1_boxes[:, 1]], 1)
        grid = extent.new_full((2,), w)  # [w, h], filled on the device (no copy from the host)
        grid[1] = h
        regions = object_boxes(objects.positions[:, :n], objects.assignment[:, :n], cfg.n_clusters, extent / grid)
        rows, ids, t1 = objects.image_rows, objects.cluster_ids, objects.t1
        self.bank.enqueue(torch.cat([t1, objects.t2], 1), step=step, image_id=batch.image_ids.to(t1.device)[rows],
                          box=view1_boxes[rows], box_view2=batch.boxes[rows, 1].float(),
                          region=regions[rows, ids], cluster_id=ids)


@dataclass
class _Objects:
    """The step's objects as the teacher found them: the joint assignment of both views' tokens
    [B, 2N] to K clusters, their positions, the token grid (h, w), the valid objects as rows
    ``image_rows`` / ``cluster_ids`` (present in both views), their pooled teacher vectors ``t1`` /
    ``t2`` (``c_1^k``, ``c_2^k``; [V, D]) and the teacher's CLS and object logits."""
    assignment: torch.Tensor
    positions: torch.Tensor
    grid: tuple[int, int]
    image_rows: torch.Tensor
    cluster_ids: torch.Tensor
    t1: torch.Tensor
    t2: torch.Tensor
    teacher_cls_logits: torch.Tensor
    teacher_object_logits: torch.Tensor

    @property
    def count(self) -> int:
        return len(self.image_rows)
