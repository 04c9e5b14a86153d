"""What ``mlsctl bank`` does, for any method's banks, through the bank module's interface alone.

* :func:`open_banks`: the banks of a run's checkpoint (latest, or ``step``);
* :class:`SourceImages`: ``image_id`` → image file, from ``RUN/images.txt``;
* :func:`nearest_entries`: a query image embedded with the checkpoint's teacher as the bank's
  :class:`~mlsctl.bank.QueryFeature` says, against the bank's valid entries;
* :func:`neighbour_tiles`: those entries as crops of their source images (``box`` payload), with
  the ``region`` payload outlined; a missing source image becomes a labelled blank;
* :func:`project_2d`: PCA (or t-SNE with scikit-learn) of a sample of entries;
* :func:`entry_colours`: what colours them: age, a ``label`` payload, the source image, or a
  labels file keyed by source image;
* :func:`export_banks`: valid entries, oldest first, as a plain safetensors file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mlsctl import atomic
from mlsctl.bank import BOX_COLUMN, IMAGE_COLUMN, LABEL_COLUMN, REGION_COLUMN, MemoryBank, load_banks
from mlsctl.errors import UserError
from mlsctl.runs import Checkpoint, Run


def open_banks(run_dir: str | Path, step: Optional[int] = None,
               has_step_option: bool = True) -> tuple[Run, Checkpoint, dict[str, MemoryBank]]:
    """The run, its checkpoint ``step`` (default: the latest) and that checkpoint's banks;
    ``has_step_option``: whether the caller's user can choose another with ``--step`` (the report cannot)."""
    from mlsctl.restore import open_run

    run = open_run(run_dir)
    checkpoint = run.checkpoint(step)

    def another() -> str:  # the checkpoints to look at instead
        others = run.other_checkpoint_steps(checkpoint.path, checkpoint.banks_path.name)
        shown = ", ".join(map(str, others[-3:]))
        return ("the run keeps no other checkpoint to look at" if not others else
                f"look at another with --step ({shown})" if has_step_option else
                f"mlsctl bank inspect {run.root} --step N looks at another (N: {shown})")

    if not checkpoint.banks_path.is_file():
        raise UserError(f"checkpoint {checkpoint.path} has no banks.safetensors (it is incomplete); {another()}")
    try:
        banks = load_banks(checkpoint.banks_path)
    except (OSError, ValueError) as exc:  # load_banks names the file; a damaged one gets the same way out as a
        raise UserError(f"cannot read {exc}; {another()}") from None  # missing one (a probe, 2026-12-07)
    return run, checkpoint, banks


def method_views(run: Run, banks: dict[str, MemoryBank]) -> dict[str, list[tuple[str, str, object]]]:
    """The run's method's own rows for ``bank inspect`` (:meth:`~mlsctl.methods.base.Method.bank_views`)."""
    from mlsctl import methods
    from mlsctl.restore import recipe_of

    recipe = recipe_of(run)
    sources = SourceImages(run)
    paths = [sources.root / relpath for relpath in sources.relpaths]
    return methods.method_class(recipe.method.name).bank_views(recipe, banks, paths)


def choose_bank(banks: dict[str, MemoryBank], name: Optional[str], run: Run) -> tuple[str, MemoryBank]:
    if not banks:
        raise UserError(f"run {run.root} has no memory bank (its method keeps none)")
    if name is None:
        if len(banks) > 1:
            raise UserError(f"run {run.root} has banks {', '.join(banks)}; choose one with --bank")
        name = next(iter(banks))
    if name not in banks:
        raise UserError(f"run {run.root} has no bank '{name}'; its banks: {', '.join(banks)}")
    return name, banks[name]


