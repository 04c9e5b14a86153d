"""Backbones (timm ViTs), weight loading with key remapping, LoRA, and heads."""

from mlsctl.models.backbone import Backbone, BackboneOutput, build_backbone

__all__ = ["Backbone", "BackboneOutput", "build_backbone"]
