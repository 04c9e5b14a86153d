"""Objects photographed several times, and sets of their images (MILE).

An *object* is an id with a list of image files. :func:`find_objects` reads them from

* a folder per object: ``ROOT/<object_id>/*.jpg`` (any image type :func:`find_images` knows), or
* a CSV (``object_id,path``, header optional) or JSONL (``{"object_id": ..., "path": ...}``) file
  whose paths are relative to ``root``, absolute, or relative to the file's own folder, as a labels
  file's (:class:`mlsctl.data.labels.ImagePaths`).

:class:`ObjectSetDataset` draws, for every (epoch, object), a set of ``set_length`` images of the
object afresh (seeded by seed, epoch and object, so resume and multi-process runs are exact):
distinct images when the object has enough, otherwise all of them padded with duplicates drawn at
random. Every image of the set gets its own multi-crop views; "set-view" ``c`` is the ``c``-th crop
of every image of the set.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from mlsctl.console import counted
from mlsctl.data.images import ImageFolder
from mlsctl.data.labels import SPLIT_NAMES, ImagePaths, read_objects_file
from mlsctl.data.loader import ResizedImages, load_or_next, map_tensors, sample_seed
from mlsctl.data.multicrop import MultiCrop, normalize_on_device
from mlsctl.errors import UserError


@dataclass
class ObjectImages:
    object_id: str
    rows: list[int]  # rows of the image folder's listing (its image ids)


def find_objects(folder: ImageFolder, objects_file: Optional[str | os.PathLike] = None) -> list[ObjectImages]:
    """Objects of ``folder`` (its images grouped by the folder under the root they are in,
    ``ROOT/<object_id>/...``, sub-folders included, as galleries and ``eval retrieval`` group them:
    :func:`mlsctl.gallery.object_folders`), or as ``objects_file`` lists them (paths relative to the
    folder's root or to the file's folder, or absolute), in a stable order."""
    rows_of = {folder.relpath(i): i for i in range(len(folder))}
    groups: dict[str, list[int]] = {}
    if objects_file is None:
        for relpath, row in rows_of.items():
            parts = Path(relpath).parts
            if len(parts) < 2:
                raise UserError(f"{folder.root / relpath} is not inside an object folder; put each object's images "
                                f"in ROOT/<object_id>/ or list them in method.objects_file")
            groups.setdefault(parts[0], []).append(row)
    else:
        groups = listed_objects(Path(objects_file), rows_of, folder.root, "method.objects_file")
    return [ObjectImages(object_id, sorted(rows)) for object_id, rows in sorted(groups.items())]


def check_objects_file(path: Optional[Path], option: str) -> None:
    """An objects file given as ``option`` that is no file is refused: the commands that embed say so before
    the model loads (``index build --objects``, ``eval retrieval --gallery-objects``), not after."""
    if path is not None and Path(path).exists() and not Path(path).is_file() and not Path(path).is_dir():
        raise UserError(f"{option} {path} is not a regular file (a pipe or a device, as <(...) gives); save it to a "
                        f"file and give that")  # never read: a pipe hangs, a device has no end (a new user's probe)
    if path is not None and not Path(path).is_file():
        raise UserError(f"{option} {path} does not exist; give a CSV or JSONL of object_id,path")


def listed_objects(path: Path, listing: dict, root, option: str) -> dict[str, list]:
    """The objects an objects file (``option``, such as ``method.objects_file``) lists, each with the items of
    ``listing`` (an image's path relative to ``root``, as a POSIX string → what the caller keeps of it: a row, a
    path) of its photos, in the file's order; a missing file or a row naming no image of ``listing`` is refused."""
    path = Path(path)
    check_objects_file(path, option)
    paths = ImagePaths(list(listing), root, path, "objects file")
    groups: dict[str, list] = {}
    for object_id, relpath in read_objects_file(path):
        found = paths.find_once(relpath, "row")  # ./a.jpg, a decomposed é, a path relative to the file's folder
        if found is None:
            raise UserError(f"{path} lists {relpath}, which is not an image under {root}; {paths.where()}")
        groups.setdefault(object_id, []).append(listing[found])
    return groups


def _posix(path: str | os.PathLike) -> PurePosixPath:
    """An image's path relative to the root as a POSIX path (its folder, its suffix)."""
    return PurePosixPath(Path(path).as_posix())