class SourceImages:
    """``image_id`` → file: line ``image_id`` of ``RUN/images.txt`` under the recipe's ``data.root``.

    Runs written before images.txt existed list ``data.root`` again (said in :attr:`note`), which
    is right only while that folder is unchanged."""

    def __init__(self, run: Run):
        from mlsctl.restore import recipe_of

        recipe = recipe_of(run)
        self.root = Path(recipe.data.root)
        self.note = None
        listed = run.image_list()
        if listed is not None:
            self.relpaths = listed
        elif self.root.is_dir():
            from mlsctl.data.images import find_images

            self.relpaths = [p.relative_to(self.root).as_posix() for p in find_images(self.root)]
            self.note = f"{run.root} has no images.txt (written by older mlsctl); listed {self.root} instead"
        else:
            self.relpaths = []
            self.note = f"{run.root} has no images.txt and its data.root {self.root} is gone"

    def shown(self, path) -> str:
        """``path`` as pictures and tables name a source image: under ``data.root`` where it is there
        (object folders repeat file names such as 00.png), else as it is."""
        path = Path(path)
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    def path(self, image_id: int) -> Optional[Path]:
        if 0 <= image_id < len(self.relpaths):
            return self.root / self.relpaths[image_id]
        return None

    def load(self, image_id: int):
        """(PIL image or None, the path or a reason)."""
        from mlsctl.data.images import BadImage, load_rgb

        path = self.path(image_id)
        if path is None:
            return None, f"image {image_id} unknown"
        try:
            return load_rgb(path), str(path)
        except (BadImage, OSError):
            return None, f"missing: {path}"


@dataclass
class Neighbour:
    slot: int
    score: float
    step: int
    image_id: Optional[int]
    image: Optional[str]  # the source image's path, or why it is missing
    box: Optional[list[float]]
    region: Optional[list[float]]
    label: Optional[int]


def query_resolution(recipe, patch_size: int) -> int:
    """The side a ``bank neighbors`` query is embedded at: the recipe's global crop size (``data.global_crops.size``),
    rounded down to a multiple of the patch size. Every method's bank holds teacher embeddings of global crops of
    that size: DINO's ``cls`` monitor (global view 1), CrIBo's ``objects`` (pooled patches of both global views),
    SOVE's ``E_C`` and ``E_P`` and MLS's queues (global view 2); a query at the model's ``img_size`` (only the size
    its position embedding is built for; a run of 64 px crops may say 96) is seen on a finer patch grid than any
    entry was, and its neighbours change (a new user's probe, 2026-12-08: at 96 px the two nearest swapped)."""
    size = recipe.data.global_crops.size
    return size - size % patch_size


def query_size_line(model, resolution: int) -> str:
    """What ``bank neighbors`` says of the query's embedding: the model, and the size and why (:func:`query_resolution`)."""
    img_size = model.info.get("img_size")
    return (f"query embedded with the {model.description} at {resolution}x{resolution} px: the global crop size "
            f"(data.global_crops.size) of the views whose teacher embeddings the bank holds"
            + (f", not the model's img_size {img_size} (the size its position embedding is built for)"
               if img_size not in (None, resolution) else ""))


def embed_query(model, bank: MemoryBank, images: Sequence, resolution: int) -> torch.Tensor:
    """Embed PIL images with ``model`` (a :class:`~mlsctl.models.source.ModelChoice`) the way
    the bank's :class:`~mlsctl.bank.QueryFeature` says: [n, the compared columns]."""
    from mlsctl.features import Preprocessing

    if bank.query_feature is None:
        raise UserError("this bank records no query feature, so images cannot be compared with it; "
                        "use `mlsctl bank plot` or `mlsctl bank export` instead")
    resolution = resolution - resolution % model.backbone.patch_size
    preprocessing = Preprocessing(resolution, "square")
    batch = torch.stack([preprocessing(img) for img in images])
    with torch.no_grad():
        out = model.backbone(batch)
    vectors = out.cls if bank.query_feature.feature == "cls" else out.patches.flatten(1, 2).mean(1)
    name = bank.query_feature.projection
    if name is not None:
        projection = model.projections.get(name)
        if projection is None:
            raise UserError(f"the bank compares the teacher's '{name}' output, which this model does not have; "
                            f"query it with the run's own checkpoint")
        with torch.no_grad():
            vectors = projection(vectors)
    return vectors.float()


