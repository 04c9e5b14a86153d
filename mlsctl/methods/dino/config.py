"""DINO's hyper-parameters: the recipe's ``method`` section when ``method.name: dino``
(docs/methods.md#dino). Light: no torch (:mod:`mlsctl.registry`)."""

from __future__ import annotations

from dataclasses import dataclass

from mlsctl.config import param
from mlsctl.methods.base_config import TeacherStudentConfig, keys_in_order


@keys_in_order("name", "out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "norm_last_layer", "student_temp",
               "teacher_temp", "warmup_teacher_temp", "warmup_teacher_temp_epochs", "center_momentum",
               "momentum_teacher", "momentum_teacher_end", "monitor_bank_size")
@dataclass
class DINOConfig(TeacherStudentConfig):
    name: str = param("dino", help="DINO")
    out_dim: int = param(65536, help="prototypes K of the head's last layer", ge=2)
    norm_last_layer: bool = param(True, help="fix the last layer's weight-norm gain to 1")
    center_momentum: float = param(0.9, help="EMA momentum of the center", ge=0.0, lt=1.0)
    monitor_bank_size: int = param(4096, help="recent teacher CLS kept for `mlsctl bank`; 0 = none", ge=0)
