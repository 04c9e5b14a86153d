"""MLS's hyper-parameters: the recipe's ``method`` section when ``method.name: mls`` (MoCo-v2 with
``lambda_ml: 0``; docs/methods.md#mls-and-moco-v2). Light: no torch (:mod:`mlsctl.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mlsctl.config import param
from mlsctl.methods.base_config import EMATeacherConfig, keys_in_order


@keys_in_order("name", "queue_size", "k", "temperature", "lambda_ml", "label_queue", "multi_label_loss",
               "proj_hidden_dim", "proj_dim", "momentum_teacher", "momentum_teacher_end", "global_feature",
               "key_bn", "bn_group_size", "tags_file")
@dataclass
class MLSConfig(EMATeacherConfig):
    name: str = param("mls", help="MLS (lambda_ml: 0 is MoCo-v2's loss at MLS's settings)")
    queue_size: int = param(4096, help="D: entries of each queue, Q_g and Q_z", ge=2)
    k: int = param(20, help="pseudo-labels per image: the top-k entries of Q_g", ge=1)
    temperature: float = param(0.2, help="τ of InfoNCE and of the multi-label logits", gt=0.0)
    lambda_ml: float = param(0.5, help="λ: weight of the multi-label loss; 0 is MoCo-v2's loss", ge=0.0)
    label_queue: Literal["g", "z"] = param("g", help="queue the pseudo-labels come from: g (Q_g, two queues, MLS) "
                                                     "or z (Q_z, one queue: the ablation)")
    multi_label_loss: Literal["bce", "bce_pos", "knn_softmax"] = param(
        "bce", help="bce (MLS), bce_pos (positive terms only) or knn_softmax (the supplement's Eq. 10)")
    proj_hidden_dim: int = param(2048, help="projector MLP width", ge=1)
    proj_dim: int = param(256, help="dimension of z", ge=1)
    momentum_teacher: float = param(0.995, help="m: momentum of the key encoder at the start", ge=0.0, le=1.0)
    momentum_teacher_end: float = param(0.995, help="momentum at the end (cosine; equal to the start: constant, "
                                                    "as MoCo)", ge=0.0, le=1.0)
    global_feature: Literal["auto", "cls", "pooled"] = param(
        "auto", help="g: auto (CNN: average-pooled last stage; ViT: CLS token), cls (ViT only) or pooled "
                     "(mean of the grid)")
    key_bn: Literal["shuffle", "sync"] = param("shuffle", help="BatchNorm defence of the key encoder: shuffle "
                                                               "(grouped statistics + shuffled keys) or sync")
    bn_group_size: int = param(32, help="images per BatchNorm group with key_bn=shuffle (MoCo: 32 per GPU)", ge=2)
    tags_file: Optional[str] = param(None, help="JSONL/CSV of image tags for `mlsctl bank inspect` (default: "
                                                "scenes.jsonl in data.root or its parent when present)", path=True)
