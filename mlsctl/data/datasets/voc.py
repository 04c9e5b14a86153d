"""Pascal VOC 2012 segmentation (Everingham et al.), as read by the Hummingbird protocol.

Layouts (found under ``--root``, which may be the folder or ``VOCtrainval_11-May-2012.tar``):

* official: ``[VOCdevkit/]VOC2012/`` with ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
  and ``ImageSets/Segmentation/{train,val,trainval}.txt``; the augmented training set adds
  ``SegmentationClassAug/<id>.png`` (SBD, Hariharan et al., as converted for DeepLab) and
  ``ImageSets/Segmentation/trainaug.txt`` (10,582 ids; ``train_aug.txt`` and ``aug.txt`` are
  read too);
* Hummingbird's ``VOCSegmentation/``: ``images/<id>.jpg``, ``SegmentationClass/``,
  ``SegmentationClassAug/``, ``sets/{train,trainaug,val}.txt``; as open-hummingbird-eval does,
  ``train`` and ``trainaug`` take their masks from ``SegmentationClassAug``.

Masks are palette PNGs (``SegmentationClass``) or grey PNGs (``SegmentationClassAug``) whose
stored index is the class: 0 background, 1–20 the object classes, 255 the 5-pixel "void" border
and difficult regions, which is not scored. Mapping: identity on 0–20, 255 ignored, any other
value refused.
"""

from __future__ import annotations

import numpy as np

from mlsctl.data.archive import Tree
from mlsctl.data.datasets import (IGNORE, SegmentationSplit, check_files, find_base, join, lookup_table, missing,
                                  read_lines)
from mlsctl.errors import UserError

CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
           "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
SPLITS = ("train", "val", "trainval", "trainaug")
DEFAULT_SPLITS = ("trainaug", "val")
SOURCE = ("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar (plus SegmentationClassAug "
          "and trainaug.txt for --split trainaug)")
EXPECTED = ("VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation} or Hummingbird's "
            "VOCSegmentation/{images,SegmentationClass,SegmentationClassAug,sets}")
OFFICIAL_BASES = ("", "VOC2012", "VOCdevkit/VOC2012")
HUMMINGBIRD_BASES = ("", "VOCSegmentation")
TRAINAUG_LISTS = ("trainaug.txt", "train_aug.txt", "aug.txt")
MAPPING = {"stored": "palette index 0-20 = class id, 255 = void border",
           "rule": "identity on 0-20; 255 ignored", "ignored_values": [255]}


def palette() -> list[int]:
    """The VOC colour map (768 values): class c gets the colour whose bits interleave c's bits."""
    colours = []
    for index in range(256):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours += [r, g, b]
    return colours


def _layout(tree: Tree) -> tuple[str, str]:
    base = find_base(tree, OFFICIAL_BASES, ("JPEGImages", "ImageSets/Segmentation"))
    if base is not None:
        return "official", base
    base = find_base(tree, HUMMINGBIRD_BASES, ("images", "sets"))
    if base is not None:
        return "hummingbird", base
    raise missing("Pascal VOC 2012", tree, EXPECTED, SOURCE)


def _split_list(tree: Tree, kind: str, base: str, split: str) -> str:
    folder = join(base, "ImageSets/Segmentation") if kind == "official" else join(base, "sets")
    names = TRAINAUG_LISTS if split == "trainaug" else (f"{split}.txt",)
    for name in names:
        if tree.is_file(join(folder, name)):
            return join(folder, name)
    hint = " (the SBD-augmented list; or use --split train)" if split == "trainaug" else ""
    raise UserError(f"{tree.location(folder)} has no {names[0]}{hint}")


def read_split(tree: Tree, split: str) -> SegmentationSplit:
    kind, base = _layout(tree)
    ids = sorted(set(read_lines(tree, _split_list(tree, kind, base, split))))
    images_dir = join(base, "JPEGImages" if kind == "official" else "images")
    augmented = split == "trainaug" or (kind == "hummingbird" and split == "train")
    masks_dir = join(base, "SegmentationClassAug" if augmented else "SegmentationClass")
    if not tree.is_dir(masks_dir):
        raise UserError(f"{tree.location(masks_dir)} is missing: the {split} split of Pascal VOC needs it"
                        + (" (SBD masks as converted for DeepLab)" if augmented else ""))
    images = [join(images_dir, f"{i}.jpg") for i in ids]
    masks = [join(masks_dir, f"{i}.png") for i in ids]
    check_files(tree, images, masks, f"Pascal VOC {split}")
    lookup = lookup_table({**{c: c for c in range(len(CLASSES))}, IGNORE: IGNORE})
    layout = f"{'official VOC2012' if kind == 'official' else 'Hummingbird VOCSegmentation'} at '{base or '.'}'"
    return SegmentationSplit("voc", split, tree, base, images, masks, list(CLASSES), lookup, dict(MAPPING), layout)


def label_image(mask: np.ndarray):
    """A mask as the original stores it: a palette PNG with the VOC colours (for tests and tools)."""
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette())
    return image
