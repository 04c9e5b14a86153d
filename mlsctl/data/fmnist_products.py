"""``fmnist-products``: an object-retrieval benchmark built from real Fashion-MNIST items.

Each *object* is one Fashion-MNIST item, "photographed" ``photos`` times (default 8): every photo
places the item at its own scale (45-85% of the canvas), position, rotation (±30°) and tint (the
object's colour, jittered in hue, saturation and brightness), over its own background (flat,
gradient, blobs, stripes or checkers, with sensor noise) with 0-2 smaller distractor items of
other classes or instances behind it. Training objects come from the Fashion-MNIST training split,
evaluation objects from its test split; an evaluation object's photos are split into disjoint
gallery and query photos (default 4 + 4). Output::

    OUT/meta.json                  format_version, generator, parameters, class names
    OUT/train/<object_id>/NN.png   training objects (one folder per object; what MILE trains on)
    OUT/gallery/<object_id>/NN.png evaluation objects, gallery photos
    OUT/query/<object_id>/NN.png   the same objects, other photos (the queries)
    OUT/objects.jsonl              per object: id, split, class, source index, colour

With ``layout="sop"`` (the Stanford Online Products protocol of deep metric learning: every object
is a class, training and test objects are disjoint), the evaluation objects' photos are not split:
``OUT/test/<object_id>/NN.png`` holds all of them (``train/`` is unchanged). The photos are the same
pixels in both layouts (same seeds), only their folders differ.

Every photo is drawn from its own RNG seeded by ``(seed, split, object, photo)``: a build is
deterministic for a seed, and running it again with the same parameters does nothing.
"""

from __future__ import annotations

import colorsys
import json
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

from mlsctl import atomic
from mlsctl.data.fmnist import (CLASSES, background, building, built_as_asked,
                                check_out_outside_others, fmnist_source, load_split, replace_folder, reusable_build)
from mlsctl.errors import UserError
from mlsctl.locks import FolderLock

PRODUCTS_FORMAT_VERSION = 1
_SPLIT_CODES = {"train": 0, "eval": 1}


