"""Pictures of features (PNG, drawn with Pillow).

* :func:`pca_rgb`: the first three principal components of a set of patch maps, fitted jointly
  over every patch of every image, each scaled to [0, 1] between its 1st and 99th percentile —
  patches the model sees alike get alike colours.
* :func:`pca_figure`: each image beside its PCA patch map, in a grid with file names.
* :func:`neighbour_grid`: a query image and its nearest memory-bank entries as captioned crops.
* :func:`scatter_plot`: a 2-D projection of bank entries coloured by label or age.
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
    """PCA patch maps of the first ``n`` rows of a feature folder, beside their source images as the
    model saw them (resized, and centre-cropped after ``--resize center-crop``)."""
    from mlsctl.data.images import BadImage, load_rgb
    from mlsctl.errors import UserError

    if not features.has_dense:
        raise UserError(f"{features.path} has no dense features; embed with --dense to draw PCA patch maps")
    rows = list(range(min(n, len(features))))
    if not rows:
        raise UserError(f"{features.path} holds no rows")
    from PIL import Image

    from mlsctl.features import Preprocessing

    dense = torch.cat([d for _, d in features.iter_dense(rows)])
    seen = features.preprocessing
    model_input = Preprocessing(int(seen.get("resolution", 224)), seen.get("resize", "square"))
    images = []
    for row in rows:
        try:  # what the model saw: the same resize (and centre crop) as embed
            pixels = model_input.pixels(load_rgb(features.image_path(row)))
            images.append(Image.fromarray(pixels.permute(1, 2, 0).numpy()))
        except (BadImage, OSError):
            images.append(None)
    return pca_figure(images, pca_rgb(dense), [features.files[r] for r in rows], out, cell=cell)


def neighbour_grid(query, tiles: Sequence[tuple[Optional[object], str]], out: Path, *, title: str,
                   cell: int = 128, per_row: int = 8) -> Path:
    """The query image, then one cell per neighbour (a PIL image, or None for a labelled blank),
    each with its caption lines under it."""
    from PIL import Image, ImageDraw

    gap, line = 8, 12
    caption = 2 * line + 2
    columns = min(per_row, len(tiles)) + 1
    rows = max(1, (len(tiles) + per_row - 1) // per_row)
    width = columns * (cell + gap) + gap
    height = 18 + rows * (cell + caption + gap) + gap
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    _label(draw, (gap, 4), title, width - 2 * gap)
    top = 18
    canvas.paste(query.convert("RGB").resize((cell, cell), Image.BICUBIC), (gap, top))
    draw.rectangle([gap - 2, top - 2, gap + cell + 1, top + cell + 1], outline=(40, 90, 220), width=2)
    _label(draw, (gap, top + cell + 2), "query", cell)
    for i, (tile, text) in enumerate(tiles):
        r, c = divmod(i, per_row)
        x, y = gap + (c + 1) * (cell + gap), top + r * (cell + caption + gap)
        if tile is None:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(205, 205, 205))
            _label(draw, (x + 4, y + cell // 2 - 6), "source image missing", cell - 8)
        else:
            canvas.paste(tile, (x, y))
        for j, part in enumerate(text.split("\n")[:2]):
            _label(draw, (x, y + cell + 2 + j * line), part, cell)
    atomic.write_with(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out


_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _ramp(t: float) -> tuple[int, int, int]:
    """A dark-blue → teal → yellow ramp for t in [0, 1] (young → old)."""
    stops = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    t = min(max(t, 0.0), 1.0) * (len(stops) - 1)
    i = min(int(t), len(stops) - 2)
    f = t - i
    return tuple(round(a + (b - a) * f) for a, b in zip(stops[i], stops[i + 1]))


def scatter_plot(points: torch.Tensor, values: torch.Tensor, out: Path, *, title: str, colour_by: str,
                 size: int = 640) -> Path:
    """2-D points coloured by an integer label (a legend of the 10 most frequent, the rest grey)
    or by a continuous value such as age (a colour bar)."""
    from PIL import Image, ImageDraw

    margin, legend = 36, 130
    canvas = Image.new("RGB", (size + legend, size), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    _label(draw, (8, 6), title, size + legend - 16)
    pts = points.double()
    low, high = pts.min(0).values, pts.max(0).values
    span = (high - low).clamp_min(1e-12)
    xy = (pts - low) / span * (size - 2 * margin) + margin
    draw.rectangle([margin - 6, margin - 6, size - margin + 6, size - margin + 6], outline=(180, 180, 180))
    if colour_by == "label":
        labels, counts = values.unique(return_counts=True)
        top = [int(labels[i]) for i in counts.argsort(descending=True)[:len(_PALETTE)]]
        colour_of = {label: _PALETTE[i] for i, label in enumerate(top)}
        colours = [colour_of.get(int(v), (190, 190, 190)) for v in values]
        for i, label in enumerate(top):
            y = margin + i * 16
            draw.rectangle([size + 6, y, size + 16, y + 10], fill=colour_of[label])
            _label(draw, (size + 22, y - 1), f"label {label}", legend - 26)
        if len(labels) > len(top):
            _label(draw, (size + 6, margin + len(top) * 16), f"+{len(labels) - len(top)} more (grey)", legend - 8)
    else:
        v = values.double()
        vmin, vmax = float(v.min()), float(v.max())
        colours = [_ramp((float(x) - vmin) / max(vmax - vmin, 1e-12)) for x in v]
        bar_top, bar_height = margin + 16, size - 2 * margin - 32
        for i in range(bar_height):
            draw.line([size + 6, bar_top + i, size + 20, bar_top + i], fill=_ramp(i / max(bar_height - 1, 1)))
        _label(draw, (size + 6, margin - 2), f"{colour_by} (steps)", legend - 8)
        _label(draw, (size + 24, bar_top - 4), f"{vmin:g}", legend - 28)
        _label(draw, (size + 24, bar_top + bar_height - 8), f"{vmax:g}", legend - 28)
    for (x, y), colour in zip(xy.tolist(), colours):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    atomic.write_with(out, lambda tmp: canvas.save(tmp, format="PNG"))
    return out
