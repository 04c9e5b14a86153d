"""SOVE's hyper-parameters: the recipe's ``method`` section when ``method.name: sove``
(docs/methods.md#sove). Light: no torch (:mod:`mlsctl.registry`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mlsctl.config import param
from mlsctl.methods.base_config import TeacherStudentConfig, keys_in_order


@keys_in_order("name", "hidden_dim", "bottleneck_dim", "head_layers", "student_temp", "teacher_temp",
               "warmup_teacher_temp", "warmup_teacher_temp_epochs", "momentum_teacher",
               "momentum_teacher_end", "class_memory_size", "patch_memory_size", "cls_anchors",
               "cls_supports", "cls_tasks", "patch_anchors", "patch_supports", "patch_tasks", "anchor_eps",
               "anchor_selection", "patch_loss", "mask_ratio", "mask_aspect", "judge_chunk", "judge_search")
@dataclass
class SOVEConfig(TeacherStudentConfig):
    name: str = param("sove", help="SOVE")
    bottleneck_dim: int = param(256, help="d: the L2-normalised embedding of CLS and patches", ge=1)
    teacher_temp: float = param(0.04, help="tau_t after warm-up (CLS and patch losses)", gt=0.0)
    class_memory_size: int = param(65536, help="N of E_C: teacher CLS embeddings kept", ge=2)
    patch_memory_size: int = param(8192, help="N of E_P: teacher patch embeddings kept", ge=2)
    cls_anchors: int = param(4096, help="K: anchors (concepts) per CLS task", ge=2)
    cls_supports: int = param(8, help="k: nearest entries joining each anchor (judges per concept = k + 1)", ge=0)
    cls_tasks: int = param(4, help="independent CLS tasks per step, their losses averaged", ge=1)
    patch_anchors: int = param(512, help="K of the patch tasks", ge=2)
    patch_supports: int = param(0, help="k of the patch tasks (the paper: the anchor alone)", ge=0)
    patch_tasks: int = param(1, help="independent patch tasks per step", ge=1)
    anchor_eps: float = param(0.1, help="eps: an anchor's own label is 1 - eps", ge=0.0, lt=1.0)
    anchor_selection: Literal["all", "half"] = param(
        "all", help="CLS tasks: keep every drawn anchor (the paper), or a random half of them (the authors' code); "
                    "patch tasks always keep every anchor, as the authors' code does")
    patch_loss: bool = param(True, help="use the non-parametric MIM loss")
    mask_ratio: float = param(0.3, help="share of each global view's patches masked for the student", ge=0.0, lt=1.0)
    mask_aspect: tuple[float, float] = param((0.3, 1 / 0.3), help="aspect-ratio range of the mask blocks", gt=0.0)
    judge_chunk: int = param(512, help="anchor rows scored against a memory at once (tiles of chunk x 16384 scores)",
                             ge=1)
    judge_search: Literal["exact", "bf16"] = param(
        "exact", help="support search: exact float32, or bfloat16 scores with the best 2k rescored exactly (faster on "
                      "CPUs with AVX-512 BF16; near-ties may differ)")
