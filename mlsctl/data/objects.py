"""Objects photographed several times, and sets of their images (MILE).

An *object* is an id with a list of image files. :func:`find_objects` reads them from

* a folder per object: ``ROOT/<object_id>/*.jpg`` (any image type :func:`find_images` knows), or
* a CSV (``object_id,path``, header optional) or JSONL (``{"object_id": ..., "path": ...}``) file
  whose paths are relative to ``root``.

:class:`ObjectSetDataset` draws, for every (epoch, object), a set of ``set_length`` images of the
object afresh (seeded by seed, epoch and object, so resume and multi-process runs are exact):
distinct images when the object has enough, otherwise all of them padded with duplicates drawn at
random. Every image of the set gets its own multi-crop views; "set-view" ``c`` is the ``c``-th crop
of every image of the set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from mlsctl.data.images import BadImage, ImageFolder
from mlsctl.data.loader import sample_seed
from mlsctl.data.multicrop import MultiCrop
from mlsctl.errors import UserError


@dataclass
class ObjectImages:
    object_id: str
    rows: list[int]  # rows of the image folder's listing (its image ids)


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    text = path.read_text()
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pairs.append((str(record["object_id"]), str(record["path"])))
            except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
                raise UserError(f"{path} line {n} is not a JSON object with 'object_id' and 'path'") from None
    else:
        from mlsctl.evaluate.knn import csv_rows

        for n, row in csv_rows(text, path):
            if not row or (n == 1 and [c.strip().lower() for c in row[:2]] == ["object_id", "path"]):
                continue
            if len(row) < 2:
                raise UserError(f"{path} line {n} needs two columns, object_id,path")
            pairs.append((row[0].strip(), row[1].strip()))
    if not pairs:
        raise UserError(f"{path} lists no (object_id, path) pair")
    return pairs


def find_objects(folder: ImageFolder, objects_file: Optional[str | os.PathLike] = None) -> list[ObjectImages]:
    """Objects of ``folder`` (its images grouped by parent folder), or as ``objects_file`` lists them
    (paths relative to the folder's root), in a stable order."""
    rows_of = {folder.relpath(i): i for i in range(len(folder))}
    groups: dict[str, list[int]] = {}
    if objects_file is None:
        for relpath, row in rows_of.items():
            parent = Path(relpath).parent.as_posix()
            if parent == ".":
                raise UserError(f"{folder.root / relpath} is not inside an object folder; put each object's images "
                                f"in ROOT/<object_id>/ or list them in method.objects_file")
            groups.setdefault(parent, []).append(row)
    else:
        path = Path(objects_file)
        if not path.is_file():
            raise UserError(f"method.objects_file {path} does not exist; give a CSV or JSONL of object_id,path")
        for object_id, relpath in _read_pairs(path):
            key = Path(relpath).as_posix()
            if key not in rows_of:
                raise UserError(f"{path} lists {relpath}, which is not an image under {folder.root}")
            groups.setdefault(object_id, []).append(rows_of[key])
    return [ObjectImages(object_id, sorted(rows)) for object_id, rows in sorted(groups.items())]


def choose_set(n_images: int, set_length: int, rng: np.random.Generator) -> list[int]:
    """Positions of a set: ``set_length`` distinct images in random order, or all of them plus
    random duplicates when there are fewer."""
    if n_images >= set_length:
        return [int(i) for i in rng.permutation(n_images)[:set_length]]
    padding = rng.integers(0, n_images, size=set_length - n_images)
    return [int(i) for i in rng.permutation(np.concatenate([np.arange(n_images), padding]))]


@dataclass
class SetBatch:
    crops: list[torch.Tensor]  # per set-view c: [B, T, 3, S, S]; global crops first
    image_ids: torch.Tensor  # [B, T] rows of the image folder
    object_index: torch.Tensor  # [B] index into the dataset's objects
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.image_ids.shape[0]

    def to(self, device: torch.device | str) -> "SetBatch":
        return SetBatch([c.to(device, non_blocking=True) for c in self.crops], self.image_ids.to(device),
                        self.object_index.to(device), self.skipped)


class ObjectSetDataset(Dataset):
    def __init__(self, folder: ImageFolder, objects: list[ObjectImages], transform: MultiCrop, set_length: int,
                 seed: int):
        self.folder, self.objects, self.transform = folder, objects, transform
        self.set_length, self.seed = set_length, seed

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        obj = self.objects[index]
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        skipped, crops, ids = [], [], []
        for position in choose_set(len(obj.rows), self.set_length, rng):
            # an unreadable photo is replaced by the object's next readable one
            for attempt in range(len(obj.rows)):
                row = obj.rows[(position + attempt) % len(obj.rows)]
                try:
                    image = self.folder.load(row)
                    break
                except BadImage as exc:
                    skipped.append((self.folder.relpath(row), str(exc)))
            else:
                raise UserError(f"no image of object {obj.object_id} under {self.folder.root} could be decoded")
            views = self.transform(image, int(rng.integers(0, 2**62)))
            crops.append(views.crops)
            ids.append(row)
        per_view = [torch.stack([c[v] for c in crops]) for v in range(len(crops[0]))]  # [T, 3, S, S] each
        return {"crops": per_view, "image_ids": ids, "object_index": index, "skipped": skipped}


def collate_sets(samples: list[dict]) -> SetBatch:
    n_views = len(samples[0]["crops"])
    return SetBatch(crops=[torch.stack([s["crops"][v] for s in samples]) for v in range(n_views)],
                    image_ids=torch.tensor([s["image_ids"] for s in samples], dtype=torch.long),
                    object_index=torch.tensor([s["object_index"] for s in samples], dtype=torch.long),
                    skipped=[item for s in samples for item in s["skipped"]])
