"""Readers of the standard benchmarks, from their official layouts, in a folder or an archive.

``open_split(name, root, split)`` finds the layout of dataset ``name`` under ``root`` (a folder or
a ``.tar``/``.zip`` read in place, :mod:`mlsctl.data.archive`) and returns the images of one
split with what the evaluation protocol needs:

* segmentation (:class:`SegmentationSplit`: ``voc``, ``ade20k``, ``cityscapes``, ``coco-stuff``,
  ``coco-things``): the mask of each image, the class names, and the protocol's *mapping* of
  the stored mask values to class ids, as a lookup table; every value the protocol ignores
  becomes :data:`IGNORE` (255), a value the layout never stores is refused with the file named;
* classification (:class:`ClassificationSplit`: ``imagenet``): the class of each image, from its
  class folder (``train/n01440764/x.JPEG``) or from a split file listing flat ``val/`` images.

One module per layout (:mod:`.voc`, :mod:`.ade20k`, :mod:`.cityscapes`, :mod:`.coco`,
:mod:`.imagenet`) holds its class names, split rules and mapping; ``docs/datasets.md`` writes
the same out for readers. Nothing here downloads: a root without the layout is one sentence
saying which layout is expected and where to get the data.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from mlsctl.data.archive import Tree, open_tree
from mlsctl.errors import UserError

IGNORE = 255
INVALID = -1  # a mask value the layout never stores


@dataclass
class SegmentationSplit:
    """The images and masks of one split of a segmentation benchmark."""

    dataset: str
    split: str
    tree: Tree
    base: str  # where the layout starts inside the tree ('' or e.g. 'VOCdevkit/VOC2012')
    images: list[str]  # paths relative to the tree's top, sorted
    masks: list[str]  # the mask of each image
    classes: list[str]
    lookup: np.ndarray  # int64 [number of stored values]: stored mask value -> class id, IGNORE or INVALID
    mapping: dict  # the protocol's mapping in words and numbers, for the result JSON
    layout: str  # the layout found, in words
    ignore_index: int = IGNORE
    _mask_of: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._mask_of = dict(zip(self.images, self.masks))

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def mask_path(self, image: str) -> str:
        """The mask of an image of this split (path relative to the tree's top)."""
        mask = self._mask_of.get(image)
        if mask is None:
            raise UserError(f"{image} is not an image of the {self.split} split of {self.dataset} in {self.tree.path}; "
                            f"embed that split (mlsctl embed --dataset {self.dataset} --split {self.split})")
        return mask

    def read_mask(self, image: str) -> np.ndarray:
        """The mask of ``image`` in class ids (int64), IGNORE where the protocol scores nothing."""
        path = self.mask_path(image)
        raw = read_label_png(self.tree, path)
        if raw.size and (raw.min() < 0 or raw.max() >= len(self.lookup)):
            bad = int(raw.max() if raw.max() >= len(self.lookup) else raw.min())
            raise UserError(f"mask {self.tree.location(path)} holds the value {bad}, which no {self.dataset} mask "
                            f"stores; is it the right annotation file?")
        mapped = self.lookup[raw]
        if (mapped == INVALID).any():
            bad = int(raw[mapped == INVALID][0])
            raise UserError(f"mask {self.tree.location(path)} holds the value {bad}, which no {self.dataset} mask "
                            f"stores; is it the right annotation file?")
        return mapped

    def describe(self) -> dict:
        """What the result JSON records: dataset, split, root, layout, classes, ignore label, mapping."""
        return {"name": self.dataset, "split": self.split, "root": str(self.tree.path), "root_kind": self.tree.kind,
                "layout": self.layout, "images": len(self.images), "num_classes": self.num_classes,
                "classes": list(self.classes), "ignore_index": self.ignore_index, "mapping": self.mapping}


@dataclass
class ClassificationSplit:
    """The images of one split of an ImageNet-style benchmark, each with its class name."""

    dataset: str
    split: str
    tree: Tree
    images: list[str]
    labels: list[str]
    layout: str
    _label_of: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._label_of = dict(zip(self.images, self.labels))

    def __len__(self) -> int:
        return len(self.images)

    def label_of(self, image: str) -> str:
        label = self._label_of.get(image)
        if label is None:
            raise UserError(f"{image} is not an image of the {self.split} split of {self.dataset} in {self.tree.path}")
        return label

    def describe(self) -> dict:
        return {"name": self.dataset, "split": self.split, "root": str(self.tree.path), "root_kind": self.tree.kind,
                "layout": self.layout, "images": len(self.images), "classes": len(set(self.labels))}


def read_label_png(tree: Tree, path: str) -> np.ndarray:
    """The stored values of a label image of a tree (palette indices of a 'P' PNG, grey levels of an 'L' one)."""
    return decode_label_image(io.BytesIO(tree.read_bytes(path)), tree.location(path))


def decode_label_image(source, where: str) -> np.ndarray:
    """The stored values [H, W] (int64) of a single-channel label image (a path or a binary file);
    a colour image or an undecodable file is one sentence naming ``where``."""
    from PIL import Image

    try:
        with Image.open(source) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise UserError(f"mask {where} has mode {img.mode}; masks must be single-channel label images "
                                f"(one class id per pixel; a colour rendering will not do)")
            return np.asarray(img).astype(np.int64)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read mask {where} ({exc}); masks must be label PNGs") from None


def lookup_table(pairs: dict[int, int], size: int = 256, default: int = INVALID) -> np.ndarray:
    """A lookup table of ``size`` entries: ``pairs`` (stored value -> class id), ``default`` elsewhere."""
    table = np.full(size, default, dtype=np.int64)
    for stored, label in pairs.items():
        table[stored] = label
    return table


def find_base(tree: Tree, candidates: Sequence[str], required: Sequence[str]) -> Optional[str]:
    """The first of ``candidates`` (prefixes inside the tree) under which every ``required`` folder exists;
    failing that, the same inside the tree's one top folder (:func:`wrapper`)."""
    outer = wrapper(tree)
    for top in ("",) if outer is None else ("", outer):
        for base in candidates:
            base = join(top, base)
            if all(tree.is_dir(join(base, r)) for r in required):
                return base
    return None


def wrapper(tree: Tree) -> Optional[str]:
    """The one folder at the top of ``tree`` with nothing else beside it (macOS's ``__MACOSX`` and
    hidden entries aside): the folder an archive was made from (``tar -cf x.tar x/``, a zip of a
    folder), or one more level of a download (``imagenet-mini/train/...``). None otherwise."""
    folders, files = tree.top()
    folders = [f for f in folders if f != "__MACOSX" and not f.startswith(".")]
    files = [f for f in files if not f.startswith(".")]
    return folders[0] if len(folders) == 1 and not files else None


def join(base: str, *parts: str) -> str:
    return "/".join(p for p in (base, *parts) if p)


def read_text(tree: Tree, path: str) -> str:
    """A listing or annotation file as UTF-8 text; bytes that are not UTF-8 get one sentence naming the
    file and the byte (never a silent replacement: a mangled file name would miss its image later)."""
    data = tree.read_bytes(path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{tree.location(path)}:{line} is not UTF-8 text (byte {data[exc.start]:#04x} at offset "
                        f"{exc.start}); is it the dataset's own file?") from None


def read_lines(tree: Tree, path: str) -> list[str]:
    return [line.strip() for line in read_text(tree, path).splitlines() if line.strip()]


def check_files(tree: Tree, images: list[str], masks: list[str], what: str) -> None:
    """Every listed image and mask exists; else one sentence with the count and the first missing file."""
    absent = [p for pair in zip(images, masks) for p in pair if not tree.is_file(p)]
    if absent:
        raise UserError(f"{what}: {len(absent)} listed files are missing from {tree.path} (first: {absent[0]}); "
                        f"is the download complete?")
    if not images:
        raise UserError(f"{what}: the split lists no images in {tree.path}")


def _modules() -> dict:
    from mlsctl.data.datasets import ade20k, cityscapes, coco, imagenet, voc

    return {"voc": voc, "ade20k": ade20k, "cityscapes": cityscapes, "coco-stuff": coco.STUFF,
            "coco-things": coco.THINGS, "imagenet": imagenet}


SEGMENTATION = ("voc", "ade20k", "cityscapes", "coco-stuff", "coco-things")
CLASSIFICATION = ("imagenet",)
DATASETS = SEGMENTATION + CLASSIFICATION


def reader(name: str):
    """The module (or object) that reads dataset ``name``: ``SPLITS``, ``DEFAULT_SPLITS``, ``read_split``."""
    if name not in DATASETS:
        raise UserError(f"--dataset {name} is not one of {', '.join(DATASETS + ('folders',))}")
    return _modules()[name]


def default_splits(name: str) -> tuple[str, str]:
    """(train split, val split) of the dataset's evaluation protocol."""
    return reader(name).DEFAULT_SPLITS


def open_split(name: str, root: Optional[str | os.PathLike], split: str, option: str = "--split"):
    """One split of dataset ``name`` under ``root`` (a folder or an archive; None: the sentence that
    asks for ``--root``); ``option`` is the command-line option that chose it (``eval``'s
    ``--train-split``), which the sentences of mistakes name."""
    if root is None:
        raise UserError(f"--dataset {name} needs --root: the dataset's folder or its .tar/.zip archive")
    module = reader(name)
    if split not in module.SPLITS:
        raise UserError(f"{option} {split} is not a split of {name}; choose one of {', '.join(module.SPLITS)}")
    try:
        return module.read_split(open_tree(root), split)
    except UserError as exc:
        if option != "--split" and "--split " in exc.message:  # a reader's hint names the option to give
            raise UserError(exc.message.replace("--split ", f"{option} "), exc.exit_code) from None
        raise


def missing(name: str, tree: Tree, expected: str, source: str) -> UserError:
    """The one sentence for a root that does not hold the layout."""
    return UserError(f"{tree.path} does not hold {name} in its standard layout (expected {expected}); get it from "
                     f"{source} and pass the folder or the archive itself as --root (nothing is downloaded or "
                     f"extracted)")
