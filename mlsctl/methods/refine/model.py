"""The refiner of context refinement as a plain PyTorch module: T cross-attention blocks (an
embedding attends to its nearest neighbours) and an optional final linear layer
(docs/methods.md#context-refinement).

The equations, the symbols and the choices where the supplement is silent (``input_scale``
included) are documented with the method that trains it, :mod:`mlsctl.methods.refine`;
``mlsctl refine apply`` (:mod:`mlsctl.refine.apply`) loads it from a run without the method.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SCALES = ("none", "sqrt_d")  # method.input_scale: what a block multiplies its unit-norm inputs by


class CrossAttentionBlock(nn.Module):
    """One single-head cross-attention block: x [B, d] attends to its neighbours [B, k, d]."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0, zero_init: bool = True, input_scale: str = "none"):
        super().__init__()
        if input_scale not in INPUT_SCALES:
            raise ValueError(f"input_scale must be one of {', '.join(INPUT_SCALES)}, got {input_scale!r}")
        self.input_scale = input_scale
        hidden = max(1, int(round(mlp_ratio * dim)))
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        if zero_init:
            for layer in (self.o, self.fc2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the normalised new x [B, d], the attention over the neighbours [B, k])."""
        if self.input_scale == "sqrt_d":  # unit-norm rows → unit variance per coordinate (mlsctl.methods.refine)
            scale = math.sqrt(x.shape[-1])
            x, neighbours = x * scale, neighbours * scale
        q = x + F.silu(self.q(x))
        k, v = F.silu(self.k(neighbours)), F.silu(self.v(neighbours))
        attention = torch.softmax(torch.einsum("bd,bkd->bk", q, k) / math.sqrt(x.shape[-1]), dim=-1)
        h = x + self.o(torch.einsum("bk,bkd->bd", attention, v))
        h = h + self.fc2(F.silu(self.fc1(self.norm(h))))
        return F.normalize(h, dim=-1), attention


class Refiner(nn.Module):
    """T blocks and the optional final linear layer d1 → d2."""

    def __init__(self, dim: int, blocks: int = 8, out_dim: int = 0, mlp_ratio: float = 2.0, zero_init: bool = True,
                 input_scale: str = "none"):
        super().__init__()
        self.dim, self.out_dim, self.input_scale = dim, out_dim or dim, input_scale
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, mlp_ratio, zero_init, input_scale) for _ in range(blocks))
        self.project = nn.Linear(dim, out_dim) if out_dim else None

    @classmethod
    def of_config(cls, dim: int, cfg) -> "Refiner":
        """The refiner a run's ``method`` settings (:class:`~mlsctl.methods.refine.config.RefineConfig`)
        build for embeddings of width ``dim``: the training method's and ``refine apply``'s one way."""
        return cls(dim, cfg.blocks, cfg.out_dim, cfg.mlp_ratio, cfg.zero_init, cfg.input_scale)

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor, trace: bool = False):
        """e⁰ [B, d1] and its neighbours [B, k, d1] → e^T [B, d2]; with ``trace`` also the list
        e⁰, e¹, ..., e^T (width d1, before the final layer) and each block's attention [B, k]."""
        x = F.normalize(x.float(), dim=-1)
        neighbours = F.normalize(neighbours.float(), dim=-1)
        states, attentions = [x], []
        for block in self.blocks:
            x, attention = block(x, neighbours)
            states.append(x)
            attentions.append(attention)
        out = F.normalize(self.project(x), dim=-1) if self.project is not None else x
        return (out, states, attentions) if trace else out
