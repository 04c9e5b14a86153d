"""Pictures of features (PNG, drawn with Pillow).

* :func:`pca_rgb`: the first three principal components of a set of patch maps, fitted jointly
  over every patch of every image, each scaled to [0, 1] between its 1st and 99th percentile —
  patches the model sees alike get alike colours.
* :func:`pca_figure`: each image beside its PCA patch map, in a grid with file names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from mlsctl import atomic


def pca_rgb(dense: torch.Tensor) -> torch.Tensor:
    """[n, h, w, D] patch features → [n, h, w, 3] colours in [0, 1]."""
    n, h, w, d = dense.shape
    x = dense.reshape(-1, d).double()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    projected = x @ v[:3].T  # [n·h·w, ≤3]
    if projected.shape[1] < 3:
        projected = torch.cat([projected, projected.new_zeros(len(projected), 3 - projected.shape[1])], 1)
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return scaled.reshape(n, h, w, 3).float()


def _label(draw, xy, text: str, width: int) -> None:
    from PIL import ImageFont

    font = ImageFont.load_default()
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text(xy, text, fill=(30, 30, 30), font=font)


def pca_figure(images: Sequence[Optional[object]], colours: torch.Tensor, names: Sequence[str], out: Path,
               cell: int = 128, pairs_per_row: int = 4) -> Path:
    """Draw ``image | PCA map`` pairs; a missing image (None) is drawn as a labelled grey cell."""
    from PIL import Image, ImageDraw

    n = len(names)
    rows = (n + pairs_per_row - 1) // pairs_per_row
    caption = 14
    gap = 8
    width = pairs_per_row * (2 * cell + gap) + gap
    height = rows * (cell + caption + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, pairs_per_row)
        x, y = gap + c * (2 * cell + gap), gap + r * (cell + caption + gap)
        image = images[i]
        if image is None:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
            _label(draw, (x + 4, y + cell // 2 - 6), "image missing", cell - 8)
        else:
            canvas.paste(image.convert("RGB").resize((cell, cell), Image.BICUBIC), (x, y))
        patch_map = (colours[i].numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(patch_map).resize((cell, cell), Image.NEAREST), (x + cell, y))
        _label(draw, (x, y + cell + 1), names[i], 2 * cell)
    atomic.write_with(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out


def features_pca(features, out: Path, n: int = 16, cell: int = 128) -> Path:
    """PCA patch maps of the first ``n`` rows of a feature folder, beside their source images."""
    from mlsctl.data.images import BadImage, load_rgb
    from mlsctl.errors import UserError

    if not features.has_dense:
        raise UserError(f"{features.path} has no dense features; embed with --dense to draw PCA patch maps")
    rows = list(range(min(n, len(features))))
    if not rows:
        raise UserError(f"{features.path} holds no rows")
    dense = torch.cat([d for _, d in features.iter_dense(rows)])
    images = []
    for row in rows:
        try:
            images.append(load_rgb(features.image_path(row)))
        except (BadImage, OSError):
            images.append(None)
    return pca_figure(images, pca_rgb(dense), [features.files[r] for r in rows], out, cell=cell)
