"""The optimiser: parameter groups, the recipe's optimiser, what the schedules give each step,
gradient clipping, the freezing of the last layer, and the EMA update of the teachers."""

from __future__ import annotations

import torch


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


def clip_gradients(parameters: list[torch.nn.Parameter], threshold: float, mode: str, accelerator) -> torch.Tensor:
    """Returns the total gradient norm before clipping, as a tensor on the device (read only when
    logged: no host synchronisation per step)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch.stack(torch._foreach_norm([g.detach().float() for g in grads], 2))
    total = norms.norm(2)
    if threshold > 0:
        if mode == "global":
            accelerator.clip_grad_norm_(parameters, threshold)
        else:  # DINO: each parameter's gradient clipped to the threshold on its own
            coefficients = (threshold / (norms + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, [c.to(g.dtype) for c, g in zip(coefficients, grads)])
    return total


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
