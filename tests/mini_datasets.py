"""Miniature copies of the benchmarks in their official layouts, as folders and as archives.

Each builder writes a handful of small images with masks stored the way the original stores them
(VOC: palette PNGs with the VOC colour map and a 255 border, SegmentationClassAug as grey PNGs,
split lists; ADE20K: grey PNGs 0-150; Cityscapes: ``*_gtFine_labelIds.png`` beside the colour,
instance and polygon files; COCO-Stuff: stuffthingmaps with fine indices and 255; ImageNet:
class folders, or a flat val/ with a split file). An image is the colour of its mask's classes
plus noise, so features carry the labels. The special values each protocol maps are always
present, so tests can pin their mapping.
"""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (40, 32)  # width, height: not square, as the originals are not


def _colour_image(labels: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """RGB pixels whose colour is a fixed function of the label, plus a little noise."""
    table = np.random.default_rng(1234).uniform(30, 225, (256, 3))
    pixels = table[np.clip(labels, 0, 255)] + rng.normal(0, 6, (*labels.shape, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _blocks(rng: np.random.Generator, values: list[int], background: int, size=SIZE) -> np.ndarray:
    """A mask of ``background`` with one rectangle per value of ``values``."""
    w, h = size
    mask = np.full((h, w), background, dtype=np.int64)
    for k, value in enumerate(values):
        top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        mask[top:top + h // 2, left:left + w // 2 - k] = value
    return mask


def _save_grey(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(path)


def _save_jpeg(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)


# ------------------------------------------------------------------------------------------------ VOC

VOC_TRAIN = ["2007_000032", "2007_000039", "2007_000063", "2007_000068"]
VOC_VAL = ["2007_000033", "2007_000042", "2007_000061"]
VOC_AUG_ONLY = ["2008_000002", "2008_000003"]  # SBD images outside the VOC segmentation lists


def _voc_mask(rng: np.random.Generator, index: int, size=SIZE) -> np.ndarray:
    """Background, two objects, and VOC's 255 'void' ring around the first."""
    first, second = 1 + index % 20, 1 + (index * 7 + 3) % 20
    mask = _blocks(rng, [first, second], 0, size)
    ys, xs = np.nonzero(mask == first)
    top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
    mask[max(top - 1, 0), left:right + 1] = 255
    mask[min(bottom + 1, size[1] - 1), left:right + 1] = 255
    return mask


def make_voc(root: Path, layout: str = "official", extra: tuple[int, int] = (0, 0), size=SIZE) -> Path:
    """``root/VOCdevkit/VOC2012`` (official) or ``root/VOCSegmentation`` (Hummingbird's); ``extra``
    adds that many (train, val) images of ``size`` (for benchmarks)."""
    from mlsctl.data.datasets.voc import label_image

    rng = np.random.default_rng(0)
    base = root / ("VOCdevkit/VOC2012" if layout == "official" else "VOCSegmentation")
    images_dir = base / ("JPEGImages" if layout == "official" else "images")
    lists = base / ("ImageSets/Segmentation" if layout == "official" else "sets")
    lists.mkdir(parents=True, exist_ok=True)
    train = VOC_TRAIN + [f"2009_{i:06d}" for i in range(extra[0])]
    val = VOC_VAL + [f"2010_{i:06d}" for i in range(extra[1])]
    for index, name in enumerate(train + val + VOC_AUG_ONLY):
        mask = _voc_mask(rng, index, size)
        _save_jpeg(_colour_image(mask, rng), images_dir / f"{name}.jpg")
        if name not in VOC_AUG_ONLY:
            (base / "SegmentationClass").mkdir(exist_ok=True)
            label_image(mask).save(base / "SegmentationClass" / f"{name}.png")
        _save_grey(mask, base / "SegmentationClassAug" / f"{name}.png")
    (lists / "train.txt").write_text("\n".join(train) + "\n")
    (lists / "val.txt").write_text("\n".join(val) + "\n")
    if layout == "official":
        (lists / "trainval.txt").write_text("\n".join(sorted(train + val)) + "\n")
    (lists / "trainaug.txt").write_text("\n".join(train + VOC_AUG_ONLY) + "\n")
    return root


# --------------------------------------------------------------------------------------------- ADE20K


def make_ade20k(root: Path, n_train: int = 4, n_val: int = 3) -> Path:
    """``root/ADEChallengeData2016/{images,annotations}/{training,validation}``; every mask has 0 and 150."""
    rng = np.random.default_rng(1)
    base = root / "ADEChallengeData2016"
    for folder, prefix, n in (("training", "ADE_train", n_train), ("validation", "ADE_val", n_val)):
        for i in range(1, n + 1):
            mask = _blocks(rng, [150, 1 + (i * 13) % 149], 0)
            mask[-2:, :] = 1 + (i * 5) % 150
            _save_jpeg(_colour_image(mask, rng), base / "images" / folder / f"{prefix}_{i:08d}.jpg")
            _save_grey(mask, base / "annotations" / folder / f"{prefix}_{i:08d}.png")
    (base / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n1\t0.1576\t11664\t1172\twall\n")
    return root


# ----------------------------------------------------------------------------------------- Cityscapes

CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"]}


def make_cityscapes(root: Path) -> Path:
    """``root/cityscapes/{leftImg8bit,gtFine}/{train,val}/<city>/``; masks hold void, ignored and evaluated ids."""
    rng = np.random.default_rng(2)
    base = root / "cityscapes"
    for split, cities in CITIES.items():
        for c, city in enumerate(cities):
            for frame in range(2):
                stem = f"{city}_{c:06d}_{frame * 19:06d}"
                mask = _blocks(rng, [26, 24, 9], 7)  # car, person, parking (ignored) on road
                mask[:, :2] = 0  # unlabeled
                mask[:2, :] = 1  # ego vehicle
                mask[-2:, -4:] = 33  # bicycle
                mask[-2:, :4] = 23  # sky
                _save_grey(mask, base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
                _save_grey(mask * 0 + 3, base / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
                Image.new("RGB", SIZE, (128, 64, 128)).save(base / "gtFine" / split / city / f"{stem}_gtFine_color.png")
                (base / "gtFine" / split / city / f"{stem}_gtFine_polygons.json").write_text(json.dumps({"objects": []}))
                image = _colour_image(mask, rng)
                (base / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
                image.save(base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
    return root


# -------------------------------------------------------------------------------------------- COCO-Stuff


def make_coco(root: Path, n_train: int = 4, n_val: int = 3) -> Path:
    """``root/cocostuff/images/{train,val}2017`` and ``annotations/{train,val}2017`` (stuffthingmaps)."""
    rng = np.random.default_rng(3)
    base = root / "cocostuff"
    image_id = 9
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            # person (fine 0), car (2), banner (91: textile), tree (168: plant) on sky-other (156), unlabeled 255
            mask = _blocks(rng, [0, 2 if i % 2 else 91, 168], 156)
            mask[:2, :] = 255
            _save_jpeg(_colour_image(mask, rng), base / "images" / f"{split}2017" / f"{image_id:012d}.jpg")
            _save_grey(mask, base / "annotations" / f"{split}2017" / f"{image_id:012d}.png")
            image_id += 1
    return root


# -------------------------------------------------------------------------------------------- ImageNet

SYNSETS = ["n01440764", "n01443537", "n01484850"]


def make_imagenet(root: Path, flat_val: bool = False, per_class: int = 4) -> Path:
    """``root/train/<synset>/*.JPEG`` and ``root/val/<synset>/`` (or a flat ``val/`` with ``val.txt``)."""
    rng = np.random.default_rng(4)
    lines = []
    for c, synset in enumerate(SYNSETS):
        labels = np.full(SIZE[::-1], 40 * (c + 1))
        for k in range(per_class):
            _save_jpeg(_colour_image(labels, rng), root / "train" / synset / f"{synset}_{k}.JPEG")
        for k in range(2):
            name = f"ILSVRC2012_val_{c * 2 + k + 1:08d}.JPEG"
            _save_jpeg(_colour_image(labels, rng), root / "val" / ("" if flat_val else synset) / name)
            lines.append(f"{name} {c}")
    if flat_val:
        (root / "val.txt").write_text("\n".join(lines) + "\n")
    return root


# -------------------------------------------------------------------------------------------- archives


def make_tar(folder: Path, tar_path: Path) -> Path:
    """The contents of ``folder`` as an uncompressed tar, member names relative to it (``tar -C folder .``)."""
    with tarfile.open(tar_path, "w") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname="./" + path.relative_to(folder).as_posix(), recursive=False)
    return tar_path


def make_zip(folder: Path, zip_path: Path) -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, path.relative_to(folder).as_posix())
    return zip_path


def write_tiny_weights(path: Path, img_size: int = 32) -> Path:
    """The tiny randomly initialised test ViT (width 32, patch 8) as a weights file that records its
    architecture, which ``--weights`` reads without ``--model``."""
    from safetensors.torch import save_file

    from conftest import tiny_model

    spec = {"arch": "vit_small_patch16_224", "img_size": img_size, "patch_size": 8,
            "timm_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
    state = {k: v.contiguous() for k, v in tiny_model(img_size=img_size).backbone.model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"model": json.dumps(spec)})
    return path


BUILDERS = {"voc": make_voc, "ade20k": make_ade20k, "cityscapes": make_cityscapes, "coco-stuff": make_coco,
            "coco-things": make_coco}
