"""The optimiser: parameter groups, the recipe's optimiser, what the schedules give each step,
gradient clipping, the freezing of the last layer, and the EMA update of the teachers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mlsctl.schedules import Schedule, cosine


def param_groups(module: torch.nn.Module, decay_biases_and_norms: bool = False) -> list[dict]:
    """Parameter groups: weight decay on weights, none on biases and norms (1-D parameters) unless
    ``decay_biases_and_norms`` (MoCo's SGD decays every parameter)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exempt = (name.endswith(".bias") or p.ndim <= 1) and not decay_biases_and_norms
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "apply_weight_decay": True}, {"params": no_decay, "weight_decay": 0.0, "apply_weight_decay": False}]


def build_optimizer(optim, groups: list[dict], fused: bool = False) -> torch.optim.Optimizer:
    """The recipe's optimiser (``optim.optimizer``) over ``groups``; the loop sets lr and weight decay
    every step from the schedules. ``adam`` adds weight decay to the gradient (L2), ``adamw`` decouples
    it, ``sgd`` uses ``optim.momentum`` (no Nesterov, no dampening: MoCo's ``torch.optim.SGD``).
    ``fused`` (parameters on CUDA): Adam and AdamW update every parameter in one kernel."""
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=optim.momentum, weight_decay=optim.weight_decay)
    kind = torch.optim.Adam if optim.optimizer == "adam" else torch.optim.AdamW
    return kind(groups, lr=0.0, betas=tuple(optim.betas), weight_decay=optim.weight_decay, **({"fused": True} if fused else {}))


@dataclass(frozen=True)
class Plan:
    """The optimiser steps of a run and what the schedules give each: learning rate (linear warm-up,
    then cosine) and weight decay (cosine), and whether the last layer is still frozen."""
    cfg: object  # the recipe's optim section
    total_steps: int
    batch_global: int  # the images of one optimiser step: batch_size x processes x accumulate_steps
    peak_lr: float  # optim.lr, scaled by batch_global / 256 with optim.scale_lr
    warmup_steps: int
    freeze_steps: int  # steps whose last-layer gradients are dropped (optim.freeze_last_layer_epochs)

    @classmethod
    def of(cls, recipe, schedule: Schedule, world_size: int) -> "Plan":
        optim = recipe.optim
        batch_global = optim.batch_size * world_size * optim.accumulate_steps
        return cls(optim, schedule.total_steps, batch_global,
                   peak_lr=optim.lr * (batch_global / 256 if optim.scale_lr else 1.0),
                   warmup_steps=schedule.steps(optim.warmup_epochs),
                   freeze_steps=schedule.steps(optim.freeze_last_layer_epochs))

    @property
    def accumulate(self) -> int:
        """Micro-batches per optimiser step (``optim.accumulate_steps``)."""
        return self.cfg.accumulate_steps

    def lr(self, step: int) -> float:
        return cosine(step, self.total_steps, self.peak_lr, self.cfg.min_lr, self.warmup_steps)

    def weight_decay(self, step: int) -> float:
        return cosine(step, self.total_steps, self.cfg.weight_decay, self.cfg.weight_decay_end)


def set_lr_and_weight_decay(optimizer, lr: float, weight_decay: float) -> None:
    """The step's values in every parameter group (weight decay only where it applies)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["apply_weight_decay"]:
            group["weight_decay"] = weight_decay


def clip_gradients(parameters: list[torch.nn.Parameter], threshold: float, mode: str, accelerator) -> torch.Tensor:
    """Returns the total gradient norm before clipping, as a tensor on the device (read only when
    logged: no host synchronisation per step). The gradients must be unscaled already: with fp16
    the loop unscales them (``accelerator.unscale_gradients``) before calling this, so the global
    mode clips with torch itself; ``accelerator.clip_grad_norm_`` would unscale a second time,
    which the grad scaler refuses ("unscale_() has already been called")."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm([g.detach().float() for g in grads], 2))
    total = norms.norm(2)
    if threshold > 0:
        if mode == "global":
            torch.nn.utils.clip_grad_norm_(parameters, threshold)
        else:  # DINO: each parameter's gradient clipped to the threshold on its own
            coefficients = (threshold / (norms + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefficients, grads)])
    return total


def gradients_to_apply(trainable: list[torch.nn.Parameter], last_layer: list[torch.nn.Parameter], step: int,
                       plan: Plan, accelerator) -> torch.Tensor:
    """The step's gradients as the optimiser takes them: the last layer's dropped while it is frozen,
    then the rest clipped (:func:`clip_gradients`; DINO clips first, which is the same for its
    per-parameter clipping, but a global norm must not count gradients that are not applied).
    Returns the norm of the gradients applied, before clipping."""
    freeze_last_layer(last_layer, step, plan)
    return clip_gradients(trainable, plan.cfg.clip_grad, plan.cfg.clip_grad_mode, accelerator)


def freeze_last_layer(parameters: list[torch.nn.Parameter], step: int, plan: Plan) -> None:
    """For the first ``optim.freeze_last_layer_epochs`` the last layer is not updated: its gradients dropped."""
    if step < plan.freeze_steps:
        for p in parameters:
            p.grad = None


@torch.no_grad()
def ema_update(pairs, momentum: float) -> None:
    for student, teacher in pairs:
        s_params = [p.detach() for p in student.parameters()]
        t_params = [p.detach() for p in teacher.parameters()]
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def check_ema_pairs(pairs) -> None:
    for student, teacher in pairs:
        s_names = [n for n, _ in student.named_parameters()]
        t_names = [n for n, _ in teacher.named_parameters()]
        if s_names != t_names:
            raise RuntimeError("EMA pair with different parameters: " + str(set(s_names) ^ set(t_names)))
