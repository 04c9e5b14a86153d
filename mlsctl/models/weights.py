"""Reading backbone weights from local files, whatever layout wrote them.

Accepted files: ``.safetensors`` and ``.pth``/``.pt``/``.bin`` (read with
``torch.load(weights_only=True)``: no code from the file runs). Accepted layouts:

* timm / plain DINO release files: ``cls_token``, ``blocks.0.attn.qkv.weight`` ...;
* DINO and CrIBo training checkpoints: ``{"teacher": {"backbone.xxx" | "module.backbone.xxx"}, ...}``
  (the teacher is taken, as those papers evaluate it);
* mlsctl run checkpoints: ``teacher.backbone.model.xxx``.

Wrappers are removed (``module.``, ``_orig_mod.``, ``backbone.``, ``model.``), heads dropped
(``head``, ``heads``, ``head_obj`` ...). Loading is strict: a mismatch raises a
:class:`~mlsctl.errors.UserError` listing the missing and unexpected keys. A position embedding
of another grid size is resampled (timm's ``resample_abs_pos_embed``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from mlsctl.errors import UserError

CONTAINER_KEYS = ("teacher", "state_dict", "model", "student", "module")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
HEAD_PREFIXES = ("head.", "heads.", "head_", "projection_head.", "prototypes.", "predictor.", "dino_head.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; give a local .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"weights file {path} must end in .safetensors or .pth")
    except UserError:
        raise
    except Exception as exc:  # torch/safetensors raise many types for foreign or damaged files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read weights from {path} ({first[:200]}); is it a complete .safetensors/.pth file?") from None
    return _unwrap(state, path)


def _unwrap(state, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in CONTAINER_KEYS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
        else:
            raise UserError(f"{path} holds no tensors under {', '.join(CONTAINER_KEYS)}; is it a model checkpoint?")
    if not isinstance(state, Mapping):
        raise UserError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def backbone_state(state: Mapping[str, torch.Tensor], keep_head: bool = False) -> dict[str, torch.Tensor]:
    """Keys of any supported layout → timm ViT keys (heads dropped; with ``keep_head`` timm's own
    ``head.weight``/``head.bias`` stay, the embedding layer of ``model.embedding_dim``)."""
    keys = list(state)
    for prefix in ("teacher.backbone.model.", "teacher.backbone.", "backbone.model."):
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {}
    for key, value in state.items():
        for wrapper in WRAPPER_PREFIXES:
            if key.startswith(wrapper):
                key = key[len(wrapper):]
        out[key] = value
    if any(k.startswith("backbone.") for k in out):
        out = {k[len("backbone."):]: v for k, v in out.items() if k.startswith("backbone.")}
    return {k: v for k, v in out.items()
            if not k.startswith(HEAD_PREFIXES) or (keep_head and k in ("head.weight", "head.bias"))}


def _summarise(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_into_vit(vit: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strictly load timm-layout ``state`` into a timm ViT, resampling the position embedding."""
    state = dict(state)
    target = vit.state_dict()
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(vit, "no_embed_class", False) else getattr(vit, "num_prefix_tokens", 1)
        grid = vit.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(grid), num_prefix_tokens=prefix)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = sorted(k for k in set(target) & set(state) if target[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({_summarise(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({_summarise(unexpected)})")
        if wrong:
            details = [f"{k} {list(state[k].shape)} vs {list(target[k].shape)}" for k in wrong]
            parts.append(f"{len(wrong)} keys of another shape ({_summarise(details)})")
        raise UserError(f"weights in {source} do not fit model.arch: " + "; ".join(parts)
                        + "; check model.arch, model.patch_size and model.timm_kwargs")
    vit.load_state_dict(state, strict=True)
