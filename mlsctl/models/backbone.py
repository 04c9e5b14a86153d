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

Masked image modelling (iBOT, SOVE): built with ``mask_token=True`` the backbone holds a learnable
token ``mask_token`` [1, D]; ``Backbone(x, mask=M)`` with ``M`` [B, h, w] bool replaces the patch
embeddings where ``M`` is true by that token *before* the position embeddings are added (a forward
hook on the ViT's ``patch_embed``, so any timm ViT works and its forward stays timm's own).

Embedding layer (metric learning, method ``ms``): built with ``embedding_dim=E`` the ViT carries
timm's own ``head``, a linear layer width → E, and ``cls`` is that layer's output on the CLS token
(timm's ``forward_head``), not L2-normalised; ``embed_dim`` is then E (the width of ``cls``) and
``width`` the ViT's. The layer is saved and loaded with the ViT's keys (``head.weight``,
``head.bias``), so an exported teacher is ``timm.create_model(arch, num_classes=E)``; a weights file
whose head has another shape (an ImageNet classifier) leaves the layer freshly initialised.
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
                 lora: Optional[lora_lib.LoraSettings] = None, mask_token: bool = False, embedding_dim: int = 0):
        super().__init__()
        import timm

        from mlsctl.config import timm_kwargs_problem

        problem = timm_kwargs_problem(timm_kwargs or {})
        if problem:
            raise UserError(f"model.timm_kwargs: {problem}")
        kwargs = dict(timm_kwargs or {})
        kwargs.update(img_size=img_size, patch_size=patch_size, drop_path_rate=drop_path_rate, num_classes=embedding_dim,
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
            state = backbone_state(read_state_dict(weights), keep_head=embedding_dim > 0)
            if embedding_dim:  # an embedding layer of another shape (or none) in the file: keep the fresh one
                fresh = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
                if any(k not in state or state[k].shape != v.shape for k, v in fresh.items()):
                    state.update(fresh)
            load_into_vit(model, state, str(weights))
        self.arch = arch
        self.patch_size = patch_size
        self.width = model.num_features
        self.embedding_dim = embedding_dim
        self.embed_dim = embedding_dim or model.num_features
        self.num_prefix_tokens = model.num_prefix_tokens
        self.model: nn.Module = lora_lib.apply_lora(model, lora) if lora is not None and lora.enabled else model
        self.mask_token = nn.Parameter(torch.zeros(1, self.width)) if mask_token else None

    @property
    def vit(self) -> nn.Module:
        """The timm ViT itself (inside the peft wrapper when LoRA is on)."""
        return lora_lib.unwrap(self.model)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> BackboneOutput:
        b, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        h, w = height // self.patch_size, width // self.patch_size
        if mask is None:
            tokens = self.vit.forward_features(x)
        else:
            if self.mask_token is None:
                raise ValueError("this backbone was built without a mask token (mask_token=True)")
            if tuple(mask.shape) != (b, h, w):
                raise ValueError(f"mask must be [{b}, {h}, {w}] for this input, got {list(mask.shape)}")
            handle = self.vit.patch_embed.register_forward_hook(self._masking_hook(mask))
            try:
                tokens = self.vit.forward_features(x)
            finally:
                handle.remove()
        patches = tokens[:, self.num_prefix_tokens:].reshape(b, h, w, -1)
        cls = self.vit.forward_head(tokens) if self.embedding_dim else tokens[:, 0]
        return BackboneOutput(cls=cls, patches=patches)

    def _masking_hook(self, mask: torch.Tensor):
        def hook(_module, _inputs, embeddings: torch.Tensor) -> torch.Tensor:
            # [B, h, w, D] with timm's dynamic image size, [B, h*w, D] otherwise
            where = mask.reshape(*embeddings.shape[:-1], 1)
            return torch.where(where, self.mask_token.to(embeddings.dtype), embeddings)
        return hook

    def forward_crops(self, crops: list[torch.Tensor],
                      masks: Optional[list[Optional[torch.Tensor]]] = None) -> list[BackboneOutput]:
        """One output per crop; consecutive crops of one size go through the ViT together
        (DINO's MultiCropWrapper), so 2 global + 10 local crops cost two forward passes.
        ``masks`` (optional, one per crop, None for an unmasked crop) are passed to :meth:`forward`."""
        outputs: list[BackboneOutput] = []
        masks = list(masks) if masks is not None else [None] * len(crops)
        start = 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            group = masks[start:end]
            if all(m is None for m in group):
                mask = None
            else:
                h, w = crops[start].shape[-2] // self.patch_size, crops[start].shape[-1] // self.patch_size
                mask = torch.cat([m if m is not None else torch.zeros(len(c), h, w, dtype=torch.bool, device=c.device)
                                  for m, c in zip(group, crops[start:end])])
            out = self(torch.cat(crops[start:end]), mask=mask)
            outputs += [BackboneOutput(c, p) for c, p in zip(out.cls.chunk(end - start), out.patches.chunk(end - start))]
            start = end
        return outputs


def build_backbone(model_cfg, *, drop_path_rate: Optional[float] = None, load_weights: bool = True,
                   mask_token: bool = False) -> Backbone:
    """A :class:`Backbone` from a recipe's ``model`` section; ``load_weights=False`` skips
    ``model.weights``/``model.pretrained`` (for a teacher that copies its student); ``mask_token``
    adds the learnable token of masked image modelling."""
    return Backbone(
        model_cfg.arch,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        drop_path_rate=model_cfg.drop_path_rate if drop_path_rate is None else drop_path_rate,
        pretrained=model_cfg.pretrained and load_weights,
        weights=model_cfg.weights if load_weights else None,
        timm_kwargs=model_cfg.timm_kwargs,
        lora=lora_lib.LoraSettings.from_config(model_cfg.lora),
        mask_token=mask_token,
        embedding_dim=model_cfg.embedding_dim,
    )
