"""LoRA adapters on a timm ViT through peft.

:func:`apply_lora` wraps the ViT with ``peft.get_peft_model`` on the modules named in ``targets``
(``qkv`` by default): base weights are frozen, only the adapters (and, with ``bias="lora_only"``,
the biases of adapted layers; with ``bias="all"``, every bias) train. No matching module is an
error, never a silent no-op. :func:`save_adapters` writes the adapters alone (peft's
``adapter_model.safetensors`` + ``adapter_config.json``); :func:`merged_vit` folds them into a
plain timm ViT.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn

from mlsctl.errors import UserError


@dataclass
class LoraSettings:
    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    bias: str = "none"
    targets: list[str] = field(default_factory=lambda: ["qkv"])

    @classmethod
    def from_config(cls, cfg) -> "LoraSettings":
        return cls(cfg.enabled, cfg.rank, cfg.alpha, cfg.dropout, cfg.bias, list(cfg.targets))


def apply_lora(vit: nn.Module, settings: LoraSettings) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        bias=settings.bias, target_modules=list(settings.targets))
    try:
        return get_peft_model(vit, config)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError is a ValueError
        if "not found" in str(exc) or "NoMatching" in type(exc).__name__:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in vit.named_modules() if isinstance(m, nn.Linear)})
            raise UserError(f"model.lora.targets {settings.targets} matched no module of the backbone; "
                            f"its linear layers are named {', '.join(names)}") from None
        raise


def is_lora(module: nn.Module) -> bool:
    return type(module).__name__.startswith("Peft")


def unwrap(module: nn.Module) -> nn.Module:
    """The underlying model of a peft wrapper (the module itself otherwise)."""
    return module.base_model.model if is_lora(module) else module


def save_adapters(module: nn.Module, directory: str | Path) -> None:
    if not is_lora(module):
        raise ValueError("this backbone has no LoRA adapters")
    module.save_pretrained(str(directory), safe_serialization=True)


def merged_vit(module: nn.Module) -> nn.Module:
    """A plain ViT with the adapters merged into the base weights (the input is left alone)."""
    if not is_lora(module):
        return module
    return copy.deepcopy(module).merge_and_unload()
