"""Benchmark data built from real Fashion-MNIST items.

``fmnist-scenes``: scene-centric RGB canvases (default 96x96) holding 2-5 Fashion-MNIST items
each, scaled, tinted and sometimes occluding one another, over varied backgrounds (flat colour,
gradients, smooth blobs, stripes, checkers, all with sensor noise). Train scenes draw items from
the Fashion-MNIST training split, val scenes from its test split. Output::

    OUT/meta.json                 format_version, parameters, class names
    OUT/{train,val}/images/*.png  RGB scenes
    OUT/{train,val}/masks/*.png   0 = background, 1..10 = item class + 1, 255 reserved for ignore
    OUT/{train,val}/scenes.jsonl  per scene: image, mask and its items (class, instance id,
                                  source index in the split, box, visible fraction, tint)

Every scene is drawn from its own RNG seeded by ``(seed, split, scene index)``, so a build is
deterministic for a seed. The build goes to a temporary sibling folder that is renamed into place
when complete; running it again with the same parameters does nothing.
"""

from __future__ import annotations

import os
import colorsys
import contextlib
import glob
import gzip
import json
import shutil
import socket
import struct
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from mlsctl import atomic
from mlsctl.data import DEFAULT_FMNIST_SOURCE, FMNIST_SOURCE_ENV
from mlsctl.errors import UserError
from mlsctl.locks import LOCK_NAME, FolderLock, abandoned_temporary

DEFAULT_SOURCE, SOURCE_ENV = DEFAULT_FMNIST_SOURCE, FMNIST_SOURCE_ENV


def fmnist_source() -> Path:
    """The folder of the Fashion-MNIST IDX files: ``$FMNIST_DIR``, else :data:`DEFAULT_SOURCE`."""
    return Path(os.environ.get(SOURCE_ENV) or DEFAULT_SOURCE)
CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
SCENES_FORMAT_VERSION = 1
IGNORE_INDEX = 255
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a download cut short: click took EOFError for Ctrl-D
        raise UserError(f"{path} is truncated or damaged ({exc}); reinstall dataset-fashion-mnist") from None
    if len(data) < 4:
        raise UserError(f"{path} is truncated; reinstall dataset-fashion-mnist")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; reinstall dataset-fashion-mnist")
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated; reinstall dataset-fashion-mnist")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated; reinstall dataset-fashion-mnist")
    return array.reshape(shape)


