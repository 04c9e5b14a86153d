"""The config fields several methods share, and how a method config keeps its keys' order.

Light on purpose: a method's ``config.py`` builds on this module and :mod:`mlsctl.config`'s schema
helpers only (no torch), so reading a recipe types its ``method`` section without importing the
method (:mod:`mlsctl.registry`).

* :class:`EMATeacherConfig`: a teacher that is an EMA of the student (MLS's key encoder too);
  :meth:`mlsctl.methods.base.Method.ema_momentum` reads its two momenta;
* :class:`TeacherStudentConfig`: the self-distillation methods (DINO, CrIBo, MILE, SOVE) add the
  projection head's shape and the student/teacher temperatures with the teacher's warm-up.

A method redeclares a field where its default or help differs (SOVE's ``teacher_temp``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mlsctl.config import MethodConfig, param


@dataclass
class EMATeacherConfig(MethodConfig):
    momentum_teacher: float = param(0.996, help="teacher EMA momentum at step 0", ge=0.0, le=1.0)
    momentum_teacher_end: float = param(1.0, help="teacher EMA momentum at the end (cosine)", ge=0.0, le=1.0)


@dataclass
class TeacherStudentConfig(EMATeacherConfig):
    hidden_dim: int = param(2048, help="head MLP width", ge=1)
    bottleneck_dim: int = param(256, help="head bottleneck (L2-normalised)", ge=1)
    head_layers: int = param(3, help="head MLP layers", ge=1)
    student_temp: float = param(0.1, help="tau_s", gt=0.0)
    teacher_temp: float = param(0.07, help="tau_t after warm-up", gt=0.0)
    warmup_teacher_temp: float = param(0.04, help="tau_t at epoch 0", gt=0.0)
    warmup_teacher_temp_epochs: int = param(30, help="epochs of linear tau_t warm-up", ge=0)

    def teacher_temperature_at(self, epoch: int) -> float:
        """tau_t at ``epoch``: ``warmup_teacher_temp``, rising linearly to ``teacher_temp`` over
        ``warmup_teacher_temp_epochs`` (DINO's schedule, which MILE and SOVE keep)."""
        from mlsctl.schedules import linear_warmup_epochs

        return linear_warmup_epochs(epoch, self.warmup_teacher_temp_epochs, self.warmup_teacher_temp, self.teacher_temp)


def _repr(self) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
    return f"{type(self).__qualname__}({shown})"


def keys_in_order(*names: str):
    """Class decorator (outside ``@dataclass``): the config's fields in this order, wherever its
    base classes declare them. The order is that of a run's config.yaml and of ``mlsctl recipes
    --show``, so moving a field into a shared base changes neither. ``names`` must be every field."""

    def apply(cls: type) -> type:
        own = [f.name for f in fields(cls)]
        if sorted(own) != sorted(names) or len(set(names)) != len(names):
            raise TypeError(f"{cls.__name__}: keys_in_order names {sorted(names)}, the fields are {sorted(own)}")
        table = cls.__dataclass_fields__
        cls.__dataclass_fields__ = {**{n: table[n] for n in names}, **{n: f for n, f in table.items() if n not in names}}
        cls.__repr__ = _repr  # the dataclass's own was written in the declaration order
        return cls

    return apply
