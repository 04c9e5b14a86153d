"""SOVE: self-organising visual embeddings with non-parametric judges (Silva et al.; docs/methods.md#sove).

Student and teacher (EMA) are a ViT with one :class:`~mlsctl.models.heads.EmbeddingHead`
(D→2048→2048→256, GELU, L2-normalised, no prototype layer) shared by the CLS and the patch tokens.
The student's global views are block-masked (:mod:`mlsctl.data.masking`; a learnable mask token
replaces the masked patch embeddings, :class:`~mlsctl.models.backbone.Backbone`); local views are
not. Two memories of teacher embeddings, both :class:`~mlsctl.bank.MemoryBank` (random unit vectors
at the start, FIFO, gathered across processes, saved and resumed with every checkpoint):

* ``E_C`` (bank ``E_C``): the teacher CLS embedding of global view 2 of every image;
* ``E_P`` (bank ``E_P``): one random teacher patch embedding of global view 2 per image.

Every step and every task the judges are drawn afresh (:func:`~mlsctl.methods.sove.ops.sample_judges`):
anchors A from the memory, their supports, the judges D and soft labels Y; the same D and Y serve
student and teacher within a task. Losses (:mod:`mlsctl.methods.sove.ops`):

* ``L_CLS`` — ``H(P(z_t; τ_t), P(z_s; τ_s))`` over cross-view pairs (teacher global views against
  every other student view), averaged over ``cls_tasks`` independent tasks of ``cls_anchors``
  anchors with ``cls_supports`` supports each (judges per concept = supports + 1);
* ``L_patch`` — non-parametric MIM: each masked student patch of a global view against the
  unmasked teacher patch at the same position of the same view, masked positions only,
  ``patch_tasks`` tasks of ``patch_anchors`` anchors with ``patch_supports`` supports over ``E_P``.

Total ``L_CLS + L_patch`` (λ1 = λ2 = 1); no centering, no Sinkhorn. The teacher temperature of
both losses follows one schedule, as in the authors' code (their separate 0.07 patch temperature is
never used there). Anchors are the same on every process (drawn from ``(seed, step)``); the patch
each process stores is drawn from ``(seed, step, rank)``. With gradient accumulation every
micro-batch of a step uses the step's judges (drawn once, from the memories as they were at the
start of the step) and stores the patches one batch of the whole step would pick for its rows. Logged: ``loss/cls``, ``loss/patch``,
the seconds spent in judge selection (``time/judges``), in the votes and losses
(``time/votes``) and in the memory updates (``time/memory``), and the masked share.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mlsctl import dist
from mlsctl.bank import Column, MemoryBank, QueryFeature
from mlsctl.data.loader import sample_seed
from mlsctl.device import to_device
from mlsctl.methods.base import Method, StepOutput, metric_value
from mlsctl.methods.self_distillation import build_student_teacher
from mlsctl.methods.sove.config import SOVEConfig
from mlsctl.methods.sove.ops import cls_loss, judge_overlap, judge_probabilities, patch_loss, sample_judges
from mlsctl.models.heads import EmbeddingHead

RNG_STREAM = 2**33  # SOVE's generators: (seed, step, RNG_STREAM + stream); stream 0 CLS judges, 1 patch judges,
# 2 the patch stored for each image (drawn for the step's whole global batch, taken by each image's place in it)


class SOVE(Method):
    Config = SOVEConfig
    find_unused_parameters: ClassVar[bool] = True  # without masking (patch_loss=false, mask_ratio=0) the mask token is idle

    def __init__(self, recipe, schedule):
        super().__init__(recipe, schedule)
        cfg = self.cfg
        self.student, self.teacher = build_student_teacher(
            recipe, lambda dim: EmbeddingHead(dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers), mask_token=True)
        self.n_global = recipe.data.global_crops.count
        generator = torch.Generator().manual_seed(recipe.seed * 7919 + 17)
        self.class_memory = MemoryBank(cfg.class_memory_size, cfg.bottleneck_dim, {
            "image_id": Column((), torch.long), "box": Column((4,), torch.float32)},
            init="random_unit", generator=generator, query_feature=QueryFeature("cls", projection="head"))
        self.patch_memory = MemoryBank(cfg.patch_memory_size, cfg.bottleneck_dim, {
            "image_id": Column((), torch.long), "box": Column((4,), torch.float32),
            "region": Column((4,), torch.float32)},
            init="random_unit", generator=generator, query_feature=QueryFeature("patch_mean", projection="head"))
        self._step_judges: dict = {}  # the judges of the current optimiser step, shared by its micro-batches

    # ------------------------------------------------------------------ declarations
    @staticmethod
    def anchor_selection_for(cfg: SOVEConfig, task: str) -> str:
        """``method.anchor_selection`` for the CLS tasks; the patch tasks keep every anchor.

        The authors' 'low_energy' halving runs on the CLS memory only: their patch memory keeps all
        its K anchors (512 concepts on the identical check), so ``half`` — which exists to match
        them — must not halve ``E_P``'s anchors (docs/methods.md#sove-departures)."""
        return cfg.anchor_selection if task == "cls" else "all"

    @classmethod
    def check_recipe(cls, recipe):
        cfg = recipe.method
        errors = []
        if recipe.data.global_crops.count != 2:
            errors.append(("data.global_crops.count", f"must be 2 for SOVE (two teacher views), got "
                                                      f"{recipe.data.global_crops.count}"))
        import timm

        from mlsctl.models.backbone import architecture_kind

        if timm.is_model(recipe.model.arch) and architecture_kind(recipe.model.arch) != "vit":
            errors.append(("model.arch", f"'{recipe.model.arch}' is a CNN; SOVE masks patch tokens and needs a Vision "
                                         f"Transformer (vit_*)"))
        if (recipe.model.timm_kwargs or {}).get("class_token") is False:
            errors.append(("model.timm_kwargs.class_token", "must stay true: SOVE's CLS loss needs a CLS token"))
        for task, memory, size in (("cls", "class_memory_size", cfg.class_memory_size),
                                   ("patch", "patch_memory_size", cfg.patch_memory_size)):
            anchors, supports = getattr(cfg, f"{task}_anchors"), getattr(cfg, f"{task}_supports")
            selection = cls.anchor_selection_for(cfg, task)
            if supports >= size:
                errors.append((f"method.{task}_supports", f"k={supports} must be smaller than the memory "
                                                          f"(method.{memory}={size}); lower it"))
            elif anchors + supports > size:  # each task's supports come from the memory less its K anchors
                errors.append((f"method.{memory}", f"{size} entries cannot hold {anchors} anchors and a pool of "
                                                   f"k={supports} supports beside them; raise method.{memory} or lower "
                                                   f"method.{task}_anchors"))
            if selection == "half" and anchors < 4:
                errors.append((f"method.{task}_anchors", "must be at least 4 with anchor_selection=half"))
        if cfg.mask_aspect[0] > cfg.mask_aspect[1]:
            errors.append(("method.mask_aspect", f"must be [low, high] with low <= high, got {list(cfg.mask_aspect)}"))
        return errors

    @classmethod
    def build_dataset(cls, recipe, folder):
        from mlsctl.data.masking import MaskedMultiCropDataset, collate_masked

        side = recipe.data.global_crops.size // recipe.model.patch_size
        dataset = MaskedMultiCropDataset(folder, cls.multicrop(recipe), recipe.seed, (side, side),
                                         recipe.method.mask_ratio, tuple(recipe.method.mask_aspect),
                                         **cls.data_path(recipe))
        return dataset, collate_masked

    def ema_pairs(self):
        return [(self.student, self.teacher)]

    def end_step(self, step):
        self._step_judges.clear()

    def banks(self):
        return {"E_C": self.class_memory, "E_P": self.patch_memory}

    def teacher_backbone(self):
        return self.teacher.backbone

    def query_projection(self, name: str) -> nn.Module:
        if name != "head":
            raise KeyError(name)
        return self.teacher.head

    @classmethod
    def bank_views(cls, recipe, banks: dict[str, MemoryBank], image_paths=None) -> dict[str, list[tuple[str, str, object]]]:
        """``mlsctl bank inspect``: the judge overlap of one sampled task per memory — how many
        entries support more than one anchor (seeded, so the same checkpoint shows the same task)."""
        cfg = recipe.method
        views = {}
        for name, task in (("E_C", "cls"), ("E_P", "patch")):
            bank = banks.get(name)
            anchors, supports = getattr(cfg, f"{task}_anchors"), getattr(cfg, f"{task}_supports")
            if bank is None or anchors + supports > bank.size:
                continue
            if supports == 0:
                views[name] = [("judge overlap", f"none possible: k=0, each of the {anchors} concepts has one judge",
                                {"supports": 0, "shared": 0})]
                continue
            memory = torch.nn.functional.normalize(bank.vectors.float(), dim=1)
            judges = sample_judges(memory, 1, anchors, supports, eps=cfg.anchor_eps,
                                   generator=torch.Generator().manual_seed(0),
                                   anchor_selection=cls.anchor_selection_for(cfg, task),
                                   chunk=cfg.judge_chunk, search=cfg.judge_search)
            overlap = judge_overlap(judges.slots[0], bank.size)
            text = (f"{overlap['shared']} of {overlap['distinct']} supporting entries ({100 * overlap['shared_share']:.1f}%) "
                    f"support >1 anchor (max {overlap['max_anchors_per_entry']}); one task of "
                    f"{judges.n_concepts} anchors x k={supports}")
            views[name] = [("judge overlap", text, overlap)]
        return views

    def teacher_temperature(self, step: int) -> float:
        return self.cfg.teacher_temperature_at(self.schedule.epoch(step))

    # ------------------------------------------------------------------ the step
    def _generator(self, step: int, stream: int) -> torch.Generator:
        """A CPU generator of its own for (seed, step, stream): resume replays it exactly."""
        return torch.Generator().manual_seed(sample_seed(self.recipe.seed, step, RNG_STREAM + stream))

    def _judges(self, memory: MemoryBank, task: str, step: int, stream: int):
        """The judges of ``step`` from (seed, step, stream). With gradient accumulation the step's
        first micro-batch draws them and the others reuse them (the loop holds the memories' writes
        until the step ends, so they would draw the same judges; ``end_step`` forgets them)."""
        cfg = self.cfg
        if self.micro_batch[1] > 1 and (task, step) in self._step_judges:
            return self._step_judges[(task, step)]
        generator = self._generator(step, stream)
        judges = sample_judges(memory.vectors, getattr(cfg, f"{task}_tasks"), getattr(cfg, f"{task}_anchors"),
                               getattr(cfg, f"{task}_supports"), eps=cfg.anchor_eps, generator=generator,
                               anchor_selection=self.anchor_selection_for(cfg, task), chunk=cfg.judge_chunk,
                               search=cfg.judge_search)
        if self.micro_batch[1] > 1:
            self._step_judges[(task, step)] = judges
        return judges

    def training_step(self, batch, step):
        cfg = self.cfg
        crops, b = batch.crops, len(batch)
        timer = self.timer(crops[0].device)  # time/...: on the logged steps only
        # the student's global views are masked only for the MIM loss (without it SOVE is CLS-only, unmasked)
        masks = batch.masks if cfg.patch_loss else torch.zeros_like(batch.masks)  # [B, 2, h, w]

        with torch.no_grad():
            teacher_out = self.teacher.backbone(torch.cat(crops[:2]))
            teacher_cls = self.teacher.head(teacher_out.cls).float()  # [2B, d]
        student_masks = [masks[:, 0], masks[:, 1]] + [None] * (len(crops) - 2) if cfg.patch_loss else None
        student_outs = self.student.backbone.forward_crops(crops, student_masks)
        student_cls = self.student.head(torch.cat([o.cls for o in student_outs])).float()
        temperature = self.teacher_temperature(step)

        def timed(key, fn):
            with timer(key):
                return fn()

        # L_CLS over cls_tasks tasks of judges from E_C
        judges = timed("time/judges", lambda: self._judges(self.class_memory, "cls", step, 0))

        def cls_term():
            total = student_cls.new_zeros(())
            for t in range(judges.n_tasks):
                d, s = judges.vectors[t], judges.scores[t]
                with torch.no_grad():
                    targets = judge_probabilities(teacher_cls, d, s, temperature).chunk(2)
                predictions = judge_probabilities(student_cls, d, s, cfg.student_temp).chunk(len(crops))
                total = total + cls_loss(predictions, targets)
            return total / judges.n_tasks
        terms = {"cls": timed("time/votes", cls_term)}

        # L_patch on the masked patches of the two global views
        flat_mask = torch.cat([masks[:, 0], masks[:, 1]]).flatten(1)  # [2B, L], rows as cat(crops[:2])
        view_image, position = flat_mask.nonzero(as_tuple=True)
        loss = terms["cls"]
        if cfg.patch_loss:
            student_patches = torch.cat([student_outs[0].patches, student_outs[1].patches]).flatten(1, 2)
            student_masked = self.student.head(student_patches[view_image, position]).float()
            with torch.no_grad():
                teacher_masked = self.teacher.head(teacher_out.patches.flatten(1, 2)[view_image, position]).float()
            patch_judges = timed("time/judges", lambda: self._judges(self.patch_memory, "patch", step, 1))

            def patch_term():
                total = student_masked.new_zeros(())
                for t in range(patch_judges.n_tasks):
                    d, s = patch_judges.vectors[t], patch_judges.scores[t]
                    with torch.no_grad():
                        targets = judge_probabilities(teacher_masked, d, s, temperature)
                    predictions = judge_probabilities(student_masked, d, s, cfg.student_temp)
                    total = total + patch_loss(predictions, targets, view_image, 2 * b)
                return total / patch_judges.n_tasks
            terms["patch"] = timed("time/votes", patch_term)
            loss = loss + terms["patch"]

        with torch.no_grad(), timer("time/memory"):
            self._remember(batch, teacher_cls[b:], teacher_out.patches[b:], step)
        metrics = {"teacher_temp": temperature, "masked_share": metric_value(flat_mask.float().mean()), **timer.seconds}
        return StepOutput(loss, terms={k: v.detach() for k, v in terms.items()}, metrics=metrics)

    def _remember(self, batch, view2_cls: torch.Tensor, view2_patches: torch.Tensor, step: int) -> None:
        """The memories: view 2's teacher CLS into E_C, one random view-2 teacher patch per image into E_P
        (``view2_patches``: the teacher's patch tokens of view 2, [B, h, w, D], before its head)."""
        b = len(batch)
        view2 = batch.boxes[:, 1].float()
        self.class_memory.enqueue(view2_cls, step=step, image_id=batch.image_ids, box=view2)
        h, w = view2_patches.shape[1:3]
        # one pick per row of the step's global batch, this micro-batch's rows taken: the same picks
        # however the batch is split over processes and micro-batches
        rows = self.global_rows(b)
        picked = torch.randint(0, h * w, (dist.world_size() * self.micro_batch[1] * b,),
                               generator=self._generator(step, 2))[rows.start:rows.stop]
        picked = to_device(picked, view2_patches.device)
        patch = view2_patches.flatten(1, 2)[torch.arange(b, device=picked.device), picked]
        self.patch_memory.enqueue(self.teacher.head(patch).float(), step=step, image_id=batch.image_ids, box=view2,
                                  region=_patch_boxes(view2, batch.flips[:, 1], picked, (h, w)))


def _patch_boxes(boxes: torch.Tensor, flips: torch.Tensor, index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The box (x0, y0, x1, y1, original pixels) of patch ``index`` (row-major) of each view."""
    h, w = grid
    row, col = (index // w).float(), (index % w).float()
    col = torch.where(flips.bool(), w - 1 - col, col)
    x0, y0, x1, y1 = boxes.unbind(-1)
    pw, ph = (x1 - x0) / w, (y1 - y0) / h
    return torch.stack([x0 + col * pw, y0 + row * ph, x0 + (col + 1) * pw, y0 + (row + 1) * ph], dim=-1)
