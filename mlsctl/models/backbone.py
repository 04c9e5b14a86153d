"""The backbone: any timm Vision Transformer, returning its CLS token and its patch-token grid.

``Backbone(x)`` returns :class:`BackboneOutput` with ``cls`` [B, D] and ``patches`` [B, h, w, D]
(after the final norm; register tokens dropped). Inputs of any size that is a multiple of the patch
size are accepted (timm's ``dynamic_img_size``), so global and local crops share one model.

Weights: ``weights=FILE`` loads a local file through :mod:`mlsctl.models.weights` (strict, key
layouts remapped); ``pretrained=True`` takes timm's weights from the Hugging Face cache, or
downloads them when the hub answers within two seconds, and fails with one sentence otherwise
(:mod:`mlsctl.models.hub`). ``timm_kwargs`` may only hold architecture arguments
(:data:`mlsctl.config.TIMM_ARCH_KEYS`). ``lora`` wraps the ViT with peft LoRA adapters
(:mod:`mlsctl.models.lora`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from mlsctl.errors import UserError
from mlsctl.models import lora as lora_lib
from mlsctl.models.weights import backbone_state, load_into_vit, read_state_dict


@dataclass
class BackboneOutput:
    cls: torch.Tensor  # [B, D]
    patches: torch.Tensor  # [B, h, w, D]


class Backbone(nn.Module):
    def __init__(self, arch: str, *, img_size: int = 224, patch_size: int = 16, drop_path_rate: float = 0.0,
                 pretrained: bool = False, weights: Optional[str] = None, timm_kwargs: Optional[dict[str, Any]] = None,
                 lora: Optional[lora_lib.LoraSettings] = None):
        super().__init__()
        import timm

        from mlsctl.config import timm_kwargs_problem

        problem = timm_kwargs_problem(timm_kwargs or {})
        if problem:
            raise UserError(f"model.timm_kwargs: {problem}")
        kwargs = dict(timm_kwargs or {})
        kwargs.update(img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate, num_classes=0,
                      dynamic_img_size=True)
        if not timm.is_model(arch):
            import difflib

            close = difflib.get_close_matches(arch, timm.list_models("vit*") + timm.list_models("*vit*"), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else "; see timm.list_models('vit*')"
            raise UserError(f"model.arch '{arch}' is not a timm model{hint}")
        if pretrained:  # resolved to a local file first: no network retries (see mlsctl.models.hub)
            from mlsctl.models.hub import timm_pretrained_file

            weights = timm_pretrained_file(arch)
        try:
            model = timm.create_model(arch, pretrained=False, **kwargs)
        except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"timm cannot build '{arch}' with {sorted(kwargs)} ({first}); check model.timm_kwargs "
                            f"(num_heads must divide embed_dim) and that model.arch is a Vision Transformer") from None
        if not (hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens") and hasattr(model, "forward_features")):
            raise UserError(f"model.arch '{arch}' is not a Vision Transformer with patch tokens; use a timm ViT")
        if weights is not None:
            load_into_vit(model, backbone_state(read_state_dict(weights)), str(weights))
        self.arch = arch
        self.patch_size = patch_size
        self.embed_dim = model.num_features
        self.num_prefix_tokens = model.num_prefix_tokens
        self.model: nn.Module = lora_lib.apply_lora(model, lora) if lora is not None and lora.enabled else model

    @property
    def vit(self) -> nn.Module:
        """The timm ViT itself (inside the peft wrapper when LoRA is on)."""
        return lora_lib.unwrap(self.model)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        b, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        tokens = self.vit.forward_features(x)
        h, w = height // self.patch_size, width // self.patch_size
        patches = tokens[:, self.num_prefix_tokens:].reshape(b, h, w, -1)
        return BackboneOutput(cls=tokens[:, 0], patches=patches)

    def forward_crops(self, crops: list[torch.Tensor]) -> list[BackboneOutput]:
        """One output per crop; consecutive crops of one size go through the ViT together
        (DINO's MultiCropWrapper), so 2 global + 10 local crops cost two forward passes."""
        outputs: list[BackboneOutput] = []
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            out = self(torch.cat(crops[start:end]))
            outputs += [BackboneOutput(c, p) for c, p in zip(out.cls.chunk(end - start), out.patches.chunk(end - start))]
            start = end
        return outputs


def build_backbone(model_cfg, *, drop_path_rate: Optional[float] = None, load_weights: bool = True) -> Backbone:
    """A :class:`Backbone` from a recipe's ``model`` section; ``load_weights=False`` skips
    ``model.weights``/``model.pretrained`` (for a teacher that copies its student)."""
    return Backbone(
        model_cfg.arch,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        drop_path_rate=model_cfg.drop_path_rate if drop_path_rate is None else drop_path_rate,
        pretrained=model_cfg.pretrained and load_weights,
        weights=model_cfg.weights if load_weights else None,
        timm_kwargs=model_cfg.timm_kwargs,
        lora=lora_lib.LoraSettings.from_config(model_cfg.lora),
    )