def _item_layer(item: np.ndarray, side: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """A 28x28 Fashion-MNIST item scaled to ``side`` and rotated: (intensity, alpha) in 0..1."""
    image = Image.fromarray(item).resize((side, side), Image.BILINEAR).rotate(angle, Image.BILINEAR, expand=False)
    intensity = np.asarray(image, dtype=np.float64) / 255.0
    return intensity, np.clip((intensity - 0.02) / 0.08, 0, 1)


def _paste(canvas: np.ndarray, intensity: np.ndarray, alpha: np.ndarray, colour: np.ndarray, x0: int, y0: int) -> None:
    """Alpha-blend a tinted item into ``canvas`` at (x0, y0), clipped to the canvas."""
    size = canvas.shape[0]
    side = intensity.shape[0]
    ys, xs = slice(max(0, y0), min(size, y0 + side)), slice(max(0, x0), min(size, x0 + side))
    iy, ix = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    rgb = colour * (0.35 + 0.65 * intensity[iy, ix])[..., None]
    a = alpha[iy, ix][..., None]
    canvas[ys, xs] = a * rgb + (1 - a) * canvas[ys, xs]


def _jitter(colour_hsv: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    h, s, v = colour_hsv
    h = (h + rng.uniform(-0.04, 0.04)) % 1.0
    s = float(np.clip(s * rng.uniform(0.8, 1.15), 0, 1))
    v = float(np.clip(v * rng.uniform(0.75, 1.15), 0, 1))
    return np.array(colorsys.hsv_to_rgb(h, s, v))


def make_photo(rng: np.random.Generator, item: np.ndarray, colour_hsv: tuple[float, float, float],
               pool: np.ndarray, size: int) -> np.ndarray:
    """One photo of an object: RGB uint8 [size, size, 3]."""
    canvas = background(rng, size)
    for _ in range(int(rng.integers(0, 3))):  # distractors, behind the object
        other = pool[int(rng.integers(0, len(pool)))]
        side = int(round(rng.uniform(0.25, 0.4) * size))
        intensity, alpha = _item_layer(other, side, rng.uniform(-30, 30))
        colour = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.3, 1), rng.uniform(0.5, 1)))
        _paste(canvas, intensity, alpha, colour, int(rng.integers(-side // 4, size - 3 * side // 4)),
               int(rng.integers(-side // 4, size - 3 * side // 4)))
    side = int(round(rng.uniform(0.45, 0.85) * size))
    intensity, alpha = _item_layer(item, side, rng.uniform(-30, 30))
    x0 = int(rng.integers(-side // 8, size - 7 * side // 8 + 1))
    y0 = int(rng.integers(-side // 8, size - 7 * side // 8 + 1))
    _paste(canvas, intensity, alpha, _jitter(colour_hsv, rng), x0, y0)
    return np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)


def _object_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    return float(rng.uniform(0, 1)), float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.55, 1.0))


LAYOUTS = ("retrieval", "sop")


def _objects(prefix: str) -> atomic.Layout:
    return {prefix + r"\d{5,}": {r"\d{2,}\.png": None}}  # {tr,ev}{i:05d}/{k:02d}.png


_PARTS = {"retrieval": {"train": _objects("tr"), "gallery": _objects("ev"), "query": _objects("ev")},
          "sop": {"train": _objects("tr"), "test": _objects("ev")}}


def products_layout(meta: dict) -> atomic.Layout:
    """What an fmnist-products build of this meta record wrote (:func:`_build_products`), by its layout
    (``parameters.layout``, ``retrieval`` when absent): for :func:`~mlsctl.data.fmnist.refuse_foreign`."""
    params = meta.get("parameters") if isinstance(meta.get("parameters"), dict) else {}
    parts = _PARTS["sop" if params.get("layout") == "sop" else "retrieval"]
    return {r"meta\.json": None, r"objects\.jsonl": None, **parts}


def build_products(out: str | Path, n_train: int = 1000, n_eval: int = 200, photos: int = 8, gallery_photos: int = 4,
                   size: int = 64, seed: int = 0, source: Optional[str | Path] = None, overwrite: bool = False,
                   progress: bool = True, layout: str = "retrieval") -> dict:
    """Build fmnist-products into ``out`` from the Fashion-MNIST files in ``source`` (default:
    :func:`~mlsctl.data.fmnist.fmnist_source`); returns the meta record. Idempotent for equal parameters."""
    source = fmnist_source() if source is None else source
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout} is not one of {', '.join(LAYOUTS)}")
    if photos < 2:
        raise UserError(f"--photos must be at least 2 (gallery and query photos are disjoint), got {photos}")
    if layout == "sop":
        gallery_photos = min(gallery_photos, photos - 1)  # unused: every evaluation photo goes to test/
    if not 1 <= gallery_photos < photos:
        raise UserError(f"--gallery-photos ({gallery_photos}; 4 when not given) must be between 1 and --photos - 1 "
                        f"({photos - 1}): give --gallery-photos {max(1, photos // 2)} with --photos {photos}")
    if size < 32:
        raise UserError(f"--size must be at least 32 pixels, got {size}")
    if n_train < 1 or n_eval < 2:
        raise UserError("--n-train must be at least 1 and --n-eval at least 2")
    out = atomic.followed(out)  # a link's target is rebuilt, the link kept
    check_out_outside_others(out)
    params = {"n_train": n_train, "n_eval": n_eval, "photos": photos, "gallery_photos": gallery_photos,
              "size": size, "seed": seed}
    if layout != "retrieval":  # builds of the default layout keep the parameters they always had
        params["layout"] = layout
    as_is = built_as_asked(out, "fmnist-products", params, overwrite)
    if as_is is not None:  # nothing to write: no lock (a data set on a read-only mount is reused; a review)
        return as_is
    with FolderLock(out, "the data set", beside=True):
        existing = reusable_build(out, "fmnist-products", params, overwrite, products_layout)
        return existing if existing is not None else _build_products(out, params, layout, source, progress)


def _build_products(out: Path, params: dict, layout: str, source, progress: bool) -> dict:
    from tqdm import tqdm

    n_train, n_eval, photos, gallery_photos, size, seed = (
        params[key] for key in ("n_train", "n_eval", "photos", "gallery_photos", "size", "seed"))
    with building(out) as tmp:
        records = []
        for split, fmnist_split, n in (("train", "train", n_train), ("eval", "test", n_eval)):
            images, labels = load_split(source, fmnist_split)
            if n > len(images):
                raise UserError(f"--n-{split} {n} exceeds the {len(images)} items of the Fashion-MNIST {fmnist_split} split")
            chosen = np.random.default_rng([seed, _SPLIT_CODES[split]]).choice(len(images), size=n, replace=False)
            for i in tqdm(range(n), desc=f"fmnist-products {split}", unit="object", disable=None if progress else True,
                          leave=False):
                index = int(chosen[i])
                object_id = f"{'tr' if split == 'train' else 'ev'}{i:05d}"
                colour = _object_colour(np.random.default_rng([seed, _SPLIT_CODES[split], i, 10_000]))
                for k in range(photos):
                    rng = np.random.default_rng([seed, _SPLIT_CODES[split], i, k])
                    photo = make_photo(rng, images[index], colour, images, size)
                    part = "train" if split == "train" else "test" if layout == "sop" else (
                        "gallery" if k < gallery_photos else "query")
                    folder = tmp / part / object_id
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(photo, mode="RGB").save(folder / f"{k:02d}.png")
                records.append({"object_id": object_id, "split": split, "class": int(labels[index]),
                                "class_name": CLASSES[int(labels[index])], "source_index": index,
                                "colour_hsv": [round(c, 3) for c in colour]})
        (tmp / "objects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        splits = ({"train": "Fashion-MNIST train", "test": "Fashion-MNIST test (t10k), every photo of each evaluation object"}
                  if layout == "sop" else
                  {"train": "Fashion-MNIST train", "gallery": "Fashion-MNIST test (t10k)",
                   "query": "Fashion-MNIST test (t10k), other photos of the gallery objects"})
        meta = {"format_version": PRODUCTS_FORMAT_VERSION, "generator": "fmnist-products", "parameters": params,
                "source": str(source), "classes": CLASSES, "splits": splits}
        atomic.write_json(tmp / "meta.json", meta)
        replace_folder(tmp, out, "fmnist-products", products_layout)
    return meta
