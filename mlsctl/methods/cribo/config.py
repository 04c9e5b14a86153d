"""CrIBo's hyper-parameters: the recipe's ``method`` section when ``method.name: cribo``
(docs/methods.md#cribo). Light: no torch (:mod:`mlsctl.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlsctl.config import param
from mlsctl.methods.base_config import TeacherStudentConfig, keys_in_order


@keys_in_order("name", "out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "norm_last_layer",
               "student_temp", "teacher_temp", "warmup_teacher_temp", "object_student_temp",
               "object_teacher_temp", "object_warmup_teacher_temp", "warmup_teacher_temp_epochs",
               "center_momentum", "object_center_momentum", "momentum_teacher", "momentum_teacher_end",
               "n_clusters", "cluster_iterations", "lambda_pos", "sinkhorn_strength", "sinkhorn_iterations",
               "cost_normalization", "bank_images", "global_loss", "cross_view_loss", "cross_image_loss")
@dataclass
class CrIBoConfig(TeacherStudentConfig):
    name: str = param("cribo", help="CrIBo")
    out_dim: int = param(65536, help="prototypes of each head output layer", ge=2)
    norm_last_layer: bool = param(True, help="fix the output layers' weight-norm gain to 1")
    student_temp: float = param(0.1, help="tau_s of the global loss", gt=0.0)
    teacher_temp: float = param(0.07, help="tau_t of the global loss after warm-up", gt=0.0)
    warmup_teacher_temp: float = param(0.04, help="tau_t of the global loss at epoch 0", gt=0.0)
    object_student_temp: float = param(0.1, help="tau_s of the object losses", gt=0.0)
    object_teacher_temp: float = param(0.07, help="tau_t of the object losses after warm-up", gt=0.0)
    object_warmup_teacher_temp: float = param(0.04, help="tau_t of the object losses at epoch 0", gt=0.0)
    warmup_teacher_temp_epochs: int = param(30, help="epochs of linear tau_t warm-up (both)", ge=0)
    center_momentum: float = param(0.9, help="EMA momentum of the global center", ge=0.0, lt=1.0)
    object_center_momentum: float = param(0.9, help="EMA momentum of the object center", ge=0.0, lt=1.0)
    n_clusters: int = param(64, help="K, clusters per image", ge=1)
    cluster_iterations: int = param(5, help="clustering rounds", ge=1)
    lambda_pos: float = param(2.0, help="weight of the positional cost", ge=0.0)
    sinkhorn_strength: float = param(20.0, help="lambda of exp(-lambda M)", gt=0.0)
    sinkhorn_iterations: int = param(5, help="Sinkhorn scalings per round", ge=1)
    cost_normalization: Literal["image", "batch"] = param(
        "image", help="min-max of the cost per image, or over the batch (official code)")
    bank_images: int = param(25000, help="S: neighbours come from the objects of the newest S images (the bank has room for S x K)", ge=1)
    global_loss: bool = param(True, help="use the global (CLS) loss")
    cross_view_loss: bool = param(True, help="use the cross-view object loss")
    cross_image_loss: bool = param(True, help="use the cross-image object loss")