def _find(source: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (source / name).is_file():
            return source / name
    raise UserError(f"Fashion-MNIST file {stem}(.gz) not found in {source}: install the Debian package "
                    f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass --source DIR (or set FMNIST_DIR)")


def load_split(source: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 28, 28] uint8 and labels [n] of the 'train' or 'test' split."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"Fashion-MNIST not found at {source}: install the Debian package dataset-fashion-mnist "
                        f"(apt-get install dataset-fashion-mnist) or pass --source DIR (or set FMNIST_DIR)")
    image_stem, label_stem = _FILES[split]
    images, labels = _read_idx(_find(source, image_stem)), _read_idx(_find(source, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"Fashion-MNIST files in {source} do not match (images {images.shape}, labels {labels.shape})")
    return images, labels


# --------------------------------------------------------------------------------------------- drawing


def _random_colour(rng: np.random.Generator, saturation=(0.0, 1.0), value=(0.1, 1.0)) -> np.ndarray:
    h = rng.uniform(0, 1)
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value)))


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] floats in 0..1."""
    c1, c2 = _random_colour(rng), _random_colour(rng)
    yy, xx = np.mgrid[0:size, 0:size] / max(1, size - 1)
    kind = rng.integers(0, 5)
    if kind == 0:  # flat
        t = np.zeros((size, size))
    elif kind == 1:  # linear gradient in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(1e-6, t.max() - t.min())
    elif kind == 2:  # smooth blobs: upsampled low-resolution noise
        low = rng.uniform(0, 1, size=(4, 4)).astype(np.float32)
        t = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float64)
        t = np.clip((t - t.min()) / max(1e-6, t.max() - t.min()), 0, 1)
    elif kind == 3:  # stripes
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.08, 0.3)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
    else:  # checker
        cell = rng.uniform(0.08, 0.25)
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float64)
    image = (1 - t)[..., None] * c1 + t[..., None] * c2
    return np.clip(image + rng.normal(0, 0.02, size=image.shape), 0, 1)


def make_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, size: int,
               min_items: int = 2, max_items: int = 5, min_visible: float = 0.4):
    """One scene: (RGB uint8 [S,S,3], class mask uint8 [S,S], list of item records)."""
    canvas = background(rng, size)
    instance = np.zeros((size, size), dtype=np.int32)  # 0 = background, k = k-th placed item
    classes: dict[int, int] = {}
    records: list[dict] = []
    n_wanted = int(rng.integers(min_items, max_items + 1))
    for _ in range(n_wanted):
        for _attempt in range(20):
            source_index = int(rng.integers(0, len(images)))
            side = int(round(rng.uniform(0.3, 0.6) * size))
            item = np.asarray(Image.fromarray(images[source_index]).resize((side, side), Image.BILINEAR),
                              dtype=np.float64) / 255.0
            alpha = np.clip((item - 0.02) / 0.08, 0, 1)
            solid = alpha > 0.5
            if solid.sum() < 0.05 * side * side:
                continue
            x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
            window = (slice(y0, y0 + side), slice(x0, x0 + side))
            trial = instance.copy()
            new_id = len(records) + 1
            trial[window][solid] = new_id
            areas = [r["_area"] for r in records]
            visible = [(trial == r["instance_id"]).sum() / a for r, a in zip(records, areas)]
            if all(v >= min_visible for v in visible):
                break
        else:
            continue
        tint = _random_colour(rng, saturation=(0.3, 1.0), value=(0.5, 1.0))
        rgb = tint * (0.35 + 0.65 * item)[..., None]
        canvas[window] = alpha[..., None] * rgb + (1 - alpha[..., None]) * canvas[window]
        instance = trial
        label = int(labels[source_index])
        classes[new_id] = label
        ys, xs = np.nonzero(solid)
        records.append({
            "instance_id": new_id, "class": label, "class_name": CLASSES[label], "source_index": source_index,
            "box": [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1],
            "tint": [round(float(c), 3) for c in tint], "_area": int(solid.sum()),
        })
    mask = np.zeros((size, size), dtype=np.uint8)
    for instance_id, label in classes.items():
        mask[instance == instance_id] = label + 1
    for record in records:
        record["visible_fraction"] = round(float((instance == record["instance_id"]).sum() / record.pop("_area")), 3)
    image = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    return image, mask, records


# --------------------------------------------------------------------------------------------- build

_SPLITS = {"train": ("train", 0), "val": ("test", 1)}


def _build_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray, n: int, size: int, seed: int,
                 progress: bool) -> None:
    from tqdm import tqdm

    (out / split / "images").mkdir(parents=True)
    (out / split / "masks").mkdir(parents=True)
    lines = []
    code = _SPLITS[split][1]
    for i in tqdm(range(n), desc=f"fmnist-scenes {split}", unit="scene", disable=None if progress else True, leave=False):
        rng = np.random.default_rng([seed, code, i])
        image, mask, items = make_scene(rng, images, labels, size)
        name = f"{i:06d}.png"
        Image.fromarray(image, mode="RGB").save(out / split / "images" / name)
        Image.fromarray(mask, mode="L").save(out / split / "masks" / name)
        lines.append(json.dumps({"image": f"images/{name}", "mask": f"masks/{name}", "items": items}))
    (out / split / "scenes.jsonl").write_text("\n".join(lines) + "\n")


def build_scenes(out: str | Path, n_train: int = 2000, n_val: int = 500, size: int = 96, seed: int = 0,
                 source: Optional[str | Path] = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Build fmnist-scenes into ``out`` from the Fashion-MNIST files in ``source`` (default:
    :func:`fmnist_source`); returns the meta record. Idempotent for equal parameters."""
    source = fmnist_source() if source is None else source
    if size < 32:
        raise UserError(f"--size must be at least 32 pixels to hold items, got {size}")
    if n_train < 1 or n_val < 1:
        raise UserError("--n-train and --n-val must be at least 1")
    out = atomic.followed(out)  # a link's target is rebuilt, the link kept
    check_out_outside_others(out)
    params = {"n_train": n_train, "n_val": n_val, "size": size, "seed": seed}
    as_is = built_as_asked(out, "fmnist-scenes", params, overwrite, ("train/labels.csv", "val/labels.csv"))
    if as_is is not None:  # nothing to write: no lock (a data set on a read-only mount is reused; a review)
        return as_is
    with FolderLock(out, "the data set", beside=True):
        existing = reusable_build(out, "fmnist-scenes", params, overwrite, scenes_layout)
        if existing is not None:
            for split in ("train", "val"):  # a build of an older mlsctl gets its labels file
                if not (out / split / "labels.csv").is_file():
                    largest_item_labels(out / split)
            return existing
        splits = {name: load_split(source, fmnist_split) for name, (fmnist_split, _) in _SPLITS.items()}
        return _build_scenes(out, splits, params, source, progress)


