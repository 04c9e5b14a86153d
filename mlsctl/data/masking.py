"""Block-wise masks for masked image modelling (BEiT / iBOT "block" masking; docs/methods.md#sove).

:func:`block_mask` masks about ``ratio`` of an ``h × w`` patch grid with rectangles: each block has
an area drawn uniformly between ``min_area`` (a ninth of the shorter side squared, as iBOT) and
what is left to mask, and an aspect ratio drawn log-uniformly in ``aspect``; a block counts when it
masks at least one new patch without passing the budget. After 10 failed draws in a row masking
stops, so a mask may fall a little short of the ratio, never over it.

:class:`MaskedMultiCropDataset` adds one mask per global crop to the multi-crop dataset, drawn from
its own seed ``(seed, epoch, image, MASK_STREAM)`` so a mask, like a crop, never depends on the
worker or process that drew it and resume stays exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mlsctl.data.loader import Batch, MultiCropDataset, collate, sample_seed

MASK_STREAM = 2**32 + 1  # an "index" no image has: the masks' seed stream


def block_mask(h: int, w: int, ratio: float, rng: np.random.Generator, aspect: tuple[float, float] = (0.3, 1 / 0.3),
               attempts: int = 10) -> np.ndarray:
    """A bool [h, w] mask with at most ``round(ratio · h · w)`` patches set, in blocks."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    mask = np.zeros((h, w), dtype=bool)
    budget = int(round(ratio * h * w))
    min_area = max(1, (min(h, w) // 3) ** 2)
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    masked = 0
    while masked < budget:
        left = budget - masked
        for _ in range(attempts):
            area = rng.uniform(min(min_area, left), left)
            ar = math.exp(rng.uniform(log_low, log_high))
            bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if not (1 <= bh <= h and 1 <= bw <= w):
                continue
            top, lft = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            new = int((~mask[top:top + bh, lft:lft + bw]).sum())
            if 0 < new <= left:
                mask[top:top + bh, lft:lft + bw] = True
                masked += new
                break
        else:
            break
    return mask


class MaskedMultiCropDataset(MultiCropDataset):
    """Multi-crop views plus a block mask [n_global, h, w] of every global crop's patch grid."""

    def __init__(self, folder, transform, seed: int, grid: tuple[int, int], ratio: float, aspect: tuple[float, float],
                 **data_path):
        super().__init__(folder, transform, seed, **data_path)
        self.grid, self.ratio, self.aspect = grid, ratio, aspect

    def __getitem__(self, key: tuple[int, int]) -> dict:
        sample = super().__getitem__(key)
        epoch, _ = key
        rng = np.random.default_rng(sample_seed(self.seed, epoch, MASK_STREAM + sample["image_id"]))
        n_global = self.transform.n_global
        sample["masks"] = torch.from_numpy(np.stack([block_mask(*self.grid, self.ratio, rng, self.aspect)
                                                     for _ in range(n_global)]))
        return sample


def collate_masked(samples: list[dict]) -> Batch:
    batch = collate(samples)
    batch.masks = torch.stack([s["masks"] for s in samples])
    return batch
