"""MLS: multi-label self-supervised learning with scene images, and its MoCo-v2 baseline
(docs/methods.md#mls-and-moco-v2). No public implementation exists: this is the
reference one, and every choice the paper leaves open is stated here.

Networks (MoCo-v2): a query encoder φ_q — backbone + projector f_q (MLP C→2048→256, ReLU, no BN; C the backbone's width)
— and a key (momentum) encoder φ_k, f_k, an EMA of the query encoder (m = 0.995) that gets no
gradient. For an image, view 1 goes through the query encoder and view 2 through the key encoder:

* ``g1``, ``g2``: L2-normalised backbone features (the global feature: average-pooled last stage of
  a CNN; a ViT's CLS token or mean patch token, ``global_feature``);
* ``z1``, ``z2``: L2-normalised projections.

Two queues of D entries, both :class:`~mlsctl.bank.MemoryBank` (random unit vectors at the start,
as MoCo's; FIFO; gathered across processes; saved and resumed with every checkpoint), written
together with the same batch in the same order, so entry i of both is the same view of the same
image (payload ``image_id`` and ``box`` in both):

* ``Q_g``: the key encoder's backbone features g2;
* ``Q_z``: the key encoder's projections z2.

Losses (pure functions in :mod:`mlsctl.methods.mls.ops`; the queues as they were before the batch, then g2, z2 enqueued):

* pseudo-labels ``y`` [B, D]: exactly k ones per row, the top-k of ``g1 · Q_gᵀ``
  (``label_queue: z`` takes them from ``z1 · Q_zᵀ`` instead: the one-queue ablation);
* ``L_ml = BCE-with-logits(z1 · Q_zᵀ / τ, y)`` averaged over the D entries and the batch
  (``multi_label_loss: bce_pos`` keeps only the positive terms, Eq. 15 of the supplement;
  ``knn_softmax`` is the k-NN softmax loss of its Eq. 10, the paper's other baseline);
* ``L = InfoNCE(z1, z2, Q_z; τ) + λ · L_ml`` with τ = 0.2, λ = 0.5; λ = 0 is MoCo-v2's loss (at MLS's
  queue, momentum, projection and schedule: the baseline of MLS's paper, docs/methods.md#mls-and-moco-v2).

With gradient accumulation (``optim.accumulate_steps``) "the batch" is the optimiser step's: every
micro-batch scores against the queues as they were before the step, and the keys of all its
micro-batches are enqueued after it, in order (the loop holds the queues' writes), as MoCo enqueues
a mini-batch's keys after its update; the key encoder moves once per optimiser step.

Choices the paper leaves open, made here: the queues start as random unit vectors (MoCo's start),
so until they have wrapped once pseudo-labels may point at such entries (the first D / global batch
steps: 16 of COCO's 462 per epoch, 32 of the quick recipes' 744); the loss is asymmetric (view 1 →
query, view 2 → key) as in MoCo-v2; the same τ serves both terms; labels and BCE
logits come from the queues only (not from this batch's keys); the released model — what ``embed`` and every eval use
— is the *query* encoder's backbone, as MoCo releases ``encoder_q``. The supplement says once that
``Q_g`` holds "g_1 of view1" and once that both queues hold view-2 features, as the main paper's
Fig. 2 does (its caption as a reviewer quoted it); we take g2, which is what runs (key encoder, no
gradient, as every entry of ``Q_z``; docs/methods.md#mls-choices-where-the-paper-is-silent).

BatchNorm (``key_bn``; :mod:`mlsctl.models.batchnorm`): ``shuffle`` (default: MoCo's own defence,
and the only one that works in any number of processes on any device) computes BatchNorm
statistics over groups of ``bn_group_size`` images in both encoders and shuffles the global batch
before the key encoder; ``sync`` uses SyncBatchNorm (CUDA processes). A ViT has no BatchNorm and
needs neither. Logged: ``loss/info_nce``, ``loss/multi_label``, the share of pseudo-labels that are
the image's own earlier views (``labels/self_share``) and the mean cosine of the k-th label.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlsctl import dist
from mlsctl.bank import Column, MemoryBank, QueryFeature
from mlsctl.data.loader import sample_seed
from mlsctl.device import full_float32, to_device
from mlsctl.errors import UserError
from mlsctl.methods.base import Method, StepOutput, metric_ratio, metric_value
from mlsctl.methods.mls.config import MLSConfig
from mlsctl.methods.mls.ops import mls_loss
from mlsctl.models.backbone import Backbone, BackboneOutput, architecture_kind, build_backbone
from mlsctl.models.batchnorm import batchnorm_layers, convert_to_group_batchnorm, convert_to_sync_batchnorm


def architecture_kind_or_none(arch: str) -> Optional[str]:
    import timm

    return architecture_kind(arch) if timm.is_model(arch) else None


SHUFFLE_STREAM = 2**34  # the key encoder's batch permutation of step s: (seed, s, SHUFFLE_STREAM)


# ------------------------------------------------------------------------------------------ method


class Encoder(nn.Module):
    """Backbone + projector (Linear-ReLU-Linear), returning (g, z) L2-normalised."""

    def __init__(self, backbone: Backbone, hidden_dim: int, out_dim: int, global_feature: str):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(backbone.embed_dim, hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, out_dim))
        self.global_feature = global_feature

    def features(self, out: BackboneOutput) -> torch.Tensor:
        """g before normalisation: a CNN's global feature is its pooled last stage (the backbone's
        ``cls`` field: timm's own pooling); a ViT gives its CLS token or its mean patch token."""
        if self.global_feature == "pooled" and self.backbone.kind == "vit":
            return out.patches.mean(dim=(1, 2))
        return out.cls

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.features(self.backbone(x))
        return F.normalize(g, dim=1), F.normalize(self.projector(g), dim=1)