def _build_scenes(out: Path, splits: dict, params: dict, source, progress: bool) -> dict:
    n_train, n_val, size, seed = (params[key] for key in ("n_train", "n_val", "size", "seed"))
    with building(out) as tmp:
        for split, n in (("train", n_train), ("val", n_val)):
            images, labels = splits[split]
            _build_split(tmp, split, images, labels, n, size, seed, progress)
            largest_item_labels(tmp / split)
        meta = {"format_version": SCENES_FORMAT_VERSION, "generator": "fmnist-scenes", "parameters": params,
                "source": str(source), "classes": ["background", *CLASSES], "ignore_index": IGNORE_INDEX,
                "splits": {"train": "Fashion-MNIST train", "val": "Fashion-MNIST test (t10k)"}}
        atomic.write_json(tmp / "meta.json", meta)
        replace_folder(tmp, out, "fmnist-scenes", scenes_layout)
    return meta


@contextlib.contextmanager
def building(out: Path):
    """A folder of its own for this process to build ``out`` in (``.NAME.building-PID`` beside it),
    removed when the build fails or is stopped; those of builds killed before (dead processes) go too.
    Two builds of one ``out`` at once no longer delete each other's files (a probe, 2026-12-06)."""
    prefix = f".{out.name}.building"
    for stale in out.parent.glob(f"{glob.escape(prefix)}*"):
        if abandoned_temporary(stale.name, prefix) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{prefix}-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def largest_item_labels(split: Path) -> Path:
    """``SPLIT/labels.csv`` (``path,label``, paths relative to ``SPLIT/images``): each scene's
    image-level label for ``eval knn``, ``eval linear`` and ``train.monitor`` — the class covering
    the most pixels of its mask (ties: the lower class)."""
    masks = sorted((split / "masks").glob("*.png"))
    rows = []
    for mask in masks:
        counts = np.bincount(np.asarray(Image.open(mask)).reshape(-1), minlength=len(CLASSES) + 1)[1:len(CLASSES) + 1]
        rows.append(f"{mask.name},{CLASSES[int(counts.argmax())]}")
    out = split / "labels.csv"
    atomic.write_text(out, "path,label\n" + "\n".join(rows) + "\n")
    return out


def check_out_outside_others(out: Path) -> None:
    """A data build's ``--out`` is not inside a folder another mlsctl command reads as a whole: a data
    set, a gallery's source, a gallery, a run or a feature folder (a new user's probe, 2026-12-06:
    ``--out data/products/gallery/nested`` became an object of the next ``index build`` of that gallery)."""
    from mlsctl.data.kinds import folder_kind

    for parent in Path(os.path.abspath(out)).parents:
        kind = folder_kind(parent)
        if kind is not None:
            raise UserError(f"--out {out} is inside {parent}, {kind}: the new images would become part of it; choose "
                            f"an --out outside it")


