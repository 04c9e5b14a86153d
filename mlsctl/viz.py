"""Pictures of features (PNG, drawn with Pillow).

* :func:`pca_rgb`: the first three principal components of a set of patch maps, fitted jointly
  over every patch of every image, each scaled to [0, 1] between its 1st and 99th percentile —
  patches the model sees alike get alike colours (:func:`pca_components` also gives the share of
  the variance each component carries).
* :func:`pca_figure`: each image beside its PCA patch map, in a grid with file names, and a legend
  that says what the two halves of a pair are.
* :func:`features_pca`: that figure for a feature folder, each image shown as the model saw it.
* :func:`neighbour_grid`: a query image and its nearest memory-bank entries as captioned crops.
* :func:`scatter_plot`: a 2-D projection of bank entries coloured by label or age.
"""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from mlsctl.outputs import literal_text, pyplot, save_figure, save_image


def pca_components(dense: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """[n, h, w, D] patch features → ([n, h, w, 3] colours in [0, 1], the share of the variance of
    the patches each of the three components carries)."""
    n, h, w, d = dense.shape
    x = dense.reshape(-1, d).double()
    x = x - x.mean(0, keepdim=True)
    _, singular, v = torch.linalg.svd(x, full_matrices=False)
    variance = singular.pow(2)
    shares = (variance[:3] / variance.sum().clamp_min(1e-300)).tolist()
    shares += [0.0] * (3 - len(shares))
    projected = x @ v[:3].T  # [n·h·w, ≤3]
    if projected.shape[1] < 3:
        projected = torch.cat([projected, projected.new_zeros(len(projected), 3 - projected.shape[1])], 1)
    low = torch.quantile(projected, 0.01, dim=0)
    high = torch.quantile(projected, 0.99, dim=0)
    scaled = ((projected - low) / (high - low).clamp_min(1e-12)).clamp(0, 1)
    return scaled.reshape(n, h, w, 3).float(), shares


def pca_rgb(dense: torch.Tensor) -> torch.Tensor:
    """[n, h, w, D] patch features → [n, h, w, 3] colours in [0, 1]."""
    return pca_components(dense)[0]


def _caption_font_path() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


def caption_font():
    """DejaVu Sans at 11 px, the font matplotlib ships: Pillow's default bitmap font draws only ASCII (a new
    user's run-through, 2026-12-06: ``café ü.png`` came out as ``caf□□.png``)."""
    from PIL import ImageFont

    return ImageFont.truetype(_caption_font_path(), 11)


@functools.lru_cache(maxsize=None)
def _glyphs():
    from matplotlib.ft2font import FT2Font

    return FT2Font(_caption_font_path())


@functools.lru_cache(maxsize=65536)
def _drawable_character(c: str) -> str:
    if c.isspace() or _glyphs().get_char_index(ord(c)):
        return c
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def drawable(text: str) -> str:
    """``text`` with each character the caption font has no glyph for written as its escape (``猫.png`` →
    ``\\u732b.png``): DejaVu Sans has no Chinese, Japanese or Korean characters, and captions of such file names
    were rows of identical boxes (□□.png under every tile), which tell nothing apart; an escape does, and
    names the file."""
    return "".join(_drawable_character(c) for c in text)


def fitted(draw, text: str, width: int, keep_end: bool = False) -> str:
    """``text`` within ``width`` pixels of the caption font, cut with "…" at its end, or at its start
    with ``keep_end`` (a path: its file name is what tells tiles apart; a new user, 2026-12-06, read
    "images/00000…" under every tile)."""
    font = caption_font()
    text = drawable(text)
    while text and draw.textlength(text, font=font) > width:
        if len(text) <= 2:
            text = ""
        else:
            text = "…" + text[2:] if keep_end else text[:-2] + "…"
    return text


def path_lines(draw, path: str, width: int) -> list[str]:
    """A path's caption within ``width`` pixels: one line where it fits, else its folder (its end kept,
    the folder nearest the file) over its file name. One line cut at its start gave
    ``…/01_1_front.jpg`` under every In-shop item, whose folders alone tell them apart (a new user's
    probe, 2026-12-07)."""
    folder, slash, name = path.rpartition("/")
    if not slash or draw.textlength(drawable(path), font=caption_font()) <= width:
        return [fitted(draw, path, width, keep_end=True)]
    return [fitted(draw, folder + "/", width, keep_end=True), fitted(draw, name, width, keep_end=True)]


def _label(draw, xy, text: str, width: int, keep_end: bool = False) -> None:
    draw.text(xy, fitted(draw, text, width, keep_end), fill=(30, 30, 30), font=caption_font())


def _resized(image, cell: int):
    """``image`` at ``cell`` pixels: enlarged by repeating pixels (what the model saw, pixel for
    pixel), reduced with a bicubic filter."""
    from PIL import Image

    image = image.convert("RGB")
    return image.resize((cell, cell), Image.NEAREST if cell >= max(image.size) else Image.BICUBIC)


def pca_figure(images: Sequence[Optional[object]], colours: torch.Tensor, names: Sequence[str], out: Path,
               cell: int = 128, pairs_per_row: int = 4, legend: Sequence[str] = ()) -> Path:
    """Draw ``image | PCA map`` pairs; a missing image (None) is drawn as a labelled grey cell. The
    ``legend`` lines go under the grid, with three swatches saying which component is which colour."""
    from PIL import Image, ImageDraw

    n = len(names)
    rows = (n + pairs_per_row - 1) // pairs_per_row
    caption = 14
    gap = 8
    width = pairs_per_row * (2 * cell + gap) + gap
    font = caption_font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = []
    for line in legend:  # wrapped to the figure's width
        words, current = line.split(" "), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if current and measure.textlength(trial, font=font) > width - 2 * gap:
                wrapped.append(current)
                current = word
            else:
                current = trial
        wrapped.append(current)
    line_height = 13
    legend_height = (len(wrapped) * line_height + 20 + gap) if legend else 0
    grid_height = rows * (cell + caption + gap) + gap
    canvas = Image.new("RGB", (width, grid_height + legend_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, pairs_per_row)
        x, y = gap + c * (2 * cell + gap), gap + r * (cell + caption + gap)
        image = images[i]
        if image is None:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(200, 200, 200))
            _label(draw, (x + 4, y + cell // 2 - 6), "image missing", cell - 8)
        else:
            canvas.paste(_resized(image, cell), (x, y))
        patch_map = (colours[i].numpy() * 255).round().astype(np.uint8)
        canvas.paste(Image.fromarray(patch_map).resize((cell, cell), Image.NEAREST), (x + cell, y))
        _label(draw, (x, y + cell + 1), names[i], 2 * cell, keep_end=True)
    if legend:
        y = grid_height
        for j, line in enumerate(wrapped):
            draw.text((gap, y + j * line_height), line, fill=(30, 30, 30), font=font)
        y += len(wrapped) * line_height + 4
        x = gap
        for swatch, text in (((230, 30, 30), "1st component: red"), ((30, 170, 30), "2nd: green"),
                             ((40, 60, 230), "3rd: blue")):
            draw.rectangle([x, y + 1, x + 11, y + 12], fill=swatch)
            draw.text((x + 16, y + 1), text, fill=(30, 30, 30), font=font)
            x += 16 + int(draw.textlength(text, font=font)) + 18
    save_image(canvas, out)
    return out


def features_pca(features, out: Path, n: int = 16, cell: Optional[int] = None, say=None) -> Path:
    """PCA patch maps of the first ``n`` rows of a feature folder, beside their source images as the
    model saw them: resized (and centre-cropped after ``--resize center-crop``) to the input size of
    the manifest's preprocessing, with the normalisation undone. ``cell`` (the side of each drawn
    image) defaults to the input size times the smallest whole factor that reaches 128 pixels, so
    every input pixel is drawn as a whole number of pixels. ``say`` is told how many source images
    could not be read (drawn as grey cells; a new user's probe, 2026-12-07: nothing was said)."""
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
    finite = torch.isfinite(dense.reshape(len(rows), -1)).all(1)
    if not bool(finite.all()):  # the PCA's SVD fails on them (a probe, 2026-12-06: an internal error)
        bad = [features.files[r] for r, ok in zip(rows, finite.tolist()) if not ok]
        raise UserError(f"the dense features of {len(bad)} of these images in {features.path} hold NaN or inf "
                        f"(first: {bad[0]}); embed the folder again with --overwrite")
    seen = features.preprocessing
    model_input = Preprocessing(int(seen.get("resolution", 224)), seen.get("resize", "square"))
    size = model_input.resolution
    cell = cell or size * -(-128 // size)
    images = []
    for row in rows:
        try:  # what the model saw: the same resize (and centre crop) as embed, before normalisation
            pixels = model_input.pixels(features.load_image(row))  # from its folder or archive
            images.append(Image.fromarray(pixels.permute(1, 2, 0).numpy()))
        except (BadImage, OSError, UserError):
            images.append(None)
    colours, shares = pca_components(dense)
    _, h, w, d = dense.shape
    crop = "shorter side resized, then the central square" if model_input.resize == "center-crop" else "resized whole"
    legend = [
        f"Left of each pair: the model's input, {size}x{size} pixels ({crop}; normalisation undone), drawn at {cell} px. "
        f"Right: its {h}x{w} patch features ({d} dimensions each) projected on their first three principal components, "
        f"fitted jointly over the {len(rows) * h * w} patches of these {len(rows)} images; each component is scaled between "
        f"its 1st and 99th percentile and shown as one colour channel, so patches the model sees alike get alike colours.",
        f"Share of the patch variance: 1st component {100 * shares[0]:.0f} %, 2nd {100 * shares[1]:.0f} %, "
        f"3rd {100 * shares[2]:.0f} %.",
    ]
    missing = sum(image is None for image in images)
    if missing and say is not None:
        say(f"note: {missing} of the {len(images)} source images could not be read (moved, or not on this machine: "
            f"{features.input_root}); drawn as grey cells")
    return pca_figure(images, colours, [features.files[r] for r in rows], out, cell=cell, legend=legend)


def neighbour_grid(query, tiles: Sequence[tuple[Optional[object], str]], out: Path, *, title: str,
                   cell: int = 128, per_row: int = 8) -> Path:
    """The query image, then one cell per neighbour (a PIL image, or None for a labelled blank),
    each with its caption lines under it (at most 3; the last of several is a path: :func:`path_lines`)."""
    from PIL import Image, ImageDraw

    gap, line = 8, 12
    caption = 4 * line + 2  # a path may take two lines
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
            for j, words in enumerate(("source image", "missing")):  # one line was cut at 128 px (a probe)
                _label(draw, (x + 4, y + cell // 2 - line + j * line), words, cell - 8)
        else:
            canvas.paste(tile, (x, y))
        parts = text.split("\n")[:3]
        if len(parts) > 1:
            parts = parts[:-1] + path_lines(draw, parts[-1], cell)
        for j, part in enumerate(parts):
            _label(draw, (x, y + cell + 2 + j * line), part, cell)
    save_image(canvas, out)
    return out


# matplotlib's tab10 without its grey (grey is for the labels beyond the 10 drawn), black last
LABEL_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf",
                 "#000000")


def legend_groups(values: torch.Tensor, *, label_names: Optional[dict] = None, unlabelled: Optional[str] = None,
                  other_name: str = "labels", shown: int = 10) -> list[dict]:
    """The legend of a scatter plot coloured by integer ``values``, in the order it is drawn: with
    ``unlabelled``, the points of negative value (``kind`` "unlabelled"); the classes beyond the
    ``shown`` most frequent, together (``kind`` "other", ``classes`` how many); then the ``shown``
    most frequent classes, most frequent first, ties by value (``kind`` "class", ``value``). Each
    has its ``name`` as the legend writes it (without the count), ``count`` and ``mask`` (a bool tensor)."""
    none = (values < 0) if unlabelled is not None else torch.zeros(len(values), dtype=torch.bool)
    groups = []
    if bool(none.any()):
        groups.append({"kind": "unlabelled", "name": unlabelled, "count": int(none.sum()), "mask": none})
    labels, counts = values[~none].unique(return_counts=True)
    top = [int(labels[i]) for i in counts.argsort(descending=True, stable=True)[:shown]]
    rest = ~torch.isin(values, torch.tensor(top, dtype=values.dtype)) & ~none
    if bool(rest.any()):
        others = len(labels) - len(top)  # other_name is plural: "1 other labels" read in a legend (2026-12-07)
        groups.append({"kind": "other", "name": f"{others} other {other_name if others > 1 else other_name[:-1]}",
                       "classes": others, "count": int(rest.sum()), "mask": rest})
    for label in top:
        chosen = (values == label) & ~none
        groups.append({"kind": "class", "value": label, "name": str((label_names or {}).get(label, f"label {label}")),
                       "count": int(chosen.sum()), "mask": chosen})
    return groups


def _colour_scale(figure, ax, pts, values: torch.Tensor, colour_by: str) -> None:
    """Points coloured by a continuous value (age in steps) with a colour bar; where every point has the same value,
    one colour and a legend that says it (a bar over one age invented the range 0.9 to 1.1: a probe, 2026-12-08)."""
    unit = " (steps)" if colour_by == "age" else ""
    if len(values) and bool((values == values.flatten()[0]).all()):
        value = values.flatten()[0].item()
        shown = f"{value:g}" + (f" step{'s' if value != 1 else ''}" if colour_by == "age" else "")
        ax.scatter(pts[:, 0], pts[:, 1], s=6, color="#21918c", label=f"every entry: {colour_by} {shown}")
        ax.legend(fontsize=8, markerscale=2.5, loc="best")
        return
    from matplotlib.ticker import MaxNLocator

    drawn = ax.scatter(pts[:, 0], pts[:, 1], s=6, c=values.double().numpy(), cmap="viridis")
    bar = figure.colorbar(drawn, ax=ax, label=f"{colour_by}{unit}")
    if not values.is_floating_point():  # whole steps: no 1.25 between 1 and 2 (a new user, 2026-12-06)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()


def _hold_flat_axes(ax, pts) -> None:
    """An axis along which every point has the same coordinate gets fixed limits around it, as wide as the other
    axis's (at least ±1), so no noise at 1e-16 is stretched to fill the panel (a probe, 2026-12-08)."""
    spans = [float(pts[:, j].max() - pts[:, j].min()) if len(pts) else 0.0 for j in range(2)]
    half = max(max(spans) / 2 * 1.1, 1.0)
    for j, set_limits in enumerate((ax.set_xlim, ax.set_ylim)):
        if spans[j] == 0.0:
            centre = float(pts[0, j]) if len(pts) else 0.0
            set_limits(centre - half, centre + half)


@literal_text
def scatter_plot(points: torch.Tensor, values: torch.Tensor, out: Path, *, title: str, colour_by: str,
                 axis_names: tuple[str, str] = ("component 1", "component 2"), label_names: Optional[dict] = None,
                 unlabelled: Optional[str] = None, other_name: str = "labels", note: Optional[str] = None) -> list[dict]:
    """2-D points (matplotlib) coloured by an integer label (a legend of the 10 most frequent, named
    by ``label_names``, the rest grey as ``other_name``) or by a continuous value such as age in steps (a colour
    bar), with axes. With ``unlabelled``, points whose label is negative have none: drawn as light
    grey crosses under that name. An axis along which the points do not spread is drawn with fixed limits, and
    ``note`` (why) is written in the panel's corner. Returns the legend's groups (:func:`legend_groups`; none for a
    colour bar)."""
    plt = pyplot()

    pts = points.double().numpy()
    figure, ax = plt.subplots(figsize=(8.5, 7))
    groups = []
    if colour_by == "label":
        groups = legend_groups(values, label_names=label_names, unlabelled=unlabelled, other_name=other_name)
        classes = 0
        for group in groups:
            chosen = group["mask"].numpy()
            label = f"{group['name']} ({group['count']})"
            if group["kind"] == "unlabelled":
                ax.scatter(pts[chosen, 0], pts[chosen, 1], s=10, marker="x", linewidths=0.8, color="0.8", label=label)
            elif group["kind"] == "other":
                ax.scatter(pts[chosen, 0], pts[chosen, 1], s=6, color="0.6", label=label)
            else:
                ax.scatter(pts[chosen, 0], pts[chosen, 1], s=6, color=LABEL_PALETTE[classes % len(LABEL_PALETTE)],
                           label=label)
                classes += 1
        ax.legend(fontsize=8, markerscale=2.5, loc="best")
    else:
        _colour_scale(figure, ax, pts, values, colour_by)
    _hold_flat_axes(ax, pts)
    if note:
        ax.text(0.01, 0.01, "\n".join(textwrap.wrap(note, 90)), transform=ax.transAxes, fontsize=8, color="0.35")
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title("\n".join(textwrap.wrap(title, 100, break_long_words=False)), fontsize=10)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, out, dpi=100)
    plt.close(figure)
    return [{k: v for k, v in group.items() if k != "mask"} for group in groups]
