"""Evaluation-time preprocessing: how ``embed``, ``eval``, ``export``, the gallery and the
pictures turn one image into a model input (resize mode, resolution, mean/std), and the
``preprocessing`` entry a feature folder's manifest records."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

RESIZE_MODES = ("square", "center-crop")


@functools.lru_cache(maxsize=16)
def _scaled_statistics(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean·255 and std·255 as [1, 3, 1, 1] tensors on ``device``, made once: a ``torch.tensor`` on
    CUDA per batch is a copy from pageable memory that waits for the device's queue."""
    scaled = torch.tensor([mean, std], dtype=torch.float32).view(2, 1, 3, 1, 1) * 255
    return tuple(scaled.to(device).unbind(0))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model input.

    ``square``: the whole image resized to ``resolution``² (patch maps cover the whole image, so
    they line up with segmentation masks). ``center-crop``: shorter side to ``resolution``·256/224,
    then the central ``resolution``² (DINO's k-NN protocol: torchvision's ``Resize(256)`` and
    ``CenterCrop(224)`` at 224, with their rounding of sizes and offsets; not for dense evaluation).
    """

    resolution: int
    resize: str = "square"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def pixels(self, img) -> torch.Tensor:
        """The resized image as uint8 [3, R, R] (cheap to batch and to move to a GPU)."""
        from PIL import Image

        r = self.resolution
        if self.resize == "square":
            img = img.resize((r, r), Image.BICUBIC)
        else:  # torchvision's Resize(short) + CenterCrop(r), pixel for pixel (tests/test_preprocessing.py)
            short = round(r * 256 / 224)
            w, h = img.size
            new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            img = img.resize((new_w, new_h), Image.BICUBIC)
            top, left = int(round((new_h - r) / 2.0)), int(round((new_w - r) / 2.0))
            img = img.crop((left, top, left + r, top + r))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, R, R] → float, scaled to [0, 1] and standardised by mean/std."""
        mean, std = _scaled_statistics(self.mean, self.std, pixels.device)
        return (pixels.float() - mean) / std

    def __call__(self, img) -> torch.Tensor:
        """One image → the model input [3, R, R]."""
        return self.normalize(self.pixels(img)[None])[0]

    def to_dict(self) -> dict:
        recorded = {"resize": self.resize, "resolution": self.resolution, "interpolation": "bicubic",
                    "mean": list(self.mean), "std": list(self.std)}
        if self.resize == "center-crop":  # sizes and offsets rounded as torchvision rounds them (since 2026-12-06;
            recorded["rounding"] = "torchvision"  # features embedded before, 1 px apart at most, are made again)
        return recorded
