"""Pictures of features (PNG, drawn with Pillow).

* :func:`pca_rgb`: the first three principal components of a set of patch maps, fitted jointly
  over every patch of every image, each scaled to [0, 1] between its 1st and 99th percentile —
  patches the model sees alike get alike colours.
* :func:`pca_figure`: each image beside its PCA patch map, in a grid with file names.
* :func:`neighbour_grid`: a query image and its nearest memory-bank entries as captioned crops.
* :func:`scatter_plot`: a 2-D projection of bank entries coloured by label or age.
"""

from __future__ import annotations

import textwrap
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
    from mlsctl.data.images import BadImage
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
            pixels = model_input.pixels(features.load_image(row))  # from its folder or archive
            images.append(Image.fromarray(pixels.permute(1, 2, 0).numpy()))
        except (BadImage, OSError, UserError):
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


# matplotlib's tab10 without its grey (grey is for the labels beyond the 10 drawn), black last
LABEL_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                 "#000000")


def scatter_plot(points: torch.Tensor, values: torch.Tensor, out: Path, *, title: str, colour_by: str,
                 axis_names: tuple[str, str] = ("component 1", "component 2"), label_names: Optional[dict] = None,
                 unlabelled: Optional[str] = None, other_name: str = "labels") -> Path:
    """2-D points (matplotlib) coloured by an integer label (a legend of the 10 most frequent, named
    by ``label_names``, the rest grey as ``other_name``) or by a continuous value such as age in steps (a colour
    bar), with axes. With ``unlabelled``, points whose label is negative have none: drawn as light
    grey crosses under that name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points.double().numpy()
    figure, ax = plt.subplots(figsize=(8.5, 7))
    if colour_by == "label":
        none = (values < 0) if unlabelled is not None else torch.zeros(len(values), dtype=torch.bool)
        if bool(none.any()):
            ax.scatter(pts[none.numpy(), 0], pts[none.numpy(), 1], s=10, marker="x", linewidths=0.8, color="0.8",
                       label=f"{unlabelled} ({int(none.sum())})")
        labels, counts = values[~none].unique(return_counts=True)
        top = [int(labels[i]) for i in counts.argsort(descending=True, stable=True)[:10]]
        palette = LABEL_PALETTE
        rest = ~torch.isin(values, torch.tensor(top, dtype=values.dtype)) & ~none
        if bool(rest.any()):
            ax.scatter(pts[rest.numpy(), 0], pts[rest.numpy(), 1], s=6, color="0.6",
                       label=f"{len(labels) - len(top)} other {other_name} ({int(rest.sum())})")
        for i, label in enumerate(top):
            chosen = (values == label).numpy() & ~none.numpy()
            name = (label_names or {}).get(label, f"label {label}")
            ax.scatter(pts[chosen, 0], pts[chosen, 1], s=6, color=palette[i % len(palette)],
                       label=f"{name} ({int(chosen.sum())})")
        ax.legend(fontsize=8, markerscale=2.5, loc="best")
    else:
        drawn = ax.scatter(pts[:, 0], pts[:, 1], s=6, c=values.double().numpy(), cmap="viridis")
        figure.colorbar(drawn, ax=ax, label=f"{colour_by} (steps)")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title("\n".join(textwrap.wrap(title, 100, break_long_words=False)), fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    atomic.write_with(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return out