def nearest_entries(bank: MemoryBank, query: torch.Tensor, k: int, sources: Optional[SourceImages]) -> list[Neighbour]:
    """The ``k`` entries written by training most cosine-similar to one query vector (a prefilled
    bank's random start entries have no source image, so they are left out)."""
    keys = bank.query_feature.columns(bank.vectors.float()) if bank.query_feature else bank.vectors.float()
    if keys.shape[1] != query.shape[-1]:
        raise UserError(f"the query has {query.shape[-1]} dimensions but the bank compares {keys.shape[1]}; "
                        f"the run's teacher does not match its bank")
    valid = bank.valid_mask() & bank.written_mask()
    scores = (F.normalize(query.reshape(1, -1), dim=1) @ F.normalize(keys, dim=1).T)[0]
    scores = scores.masked_fill(~valid, float("-inf"))
    top = scores.topk(min(k, int(valid.sum())))
    found = []
    for score, slot in zip(top.values.tolist(), top.indices.tolist()):
        payload = {name: value[slot] for name, value in bank.payload.items()}
        image_id = int(payload[IMAGE_COLUMN]) if IMAGE_COLUMN in payload else None
        image = None
        if image_id is not None and sources is not None:
            image = str(sources.path(image_id)) if sources.path(image_id) is not None else f"image {image_id} unknown"
        found.append(Neighbour(
            slot=slot, score=score, step=int(payload["step"]), image_id=image_id, image=image,
            box=payload[BOX_COLUMN].tolist() if BOX_COLUMN in payload else None,
            region=payload[REGION_COLUMN].tolist() if REGION_COLUMN in payload else None,
            label=int(payload[LABEL_COLUMN]) if LABEL_COLUMN in payload else None))
    return found


def crop_tile(image, box: Optional[Sequence[float]], region: Optional[Sequence[float]], cell: int):
    """The ``box`` crop of ``image`` resized to ``cell`` pixels, ``region`` outlined in it."""
    from PIL import Image, ImageDraw

    image = image.convert("RGB")
    x0, y0, x1, y1 = box if box is not None and box[2] > box[0] and box[3] > box[1] else (0, 0, *image.size)
    tile = image.crop((round(x0), round(y0), round(x1), round(y1))).resize((cell, cell), Image.BICUBIC)
    if region is not None and region[2] > region[0] and region[3] > region[1]:
        sx, sy = cell / (x1 - x0), cell / (y1 - y0)
        rx0, ry0 = (region[0] - x0) * sx, (region[1] - y0) * sy
        rx1, ry1 = (region[2] - x0) * sx, (region[3] - y0) * sy
        ImageDraw.Draw(tile).rectangle([rx0, ry0, rx1 - 1, ry1 - 1], outline=(255, 40, 40), width=2)
    return tile


def neighbour_tiles(neighbours: Sequence[Neighbour], sources: SourceImages, cell: int) -> list[tuple[object, str]]:
    """(tile or None, caption) per neighbour; None draws a labelled blank."""
    tiles = []
    for n in neighbours:
        # three decimals: 0.995 is no collapse, and "cos 1.00" under every tile read as one (a new user, 2026-12-06)
        caption = f"cos {n.score:.3f}\nstep {n.step + 1}"  # as metrics.jsonl counts it (the column: from 0)
        if n.image_id is None:
            tiles.append((None, caption + "\nno image_id"))
            continue
        image, where = sources.load(n.image_id)
        if image is None:
            tiles.append((None, f"{caption}\n{where}"))
        else:
            # the path under data.root, as the table beside the grid says it: names like 00.png repeat in every
            # folder, and a file directly under data.root was shown under the root folder's name (a new user's probe)
            tiles.append((crop_tile(image, n.box, n.region, cell), f"{caption}\n{sources.shown(where)}"))
    return tiles


