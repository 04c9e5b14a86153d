"""Cityscapes, fine annotations (Cordts et al.), with the official label-id -> train-id map.

Layout (under ``--root``, the folder or an archive of it; ``gtFine_trainvaltest.zip`` and
``leftImg8bit_trainvaltest.zip`` unpacked into one folder)::

    [cityscapes/]leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    [cityscapes/]gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Splits: ``train`` (2,975 images) and ``val`` (500). The ``*_gtFine_labelIds.png`` masks store the
label *ids* 0–33 of ``cityscapesScripts/helpers/labels.py``; the benchmark scores the 19 classes
with a *train id*. Mapping (:data:`LABELS`): the 19 evaluated ids become train ids 0–18; the
void ids (0 unlabeled, 1 ego vehicle, 2 rectification border, 3 out of roi, 4 static, 5 dynamic,
6 ground) and the ids ignored in evaluation (9 parking, 10 rail track, 14 guard rail, 15 bridge,
16 tunnel, 18 polegroup, 29 caravan, 30 trailer) become 255, ignored. (License plate, id -1, is
never stored in the PNGs.)
"""

from __future__ import annotations

from mlsctl.data.archive import Tree
from mlsctl.data.datasets import IGNORE, SegmentationSplit, check_files, find_base, join, lookup_table, missing

# (label id, name, train id): cityscapesScripts' table; 255 = not evaluated
LABELS = (
    (0, "unlabeled", IGNORE), (1, "ego vehicle", IGNORE), (2, "rectification border", IGNORE),
    (3, "out of roi", IGNORE), (4, "static", IGNORE), (5, "dynamic", IGNORE), (6, "ground", IGNORE),
    (7, "road", 0), (8, "sidewalk", 1), (9, "parking", IGNORE), (10, "rail track", IGNORE), (11, "building", 2),
    (12, "wall", 3), (13, "fence", 4), (14, "guard rail", IGNORE), (15, "bridge", IGNORE), (16, "tunnel", IGNORE),
    (17, "pole", 5), (18, "polegroup", IGNORE), (19, "traffic light", 6), (20, "traffic sign", 7),
    (21, "vegetation", 8), (22, "terrain", 9), (23, "sky", 10), (24, "person", 11), (25, "rider", 12),
    (26, "car", 13), (27, "truck", 14), (28, "bus", 15), (29, "caravan", IGNORE), (30, "trailer", IGNORE),
    (31, "train", 16), (32, "motorcycle", 17), (33, "bicycle", 18),
)
CLASSES = tuple(name for _, name, train_id in sorted(LABELS, key=lambda x: x[2]) if train_id != IGNORE)
SPLITS = ("train", "val")
DEFAULT_SPLITS = ("train", "val")
SOURCE = "https://www.cityscapes-dataset.com/downloads/ (gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip, after registering)"
EXPECTED = "cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/"
IMAGE_SUFFIX, MASK_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png"
MAPPING = {"stored": "label ids 0-33 (cityscapesScripts labels.py)",
           "rule": "label id -> train id 0-18; void and not-evaluated ids -> 255",
           "label_id_to_train_id": {str(i): t for i, _, t in LABELS},
           "ignored_values": [i for i, _, t in LABELS if t == IGNORE]}


def read_split(tree: Tree, split: str) -> SegmentationSplit:
    base = find_base(tree, ("", "cityscapes"), ("leftImg8bit", "gtFine"))
    if base is None:
        raise missing("Cityscapes", tree, EXPECTED, SOURCE)
    images_dir = join(base, "leftImg8bit", split)
    images = [p for p in tree.files(images_dir) if p.endswith(IMAGE_SUFFIX)]
    masks = [join(base, "gtFine", split, p[len(images_dir) + 1:-len(IMAGE_SUFFIX)] + MASK_SUFFIX) for p in images]
    check_files(tree, images, masks, f"Cityscapes {split}")
    lookup = lookup_table({i: t for i, _, t in LABELS})
    return SegmentationSplit("cityscapes", split, tree, base, images, masks, list(CLASSES), lookup, dict(MAPPING),
                             f"Cityscapes gtFine at '{base or '.'}'")