NESTED_FOLDERS = 4  # sub-folders of one group from which a data set's root given for its split is suspected


def nested_groups_note(root: Path, groups: dict, what: str = "objects", prefer: tuple[str, ...] = (),
                       objects_option: str = "method.objects_file=",
                       objects_name: str = "objects.csv") -> Optional[str]:
    """A warning where groups of images (objects, classes: the folders right under ``root``; ``groups``
    maps each to its images' paths relative to ``root``) gather their images from
    :data:`NESTED_FOLDERS` or more sub-folders, at any depth.

    Two layouts are told apart. The data set's root given for one of its splits (new users,
    2026-12-06: ``index build data/prod`` built three objects, gallery, query and train; MILE and
    Multi-Similarity trained on them, test photos included): the groups are split names, or the
    images do not all sit at one depth; the folder advised is the first named in ``prefer``
    (case-folded), else the one with the most sub-folders. A deep layout (In-shop's
    ``img/MEN/Denim/id_00000080/01_1_front.jpg``, a new user's probe, 2026-12-07: the advice to give
    ``img/MEN``, then ``img/MEN/Boots``, would have trained on one category): every image in a leaf
    folder at one depth of two or more, the leaf folders being the objects; the fix is an objects
    file, ``objects_name`` written by the command the note gives and given as ``objects_option`` and
    its name (MILE's ``method.objects_file=objects.csv``, ``index build --objects objects.csv``). None
    where nothing looks so."""
    nested = {}
    for name, paths in groups.items():
        folders = {_posix(p).parent for p in paths if len(Path(p).parts) > 2}
        if len(folders) >= NESTED_FOLDERS:
            nested[name] = (len(paths), len(folders))
    if not nested:
        return None
    leaves = {_posix(p).parent for paths in groups.values() for p in paths}
    depths = {len(leaf.parts) for leaf in leaves}
    splits = all(str(name).casefold() in SPLIT_NAMES for name in nested)
    if len(depths) == 1 and min(depths) >= 2 and not splits:
        return _deep_layout_note(Path(root), groups, sorted(leaves), what, objects_option + objects_name, objects_name)
    # the folder to give: one named as ``prefer`` says (MILE trains on "train", a gallery is "gallery"), else the
    # one with the most sub-folders (a review, 2026-12-06: the largest could be a test split)
    preferred = [name for name in nested if str(name).casefold() in prefer]
    name = preferred[0] if preferred else max(nested, key=lambda n: nested[n][1])
    images, folders = nested[name]
    return (f"{len(nested)} of the {len(groups)} {what} of {root} gather their images from {NESTED_FOLDERS} or more "
            f"sub-folders ('{name}': {images} images in {folders} sub-folders); {what} are the folders right under "
            f"{root}: if those sub-folders are the {what}, give {Path(root) / name} instead")


