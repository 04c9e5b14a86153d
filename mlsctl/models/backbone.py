"""The backbone: any timm Vision Transformer or CNN, returning a global feature and a feature grid.

``Backbone(x)`` returns :class:`BackboneOutput` with ``cls`` [B, D] and ``patches`` [B, h, w, D].

* **ViT** (``kind == "vit"``): ``cls`` is the CLS token and ``patches`` the patch tokens, after the
  final norm (register tokens dropped). Inputs of any size that is a multiple of the patch size are
  accepted (timm's ``dynamic_img_size``), so global and local crops share one model.
* **CNN** (``kind == "cnn"``: any timm model whose ``forward_features`` returns an NCHW map, such as
  ResNet-50 or ConvNeXt): ``cls`` is timm's pooled feature — the average-pooled last stage, then the
  head's norm where the model has one (ConvNeXt) — (a CNN has no CLS token; the name is kept so
  every consumer reads one field: it is *the global feature*) and ``patches`` the last
  stage's map as a grid. The "patch size" of a CNN is its output stride (32 for a ResNet, 8 with
  ``timm_kwargs: {output_stride: 8}``), so dense evaluation, crop-size checks and position maps
  treat a cell of the last stage as a patch. :attr:`has_cls_token` tells the two apart.

Weights: ``weights=FILE`` loads a local file through :mod:`mlsctl.models.weights` (strict, key
layouts remapped); ``pretrained=True`` takes timm's weights from the Hugging Face cache, or
downloads them when the hub answers within two seconds, and fails with one sentence otherwise
(:mod:`mlsctl.models.hub`). With ``skip_init=True`` (for inference) a model whose weights come
from a file is built without the random initialisation they replace at once
(:func:`mlsctl.models.weights.materialise`): the same model in a fraction of the time, and the
global random generator left alone (not with ``embedding_dim``, whose layer may stay fresh).
Training keeps the ordinary way: what the backbone draws decides the initialisation of the modules
built after it. ``timm_kwargs`` may only hold architecture arguments
(:data:`mlsctl.config.TIMM_ARCH_KEYS`). ``lora`` wraps the ViT with peft LoRA adapters
(:mod:`mlsctl.models.lora`).

Masked image modelling (iBOT, SOVE): built with ``mask_token=True`` the backbone holds a learnable
token ``mask_token`` [1, D]; ``Backbone(x, mask=M)`` with ``M`` [B, h, w] bool replaces the patch
embeddings where ``M`` is true by that token *before* the position embeddings are added (a forward
hook on the ViT's ``patch_embed``, so any timm ViT works and its forward stays timm's own).

Embedding layer (metric learning, method ``ms``; ViTs only): built with ``embedding_dim=E`` the ViT carries
timm's own ``head``, a linear layer width → E, and ``cls`` is that layer's output on the CLS token
(timm's ``forward_head``), not L2-normalised; ``embed_dim`` is then E (the width of ``cls``) and
``width`` the ViT's. The layer is saved and loaded with the ViT's keys (``head.weight``,
``head.bias``), so an exported teacher is ``timm.create_model(arch, num_classes=E)``; a weights file
whose head has another shape (an ImageNet classifier) leaves the layer freshly initialised.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from mlsctl.errors import UserError, first_line
from mlsctl.models import lora as lora_lib
from mlsctl.models import weights as weights_lib


@dataclass
class BackboneOutput:
    """What :class:`Backbone` gives for a batch: ``cls`` [B, D], the global feature (a ViT's CLS token,
    or its projection with ``embedding_dim``; a CNN's pooled map) and ``patches`` [B, h, w, D], one
    token per patch on the ``h × w`` grid (a CNN's last feature map)."""

    cls: torch.Tensor  # [B, D]
    patches: torch.Tensor  # [B, h, w, D]


@functools.lru_cache(maxsize=None)
def _default_shape(arch: str) -> tuple[int, int, int]:
    """(width, depth, patch) of timm's ``arch`` as timm builds it by default (on the meta device: no
    memory, no weights): what :attr:`Backbone.name` compares a built ViT with."""
    import timm

    with torch.device("meta"):
        default = timm.create_model(arch, pretrained=False, num_classes=0)
    return default.num_features, len(default.blocks), int(default.patch_embed.patch_size[0])


def closest_model_name(arch: str, names: list[str]) -> Optional[str]:
    """The timm name a mistyped ``arch`` most likely meant: difflib's closest among the names that
    share its longest prefix of 4 characters or more (its family: ``vit_tinyy`` → ``vit_tiny_patch16_224``,
    where difflib over every name offered ``gcvit_tiny``: a new user's probe, 2026-12-07); else
    difflib's closest of all."""
    import difflib

    for length in range(len(arch), 3, -1):
        sharing = [name for name in names if name.startswith(arch[:length])]
        if sharing:
            return difflib.get_close_matches(arch, sharing, n=1, cutoff=0.0)[0]
    close = difflib.get_close_matches(arch, names, n=1)
    return close[0] if close else None


def _check_timm_settings(arch: str, timm_kwargs: Optional[dict[str, Any]]) -> None:
    """``model.timm_kwargs`` and ``model.arch`` refused in one sentence where timm would not take them (an unknown
    arch names the closest timm model)."""
    import timm

    from mlsctl.config import timm_kwargs_problem

    problem = timm_kwargs_problem(timm_kwargs or {})
    if problem:
        raise UserError(f"model.timm_kwargs: {problem}")
    if not timm.is_model(arch):
        close = closest_model_name(arch, timm.list_models())
        hint = f"; did you mean '{close}'?" if close else "; see timm.list_models()"
        raise UserError(f"model.arch '{arch}' is not a timm model{hint}")


def _cnn_stride(arch: str, model: nn.Module, patch_size: Optional[int], lora, mask_token: bool) -> int:
    """The stride of a timm CNN's last stage (its "patch"), once what a CNN cannot do is refused: a ``patch_size``
    other than that stride, LoRA (it adapts a ViT's attention), a mask token, or no NCHW feature map."""
    if getattr(model, "output_fmt", "NCHW") != "NCHW" or not getattr(model, "feature_info", None):
        raise UserError(f"model.arch '{arch}' is neither a Vision Transformer with patch tokens nor a CNN with "
                        f"an NCHW feature map; use a timm ViT (vit_*) or CNN (resnet50, convnext_tiny, ...)")
    stride = int(model.feature_info[-1]["reduction"])
    if patch_size is not None and patch_size != stride:
        raise UserError(f"model.arch '{arch}' is a CNN whose last stage has stride {stride}: set "
                        f"model.patch_size={stride} (a cell of its last stage is its 'patch')")
    if lora is not None and lora.enabled:
        raise UserError(f"model.lora adapts a ViT's attention; '{arch}' is a CNN: set model.lora.enabled=false")
    if mask_token:
        raise UserError(f"masked image modelling needs a Vision Transformer (a mask token replaces patch "
                        f"embeddings); model.arch '{arch}' is a CNN")
    return stride


def _load_weights(model: nn.Module, weights, embedding_dim: int) -> None:
    """``weights`` (a file's backbone) into a built ``model``; with an embedding layer (``embedding_dim``), the file's
    is taken where its shape fits and the fresh one kept otherwise (said, where the file holds one of another
    shape)."""
    state = weights_lib.backbone_state(weights_lib.read_state_dict(weights), keep_head=embedding_dim > 0)
    if embedding_dim:  # an embedding layer of another shape (or none) in the file: keep the fresh one
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
        other = {k: list(state[k].shape) for k, v in fresh.items() if k in state and state[k].shape != v.shape}
        if other:  # a file without one is the usual start (a self-supervised backbone); another shape is news
            logging.getLogger("mlsctl").warning(
                f"{weights} holds an embedding layer of another shape ({other}) than model.embedding_dim "
                f"{embedding_dim} builds; it starts freshly initialised, the rest of the backbone from the file")
        if any(k not in state or state[k].shape != v.shape for k, v in fresh.items()):
            state.update(fresh)
    weights_lib.load_into_vit(model, state, str(weights))


class Backbone(nn.Module):
    """A timm model (``arch``; ViT or CNN) built for ``img_size`` at stride ``patch_size``, optionally
    with LoRA adapters and a mask token (SOVE's masked patches); ``forward(x)`` takes normalised float
    images [B, C, H, W] (H, W multiples of the patch size) and returns a :class:`BackboneOutput`.
    The timm module itself is ``.net`` (LoRA unwrapped)."""

    def __init__(self, arch: str, *, img_size: int = 224, patch_size: Optional[int] = 16, drop_path_rate: float = 0.0,
                 pretrained: bool = False, weights: Optional[str] = None, timm_kwargs: Optional[dict[str, Any]] = None,
                 lora: Optional[lora_lib.LoraSettings] = None, mask_token: bool = False, embedding_dim: int = 0,
                 skip_init: bool = False):
        super().__init__()
        import timm

        _check_timm_settings(arch, timm_kwargs)
        self.kind = architecture_kind(arch)
        kwargs = dict(timm_kwargs or {})
        kwargs.update(drop_path_rate=drop_path_rate, num_classes=0)
        if embedding_dim and self.kind != "vit":
            raise UserError(f"model.embedding_dim adds timm's head on a ViT's CLS token; '{arch}' is a CNN: set "
                            f"model.embedding_dim=0 or use a ViT")
        if self.kind == "vit":
            kwargs["num_classes"] = embedding_dim
            kwargs.update(img_size=img_size, dynamic_img_size=True)
            if patch_size is not None:
                kwargs["patch_size"] = patch_size
        if pretrained:  # resolved to a local file first: no network retries (see mlsctl.models.hub)
            from mlsctl.models.hub import timm_pretrained_file

            weights = timm_pretrained_file(arch)

        def create() -> nn.Module:
            try:
                return timm.create_model(arch, pretrained=False, **kwargs)
            except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
                hint = ("(num_heads must divide embed_dim)" if self.kind == "vit"
                        else "(a CNN takes output_stride, not ViT shapes)")
                raise UserError(f"timm cannot build '{arch}' with {sorted(kwargs)} ({first_line(exc)}); check model.timm_kwargs "
                                f"{hint}") from None

        skip_init = skip_init and weights is not None and not embedding_dim
        model = weights_lib.on_meta(create) if skip_init else create()
        if self.kind == "vit":
            stride = int(model.patch_embed.patch_size[0])
            self.num_prefix_tokens = model.num_prefix_tokens
        else:
            stride = _cnn_stride(arch, model, patch_size, lora, mask_token)
            self.num_prefix_tokens = 0
        if skip_init:
            state = weights_lib.fitted_state(model, weights_lib.backbone_state(weights_lib.read_state_dict(weights)),
                                             str(weights))
            model = weights_lib.materialise(model, state, create)
        elif weights is not None:
            _load_weights(model, weights, embedding_dim)
        self.arch = arch
        self.timm_kwargs = dict(timm_kwargs or {})
        self.reshaped = (bool(self.timm_kwargs) if self.kind != "vit" else
                         (model.num_features, len(model.blocks), stride) != _default_shape(arch))
        self.patch_size = stride
        self.width = model.num_features
        self.embedding_dim = embedding_dim
        self.embed_dim = embedding_dim or model.num_features
        self.model: nn.Module = lora_lib.apply_lora(model, lora) if lora is not None and lora.enabled else model
        self.mask_token = nn.Parameter(torch.zeros(1, self.width)) if mask_token else None

    @property
    def name(self) -> str:
        """``arch`` as timm names it, with the shape it was built in where model.timm_kwargs or
        model.patch_size change it: a width-320 ViT of patch 8 is no ``vit_small_patch16_224``."""
        if not self.reshaped:
            return self.arch
        if self.kind == "vit":
            return f"{self.arch} reshaped to width {self.width}, depth {len(self.net.blocks)}, patch {self.patch_size}"
        return f"{self.arch} built with timm_kwargs {self.timm_kwargs}"

    @property
    def net(self) -> nn.Module:
        """The timm model itself (inside the peft wrapper when LoRA is on)."""
        return lora_lib.unwrap(self.model)

    @property
    def has_cls_token(self) -> bool:
        """Whether ``cls`` is a CLS token (a ViT with a class token) rather than pooled features."""
        return self.kind == "vit" and self.num_prefix_tokens > 0 and not getattr(self.net, "no_class_token", False) \
            and getattr(self.net, "cls_token", None) is not None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> BackboneOutput:
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"the backbone takes normalised float images [B, C, H, W], got a {x.dtype} tensor of "
                             f"shape {list(x.shape)}" + (" (add a batch dimension: x[None])" if x.ndim == 3 else ""))
        b, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        h, w = height // self.patch_size, width // self.patch_size
        if self.kind == "cnn":
            if mask is not None:
                raise ValueError("a CNN backbone takes no mask (masked image modelling needs a ViT)")
            grid = self.net.forward_features(x)
            if tuple(grid.shape[-2:]) != (h, w):
                raise ValueError(f"{self.arch} gave a {tuple(grid.shape[-2:])} map for a {height}x{width} input, "
                                 f"not {h}x{w} at stride {self.patch_size}")
            # timm's own pooled feature (average pooling, and the head's norm where the model has one, as
            # ConvNeXt): what the exported model (num_classes=0) returns
            return BackboneOutput(cls=self.net.forward_head(grid, pre_logits=True), patches=grid.permute(0, 2, 3, 1))
        if mask is None:
            tokens = self.net.forward_features(x)
        else:
            if self.mask_token is None:
                raise ValueError("this backbone was built without a mask token (mask_token=True)")
            if tuple(mask.shape) != (b, h, w):
                raise ValueError(f"mask must be [{b}, {h}, {w}] for this input, got {list(mask.shape)}")
            handle = self.net.patch_embed.register_forward_hook(self._masking_hook(mask))
            try:
                tokens = self.net.forward_features(x)
            finally:
                handle.remove()
        patches = tokens[:, self.num_prefix_tokens:].reshape(b, h, w, -1)
        if self.embedding_dim:
            cls = self.net.forward_head(tokens)
        elif self.has_cls_token:
            cls = tokens[:, 0]
        else:  # no class token (timm's class_token=False): its pooled feature, not the first patch (a review, 2026-12-06)
            cls = self.net.forward_head(tokens, pre_logits=True)
            if cls.ndim == 3:  # global_pool '' pools nothing: the mean of the patch tokens
                cls = patches.mean(dim=(1, 2))
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


def architecture_kind(arch: str) -> str:
    """``"vit"`` for a timm Vision Transformer with patch tokens, ``"cnn"`` otherwise (checked
    further when the model is built). Decided from timm's registry without building the model."""
    import timm

    module = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    return "vit" if module in VIT_MODULES else "cnn"


# timm modules whose models are Vision Transformers with patch tokens (patch_embed, num_prefix_tokens)
VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos",
               "vision_transformer_sam", "deit", "eva", "beit")


def build_backbone(model_cfg, *, drop_path_rate: Optional[float] = None, load_weights: bool = True,
                   mask_token: bool = False, skip_init: bool = False) -> Backbone:
    """A :class:`Backbone` from a recipe's ``model`` section; ``load_weights=False`` skips
    ``model.weights``/``model.pretrained`` (for a teacher that copies its student); ``mask_token``
    adds the learnable token of masked image modelling; ``skip_init``: see :class:`Backbone`."""
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
        skip_init=skip_init,
    )
