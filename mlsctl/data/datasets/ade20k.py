"""ADE20K, the SceneParsing benchmark release (Zhou et al., ``ADEChallengeData2016``).

Layout (under ``--root``, the folder or ``ADEChallengeData2016.zip``)::

    [ADEChallengeData2016/]images/{training,validation}/ADE_{train,val}_XXXXXXXX.jpg
    [ADEChallengeData2016/]annotations/{training,validation}/ADE_{train,val}_XXXXXXXX.png

Splits: ``train`` (training, 20,210 images) and ``val`` (validation, 2,000). Annotations are
grey PNGs: 0 is "other objects" (pixels outside the 150 classes), 1–150 the classes of
``objectInfo150``. Mapping (the benchmark's, mmsegmentation's ``reduce_zero_label``): 0 is
ignored, stored value v becomes class v − 1, so the 150 classes are 0–149. open-hummingbird-eval
keeps 151 classes and passes 0 as the ignore index to its metric: the scored pixels are the same,
but its mean runs over 151 classes (the ignored one scores 0) and its memory keeps "other" patches
(docs/methods.md#eval-knn-seg).
"""

from __future__ import annotations

from mlsctl.data.archive import Tree
from mlsctl.data.datasets import IGNORE, SegmentationSplit, check_files, find_base, join, lookup_table, missing

CLASSES = ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
           "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
           "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
           "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
           "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
           "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
           "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
           "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
           "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
           "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
           "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
           "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
           "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
           "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
           "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
           "glass", "clock", "flag")
SPLITS = ("train", "val")
DEFAULT_SPLITS = ("train", "val")
FOLDERS = {"train": "training", "val": "validation"}
SOURCE = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
EXPECTED = "ADEChallengeData2016/{images,annotations}/{training,validation}"
MAPPING = {"stored": "0 = other objects, 1-150 = the classes of objectInfo150",
           "rule": "0 ignored; v -> v - 1 (reduce_zero_label)", "ignored_values": [0]}


def read_split(tree: Tree, split: str) -> SegmentationSplit:
    base = find_base(tree, ("", "ADEChallengeData2016"), ("images", "annotations"))
    if base is None:
        raise missing("ADE20K", tree, EXPECTED, SOURCE)
    folder = FOLDERS[split]
    images_dir = join(base, "images", folder)
    images = [p for p in tree.files(images_dir) if p.lower().endswith(".jpg")]
    masks = [join(base, "annotations", folder, p[len(images_dir) + 1:-4] + ".png") for p in images]
    check_files(tree, images, masks, f"ADE20K {split} ({folder})")
    lookup = lookup_table({0: IGNORE, **{v: v - 1 for v in range(1, len(CLASSES) + 1)}})
    return SegmentationSplit("ade20k", split, tree, base, images, masks, list(CLASSES), lookup, dict(MAPPING),
                             f"ADEChallengeData2016 at '{base or '.'}'")
