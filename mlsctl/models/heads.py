"""Projection heads."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||)ᵀ`` without bias (weight normalisation per output unit).

    With ``fixed_gain`` the gain g stays 1 (DINO's ``norm_last_layer=True``): the layer is then a
    cosine-similarity classifier over ``out_features`` prototypes.
    """

    def __init__(self, in_features: int, out_features: int, fixed_gain: bool = True):
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.direction, std=0.02)
        self.gain = nn.Parameter(torch.ones(out_features), requires_grad=not fixed_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.normalize(self.direction, dim=1) * self.gain[:, None]
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP D→hidden→hidden→bottleneck (GELU), L2 normalisation, weight-normed linear → out_dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        n_layers = max(n_layers, 1)
        if n_layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(n_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_linear)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck (before the prototypes)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))