class MLS(Method):
    Config = MLSConfig

    def __init__(self, recipe, schedule):
        super().__init__(recipe, schedule)
        cfg = self.cfg
        backbone = build_backbone(recipe.model)
        global_feature = cfg.global_feature
        if global_feature == "cls" and not backbone.has_cls_token:
            raise UserError(f"method.global_feature=cls needs a CLS token, and model.arch '{recipe.model.arch}' has none "
                            f"(a CNN's global feature is its pooled last stage); use method.global_feature=auto or pooled")
        if global_feature == "auto":
            global_feature = "cls" if backbone.has_cls_token else "pooled"
        self.global_feature = global_feature
        self.query = Encoder(backbone, cfg.proj_hidden_dim, cfg.proj_dim, global_feature)
        self.key = Encoder(build_backbone(recipe.model, drop_path_rate=0.0, load_weights=False), cfg.proj_hidden_dim,
                           cfg.proj_dim, global_feature)
        self.has_batchnorm = bool(batchnorm_layers(self.query))
        if self.has_batchnorm:
            if cfg.key_bn == "shuffle":
                for encoder in (self.query, self.key):
                    convert_to_group_batchnorm(encoder, cfg.bn_group_size, f"model.arch '{recipe.model.arch}'")
            elif dist.world_size() > 1:
                self.query = convert_to_sync_batchnorm(self.query)
                self.key = convert_to_sync_batchnorm(self.key)
        self.key.load_state_dict(self.query.state_dict())
        for p in self.key.parameters():
            p.requires_grad_(False)
        generator = torch.Generator().manual_seed(recipe.seed)
        payload = {"image_id": Column((), torch.long), "box": Column((4,), torch.float32)}
        query_feature = "patch_mean" if global_feature == "pooled" and backbone.kind == "vit" else "cls"
        self.queue_g = MemoryBank(cfg.queue_size, backbone.embed_dim, payload, init="random_unit", generator=generator,
                                  query_feature=QueryFeature(query_feature))
        self.queue_z = MemoryBank(cfg.queue_size, cfg.proj_dim, payload, init="random_unit", generator=generator,
                                  query_feature=QueryFeature(query_feature, projection="projector"))

    @classmethod
    def check_training(cls, recipe, world_size, device_type):
        """Checked by ``pretrain`` with the real process count (not when a run is only read)."""
        cfg, batch, accumulate = recipe.method, recipe.optim.batch_size, recipe.optim.accumulate_steps
        if cfg.queue_size < batch * world_size * accumulate:
            made = f"{batch} x {world_size} processes" + (f" x {accumulate} accumulation steps" if accumulate > 1 else "")
            return [("method.queue_size", f"{cfg.queue_size} is smaller than the global batch ({made}): each step would "
                                          f"overwrite the whole queue; raise it")]
        if architecture_kind_or_none(recipe.model.arch) != "cnn":
            return []  # a ViT has no BatchNorm: key_bn does nothing
        group = cfg.bn_group_size
        if cfg.key_bn == "sync":
            if world_size > 1 and device_type != "cuda":
                return [("method.key_bn", "sync needs CUDA processes (torch's SyncBatchNorm synchronises GPU tensors "
                                          "only); on CPU use method.key_bn=shuffle")]
            return []
        if batch > group and batch % group:
            return [("method.bn_group_size", f"{group} does not divide optim.batch_size {batch} into BatchNorm groups; "
                                             f"make the batch a multiple of it (or use method.key_bn=sync)")]
        if world_size * max(1, batch // group) < 2:
            return [("method.bn_group_size", f"{group} >= optim.batch_size {batch} in one process: the batch is one "
                                             f"BatchNorm group and shuffling keys cannot hide a query's key; set it to "
                                             f"at most {batch // 2}")]
        return []

    @classmethod
    def check_recipe(cls, recipe):
        cfg, data = recipe.method, recipe.data
        if data.global_crops.count != 2:
            return [("data.global_crops.count", f"must be 2 for MLS/MoCo (view 1: query, view 2: key), got "
                                                f"{data.global_crops.count}")]
        if data.local_crops.count:
            return [("data.local_crops.count", f"must be 0 for MLS/MoCo (two views only), got {data.local_crops.count}")]
        if cfg.k > cfg.queue_size:
            return [("method.k", f"{cfg.k} pseudo-labels cannot come from a queue of {cfg.queue_size} entries; lower "
                                 f"method.k or raise method.queue_size")]
        return []

    @classmethod
    def recipe_notes(cls, recipe) -> list[str]:
        notes, cfg = super().recipe_notes(recipe), recipe.method
        if cfg.momentum_teacher != cfg.momentum_teacher_end:  # a review (2026-12-06): 0.999 alone fell to 0.995
            notes.append(f"the key encoder's momentum goes from method.momentum_teacher={cfg.momentum_teacher} to "
                         f"method.momentum_teacher_end={cfg.momentum_teacher_end} on a cosine; MoCo keeps it constant: "
                         f"set both to one value for that")
        return notes

    # ------------------------------------------------------------------ declared to the loop
    def ema_pairs(self):
        return [(self.query, self.key)]

    def banks(self):
        return {"Q_g": self.queue_g, "Q_z": self.queue_z}

    def teacher_backbone(self):
        return self.query.backbone  # MoCo releases the query encoder (encoder_q)

    def query_projection(self, name: str) -> nn.Module:
        if name == "projector":
            return self.query.projector
        raise KeyError(name)

    @classmethod
    def bank_views(cls, recipe, banks, image_paths=None):
        from mlsctl.methods.mls.views import queue_views

        return queue_views(recipe, banks, image_paths)

    # ------------------------------------------------------------------ the step
    def _encode_keys(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(g2, z2) of the key encoder; with shuffle BN the global batch is encoded in a permuted
        order (every process its slice of the permutation) and put back in order."""
        if not (self.has_batchnorm and self.cfg.key_bn == "shuffle"):
            return self.key(x)
        b, rank = len(x), dist.rank()
        everything = dist.gather_cat(x)
        micro, count = self.micro_batch  # every micro-batch of a step is shuffled on its own
        generator = torch.Generator().manual_seed(sample_seed(self.recipe.seed, step * count + micro, SHUFFLE_STREAM))
        order = to_device(torch.randperm(len(everything), generator=generator), x.device)
        g, z = self.key(everything[order[rank * b:(rank + 1) * b]])
        g_all, z_all = dist.gather_cat(g), dist.gather_cat(z)
        g_back, z_back = torch.empty_like(g_all), torch.empty_like(z_all)
        g_back[order], z_back[order] = g_all, z_all
        return g_back[rank * b:(rank + 1) * b], z_back[rank * b:(rank + 1) * b]

    def training_step(self, batch, step):
        cfg = self.cfg
        view1, view2 = batch.crops[0], batch.crops[1]
        g1, z1 = self.query(view1)
        with torch.no_grad():
            g2, z2 = self._encode_keys(view2, step)
        q_g, q_z = self.queue_g.vectors.clone(), self.queue_z.vectors.clone()  # as before this batch
        with full_float32(view1.device.type):  # logits and top-k in float32 under bf16/fp16 (and without TF32)
            g1, z1, g2, z2 = g1.float(), z1.float(), g2.float(), z2.float()
            label_features, label_queue = (g1, q_g) if cfg.label_queue == "g" else (z1, q_z)
            loss, terms, labels = mls_loss(z1, z2, label_features, label_queue, q_z, k=cfg.k,
                                           temperature=cfg.temperature, weight=cfg.lambda_ml, kind=cfg.multi_label_loss)
        metrics = {}
        if self.logged:  # label metrics where they are logged (kept on the device, read there)
            metrics = self._label_metrics(labels, label_features, label_queue, batch.image_ids, view1.device.type)
        box = batch.boxes[:, 1].float()
        self.queue_g.enqueue(g2, step=step, image_id=batch.image_ids, box=box)
        self.queue_z.enqueue(z2, step=step, image_id=batch.image_ids, box=box)
        return StepOutput(loss, terms=terms, metrics=metrics)

    def _label_metrics(self, labels, label_features, label_queue, image_ids, device_type: str) -> dict:
        """``labels/self_share``: pseudo-labels that are the image's own earlier views; ``labels/kth_cosine``:
        the k-th largest cosine of a row, the score an entry needs to be a label."""
        metrics = {}
        with torch.no_grad(), full_float32(device_type):
            chosen = labels.bool()
            written = self.queue_g.written_mask()  # random starting entries belong to no image
            same_image = (self.queue_g.payload["image_id"][None, :] == image_ids[:, None]) & written[None, :]
            metrics["labels/self_share"] = metric_ratio((chosen & same_image).sum(), chosen.sum().clamp_min(1))
            metrics["labels/kth_cosine"] = metric_value(
                (label_features @ label_queue.T).topk(self.cfg.k, dim=1).values[:, -1].mean())
        return metrics
