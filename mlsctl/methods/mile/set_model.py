"""A MILE run's teacher as a set model: backbone + set encoder, and the recurrence that folds images
into a set's latent one at a time (docs/methods.md#mile).

:class:`MILESetModel` is the model alone: its width, its fingerprint and :meth:`~MILESetModel.fold`.
How photos become its inputs (the preprocessing a gallery records) is
:class:`mlsctl.gallery.SetModel`, which adds it on top and is what ``mlsctl.gallery.load_set_model``
returns for a MILE run: it needs the feature preprocessing and reads runs back, both above the ``methods`` layer.
(A run of any other method gets :class:`mlsctl.gallery.MeanCLSSetModel`, the mean of its photos' CLS, which
belongs to no method.)
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MILESetModel:
    backbone: object  # ModelChoice of the teacher backbone
    encoder: torch.nn.Module  # SetEncoder
    attend: str
    resolution: int
    run: str
    step: int
    set_length: Optional[int] = None  # photos a set held in training (method.set_length), where known

    @property
    def dim(self) -> int:
        return self.backbone.backbone.embed_dim

    @property
    def device(self) -> torch.device:
        """Where the backbone and the set encoder are (:meth:`to`)."""
        return next(self.encoder.parameters()).device

    def to(self, device: torch.device | str) -> "MILESetModel":
        """Move the backbone and the set encoder to ``device``; returns the model."""
        self.backbone.backbone.to(device)
        self.encoder.to(device)
        return self

    @functools.cached_property
    def fingerprint(self) -> str:
        from mlsctl.models.source import fingerprint

        return hashlib.sha256((self.backbone.fingerprint + fingerprint(self.encoder) + self.attend).encode()).hexdigest()

    @torch.no_grad()
    def fold(self, latent: Optional[torch.Tensor], cls: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fold images (CLS [t, D], tokens [t, p, D]) one by one into ``latent`` [D] (None: a new set,
        ``L_0 = e_0``), on the model's :attr:`device`; the latent comes back on ``cls``'s device."""
        home, device = cls.device, self.device
        cls, latent = cls.to(device), (latent.to(device) if latent is not None else None)
        tokens = tokens.to(device) if tokens is not None else None
        start = 0
        if latent is None:
            latent, start = cls[0], 1
        latent = latent[None]
        for t in range(start, cls.shape[0]):
            context = cls[t][None, None] if tokens is None else tokens[t][None]
            latent = self.encoder.fold(latent, context)
        return latent[0].to(home)