def _deep_layout_note(root: Path, groups: dict, leaves: list[PurePosixPath], what: str, given: str,
                      objects_name: str) -> str:
    """:func:`nested_groups_note` of a deep layout: each leaf folder is likely one object. The command it
    gives names each object by its leaf folder, or by the leaf folder's path with ``_`` for ``/`` where two
    leaf folders share a name (a gallery's ids hold no ``/``)."""
    depth = len(leaves[0].parts)
    example = leaves[0]
    photos = sum(1 for paths in groups.values() for p in paths if _posix(p).parent == example)
    shown = ", ".join(sorted(map(str, groups))[:3]) + (", ..." if len(groups) > 3 else "")
    unique = len({leaf.name for leaf in leaves}) == len(leaves)
    object_id = ("id = $(NF-1)" if unique else
                 'id = substr($0, 1, length($0) - length($NF) - 1); gsub("/", "_", id)')
    suffixes = sorted({_posix(p).suffix for paths in groups.values() for p in paths})
    names = " -o ".join(f"-name '*{s}'" for s in suffixes)
    listing = (f"(cd {shlex.quote(str(root))} && find -L . -type f \\( {names} \\) | sed 's|^\\./||' | awk -F/ "
               f"'BEGIN {{print \"object_id,path\"}} {{{object_id}; print id \",\" $0}}') > {objects_name}")
    return (f"the {counted(sum(len(p) for p in groups.values()), 'image')} of {root} sit in {len(leaves)} folders "
            f"{depth} levels down (such as {example}/, {counted(photos, 'image')}), but {what} are the folders right "
            f"under {root}, here its {counted(len(groups), 'folder')} ({shown}): if each of those {len(leaves)} "
            f"folders is one object, list their images in an objects file, a CSV of object_id,path rows with paths "
            f"relative to {root} (one way: {listing}), and give it with {given}")


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
    # augment gpu (see mlsctl.data.loader): each photo resized, and its crops' parameters
    images: Optional[torch.Tensor] = None  # [B, T, 3, R, R] uint8
    boxes: Optional[torch.Tensor] = None  # [B, T, n_views, 4] in original pixels
    flips: Optional[torch.Tensor] = None  # [B, T, n_views]
    photometric: Optional[torch.Tensor] = None  # [B, T, n_views, P]
    image_sizes: Optional[torch.Tensor] = None  # [B, T, 2]

    def __len__(self) -> int:
        return self.image_ids.shape[0]

    def to(self, device: torch.device | str) -> "SetBatch":
        return map_tensors(self, lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "SetBatch":
        return map_tensors(self, lambda t: t.pin_memory())


class ObjectSetDataset(Dataset):
    def __init__(self, folder: ImageFolder, objects: list[ObjectImages], transform: MultiCrop, set_length: int,
                 seed: int, augment: str = "cpu", decode_size: int = 0, cache: str = "none"):
        self.folder, self.objects, self.transform = folder, objects, transform
        self.set_length, self.seed = set_length, seed
        self.resized = ResizedImages(len(folder), decode_size, cache == "memory") if augment == "gpu" else None

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def images_per_item(self) -> int:
        """Photos decoded for one item, a set (what :func:`mlsctl.data.loader.check_batches_fit` counts)."""
        return self.set_length

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        obj = self.objects[index]
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        skipped, photos, ids = [], [], []
        for position in choose_set(len(obj.rows), self.set_length, rng):
            # an unreadable photo is replaced by the object's next readable one
            row, image, missed = load_or_next(self.folder, obj.rows, position, self.resized,
                                              f"images of object {obj.object_id} under {self.folder.root}")
            skipped += missed
            seed = int(rng.integers(0, 2**62))
            if self.resized is not None:
                pixels, size = self.resized.get(row, image)
                photos.append((pixels, *self.transform.plan(*size, seed), torch.tensor(size)))
            else:
                photos.append(self.transform(image, seed).crops)
            ids.append(row)
        sample = {"image_ids": ids, "object_index": index, "skipped": skipped}
        if self.resized is not None:
            for name, values in zip(("images", "boxes", "flips", "photometric", "image_sizes"), zip(*photos)):
                sample[name] = torch.stack(values)  # [T, ...]
        else:
            sample["crops"] = [torch.stack([c[v] for c in photos]) for v in range(len(photos[0]))]  # [T, 3, S, S] each
        return sample

    def on_device(self, batch: SetBatch) -> SetBatch:
        """The float crops on the batch's device: normalised, or (augment gpu) cut from the photos."""
        if batch.images is None:
            return dataclasses.replace(batch, crops=[normalize_on_device(c.flatten(0, 1)).view(c.shape)
                                                     for c in batch.crops])
        b, t = batch.images.shape[:2]
        crops = self.transform.render(batch.images.flatten(0, 1), batch.boxes.flatten(0, 1), batch.flips.flatten(0, 1),
                                      batch.photometric.flatten(0, 1), batch.image_sizes.flatten(0, 1))
        return dataclasses.replace(batch, crops=[c.view(b, t, *c.shape[1:]) for c in crops], images=None, boxes=None,
                                   flips=None, photometric=None, image_sizes=None)


def collate_sets(samples: list[dict]) -> SetBatch:
    device_side = "images" in samples[0]
    n_views = 0 if device_side else len(samples[0]["crops"])
    stacked = {name: torch.stack([s[name] for s in samples])
               for name in ("images", "boxes", "flips", "photometric", "image_sizes") if device_side}
    return SetBatch(crops=[torch.stack([s["crops"][v] for s in samples]) for v in range(n_views)],
                    image_ids=torch.tensor([s["image_ids"] for s in samples], dtype=torch.long),
                    object_index=torch.tensor([s["object_index"] for s in samples], dtype=torch.long),
                    skipped=[item for s in samples for item in s["skipped"]], **stacked)
