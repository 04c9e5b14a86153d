"""MILE: self-supervised incremental embeddings of image sets (Leotescu et al.; docs/methods.md#mile).

Symbols of the paper and their names here:

* Φ_BKB — the ViT backbone (:class:`~mlsctl.models.backbone.Backbone`), CLS output ``e_t`` [B, D];
  LoRA on ``qkv`` through peft when ``model.lora.enabled`` (r=48, alpha 16, dropout 0.1, bias
  ``lora_only`` in the paper's large-backbone recipes), on student and teacher alike;
* Φ_CROSS — :class:`CrossBlock`: pre-norm cross-attention ``H = MHA(LN_q(L), LN_kv(e), LN_kv(e)) + L``
  then ``Φ = W2·GELU(W1·LN(H)) + H`` (W1: D→2D, W2: 2D→D), truncated-normal init. Attention is
  **per sample**: the query is the sample's own latent [B, 1, D] and the keys/values its own image
  tokens [B, n, D] (its CLS, n = 1; or its patch tokens with ``attend: patches``). The official
  code attends across the batch by accident; this does not;
* L_t — the latent state, :meth:`SetEncoder.fold`: ``L_0 = e_0`` and
  ``L_t = (1 − tanh a)·Φ_CROSS(L_{t−1}, e_t) + tanh(a)·L_{t−1}``, a scalar ``a`` (``gate``)
  initialised at 0. The set embedding is the last L; adding an image folds one more step, without
  recomputing earlier images (``mlsctl index add``);
* L_MI — DINO's loss between set-level latents: every image of a set gets multi-crop views,
  set-view c is the c-th crop of each image, the student folds every set-view and the teacher the
  two global ones; teacher ``c_t`` against student ``c_s ≠ c_t`` through a DINO head, with
  centering and the teacher temperature warm-up.

The teacher starts as an exact copy of the student (the released code forgets this;
docs/methods.md#mile-departures).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlsctl.errors import UserError
from mlsctl.methods.base import Method, StepOutput, metric_value
from mlsctl.methods.mile.config import MILEConfig
from mlsctl.methods.self_distillation import StepCenters, build_student_teacher, dino_loss, teacher_probabilities
from mlsctl.models.heads import DINOHead


class CrossBlock(nn.Module):
    """Φ_CROSS: one latent per sample attends to that sample's image tokens only."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)
        for module in (self.fc1, self.fc2, self.attn.out_proj):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.attn.in_proj_weight, std=0.02)
        nn.init.zeros_(self.attn.in_proj_bias)

    def forward(self, latent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``latent`` [B, D], ``tokens`` [B, n, D] → [B, D]."""
        kv = self.norm_kv(tokens)
        h = self.attn(self.norm_q(latent)[:, None], kv, kv, need_weights=False)[0][:, 0] + latent
        return self.fc2(F.gelu(self.fc1(self.norm_mlp(h)))) + h


class SetEncoder(nn.Module):
    """The gated recurrence over a set's images (Φ_CROSS and the gate ``a``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.cross = CrossBlock(dim, heads)
        self.gate = nn.Parameter(torch.zeros(()))  # a; alpha = tanh(a) starts at 0

    @property
    def alpha(self) -> torch.Tensor:
        return torch.tanh(self.gate)

    def fold(self, latent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One step: ``L_t = (1 − alpha)·Φ_CROSS(L_{t−1}, e_t) + alpha·L_{t−1}``."""
        alpha = self.alpha
        return (1 - alpha) * self.cross(latent, tokens) + alpha * latent

    def forward(self, cls: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``cls`` [B, T, D] (and the tokens attended to, [B, T, n, D]; default the CLS) → L_{T-1} [B, D]."""
        tokens = cls[:, :, None] if tokens is None else tokens
        latent = cls[:, 0]
        for t in range(1, cls.shape[1]):
            latent = self.fold(latent, tokens[:, t])
        return latent


class MILENet(nn.Module):
    """Φ_BKB + set encoder + DINO head (student or teacher)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head  # head = {set encoder, DINO head}

    def latents(self, crops: list[torch.Tensor], attend: str) -> list[torch.Tensor]:
        """Set-views [B, T, 3, S, S] each → their set latents [B, D] each."""
        b, t = crops[0].shape[:2]
        outputs = self.backbone.forward_crops([c.flatten(0, 1) for c in crops])
        latents = []
        for out in outputs:
            cls = out.cls.reshape(b, t, -1)
            tokens = out.patches.flatten(1, 2).reshape(b, t, -1, cls.shape[-1]) if attend == "patches" else None
            latents.append(self.head.encoder(cls, tokens))
        return latents


class MILEHead(nn.Module):
    def __init__(self, dim: int, cfg: MILEConfig):
        super().__init__()
        if dim % cfg.cross_heads:
            raise UserError(f"method.cross_heads {cfg.cross_heads} does not divide the backbone width {dim} of "
                            f"model.arch; choose a divisor of {dim}")
        self.encoder = SetEncoder(dim, cfg.cross_heads)
        self.dino = DINOHead(dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.norm_last_layer)


class MILE(Method):
    Config = MILEConfig
    batch_element = "set"  # of set_length photos of one object

    def __init__(self, recipe, schedule):
        super().__init__(recipe, schedule)
        cfg = self.cfg
        student, teacher = build_student_teacher(recipe, lambda dim: MILEHead(dim, cfg))
        self.student, self.teacher = MILENet(student.backbone, student.head), MILENet(teacher.backbone, teacher.head)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.step_centers = StepCenters()
        self.n_global = recipe.data.global_crops.count

    @classmethod
    def check_recipe(cls, recipe):
        errors = []
        if recipe.data.global_crops.count != 2:
            errors.append(("data.global_crops.count", f"must be 2 for MILE (two teacher set-views), got "
                                                      f"{recipe.data.global_crops.count}"))
        width = (recipe.model.timm_kwargs or {}).get("embed_dim")
        if width and width % recipe.method.cross_heads:
            errors.append(("method.cross_heads", f"{recipe.method.cross_heads} does not divide the backbone width {width}"))
        return errors

    @classmethod
    def input_paths(cls, recipe):
        return [("method.objects_file", recipe.method.objects_file)]

    @classmethod
    def throughput_units(cls, recipe):
        return {"sets_per_s": 1, "photos_per_s": recipe.method.set_length}

    @classmethod
    def build_dataset(cls, recipe, folder):
        from mlsctl.data.objects import ObjectSetDataset, collate_sets, find_objects

        transform = cls.multicrop(recipe)
        objects = find_objects(folder, recipe.method.objects_file)
        return (ObjectSetDataset(folder, objects, transform, recipe.method.set_length, recipe.seed, **cls.data_path(recipe)),
                collate_sets)

    def ema_pairs(self):
        return [(self.student, self.teacher)]

    def end_step(self, step):
        self.step_centers.apply()

    def last_layer_parameters(self):
        return list(self.student.head.dino.last_layer.parameters())

    @classmethod
    def trained_images(cls, recipe, relpaths):
        from mlsctl.data.objects import listed_objects

        if not recipe.method.objects_file:
            return None
        # read as training reads them (./, absolute, relative to the file's folder: counted exactly, 1 of 3, a review)
        listed = listed_objects(Path(recipe.method.objects_file), {r: r for r in relpaths}, Path(recipe.data.root),
                                "method.objects_file")
        return sum(map(len, listed.values())), f"the photos method.objects_file {recipe.method.objects_file} lists"

    @classmethod
    def data_notes(cls, recipe, dataset):
        from mlsctl.data.objects import nested_groups_note

        folder = dataset.folder
        if recipe.method.objects_file:
            # the run's first line counts the images under data.root; say what it trains on (a new user's
            # probe, 2026-12-06: "mile on 8000 images" for 64 objects of 512 photos)
            photos = sum(len(o.rows) for o in dataset.objects)
            if photos < len(folder):
                return [f"method.objects_file {recipe.method.objects_file} lists {len(dataset.objects)} objects of "
                        f"{photos} photos: the run trains on those, not on all {len(folder)} images under data.root"]
            return []
        note = nested_groups_note(Path(folder.root), {o.object_id: [folder.relpath(r) for r in o.rows]
                                                      for o in dataset.objects}, prefer=("train", "training"))
        return [f"data.root: {note}"] if note else []

    def teacher_backbone(self):
        return self.teacher.backbone

    def teacher_encoder(self) -> SetEncoder:
        return self.teacher.head.encoder

    def teacher_temperature(self, step: int) -> float:
        return self.cfg.teacher_temperature_at(self.schedule.epoch(step))

    def training_step(self, batch, step):
        cfg = self.cfg
        with torch.no_grad():
            teacher_latents = self.teacher.latents(batch.crops[:self.n_global], cfg.attend)
            teacher_logits = self.teacher.head.dino(torch.cat(teacher_latents)).float()
        student_latents = self.student.latents(batch.crops, cfg.attend)
        student_logits = self.student.head.dino(torch.cat(student_latents)).float()
        temperature = self.teacher_temperature(step)
        targets = teacher_probabilities(teacher_logits, self.center, temperature)
        loss = dino_loss(student_logits.chunk(len(batch.crops)), targets.chunk(self.n_global), cfg.student_temp)
        self.step_centers.add("center", self.center, teacher_logits, cfg.center_momentum)
        alpha = metric_value(self.student.head.encoder.alpha)  # a copy on the device, read where logged
        return StepOutput(loss, terms={"mile": loss.detach()},
                          metrics={"teacher_temp": temperature, "gate_alpha": alpha, "one_minus_alpha": 1 - alpha})