def built_as_asked(out: Path, generator: str, params: dict, overwrite: bool,
                   needed: tuple[str, ...] = ()) -> Optional[dict]:
    """The meta record of ``out`` when it is exactly the build asked for (``generator``, ``params``, the
    ``needed`` files, no ``overwrite``, no swap cut short beside it), read without writing anything;
    None otherwise (then :func:`reusable_build`, under the build's lock, decides)."""
    if overwrite or atomic.aside_of(out).exists() or not (out / "meta.json").is_file():
        return None
    if (out.parent / f".{out.name}{LOCK_NAME}").exists():  # a build of it under way: wait for its lock instead
        return None
    try:
        existing = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(existing, dict) and existing.get("generator", "fmnist-scenes") == generator
            and existing.get("parameters") == params and all((out / name).is_file() for name in needed)):
        return None
    return dict(existing, reused=True)


def reusable_build(out: Path, generator: str, params: dict, overwrite: bool,
                   layout: Callable[[dict], atomic.Layout]) -> Optional[dict]:
    """The meta record of ``out`` when it was built by ``generator`` with ``params`` (and no
    ``overwrite``); None when it should be built. ``overwrite`` replaces only a folder that
    ``generator`` built, holding nothing anywhere but what it made (``layout`` of its meta record):
    anything else (a non-empty folder of other files, a file added to a build) is never deleted."""
    atomic.recover_swap(out)  # a build killed while it swapped its folder in: the old one back first
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    existing = None
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            existing = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            existing = None
    ours = isinstance(existing, dict) and existing.get("generator", "fmnist-scenes") == generator
    if ours and existing.get("parameters") == params and not overwrite:
        existing["reused"] = True
        return existing
    if not ours and atomic.holds_anything(out):
        raise UserError(f"{out} exists and is not a {generator} folder; choose another --out (--overwrite only "
                        f"replaces a {generator} build)")
    if ours and not overwrite:
        raise UserError(f"{out} holds {generator} built with {_shown_parameters(existing.get('parameters'))}; "
                        f"add --overwrite to rebuild it with {_shown_parameters(params)}")
    if ours:  # --overwrite replaces the whole folder: what the build did not make would go with it
        refuse_foreign(out, generator, layout(existing))
    return None


def refuse_foreign(out: Path, generator: str, made: atomic.Layout) -> None:
    """Before a build replaces ``out`` whole: one sentence naming what anywhere in it the build did not
    make (``made``, its layout), hidden names included (a new user's probe, 2026-12-07: ``.git/``,
    ``train/my_feats/`` and a stray ``train/images/my_extra.png`` went with an --overwrite)."""
    atomic.refuse_others(out, made, str(out), f", which the {generator} build did not make")


_SCENE_IMAGES = {r"\d{6,}\.png": None}  # {i:06d}.png
_SCENE_SPLIT = {"images": _SCENE_IMAGES, "masks": _SCENE_IMAGES, r"scenes\.jsonl": None, r"labels\.csv": None}
#: What an fmnist-scenes build writes (:func:`_build_scenes`), for :func:`refuse_foreign`.
SCENES_LAYOUT: atomic.Layout = {r"meta\.json": None, "train": _SCENE_SPLIT, "val": _SCENE_SPLIT}


def scenes_layout(meta: dict) -> atomic.Layout:
    return SCENES_LAYOUT


def _shown_parameters(params) -> str:
    """A build's parameters as a message says them: ``n_train 2000, n_val 500, size 96, seed 0``."""
    if not isinstance(params, dict):
        return "unknown parameters"
    return ", ".join(f"{key} {value}" for key, value in params.items())


def replace_folder(tmp: Path, out: Path, generator: str, layout: Callable[[dict], atomic.Layout]) -> None:
    """Put a completely built ``tmp`` in place of ``out``, in one step (:func:`mlsctl.atomic.swap_folder`),
    once more refusing what the earlier build did not make (``layout`` of its meta record), which may
    have been put there while this one was built."""
    if out.is_dir():
        refuse_foreign(out, generator, layout(_read_meta(out) or {}))
    atomic.swap_folder(tmp, out)


def _read_meta(out: Path) -> Optional[dict]:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None
