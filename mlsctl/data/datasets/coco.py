"""COCO-Stuff 164k (Caesar et al.) semantic maps, coarsened as the unsupervised-segmentation papers do.

Layout (under ``--root``, a folder or an archive; the COCO-Stuff README's setup)::

    [cocostuff/]images/{train2017,val2017}/<id>.jpg          train2017.zip, val2017.zip
    [cocostuff/]annotations/{train2017,val2017}/<id>.png     stuffthingmaps_trainval2017.zip

(``annotations/stuffthingmaps_trainval2017/{train2017,val2017}`` is read too). The maps store
the *fine* class index = COCO-Stuff id − 1: 0–90 things (80 of them annotated), 91–181 stuff,
255 unlabeled. Each fine class belongs to one COCO supercategory (:data:`THING_GROUPS`,
:data:`STUFF_GROUPS`; COCO's and COCO-Stuff's category tables).

* ``coco-stuff`` — COCO-Stuff-27 (PiCIE, STEGO): the 171 annotated fine classes merged into their
  27 supercategories, 12 of things then 15 of stuff, in the order of :data:`COARSE_27`;
  255 (unlabeled) ignored.
* ``coco-things`` — Hummingbird/Leopart's COCO-Things: the 12 thing supercategories in
  alphabetical order (:data:`THINGS_12`); stuff and unlabeled pixels ignored.

Splits: ``train`` (train2017, 118k) and ``val`` (val2017, 5k). The curated subsets of PiCIE/STEGO
(``Coco164kFull_Stuff_Coarse.txt``) are not applied: every image with a map is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlsctl.data.archive import Tree
from mlsctl.data.datasets import IGNORE, SegmentationSplit, check_files, find_base, join, lookup_table, missing

# COCO id ranges of each thing supercategory (ids 1-91; the 11 ids without masks included)
THING_GROUPS = {"person": range(1, 2), "vehicle": range(2, 10), "outdoor": range(10, 16), "animal": range(16, 26),
                "accessory": range(26, 34), "sports": range(34, 44), "kitchen": range(44, 52),
                "food": range(52, 62), "furniture": range(62, 72), "electronic": range(72, 78),
                "appliance": range(78, 84), "indoor": range(84, 92)}
# COCO-Stuff ids (92-182) of each stuff supercategory
STUFF_GROUPS = {
    "textile": (92, 93, 104, 105, 109, 131, 137, 141, 152, 167, 168),
    "plant": (94, 97, 119, 124, 129, 134, 142, 163, 169),
    "building": (95, 96, 128, 151, 158, 166),
    "furniture": (98, 107, 108, 110, 112, 123, 130, 133, 156, 161, 165),
    "structural": (99, 113, 138, 146, 164),
    "rawmaterial": (100, 132, 139, 143),
    "floor": (101, 114, 115, 116, 117, 118),
    "ceiling": (102, 103),
    "sky": (106, 157),
    "ground": (111, 125, 126, 136, 140, 144, 145, 147, 149, 154, 159),
    "water": (120, 148, 155, 178, 179),
    "food": (121, 122, 153, 170),
    "solid": (127, 135, 150, 160, 162, 182),
    "wall": tuple(range(171, 178)),
    "window": (180, 181),
}
COARSE_27 = tuple(f"{g}-things" for g in ("electronic", "appliance", "food", "furniture", "indoor", "kitchen",
                                           "accessory", "animal", "outdoor", "person", "sports", "vehicle")) + \
    tuple(f"{g}-stuff" for g in ("ceiling", "floor", "food", "furniture", "rawmaterial", "textile", "wall", "window",
                                 "building", "ground", "plant", "sky", "solid", "structural", "water"))
THINGS_12 = tuple(sorted(THING_GROUPS))
SPLITS = ("train", "val")
DEFAULT_SPLITS = ("train", "val")
SOURCE = ("http://images.cocodataset.org/zips/{train2017,val2017}.zip and "
          "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip")
EXPECTED = "images/{train2017,val2017}/*.jpg and annotations/{train2017,val2017}/*.png (stuffthingmaps)"
BASES = ("", "cocostuff", "coco", "coco_stuff164k", "dataset")
ANNOTATION_DIRS = ("annotations", "annotations/stuffthingmaps_trainval2017", "stuffthingmaps_trainval2017")


def fine_to_coarse_27() -> dict[int, int]:
    """Fine index (COCO-Stuff id − 1) → COCO-Stuff-27 class."""
    out = {}
    for group, ids in THING_GROUPS.items():
        out.update({i - 1: COARSE_27.index(f"{group}-things") for i in ids})
    for group, ids in STUFF_GROUPS.items():
        out.update({i - 1: COARSE_27.index(f"{group}-stuff") for i in ids})
    return out


def fine_to_things_12() -> dict[int, int]:
    """Fine index → COCO-Things class (thing supercategories, alphabetical); stuff ignored."""
    out = {i - 1: THINGS_12.index(group) for group, ids in THING_GROUPS.items() for i in ids}
    out.update({i - 1: IGNORE for ids in STUFF_GROUPS.values() for i in ids})
    return out


@dataclass(frozen=True)
class CocoProtocol:
    name: str
    classes: tuple
    fine_to_class: callable
    rule: str
    SPLITS: tuple = SPLITS
    DEFAULT_SPLITS: tuple = DEFAULT_SPLITS

    def read_split(self, tree: Tree, split: str) -> SegmentationSplit:
        base = find_base(tree, BASES, ("images",))
        annotations = None if base is None else next(
            (join(base, d, f"{split}2017") for d in ANNOTATION_DIRS if tree.is_dir(join(base, d, f"{split}2017"))), None)
        if base is None or annotations is None:
            raise missing(f"COCO-Stuff ({self.name})", tree, EXPECTED, SOURCE)
        images_dir = join(base, "images", f"{split}2017")
        images = [p for p in tree.files(images_dir) if p.lower().endswith(".jpg")]
        masks = [join(annotations, p[len(images_dir) + 1:-4] + ".png") for p in images]
        check_files(tree, images, masks, f"COCO {split}2017")
        fine = self.fine_to_class()
        lookup = lookup_table({**fine, IGNORE: IGNORE})
        mapping = {"stored": "fine index = COCO-Stuff id - 1 (0-90 things, 91-181 stuff), 255 unlabeled",
                   "rule": self.rule, "fine_to_class": {str(k): v for k, v in sorted(fine.items())},
                   "ignored_values": [IGNORE] + sorted(k for k, v in fine.items() if v == IGNORE)}
        return SegmentationSplit(self.name, split, tree, base, images, masks, list(self.classes), lookup, mapping,
                                 f"COCO-Stuff 164k stuffthingmaps at '{annotations}'")


STUFF = CocoProtocol("coco-stuff", COARSE_27, fine_to_coarse_27,
                     "171 fine classes -> their 27 supercategories (COCO-Stuff-27 of PiCIE/STEGO); 255 ignored")
THINGS = CocoProtocol("coco-things", THINGS_12, fine_to_things_12,
                      "thing classes -> their 12 supercategories in alphabetical order (Leopart/Hummingbird "
                      "COCO-Things); stuff and 255 ignored")
