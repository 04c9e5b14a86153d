"""Projection heads."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||)ᵀ`` without bias (weight normalisation per output unit), as DINO's
    ``weight_norm(nn.Linear(..., bias=False))``.

    With ``fixed_gain`` the gain g stays 1 (DINO's ``norm_last_layer=True``): the layer is then a
    cosine-similarity classifier over ``out_features`` prototypes. Matching the authors' code:

    * the direction v starts with ``nn.Linear``'s default initialisation (uniform in ±1/√in, rows
      of norm ≈ 0.58), not the trunc-normal of the MLP layers; v is normalised in the forward, so
      its scale only sets the size of its updates;
    * the gain g has shape [out, 1] (``weight_g``), so with ``norm_last_layer=false`` it is weight
      decayed like a weight — a 1-D [out] gain would be exempt as a norm parameter. A saved gain of
      shape [out] (mlsctl before 0.1.0's fidelity changes) is read as [out, 1].
    """

    def __init__(self, in_features: int, out_features: int, fixed_gain: bool = True):
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.direction, a=math.sqrt(5))  # nn.Linear's own default
        self.gain = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_gain)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "gain"
        if key in state_dict and state_dict[key].ndim == 1:
            state_dict[key] = state_dict[key][:, None]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The logits in float32 under any autocast: the teacher's are divided by 0.04 and each one is a
        # prototype score; in bf16 (8 bits of mantissa) their error was ~1e-3, 8 times that of the
        # authors' fp16 (a review, 2026-12-06). On CUDA, with TF32 matmuls at half bf16's rate, this
        # should cost about 2 % of a dino_in1k step (estimated from FLOPs: the layer is 1.6 % of the
        # forward of 2 × 224 px + 10 × 96 px crops of ViT-S/16 and K = 65,536; not measured).
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), F.normalize(self.direction.float(), dim=1) * self.gain.float())


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, n_layers: int) -> nn.Module:
    """DINO's head MLP: in→hidden (GELU) → ... → out, trunc-normal weights (std 0.02), zero biases."""
    n_layers = max(n_layers, 1)
    if n_layers == 1:
        mlp: nn.Module = nn.Linear(in_dim, out_dim)
    else:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(n_layers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, out_dim))
        mlp = nn.Sequential(*layers)
    mlp.apply(_init_linear)
    return mlp


class EmbeddingHead(nn.Module):
    """MLP D→hidden→hidden→out (GELU) and L2 normalisation, without a prototype layer (SOVE's head,
    shared by the CLS and the patch tokens)."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, n_layers: int = 3):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, out_dim, n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1)


class DINOHead(nn.Module):
    """MLP D→hidden→hidden→bottleneck (GELU), L2 normalisation, weight-normed linear → out_dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim, n_layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_gain=norm_last_layer)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck (before the prototypes)."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.project(x))
