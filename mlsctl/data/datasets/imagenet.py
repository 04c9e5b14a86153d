"""ImageNet-style classification folders (ILSVRC-2012 and any data set laid out like it).

Layout (under ``--root``, a folder or an archive)::

    [imagenet/ | ILSVRC/Data/CLS-LOC/]train/<class>/<image>      the class is the folder under train/
    [...]val/<class>/<image>                                      (val prepared into class folders)
    [...]val/<image> + a split file                               (val as distributed, flat)

Split files for a flat split: ``<split>.txt`` next to the split folder, lines ``<file> <label>``
(the label a class name, or an integer index into the sorted class folders of ``train/``, as in
Caffe's ``val.txt``), or Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the
class the first word of the prediction string) at the top of the root. Images are the files
Pillow reads (:data:`mlsctl.data.images.IMAGE_EXTENSIONS`).

The class is the folder directly under the split, also for an image deeper in it: ImageNet's own
definition (a split file's class index counts those folders, and published k-NN and linear figures
use them), where ``--train``/``--val`` folders make each image's own folder, however deep, its class
(docs/formats.md). Deeper images are said, with the other way (:func:`deeper_note`).
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Optional

from mlsctl.data.archive import Tree
from mlsctl.data.datasets import ClassificationSplit, find_base, join, missing, read_lines, read_text, wrapper
from mlsctl.errors import UserError

SPLITS = ("train", "val")
DEFAULT_SPLITS = ("train", "val")
SOURCE = "https://image-net.org/download (ILSVRC-2012 train and val), or your own train/<class>/ and val/ folders"
EXPECTED = "train/<class>/<images> and val/<class>/<images> (or val/<images> with val.txt)"
BASES = ("", "imagenet", "ILSVRC/Data/CLS-LOC")


def _is_image(path: str) -> bool:
    from mlsctl.data.images import IMAGE_EXTENSIONS

    return path.lower().endswith(IMAGE_EXTENSIONS)


def _split_file_labels(tree: Tree, base: str, split: str, class_names: list[str]) -> Optional[dict[str, str]]:
    """File name -> class from ``<split>.txt`` or ``LOC_<split>_solution.csv``, or None if neither exists."""
    listing = join(base, f"{split}.txt")
    if tree.is_file(listing):
        table = {}
        for number, line in enumerate(read_lines(tree, listing), 1):
            parts = line.split()
            if len(parts) != 2:
                raise UserError(f"{tree.location(listing)}:{number} is not '<file> <label>'")
            name, label = parts
            if label.isdigit() and class_names:
                if int(label) >= len(class_names):
                    raise UserError(f"{tree.location(listing)}:{number}: class index {label} but train/ has "
                                    f"{len(class_names)} class folders")
                label = class_names[int(label)]
            table[name.rsplit("/", 1)[-1]] = label
        return table
    # at the top of the root (Kaggle's layout), or of the one folder the root wraps it in
    name = f"LOC_{split}_solution.csv"
    solution = next((path for path in (name, join(wrapper(tree) or "", name)) if tree.is_file(path)), None)
    if solution is not None:
        rows = csv.reader(io.StringIO(read_text(tree, solution)))
        table = {}
        try:
            for number, row in enumerate(rows, 1):
                if not row or (number == 1 and row[:1] == ["ImageId"]):
                    continue  # a blank line, the header
                words = row[1].split() if len(row) >= 2 else []
                if not row[0] or not words:
                    raise UserError(f"{tree.location(solution)}:{number} is not 'ImageId,PredictionString' with a "
                                    f"class first (Kaggle's LOC_{split}_solution.csv)")
                table[row[0] + ".JPEG"] = words[0]
        except csv.Error as exc:
            raise UserError(f"{tree.location(solution)} is not a readable CSV ({exc})") from None
        return table
    return None


def deeper_note(folder: str, inside: list[str]) -> None:
    """A note where images lie below their class folder (``train/Boots/sub0/1.jpg``): this layout makes
    them the class ``Boots``, as ImageNet's does, and ``--train``/``--val`` would make ``Boots/sub0`` one
    (a new user's probe, 2026-12-07: the docs called both "folder name")."""
    deeper = [p for p in inside if p.count("/") > 1]
    if deeper:
        n = len(deeper)
        images = f"{n} images lie below their" if n != 1 else "1 image lies below its"
        logging.getLogger("mlsctl").warning(
            f"{folder}: {images} class folder (e.g. "
            f"{deeper[0]}, of the class {deeper[0].split('/', 1)[0]}): --dataset imagenet takes the folder under the "
            f"split as the class, as ImageNet does; give --train/--val folders instead to make each image's own "
            f"folder its class")


def read_split(tree: Tree, split: str) -> ClassificationSplit:
    base = find_base(tree, BASES, (split,))
    if base is None:
        raise missing("an ImageNet-style data set", tree, EXPECTED, SOURCE)
    folder = join(base, split)
    files = [p for p in tree.files(folder) if _is_image(p)]
    if not files:
        raise UserError(f"{tree.location(folder)} holds no images")
    inside = [p[len(folder) + 1:] for p in files]
    if all("/" in p for p in inside):
        labels = [p.split("/", 1)[0] for p in inside]
        deeper_note(tree.location(folder), inside)
        return ClassificationSplit("imagenet", split, tree, files, labels, f"class folders at '{folder}'")
    train_dir = join(base, "train")
    class_names = sorted({p[len(train_dir) + 1:].split("/", 1)[0] for p in tree.files(train_dir)
                          if "/" in p[len(train_dir) + 1:]})
    table = _split_file_labels(tree, base, split, class_names)
    if table is None:
        raise UserError(f"{tree.location(folder)} holds images outside class folders and no split file labels them; "
                        f"add {join(base, split + '.txt')} ('<file> <label>' lines) or sort them into class folders")
    unlabelled = [p for p in files if p.rsplit("/", 1)[-1] not in table]
    if unlabelled:
        raise UserError(f"the split file of {tree.location(folder)} has no label for {len(unlabelled)} images "
                        f"(first: {unlabelled[0]})")
    labels = [table[p.rsplit("/", 1)[-1]] for p in files]
    return ClassificationSplit("imagenet", split, tree, files, labels, f"flat '{folder}' with a split file")
