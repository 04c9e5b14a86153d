"""What ``mlsctl bank inspect`` shows of MLS's queues ``Q_g`` and ``Q_z`` when the images carry
tags (fmnist-scenes' ``scenes.jsonl`` in ``data.root`` or the folder above it, or
``method.tags_file``):

* **tags**: how many queue entries come from an image with each tag (an image with several tags
  counts once for each) — what the label payload of the queue holds;
* **label precision**: MLS's pseudo-labels seen from the queue itself — every written entry is a
  query against the other entries of the same queue (entries of its own image excluded); for each
  of its tags, the share of its top-k (``method.k``) neighbours that carry that tag, averaged over
  (entry, tag) pairs, next to what random neighbours would give (chance: each tag's share among
  the other entries). "Shares any tag" would be uninformative on scenes of several items (69 %
  of random pairs of fmnist-scenes share one). Two queues beat one in the paper because ``Q_g``'s neighbours are
  better labels than ``Q_z``'s; this row measures exactly that on a run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from mlsctl.errors import UserError


def tags_file_of(recipe) -> Optional[Path]:
    if recipe.method.tags_file:
        return Path(recipe.method.tags_file)
    if recipe.data.root:
        for folder in (Path(recipe.data.root), Path(recipe.data.root).parent):  # fmnist-scenes: train/images
            if (folder / "scenes.jsonl").is_file():
                return folder / "scenes.jsonl"
    return None


def written_images(bank, images: int) -> list[Optional[int]]:
    """The source image (``image_id``) of every slot of ``bank``; None where the slot was never written or names
    no image of the ``images`` the run lists."""
    return [image_id if step >= 0 and 0 <= image_id < images else None
            for image_id, step in zip(bank.payload["image_id"].tolist(), bank.payload["step"].tolist())]


def image_tags(image_ids: Iterable[int], image_paths: list[Path], table: dict[str, list[str]], tags_file: Path,
               root: Optional[Path]) -> dict[int, frozenset]:
    """The tags of each of ``image_ids`` (the images the queues hold: thousands, not every training image) that the
    tags file lists. Its paths are read as every labels file's (:class:`mlsctl.data.labels.ImagePaths`: relative to
    ``root``, the run's data.root, to the file's own folder, or absolute; ``./`` and decomposed Unicode folded; links
    not followed): a new user's probe (2026-12-07) found this view matching resolved paths against the file's folder
    only, its own way. One pass over the file for all the queues: 1.28 M rows against 65,536 entries took 20 s a
    queue (a review)."""
    from mlsctl.data.labels import ImagePaths

    held = sorted(set(image_ids))
    base = Path(root) if root is not None else Path(tags_file).parent
    files = [_under(Path(image_paths[image_id]), base) for image_id in held]
    found = ImagePaths(files, base, Path(tags_file), "tags file").rows(table)
    return {image_id: frozenset(found[f]) for image_id, f in zip(held, files) if f in found}


def _under(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` where it lies under it, else absolute (as :class:`ImagePaths` takes files)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path.absolute())


LABEL_PRECISION_CHUNK = 1024  # queue entries scored at a time: 1024 x 65,536 floats is 256 MiB


def label_precision(vectors: torch.Tensor, image_ids: torch.Tensor, tags: list[Optional[frozenset]], k: int) -> dict:
    """Per tag of each tagged entry, the share of its top-k neighbours (cosine, same image
    excluded) that carry that tag, averaged over (entry, tag) pairs; chance is the same average of
    each tag's share among all other entries (what k random neighbours would give)."""
    rows = torch.tensor([i for i, t in enumerate(tags) if t], dtype=torch.long)
    if len(rows) <= k or len(torch.unique(image_ids[rows])) < 2:  # no neighbour from another image to count
        return {}
    x = F.normalize(vectors[rows].float(), dim=1)
    ids = image_ids[rows]
    names = sorted({tag for i in rows.tolist() for tag in tags[i]})
    index = {name: j for j, name in enumerate(names)}
    onehot = torch.zeros(len(rows), len(names))
    for r, i in enumerate(rows.tolist()):
        onehot[r, [index[t] for t in tags[i]]] = 1.0
    shares = []  # [n, T] in row chunks: the share of each entry's k neighbours carrying each tag
    for start in range(0, len(rows), LABEL_PRECISION_CHUNK):  # never the n x n scores (40 GiB at a 65,536 queue)
        scores = x[start:start + LABEL_PRECISION_CHUNK] @ x.T
        scores.masked_fill_(ids[start:start + LABEL_PRECISION_CHUNK, None] == ids[None, :], float("-inf"))
        shares.append(onehot[scores.topk(k, dim=1).indices].mean(dim=1))
    neighbour_share = torch.cat(shares)
    pairs = onehot.sum()
    precision = float((neighbour_share * onehot).sum() / pairs)
    # [n, T]: each tag's share among the entries of the other images (all entries less its image's own)
    _, image_of = torch.unique(ids, return_inverse=True)
    per_image = torch.zeros(int(image_of.max()) + 1, len(names)).index_add_(0, image_of, onehot)
    per_image_entries = torch.bincount(image_of).float()
    prevalence = (onehot.sum(0)[None] - per_image[image_of]) / (len(rows) - per_image_entries[image_of])[:, None]
    chance = float((prevalence * onehot).sum() / pairs)
    return {"precision": precision, "chance": chance, "k": k, "queries": len(rows)}


def queue_views(recipe, banks, image_paths: Optional[list[Path]]) -> dict[str, list[tuple[str, str, object]]]:
    from mlsctl.data.labels import read_multi_labels

    path = tags_file_of(recipe)
    if path is None or not image_paths:
        return {}
    try:
        table = read_multi_labels(path)
    except UserError as exc:
        return {name: [("tags", f"not shown: {exc}", None)] for name in banks}
    slots = {name: written_images(bank, len(image_paths)) for name, bank in banks.items()}
    try:
        by_image = image_tags((i for images in slots.values() for i in images if i is not None), image_paths, table,
                              path, Path(recipe.data.root) if recipe.data.root else None)
    except UserError as exc:  # an image two rows give two tag lists
        return {name: [("tags", f"not shown: {exc}", None)] for name in banks}
    views = {}
    for name, bank in banks.items():
        tags = [by_image.get(image_id) if image_id is not None else None for image_id in slots[name]]
        counts = Counter(tag for t in tags if t for tag in t)
        tagged = sum(1 for t in tags if t)
        if not tagged:
            views[name] = [("tags", f"no entry comes from an image listed in {path}", None)]
            continue
        top = counts.most_common()
        shown = ", ".join(f"{tag}: {n}" for tag, n in top[:5]) + (", ..." if len(top) > 5 else "")  # (--json: all)
        rows = [("tags", f"{len(top)} tags over {tagged} entries ({path.name}); {shown}", dict(top))]
        precision = label_precision(bank.vectors, bank.payload["image_id"], tags, recipe.method.k)
        if precision:
            rows.append(("label precision", f"{100 * precision['precision']:.1f}% of each entry's top-{precision['k']} carry "
                                            f"each of its tags (chance {100 * precision['chance']:.1f}%)", precision))
        views[name] = rows
    return views
