"""MILE's hyper-parameters: the recipe's ``method`` section when ``method.name: mile``
(docs/methods.md#mile). Light: no torch (:mod:`mlsctl.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mlsctl.config import param
from mlsctl.methods.base_config import TeacherStudentConfig, keys_in_order


@keys_in_order("name", "set_length", "objects_file", "attend", "cross_heads", "out_dim", "hidden_dim",
               "bottleneck_dim", "head_layers", "norm_last_layer", "student_temp", "teacher_temp",
               "warmup_teacher_temp", "warmup_teacher_temp_epochs", "center_momentum", "momentum_teacher",
               "momentum_teacher_end")
@dataclass
class MILEConfig(TeacherStudentConfig):
    name: str = param("mile", help="MILE")
    set_length: int = param(4, help="images per training set (sampled afresh every epoch)", ge=1)
    objects_file: Optional[str] = param(None, path=True, help="CSV/JSONL of object_id,path (relative to data.root or "
                                                              "to the file's folder, or absolute); default: one "
                                                              "folder per object under data.root")
    attend: Literal["cls", "patches"] = param("cls", help="what a latent attends to in each image: its CLS or its patch tokens")
    cross_heads: int = param(6, help="attention heads of Φ_CROSS (must divide the backbone width)", ge=1)
    out_dim: int = param(65536, help="prototypes K of the DINO head", ge=2)
    norm_last_layer: bool = param(True, help="fix the last layer's weight-norm gain to 1")
    warmup_teacher_temp_epochs: int = param(30, help="epochs of linear tau_t warm-up (paper: 0.04 → 0.07 over 30)", ge=0)
    center_momentum: float = param(0.9, help="EMA momentum of the center", ge=0.0, lt=1.0)
    momentum_teacher: float = param(0.996, help="teacher EMA momentum at step 0 (paper: 0.996 ViT-S, 0.9996 larger)",
                                    ge=0.0, le=1.0)