PROJECTIONS = ("auto", "pca", "tsne")


TSNE_SMALLEST = 5  # entries below which t-SNE's perplexity cannot be below their number (auto: PCA)


def project_2d(vectors: torch.Tensor, method: str = "auto", seed: int = 0, held: Optional[int] = None
               ) -> tuple[torch.Tensor, str, Optional[tuple[float, float]]]:
    """[n, D] → ([n, 2], the method used, PCA's two shares of the variance or None for t-SNE): PCA of
    the L2-normalised vectors, or t-SNE when
    ``method`` is "tsne" (or "auto" with scikit-learn installed and at least :data:`TSNE_SMALLEST`
    vectors). ``held``: the entries the bank holds, which a refusal names where drawing more cannot help. A
    principal component without variance is drawn at 0 and its share is 0 (:func:`flat_components_note`)."""
    if method not in PROJECTIONS:
        raise UserError(f"--projection {method} is not one of {', '.join(PROJECTIONS)}")
    unit = F.normalize(vectors.double(), dim=1)
    if method == "tsne" and held is not None and held < TSNE_SMALLEST:  # --sample cannot draw more (a probe)
        raise UserError(f"t-SNE needs at least {TSNE_SMALLEST} entries and the bank holds only {held} written "
                        f"entries; use --projection pca")
    if method == "tsne" and len(unit) < TSNE_SMALLEST:  # a new user (2026-12-06): --sample 2 crashed in t-SNE
        raise UserError(f"t-SNE needs at least {TSNE_SMALLEST} entries ({len(unit)} here); draw more with --sample "
                        f"or use --projection pca")
    if method == "auto" and len(unit) < TSNE_SMALLEST:
        method = "pca"
    if method in ("auto", "tsne"):
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            if method == "tsne":
                raise UserError("t-SNE needs scikit-learn (pip install scikit-learn); or use --projection pca") from None
        else:
            perplexity = float(min(30, max(2, (len(unit) - 1) // 3)))
            points = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(unit.numpy())
            return torch.as_tensor(points), "t-SNE", None
    centred = unit - unit.mean(0, keepdim=True)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    points = centred @ v[:2].T
    if points.shape[1] < 2:
        points = torch.cat([points, points.new_zeros(len(points), 2 - points.shape[1])], 1)
    variance = s.square()
    total = float(variance.sum())
    shares = (variance[:2] / max(total, 1e-30)).tolist() + [0.0, 0.0]
    for i in range(2):  # a component without variance (2 entries span one direction): its rounding noise, at 1e-16,
        if total <= FLAT_TOTAL or shares[i] <= FLAT_SHARE:  # was drawn as if it were spread (a probe, 2026-12-08)
            points[:, i] = 0.0
            shares[i] = 0.0
    return points, "PCA", (shares[0], shares[1])


FLAT_SHARE = 1e-9  # a principal component with at most this share of the variance has none: rounding noise
FLAT_TOTAL = 1e-20  # a total variance of at most this: the entries are one vector


def flat_components_note(entries: int, shares: Optional[tuple[float, float]]) -> Optional[str]:
    """What a PCA picture says of a component :func:`project_2d` found without variance (drawn at 0), or None."""
    if shares is None or shares[1] > 0:
        return None
    if shares[0] == 0:
        return (f"the {entries} entries are one vector (no variance): every point at 0 on both principal "
                f"components")
    reason = (f"{entries} entries span one direction" if entries == 2
              else "the entries vary along one direction only")
    return f"principal component 2 has no variance ({reason}): every point drawn at 0 on it"


COLOUR_KEYWORDS = ("age", "label", "source")
IGNORED_MASK_VALUE = 255  # a mask's pixels that count for no class (eval knn-seg's ignore index)


@dataclass
class EntryColours:
    """How :func:`mlsctl.viz.scatter_plot` colours entries: ``values`` per entry (ages, or integer
    classes named by ``names``; -1: no label, drawn grey as ``unlabelled``), and a caption."""

    values: torch.Tensor
    mode: str  # "age" (a colour bar) or "label" (a legend)
    caption: str
    names: Optional[dict[int, str]] = None
    unlabelled: Optional[str] = None
    missing: int = 0
    other_name: str = "labels"  # what the classes beyond the 10 drawn are called in the legend
    note: Optional[str] = None  # what the colours are not, said with the picture
    missing_said: Optional[str] = None  # why the ``missing`` entries are grey ("have no class ..."), where not a file's


def entry_colours(bank: MemoryBank, name: str, slots: torch.Tensor, color_by: str, step: int,
                  sources: Optional[SourceImages]) -> EntryColours:
    """Colours of the entries at ``slots`` (written entries) by ``color_by``: ``age`` (steps since
    the write), ``label`` (the ``label`` payload), ``source`` (the source image, named by its path under ``data.root``),
    the path of a labels file (CSV ``path,label`` or JSONL ``{"path", "label"}``, read by
    :func:`mlsctl.data.labels.read_labels_file`) whose paths are the source images as the run's
    images.txt lists them (relative to ``data.root``; read as :class:`mlsctl.data.labels.ImagePaths` reads them),
    absolute paths, or ``image_id`` numbers, or a
    folder of segmentation masks (:func:`mask_colours`: each entry's own class, for banks of regions).
    Entries whose image the file does not list are grey and counted in ``missing``; a file that
    labels none of them is refused. A labels file labels whole images: a bank of regions (objects,
    patches) is drawn in each entry's image's label, and ``note`` says so (a new user's probe,
    2026-12-07: fmnist-scenes' labels.csv, each scene's largest item, coloured CrIBo's objects without a word)."""
    payload = {key: value.cpu()[slots] for key, value in bank.payload.items()}
    if color_by == "age":
        return EntryColours(step - payload["step"], "age", "age")
    if color_by == "label":
        if LABEL_COLUMN not in payload:
            raise UserError(f"bank '{name}' has no '{LABEL_COLUMN}' payload (it has {', '.join(bank.payload)}); "
                            f"use --color-by age, source or a labels file")
        return EntryColours(payload[LABEL_COLUMN].long(), "label", "label")
    path = None if color_by in COLOUR_KEYWORDS else Path(color_by)
    if path is not None and not path.is_file() and not path.is_dir():
        import difflib

        close = difflib.get_close_matches(color_by, COLOUR_KEYWORDS, n=1)  # as the other options (a new user)
        raise UserError(f"--color-by {color_by!r} is neither age, label, source, an existing labels file nor a folder "
                        f"of masks" + (f"; did you mean '{close[0]}'?" if close else "; give one of those (a labels "
                                                                                     "file is a CSV or JSONL of "
                                                                                     "path,label)"))
    if IMAGE_COLUMN not in payload:
        raise UserError(f"bank '{name}' has no '{IMAGE_COLUMN}' payload (it has {', '.join(bank.payload)}), so its "
                        f"entries have no source image; use --color-by age")
    image_ids = payload[IMAGE_COLUMN].long()
    relpaths = sources.relpaths if sources is not None else []

    def relpath(image_id: int) -> Optional[str]:
        return relpaths[image_id] if 0 <= image_id < len(relpaths) else None

    if path is None:  # source: one class per image
        # the path under data.root, not the bare file name: 01.png of two folders are two images
        names = {int(i): relpath(int(i)) or f"image {int(i)}" for i in image_ids.unique()}
        return EntryColours(image_ids, "label", "source image", names, other_name="images")
    entries = [relpath(i) for i in image_ids.tolist()]
    if path.is_dir():
        return mask_colours(payload, name, path, entries)
    return labels_file_colours(payload, name, path, image_ids.tolist(), entries, sources)


def labels_file_colours(payload: dict, name: str, path: Path, image_ids: Sequence[int],
                        relpaths: Sequence[Optional[str]], sources: Optional[SourceImages]) -> EntryColours:
    """Each entry coloured by its source image's label in the labels file ``path`` (:func:`entry_colours`), keyed
    by the image's path under data.root (``relpaths``, per entry; None where unknown), its absolute path or its
    ``image_id``; a bank of regions is drawn in each entry's image's label, and ``note`` says so."""
    from mlsctl.data.labels import ImagePaths, read_labels_file

    # bank plot has no --multi-label (a new user's run-through, 2026-12-06: the hint said to add it)
    table = read_labels_file(path, "bank plot colours one label per image: give a path,label file (fmnist-scenes: "
                                   "train/labels.csv)")
    root = sources.root if sources is not None else None
    found, by_file = [], None
    for image_id, rel in zip(image_ids, relpaths):
        keys = ([rel, str(root / rel)] if rel is not None else []) + [str(image_id)]
        label = next((table[k] for k in keys if k in table), None)
        if label is None and rel is not None:  # ./ paths, decomposed Unicode, the file's own folder: as labels_of
            by_file = by_file if by_file is not None else ImagePaths(sources.relpaths, root, path).rows(table)
            label = by_file.get(rel)
        found.append(label)
    classes = sorted({label for label in found if label is not None})
    if not classes:
        example = relpaths[0] or str(image_ids[0])
        raise UserError(f"labels file {path} labels none of the {len(found)} entries drawn (e.g. {example}); key it "
                        f"by the source images as RUN/images.txt lists them, by absolute paths or by image_id")
    index = {label: i for i, label in enumerate(classes)}
    values = torch.tensor([index[label] if label is not None else -1 for label in found])
    missing = int((values < 0).sum())
    if REGION_COLUMN not in payload:
        return EntryColours(values, "label", f"labels of {path.name}", dict(enumerate(classes)),
                            unlabelled=f"not in {path.name}", missing=missing)
    masks = root.parent / "masks" if root is not None else None  # the fmnist-scenes layout: SPLIT/images, SPLIT/masks
    note = (f"note: bank '{name}' holds regions of images (objects, patches) and {path} labels whole images, so each "
            f"entry is drawn in its image's label, not its own class" +
            (f"; --color-by {masks} colours each by the class covering most of its region" if masks is not None
             and masks.is_dir() else ""))
    return EntryColours(values, "label", f"labels of {path.name}, each entry's image", dict(enumerate(classes)),
                        unlabelled=f"not in {path.name}", missing=missing, note=note)


def mask_colours(payload: dict, name: str, masks: Path, relpaths: Sequence[Optional[str]]) -> EntryColours:
    """Each entry coloured by the class covering most of its ``region`` (original pixels) in its source
    image's segmentation mask, found in the folder ``masks`` as ``eval knn-seg`` finds them (the image's path
    under data.root with a mask extension); ignored pixels (255) do not count, ties go to the lower class;
    class names from a ``meta.json`` beside the masks (fmnist-scenes writes one). An entry whose region holds
    no counted pixel, or whose image is unknown, is unlabelled."""
    import numpy as np

    from mlsctl.evaluate.knn_seg import class_names, match_masks, read_mask

    if REGION_COLUMN not in payload:
        raise UserError(f"--color-by {masks} colours each entry by the class of its region, and bank '{name}' has no "
                        f"'{REGION_COLUMN}' payload (its entries are whole crops); colour it by a labels file of "
                        f"path,label instead")
    known = sorted({relpath for relpath in relpaths if relpath is not None})
    mask_of = dict(zip(known, match_masks(known, masks, "--color-by")))
    read: dict[str, np.ndarray] = {}
    values = []
    for relpath, region in zip(relpaths, payload[REGION_COLUMN].tolist()):
        if relpath is None:
            values.append(-1)
            continue
        mask = read.get(relpath)
        if mask is None:
            mask = read[relpath] = read_mask(mask_of[relpath])
        x0, y0 = max(0, math.floor(region[0])), max(0, math.floor(region[1]))
        x1, y1 = min(mask.shape[1], math.ceil(region[2])), min(mask.shape[0], math.ceil(region[3]))
        pixels = mask[y0:y1, x0:x1].reshape(-1)
        counted = pixels[(pixels >= 0) & (pixels != IGNORED_MASK_VALUE)]
        values.append(int(np.bincount(counted).argmax()) if counted.size else -1)
    classes = sorted({v for v in values if v >= 0})
    if not classes:
        raise UserError(f"no region of the {len(values)} entries drawn holds a class in {masks} (only ignored pixels "
                        f"{IGNORED_MASK_VALUE}, or regions outside the masks); are they the masks of the run's images?")
    names = class_names(masks) or []
    return EntryColours(torch.tensor(values), "label", f"class of each region in {masks.name}",
                        {c: names[c] if c < len(names) else f"class {c}" for c in classes},
                        unlabelled="no class in its region", missing=sum(v < 0 for v in values),
                        missing_said=f"have no class of {masks} in their region, or an unknown source image")


def check_export_target(out: Path, run: Run, overwrite: bool) -> None:
    """``bank export --out``: a file name ending in .safetensors, new (or ``overwrite`` of an earlier
    bank export), and never inside the run folder, whose files are the run's own (a checkpoint's
    banks.safetensors, the teacher); checked before the banks are read."""
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors: the file is a safetensors file whatever its name")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name ending in .safetensors")
    if out.exists() and not out.is_file():  # a FIFO would make the header read below wait for ever (a review)
        raise UserError(f"--out {out} is not a regular file (a device, a pipe or a socket); give a file path")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out} exists; add --overwrite to replace it, or choose another --out")
    if out.resolve().is_relative_to(run.root.resolve()):
        raise UserError(f"--out {out} is inside the run folder {run.root}, whose files are the run's own (a "
                        f"checkpoint's banks.safetensors, the teacher); write the export outside it")
    # a new user (2026-12-06): --overwrite replaced another run's teacher, its banks, a feature shard
    if out.exists() and not is_bank_export(out):
        raise UserError(f"--out {out} is not a bank export (another run's weights or banks, a feature shard?); "
                        f"--overwrite replaces only a file bank export wrote: choose another --out")


EXPORT_FORMAT = "mlsctl bank export"  # the metadata's "format" (exports before 2026-12-06: "order" and "banks")


def is_bank_export(path: Path) -> bool:
    """Whether ``path`` is a safetensors file :func:`export_banks` wrote (by its metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as opened:
            metadata = opened.metadata() or {}
    except Exception:  # noqa: BLE001 - anything safetensors cannot read as a header is no export of ours
        return False
    return metadata.get("format") == EXPORT_FORMAT or (metadata.get("order") == "oldest first" and "banks" in metadata)


def export_banks(banks: dict[str, MemoryBank], out: str | Path, *, run: Run, checkpoint: Checkpoint) -> dict:
    """``NAME/vectors`` [filled, D] and ``NAME/COLUMN`` (every payload column, ``step`` included)
    of each bank's valid entries, oldest first; the metadata says where they came from."""
    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for name, bank in banks.items():
        order = bank.order().cpu()
        tensors[f"{name}/vectors"] = bank.vectors.cpu()[order].contiguous()
        for column, value in bank.payload.items():
            tensors[f"{name}/{column}"] = value.cpu()[order].contiguous()
        shapes[name] = list(tensors[f"{name}/vectors"].shape)
    metadata = {"format": EXPORT_FORMAT, "run": str(run.root.resolve()), "step": str(checkpoint.step),
                "banks": json.dumps(shapes), "order": "oldest first",
                "images": str(run.images_path.resolve()) if run.images_path.is_file() else ""}
    atomic.write_with(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return shapes
