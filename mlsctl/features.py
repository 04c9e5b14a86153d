"""Feature shards: the format ``embed`` writes and ``eval``, ``viz``, ``index`` and ``bank`` read.

A feature folder (one of mlsctl's three contracts, with recipes and run folders)::

    FEATS/manifest.json                              written last: the folder is complete when it exists
    FEATS/shard-00000-of-00003.safetensors ...       global [n, D], optional dense [n, h, w, D], row [n] int64

``manifest.json`` holds ``format_version``, ``mlsctl_version``, ``input_root``, ``files`` (paths
relative to the input root, in row order: row ``r`` of the concatenated shards is ``files[r]``),
``skipped`` (``[path, reason]`` for each file that could not be decoded), ``shards`` (file name and
row count of each), ``model`` (source, arch, sizes, and ``fingerprint``: the sha256 of its
tensors), ``preprocessing`` (resize mode, resolution, mean/std), ``dtype``, ``normalization``
(features are stored as the backbone returns them, *not* L2-normalised), ``dim``, ``grid``
(``[h, w]`` of the dense maps or null) and the ``plan`` that produced them.

Writing (:func:`embed_folder`) is resumable and exact. The candidate files are cut into *parts* of
``part_size`` images (a multiple of the batch size; batches never cross a part, so a batch holds
the same images however often the job was interrupted); each finished part is written atomically
to ``FEATS/.partial/``. A rerun of the same command skips the finished parts; after the last one,
the parts are concatenated into the shards in file order: each shard is renamed into place, its
parts' row indices and skipped files are kept in a small record (``.partial/shard-NNNNN.json``) and
its parts are deleted, so the features never take much more than their own size on disk (one
shard more for each process; keeping every part until the end took twice their size). The manifest, written from
the records, commits the folder. With several processes (``accelerate launch -m mlsctl embed``)
part ``k`` belongs to process ``k mod world_size`` and each process assembles shards ``rank,
rank + world_size, ...``, so the output is the same folder one process writes.

Reading (:class:`Features`, in the data layer: :mod:`mlsctl.data.shards`, re-exported here) goes
through ``safetensors.safe_open`` (memory-mapped), shard by shard; a damaged, unfinished or foreign
folder raises a :class:`~mlsctl.errors.UserError` saying what is wrong and what to do. How an image
becomes the model input (:class:`Preprocessing`) lives in :mod:`mlsctl.data.preprocessing`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mlsctl.console import LogProgress, to_stderr
from mlsctl import atomic
from mlsctl import dist
from mlsctl.data.images import DEFAULT_MAX_IMAGE_PIXELS
from mlsctl.data.loader import Loader, worker_init
from mlsctl.data.preprocessing import RESIZE_MODES, Preprocessing
from mlsctl.data.shards import (DTYPES, FORMAT_VERSION, MANIFEST, PARTIAL, SHARD_BYTES, Features, ShardInfo,
                                feature_manifest, is_feature_folder, shard_name, write_shard)
from mlsctl.errors import Interrupted, UserError
from mlsctl.locks import LOCK_NAME, FolderLock
from mlsctl.outputs import inside

# the package face of the shard format: what embed writes, and (from the data layer) how it is read
__all__ = [
    # mlsctl.data.preprocessing
    "RESIZE_MODES", "Preprocessing",
    # mlsctl.data.shards
    "DTYPES", "FORMAT_VERSION", "MANIFEST", "PARTIAL", "SHARD_BYTES", "Features", "ShardInfo", "is_feature_folder",
    "shard_name", "write_shard", "feature_manifest",
    # here
    "EmbedSummary", "folder_label", "model_label", "embed_folder", "embed_split", "embed_listing",
    "cache_dir", "split_cache_dir", "features_or_embed", "features_of_split",
]

# --------------------------------------------------------------------------------------------- writing


@dataclass
class EmbedSummary:
    out: Path
    rows: int
    skipped: list[list[str]]
    seconds: float
    images_per_s: float
    model: str
    reused: bool = False
    resumed_parts: int = 0
    timings: dict = field(default_factory=dict)


def _sha256_lines(lines: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def folder_label(images: str | os.PathLike) -> str:
    """A name for a folder of images that two folders never share: its last three path parts and
    a hash of its absolute path (``fmnist-scenes-train-images-3f2a1c``)."""
    absolute = os.path.abspath(images)
    tail = "-".join(Path(absolute).parts[-3:]).replace("/", "")
    return f"{tail}-{hashlib.sha256(absolute.encode('utf-8', 'surrogateescape')).hexdigest()[:6]}"


def model_label(model) -> str:
    """A model's name in folder names and the first 8 hex digits of its backbone fingerprint
    (``dino-4c64b87c``): a run's folder name (also for a checkpoint of it), ``weights`` for a weights
    file, ``random-<name of the run or file whose architecture it is>``, else the model's source."""
    from mlsctl.runs import run_of_model

    source = model.info.get("path") or model.info["arch"]
    run = run_of_model(model.info["source"], model.info.get("path"))
    label = run.name if run is not None else model.info["source"]
    if model.info["source"] == "random-init":
        label = "random-" + Path(source).name
    return f"{label}-{model.fingerprint[:8]}"


_PLAN_KEYS = ("format_version", "candidates", "candidates_sha256", "fingerprint", "preprocessing", "dtype", "dense",
              "batch_size", "part_size", "parts_per_shard", "dim", "grid", "contents_sha256", "max_image_pixels")
# contents_sha256: of every image's relative path, size and modification time (a folder's images; None for an
# archive's). A plan recorded before it existed (None) is taken as the same contents: it cannot be checked.
# max_image_pixels: which images are skipped as too large; embed again with a raised --max-image-pixels said
# "nothing to do" and the image stayed skipped (a new user's probe, 2026-12-08).
_UNCHECKED_WHEN_ABSENT = ("contents_sha256", "max_image_pixels")


def _differs(a: dict, b: dict, key: str, reading: bool = False) -> bool:
    """Whether plans ``a`` (the folder's) and ``b`` differ in ``key``. ``reading``: an evaluation reading the
    folder, which serves where its image pixel limit is at least the evaluation's (it skipped no image the
    evaluation would embed: ``embed --max-image-pixels`` raised for it is kept, not embedded again)."""
    if key in _UNCHECKED_WHEN_ABSENT and (a.get(key) is None or b.get(key) is None):
        return False
    if key == "max_image_pixels" and reading:
        numbers = all(isinstance(v, int) and not isinstance(v, bool) for v in (a[key], b[key]))
        return not numbers or a[key] < b[key]  # a hand-edited plan's text: made otherwise, not a TypeError
    return a.get(key) != b.get(key)


def contents_sha256(relpaths: Sequence[str], file_stats: Sequence[tuple[int, int]]) -> str:
    """The SHA-256 of every image's relative path, size and modification time in whole seconds (a copy
    to a file system of coarser times, with ``cp -p`` or rsync, keeps it)."""
    digest = hashlib.sha256()
    for relpath, (size, mtime_ns) in zip(relpaths, file_stats):
        digest.update(f"{relpath}\t{size}\t{mtime_ns // 10**9}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _plan_sha(plan: dict) -> str:
    """The hash the parts and shards of a plan carry. It leaves the contents out: they are checked when
    the folder is opened, and an unfinished embed of a version that did not record them keeps its parts."""
    return _sha256_lines([json.dumps({k: v for k, v in plan.items() if k != "contents_sha256"}, sort_keys=True)])


# how an embed was cut into parts and shards: what resuming an unfinished one needs the same, not its features
_LAYOUT_KEYS = ("batch_size", "part_size", "parts_per_shard")


def _same_plan(a: dict, b: dict, *, complete: bool = False, any_dtype: bool = False) -> bool:
    """Whether plans ``a`` and ``b`` make the same features. ``complete``: a finished folder, whose batch and
    shard sizes no longer matter; ``any_dtype``: an evaluation reading it, for which float16 and float32
    features serve alike (``embed --batch-size 32`` then an eval of the same images embedded them again, and
    replaced the user's folder: embed's default --out is the evaluations' cache; a review, 2026-12-06)."""
    ignored = (_LAYOUT_KEYS if complete else ()) + (("dtype",) if any_dtype else ())
    return not any(_differs(a, b, k, reading=any_dtype) for k in _PLAN_KEYS if k not in ignored)


def _plan_difference(old: dict, new: dict, *, complete: bool = False, reading: bool = False) -> str:
    names = {"fingerprint": "model", "candidates_sha256": "image list", "candidates": "image count",
             "contents_sha256": "image sizes or modification times",
             "max_image_pixels": f"--max-image-pixels, {old.get('max_image_pixels')} then"}
    changed = [names.get(k, k) for k in _PLAN_KEYS
               if _differs(old, new, k, reading=reading) and not (complete and k in _LAYOUT_KEYS)]
    return ", ".join(dict.fromkeys(changed))


class TreeImages(torch.utils.data.Dataset):
    """The images ``relpaths`` of a tree (a folder or an archive, :mod:`mlsctl.data.archive`),
    decoded and resized by ``preprocessing`` (uint8 [3, R, R]); item ``i`` is ``(i, pixels, None)``,
    or ``(i, None, reason)`` for a file that is not a decodable image (``raise_with``: the option that
    raises ``max_pixels``, named in the reason of a larger one, where the command has one). Batches of
    it go through :func:`collate_images`."""

    def __init__(self, tree, relpaths: list[str], preprocessing: Preprocessing, max_pixels: int, raise_with: str = ""):
        self.tree, self.relpaths, self.preprocessing, self.max_pixels = tree, relpaths, preprocessing, max_pixels
        self.raise_with = raise_with

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, index: int):
        from mlsctl.data.images import BadImage

        try:
            image = self.tree.load_rgb(self.relpaths[index], self.max_pixels, self.raise_with)
            return index, self.preprocessing.pixels(image), None
        except BadImage as exc:
            return index, None, str(exc)


def collate_images(items):
    """:class:`TreeImages` items → row indices [b], pixels [b, 3, R, R] (None when all were
    unreadable) and the unreadable ones as ``(index, reason)``."""
    ok = [(i, x) for i, x, _ in items if x is not None]
    indices = torch.tensor([i for i, _ in ok], dtype=torch.long)
    pixels = torch.stack([x for _, x in ok]) if ok else None
    skipped = [(i, reason) for i, x, reason in items if x is None]
    return indices, pixels, skipped


def _write_part(path: Path, global_: list, dense: list, indices: list, skipped: list, dim: int,
                grid: Optional[tuple[int, int]], dtype: torch.dtype, plan_sha: str) -> None:
    from safetensors.torch import save_file

    tensors = {
        "global": torch.cat(global_) if global_ else torch.empty(0, dim, dtype=dtype),
        "index": torch.cat(indices) if indices else torch.empty(0, dtype=torch.long),
    }
    if grid is not None:
        tensors["dense"] = torch.cat(dense) if dense else torch.empty(0, *grid, dim, dtype=dtype)
    metadata = {"skipped": json.dumps(skipped), "plan_sha256": plan_sha}
    atomic.write_with(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata))


# The most patches (or, for a CNN, output cells) an image may give: a 128 x 128 grid, e.g. 1,024 px
# at patch 8 or 2,048 px at patch 16 (Hummingbird's ViT-S/16 runs at 512 px: 1,024 patches). Beyond,
# one image's attention needs gigabytes and hours on a CPU: a typo rather than a protocol.
MAX_PATCHES = 128 * 128


CACHE_ROOT = "features"  # under the working folder: the evaluations' feature caches, embed's default --out


_NOT_IMAGES = {  # folder_kind → what to give instead (a gallery probe, 2026-12-06: said after the model loaded)
    "a run folder": "give it with --run (the model that embeds), and a folder of images to embed",
    "a gallery": "give the folder of photos it was built from (its gallery.json names it as source)",
    "a feature folder": "it is embedded already: the evaluations, index build and refine take it as it is",
}


def check_images_folder(images: Path) -> None:
    """A folder of images to embed is not a run, a gallery or a feature folder (cheap: said before a
    model loads, by ``embed`` and the evaluations alike)."""
    from mlsctl.data.kinds import folder_kind

    kind = folder_kind(images)
    if kind in _NOT_IMAGES:
        raise UserError(f"{images} is {kind}, not a folder of images; {_NOT_IMAGES[kind]}")


def check_outside_images_folder(out: str | os.PathLike, images: str | os.PathLike, *,
                                default: Optional[str] = None) -> None:
    """Features are never written inside the folder of images they come from: every later embed of it
    would list their files as images it could not read. ``default`` names an ``out`` nobody gave (the
    default --out, the evaluations' cache), whose fix is to run from another folder."""
    if not inside(out, images):
        return
    why = "every later embed of that folder would list the features' files as images it could not read"
    if default is None:
        raise UserError(f"--out {out} is inside the images folder {images}: {why}; choose an --out outside it")
    raise UserError(f"{default} ({out}, under the working folder) is inside the images folder {images}: {why}; run "
                    f"from another folder" + (" or give --out" if "--out" in default else ""))


def embed_folder(images: str | os.PathLike, out: str | os.PathLike, model, *, dense: bool = False,
                 resolution: Optional[int] = None, resize: str = "square", batch_size: int = 64,
                 workers: Optional[int] = None, dtype: str = "fp16", part_size: Optional[int] = None, overwrite: bool = False,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, refresh: bool = False,
                 progress: Optional[bool] = None, say: Callable[[str], None] = to_stderr,
                 dense_cache: Optional[Path] = None, raise_with: str = "", listed: Optional[Path] = None,
                 listed_what: str = "list file") -> EmbedSummary:
    """Embed every image under ``images`` with ``model`` (a :class:`~mlsctl.models.source.ModelChoice`)
    into the feature folder ``out``; see the module docstring for the format and resume rules
    (``refresh``: :func:`embed_listing`'s). ``listed``: a file naming the images to embed, and no
    others (a split file: :func:`mlsctl.data.labels.listed_files`; ``listed_what`` names its option)."""
    from mlsctl.data.archive import Tree
    from mlsctl.data.images import NOT_AN_IMAGE, require_images, scan_images

    images = Path(images)
    check_outside_images_folder(out, images)
    check_images_folder(images)
    scan = scan_images(images, "image folder")
    require_images(scan, "image folder")
    relpaths = [f.relative_to(images).as_posix() for f in scan.files]
    not_images = [[p.relative_to(images).as_posix(), f"{NOT_AN_IMAGE}{p.suffix or 'none'})"]
                  for p in scan.others] + [list(item) for item in scan.skipped]
    if listed is not None:  # the listed images only; what is not listed is not the embed's to report
        from mlsctl.data.labels import listed_files

        chosen = set(listed_files(relpaths, images, Path(listed), listed_what))
        kept = [i for i, relpath in enumerate(relpaths) if relpath in chosen]
        relpaths, scan.file_stats = [relpaths[i] for i in kept], [scan.file_stats[i] for i in kept]
        not_images = []
    notes = scan.notes("image folder") if listed is None else []
    contents = contents_sha256(relpaths, scan.file_stats)
    scan.file_stats = []  # 1.28 M tuples need not live through the embed
    return embed_listing(Tree(images), relpaths, out, model, not_images=not_images, contents=contents,
                         notes=notes, dense=dense, resolution=resolution, resize=resize,
                         batch_size=batch_size, workers=workers, dtype=dtype, part_size=part_size,
                         overwrite=overwrite, refresh=refresh, max_image_pixels=max_image_pixels, progress=progress,
                         say=say, dense_cache=dense_cache, raise_with=raise_with)


WORKERS_FROM_IMAGES = 1000  # fewer images decode faster in the main process than workers start


def default_workers(n_images: int) -> int:
    """``--workers``' default: none below :data:`WORKERS_FROM_IMAGES` images; else one per core this
    process may use but one (the main process's), at least 1 and at most 8. Its cores are its
    affinity mask where that is narrower than the machine (Slurm's ``--cpus-per-task``, numactl:
    already this process's share), else the machine's cores divided among the node's processes
    (``LOCAL_WORLD_SIZE``, as torchrun and Accelerate set it)."""
    from mlsctl.data.loader import usable_cores

    if n_images < WORKERS_FROM_IMAGES:
        return 0
    cores = usable_cores()
    if cores >= (os.cpu_count() or cores):  # not pinned: the node's processes share the machine
        cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(8, max(1, cores - 1)) if cores >= 2 else 0


def embed_split(split, out: str | os.PathLike, model, **options) -> EmbedSummary:
    """Embed the images of one split of a benchmark (:mod:`mlsctl.data.datasets`), read in place
    from its folder or archive; ``files`` of the manifest are the images' paths inside it."""
    return embed_listing(split.tree, list(split.images), out, model, **options)


def embed_listing(tree, relpaths: list[str], out: str | os.PathLike, model, *, not_images: Sequence = (),
                  contents: Optional[str] = None, notes: Sequence[str] = (),
                  dense: bool = False, resolution: Optional[int] = None,
                  resize: str = "square", batch_size: int = 64, workers: Optional[int] = None, dtype: str = "fp16",
                  part_size: Optional[int] = None, overwrite: bool = False, refresh: bool = False,
                  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, progress: Optional[bool] = None,
                  say: Callable[[str], None] = to_stderr, dense_cache: Optional[Path] = None,
                  raise_with: str = "") -> EmbedSummary:
    """Embed the images ``relpaths`` of ``tree`` (a folder or an archive) into ``out``, decoding
    them in ``workers`` processes (None: :func:`default_workers`). ``contents``: :func:`contents_sha256` of
    the images, so a folder whose images changed under the same names is not taken as done;
    ``refresh`` (the evaluations' feature caches): a folder made otherwise is replaced, not refused.
    ``dense_cache`` (global features asked for): a feature folder that may hold these images' dense
    maps too, made by the same plan otherwise (``eval knn-seg``'s cache of them); complete, it is the
    answer as it is (the summary's ``out``) and nothing is embedded. ``raise_with``: the option that
    raises ``max_image_pixels`` (embed's --max-image-pixels), named where a larger image is skipped;
    callers without one (index build) pass none, and no option is named."""
    from mlsctl.data.images import allow_image_pixels

    started = time.perf_counter()
    workers = default_workers(len(relpaths)) if workers is None else workers
    images, out = Path(tree.path), Path(out)
    not_images = [list(item) for item in not_images]
    resolution, part_size = _checked_plan_options(model, dense, resolution, resize, dtype, batch_size, part_size)
    backbone, patch = model.backbone, model.backbone.patch_size
    allow_image_pixels(max_image_pixels)
    preprocessing = Preprocessing(resolution, resize)
    grid = (resolution // patch, resolution // patch) if dense else None
    torch_dtype = DTYPES[dtype]
    parts_per_shard = _parts_per_shard(backbone.embed_dim * torch_dtype.itemsize, grid, part_size)
    n_parts = (len(relpaths) + part_size - 1) // part_size
    n_shards = (n_parts + parts_per_shard - 1) // parts_per_shard
    plan = {
        "format_version": FORMAT_VERSION, "input_root": str(images.resolve()), "candidates": len(relpaths),
        "candidates_sha256": _sha256_lines(relpaths), "fingerprint": model.fingerprint,
        "contents_sha256": contents,
        "preprocessing": preprocessing.to_dict(), "dtype": {"fp16": "float16", "fp32": "float32"}[dtype],
        "dense": dense, "batch_size": batch_size, "part_size": part_size, "parts_per_shard": parts_per_shard,
        "max_image_pixels": max_image_pixels,
        "n_parts": n_parts, "n_shards": n_shards, "dim": backbone.embed_dim, "grid": list(grid) if grid else None,
    }
    plan_sha = _plan_sha(plan)
    is_main = dist.rank() == 0
    if dense_cache is not None and not dense:
        dense_grid = (resolution // patch, resolution // patch)
        dense_parts_per_shard = _parts_per_shard(backbone.embed_dim * torch_dtype.itemsize, dense_grid, part_size)
        found = complete_feature_folder(Path(dense_cache), dict(
            plan, dense=True, grid=list(dense_grid), parts_per_shard=dense_parts_per_shard,
            n_shards=(n_parts + dense_parts_per_shard - 1) // dense_parts_per_shard))
        if found is not None:
            return EmbedSummary(Path(dense_cache), len(found["files"]), found["skipped"], time.perf_counter() - started,
                                0.0, model.description, reused=True)

    # ---------------------------------------------------------------- the state of --out
    check_feature_target(out)
    lock = FolderLock(out, "feature folder", also_beside=True)  # refine apply locks beside --out
    reused = dist.on_main(lambda: _open_feature_folder(out, plan, overwrite, lock, refresh, say))
    if reused is not None:
        if is_main:
            lock.release()
        return EmbedSummary(out, len(reused["files"]), reused["skipped"], time.perf_counter() - started, 0.0,
                            model.description, reused=True)
    try:
        job = _EmbedJob(tree, relpaths, not_images, notes, preprocessing, grid, torch_dtype, workers, plan, plan_sha,
                        raise_with)
        return _embed_parts(job, out, model, progress, say, started)
    finally:
        if is_main:
            lock.release()


def _checked_plan_options(model, dense: bool, resolution: Optional[int], resize: str, dtype: str, batch_size: int,
                          part_size: Optional[int]) -> tuple[int, int]:
    """:func:`embed_listing`'s options checked against the model before anything is read: the resolution (the
    model's where none is given) and the part size (8 batches where none is given)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if resize not in RESIZE_MODES:
        raise UserError(f"--resize {resize} is not one of {', '.join(RESIZE_MODES)}")
    backbone = model.backbone
    if dense and getattr(backbone, "embedding_dim", 0):
        raise UserError(f"{model.description} ends in an embedding layer (model.embedding_dim "
                        f"{backbone.embedding_dim}), whose features are global only: patch features (embed --dense, "
                        f"eval knn-seg and linear-seg) need a model without one, such as the run it was fine-tuned "
                        f"from")  # "drop --dense" went to evaluations that have no --dense (a new user's probe)
    patch = backbone.patch_size
    resolution = resolution or model.info["img_size"]
    if resolution % patch:
        raise UserError(f"--resolution {resolution} is not a multiple of the model's patch size {patch}; "
                        f"try {max(patch, round(resolution / patch) * patch)}")
    if (resolution // patch) ** 2 > MAX_PATCHES:
        largest = int(MAX_PATCHES ** 0.5) * patch
        raise UserError(f"--resolution {resolution} gives {(resolution // patch) ** 2:,} patches an image (patch "
                        f"{patch}), beyond the {MAX_PATCHES:,} this command embeds (attention grows with their square); "
                        f"use at most {largest}")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    part_size = part_size or batch_size * 8
    if part_size % batch_size:
        raise UserError(f"--part-size {part_size} must be a multiple of --batch-size {batch_size}")
    return resolution, part_size


def _parts_per_shard(bytes_per_vector: int, grid, part_size: int) -> int:
    """Parts of ``part_size`` rows in one shard of about :data:`SHARD_BYTES`: a row is the global vector
    and, with a ``grid``, one vector per patch."""
    return max(1, SHARD_BYTES // (bytes_per_vector * (1 + (grid[0] * grid[1] if grid else 0)) * part_size))


def complete_feature_folder(folder: Path, plan: dict) -> Optional[dict]:
    """The manifest of ``folder`` where it is a complete feature folder made by ``plan`` (its images'
    contents recorded and the same), else None. Reads only: nothing is locked, changed or removed."""
    if not (folder / MANIFEST).is_file() or _made_otherwise(folder, plan):
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("plan"), dict):
        return None
    return manifest if isinstance(manifest.get("files"), list) and isinstance(manifest.get("skipped"), list) else None


def check_feature_target(out: Path) -> None:
    """``out`` may become a feature folder: it is one, or new, or an empty folder. Cheap, so said
    before a model loads; :func:`_open_feature_folder` asks again under the folder's lock."""
    from mlsctl.data.kinds import folder_kind

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder")
    if not out.is_dir() or is_feature_folder(out) or not atomic.holds_anything(out, besides=(LOCK_NAME,)):
        return
    kind = folder_kind(out)  # never "empty it" for a run's folder or a gallery (a new user, 2026-12-06)
    raise UserError(f"--out {out} exists and is {kind or 'not a feature folder'}; choose another --out"
                    + (" (or empty it)" if kind is None else ""))


def _open_feature_folder(out: Path, plan: dict, overwrite: bool, lock: FolderLock, refresh: bool = False,
                         say: Callable[[str], None] = to_stderr) -> Optional[dict]:
    """Process 0: lock ``out`` and get it ready for this plan. Returns the manifest of a complete
    folder made the same way (nothing to do), else None with ``.partial/`` prepared. Anything that
    is not a feature folder is never touched, --overwrite or not. ``refresh``: a feature folder made
    otherwise (complete or not) is replaced as with ``overwrite``; one made the same way is kept."""
    lock.acquire()
    try:
        if refresh and not overwrite:
            why = _why_made_otherwise(out, plan)
            overwrite = why is not None
            if why is not None:  # an evaluation's cache replaced: said, with why (a new user, 2026-12-06: an
                say(f"{out}: {why}; embedding again")  # interrupted embed's parts went without a word)
        partial = out / PARTIAL
        contents = [p for p in out.iterdir() if p.name != LOCK_NAME]
        if (out / MANIFEST).is_file():
            existing = _json_or_empty(out / MANIFEST)
            previous = existing.get("plan", {}) if isinstance(existing, dict) else {}
            if _same_plan(previous, plan, complete=True, any_dtype=refresh) and not overwrite:
                _remove_leftovers(out)  # of an embed killed while it cleaned up
                return existing
            if not overwrite:
                raise UserError(f"--out {out} already holds features made differently "
                                f"({_plan_difference(previous, plan, complete=True) or 'unknown'}); add --overwrite to "
                                f"replace them or "
                                f"choose another --out")
        elif partial.is_dir() and (partial / "plan.json").is_file() and not overwrite:
            _check_unfinished_embed(out, _json_or_empty(partial / "plan.json"), plan)
        elif contents and not is_feature_folder(out):
            check_feature_target(out)
        if overwrite and partial.is_dir():  # an unfinished embed: continued when it is this one, else begun again
            _discard_other_unfinished_embed(out, plan)
        # With --overwrite the features already there stay whole and readable until the new manifest replaces
        # them (_write_manifest); nothing else in --out is touched.
        partial.mkdir(parents=True, exist_ok=True)
        _drop_unusable_records(out, partial, _plan_sha(plan))
        _remove_leftovers(out, keep_partial=True)
        if not (partial / "plan.json").is_file():
            atomic.write_json(partial / "plan.json", plan)
        return None
    except BaseException:
        lock.release()
        raise


def _json_or_empty(path: Path):
    """The JSON in ``path``, or {} where it cannot be read (a plan or manifest then compares as made otherwise)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _check_unfinished_embed(out: Path, previous, plan: dict) -> None:
    """An unfinished embed in ``out`` (its ``.partial/plan.json`` says ``previous``) is continued only by the same
    plan; otherwise one sentence says what changed and that --overwrite begins again."""
    difference = _plan_difference(previous, plan)
    if difference == "image sizes or modification times":  # the same names, other images under them
        raise UserError(f"--out {out} holds an unfinished embed of images that changed since it began (a size "
                        f"or modification time in {plan['input_root']} differs); its parts cannot be reused: "
                        f"add --overwrite to begin again with the images there now")
    if difference in ("image list", "image count, image list") or (
            difference.startswith(("image list", "image count"))
            and difference.endswith("image sizes or modification times")):
        raise UserError(f"--out {out} holds an unfinished embed of another list of images "
                        f"({previous.get('candidates', '?')} then, {plan['candidates']} now: files were added "
                        f"to or removed from {plan['input_root']} since it began); its parts cannot be reused: "
                        f"add --overwrite to begin again with the images there now")
    if not _same_plan(previous, plan):
        raise UserError(f"--out {out} holds an unfinished embed made differently ({difference or 'unknown'}); "
                        f"run the original command again to finish it, or add --overwrite")


def _discard_other_unfinished_embed(out: Path, plan: dict) -> None:
    """--overwrite over an unfinished embed of another plan: its assembled shards and ``.partial/`` go (one of this
    plan is continued)."""
    partial = out / PARTIAL
    if _same_plan(_json_or_empty(partial / "plan.json"), plan):
        return
    listed = _shard_files(out)
    for name in _recorded_shard_files(partial) - listed:  # shards it had assembled
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(partial)


def _remove_leftovers(out: Path, keep_partial: bool = False) -> None:
    """Temporary files of interrupted atomic writes, shard files the manifest does not list (an
    --overwrite killed after writing new shards, or after its commit), and ``.partial/`` once the
    manifest exists."""
    for stale in [*(out / PARTIAL).glob(".*.tmp"), *out.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)
    if (out / MANIFEST).is_file():
        listed = _shard_files(out)
        if listed:
            kept = listed | (_recorded_shard_files(out / PARTIAL) if keep_partial else set())
            for shard in out.glob("shard-*.safetensors"):
                if shard.name not in kept:  # (an unfinished --overwrite's assembled shards stay)
                    shard.unlink(missing_ok=True)
    if not keep_partial and (out / PARTIAL).is_dir():
        shutil.rmtree(out / PARTIAL, ignore_errors=True)


@dataclass
class _EmbedJob:
    """What :func:`embed_listing` settled before an image is read: the images, how they become
    pixels, and the plan (recorded in the manifest: a folder made by the same plan is done), which
    says how the rows split into parts and the parts into shards."""

    tree: object
    relpaths: list[str]
    not_images: list[list[str]]
    notes: Sequence[str]
    preprocessing: Preprocessing
    grid: Optional[tuple[int, int]]
    torch_dtype: torch.dtype
    workers: int
    plan: dict
    plan_sha: str
    raise_with: str = ""  # the option that raises max_image_pixels, named in a larger image's skip reason

    dense = property(lambda self: self.plan["dense"])
    batch_size = property(lambda self: self.plan["batch_size"])
    part_size = property(lambda self: self.plan["part_size"])
    parts_per_shard = property(lambda self: self.plan["parts_per_shard"])
    n_parts = property(lambda self: self.plan["n_parts"])
    n_shards = property(lambda self: self.plan["n_shards"])


def _embed_parts(job: _EmbedJob, out: Path, model, progress: Optional[bool], say: Callable[[str], None],
                 started: float) -> EmbedSummary:
    """Embed this process's unfinished parts, then (process 0) assemble the shards and the manifest."""
    backbone, relpaths, plan, plan_sha = model.backbone, job.relpaths, job.plan, job.plan_sha
    n_parts, part_size, batch_size = job.n_parts, job.part_size, job.batch_size
    partial = out / PARTIAL
    is_main = dist.rank() == 0

    # ---------------------------------------------------------------- this process's parts
    part_path = lambda k: partial / f"part-{k:05d}.safetensors"  # noqa: E731
    assembled = set(_assembled_parts(partial, plan_sha))  # parts already in a shard (a kill while assembling)
    is_done = lambda k: k in assembled or part_path(k).is_file()  # noqa: E731
    mine = [k for k in range(n_parts) if k % dist.world_size() == dist.rank()]
    done = [k for k in mine if is_done(k)]
    todo = [k for k in mine if not is_done(k)]
    batches = []
    for k in todo:
        stop = min((k + 1) * part_size, len(relpaths))
        batches += [list(range(s, min(s + batch_size, stop))) for s in range(k * part_size, stop, batch_size)]
    n_todo = sum(len(b) for b in batches)
    if is_main:
        say(f"embedding {len(relpaths)} images from {job.tree.path} with {model.description}")
        for line in job.notes:
            say(line)
        finished = sum(is_done(k) for k in range(n_parts))
        if finished:
            say(f"resuming: {finished} of {n_parts} parts already done")
    device = embedding_device()
    backbone.to(device)
    loader = Loader(TreeImages(job.tree, relpaths, job.preprocessing, plan["max_image_pixels"], job.raise_with),
                    batch_sampler=batches,
                    num_workers=job.workers,
                    collate_fn=collate_images, worker_init_fn=worker_init, persistent_workers=False,
                    pin_memory=device.type == "cuda", workers_key="--workers")
    from tqdm import tqdm

    show = (progress if progress is not None else sys.stderr.isatty()) and is_main
    if is_main and progress is None and not show:  # a log, not a terminal: a line every 30 s
        bar = LogProgress(n_todo, "embed", say=say)
    else:
        bar = tqdm(total=n_todo, unit="img", disable=not show, desc="embed", dynamic_ncols=True)
    try:
        forward_s = _run_batches(loader, backbone, job, device, todo, bar, part_path)
        bar.close()
        dist.barrier()
        layout = dist.on_main(lambda: _shard_layout(out, plan_sha, n_parts, job.parts_per_shard, job.n_shards,
                                                    part_path))
        dist.on_every(lambda: _write_shards(out, layout, bool(plan["grid"]), part_path, dist.rank(),
                                            dist.world_size()))
        # the manifest stays on process 0 (1.28 M file names for ImageNet)
        dist.on_main(lambda: _write_manifest(out, plan, plan_sha, layout, relpaths, job.not_images, model,
                                             job.preprocessing))
    except KeyboardInterrupt:
        raise Interrupted(_stopped_at(out, plan_sha, n_parts, part_path) if is_main else "") from None
    manifest = json.loads((out / MANIFEST).read_text())
    seconds = time.perf_counter() - started
    return EmbedSummary(out, len(manifest["files"]), manifest["skipped"], seconds, n_todo / max(seconds, 1e-9),
                        model.description, resumed_parts=len(done), timings={"forward_s": forward_s})


def _stopped_at(out: Path, plan_sha: str, n_parts: int, part_path) -> str:
    """What an embed stopped by Ctrl-C leaves: parts saved, or (stopped as the manifest was committed)
    a complete folder. A stop while the shards were joined said only "interrupted" (a probe, 2026-12-07)."""
    partial = out / PARTIAL
    if not partial.is_dir() and (out / MANIFEST).is_file():
        return f"stopped after the features were written: {out} is complete"
    try:
        assembled = set(_assembled_parts(partial, plan_sha))
        finished = sum(k in assembled or part_path(k).is_file() for k in range(n_parts))
    except (OSError, UserError):  # a shard's record half read: the next run reads them again
        return f"the parts saved in {partial} are kept; run the same command again to continue"
    return f"{finished} of {n_parts} parts are saved in {partial}; run the same command again to continue"


def _run_batches(loader, backbone, job: _EmbedJob, device, todo: list[int], bar, part_path) -> float:
    """The forward passes; each part is written as soon as its last batch is done. Returns the
    seconds spent in forward passes."""
    preprocessing, dense, torch_dtype, relpaths, part_size = (job.preprocessing, job.dense, job.torch_dtype,
                                                              job.relpaths, job.part_size)
    buffers = {"global": [], "dense": [], "index": [], "skipped": []}
    current = todo[0] if todo else None
    forward_s = 0.0
    with torch.inference_mode():
        for indices, pixels, skipped in loader:
            batch_indices = sorted(indices.tolist() + [i for i, _ in skipped])
            part = batch_indices[0] // part_size
            if part != current:
                raise RuntimeError("batches left their part")  # the batch sampler above makes this impossible
            if pixels is not None:
                t0 = time.perf_counter()
                output = backbone(preprocessing.normalize(pixels.to(device, non_blocking=True)))
                buffers["global"].append(output.cls.to("cpu", torch_dtype))
                if dense:
                    buffers["dense"].append(output.patches.to("cpu", torch_dtype))
                forward_s += time.perf_counter() - t0
                buffers["index"].append(indices)
            buffers["skipped"] += [[relpaths[i], reason] for i, reason in skipped]
            bar.update(len(indices) + len(skipped))
            if batch_indices[-1] == min((part + 1) * part_size, len(relpaths)) - 1:
                _write_part(part_path(part), buffers["global"], buffers["dense"], buffers["index"], buffers["skipped"],
                            backbone.embed_dim, job.grid, torch_dtype, job.plan_sha)
                buffers = {"global": [], "dense": [], "index": [], "skipped": []}
                position = todo.index(part)
                current = todo[position + 1] if position + 1 < len(todo) else None
    return forward_s


def embedding_device() -> torch.device:
    """Where embedding runs: this process's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")


def _record_path(partial: Path, shard: int) -> Path:
    """The record of shard ``shard`` once assembled: its file, rows and its parts' row indices and skipped files."""
    return partial / f"shard-{shard:05d}.json"


def _read_record(path: Path) -> Optional[dict]:
    """A shard's record, None when it cannot be read (it is written atomically: only a hand can break it)."""
    try:
        record = json.loads(path.read_text())
        int(record["shard"]), str(record["file"]), list(record["parts"])
        return record
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _shard_records(partial: Path, shards: Optional[Sequence[int]] = None) -> dict[int, dict]:
    """The records of the shards already assembled (their parts are gone), by shard number: every
    record in ``partial``, or those of ``shards`` each opened by its name (a listing of the folder
    on a network file system can lag behind what another process just wrote)."""
    paths = sorted(partial.glob("shard-*.json")) if shards is None else [_record_path(partial, s) for s in shards]
    records = {}
    for path in paths:
        record = _read_record(path)
        if record is None:
            raise UserError(f"{path} cannot be read; run the same mlsctl embed command again")
        records[int(record["shard"])] = record
    return records


def _recorded_shard_files(partial: Path) -> set[str]:
    files = set()
    for path in partial.glob("shard-*.json"):
        record = _read_record(path)
        if record is not None:
            files.add(record["file"])
    return files


def _drop_unusable_records(out: Path, partial: Path, plan_sha: str) -> None:
    """Before an embed continues: forget the records it cannot use — unreadable, of another plan, or
    whose shard is gone (deleted to free space) — so their parts are embedded again instead of the
    run failing for ever."""
    for path in partial.glob("shard-*.json"):
        record = _read_record(path)
        if record is None or record.get("plan_sha256") != plan_sha or not (out / record["file"]).is_file():
            path.unlink(missing_ok=True)


def _assembled_parts(partial: Path, plan_sha: str, shards: Optional[Sequence[int]] = None
                     ) -> dict[int, tuple[list[int], list]]:
    """Part → (row indices, skipped files) of every part already assembled into a shard of this embed
    (of ``shards`` only, when given: :func:`_shard_records`)."""
    return _parts_in(_shard_records(partial, shards), partial, plan_sha)


def _parts_in(records: dict[int, dict], partial: Path, plan_sha: str) -> dict[int, tuple[list[int], list]]:
    """:func:`_assembled_parts` of records already read."""
    parts = {}
    for record in records.values():
        if record.get("plan_sha256") != plan_sha:
            raise UserError(f"{_record_path(partial, record['shard'])} belongs to another embed; run with --overwrite")
        for part in record["parts"]:
            parts[part["part"]] = (part["index"], part["skipped"])
    return parts


def _part_records(part_path, parts, plan_sha: str, assembled: dict):
    """Each part's (row indices, skipped files), checked to be this embed's: from its record when its
    shard is assembled (``assembled``: :func:`_assembled_parts`), else from the part."""
    from safetensors import safe_open

    for k in parts:
        if k in assembled:
            index, skipped = assembled[k]
            yield k, torch.tensor(index, dtype=torch.long), skipped
            continue
        path = part_path(k)
        if not path.is_file():
            raise UserError(f"{path} is missing after every process finished; run the same mlsctl embed command again")
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("plan_sha256") != plan_sha:
                raise UserError(f"{path} belongs to another embed; run with --overwrite")
            yield k, f.get_tensor("index"), json.loads(metadata["skipped"])


def _shard_layout(out: Path, plan_sha: str, n_parts: int, parts_per_shard: int, n_shards: int,
                  part_path) -> list[dict]:
    """Each shard's number, file name, first row and parts (read from the parts' row indices alone),
    and whether it is already assembled."""
    partial = part_path(0).parent
    records = _shard_records(partial)
    assembled = _parts_in(records, partial, plan_sha)
    replaced = _shard_files(out)  # of the features --overwrite replaces: read until the new manifest is in place
    layout, start = [], 0
    for s in range(n_shards):
        parts = list(range(s * parts_per_shard, min((s + 1) * parts_per_shard, n_parts)))
        rows = sum(len(index) for _, index, _ in _part_records(part_path, parts, plan_sha, assembled))
        if s in records:  # assembled before a kill: its file stays
            name = records[s]["file"]
            if not (out / name).is_file():  # checked as the run began (_drop_unusable_records): removed since
                raise UserError(f"{out / name}, assembled by an earlier run of this embed, was removed while this one "
                                f"ran; run the same mlsctl embed command again")
        else:
            name = shard_name(s, n_shards)
            if name in replaced:  # a name the replaced manifest still uses: this shard is written beside it
                name = name.replace(".safetensors", f".{plan_sha[:12]}.safetensors")
        layout.append({"shard": s, "file": name, "start": start, "rows": rows, "parts": parts,
                       "assembled": s in records})
        start += rows
    return layout


def _write_shards(out: Path, layout: list[dict], dense: bool, part_path, rank: int, world: int) -> None:
    """Shards ``rank``, ``rank + world``, ... of ``layout``: their parts concatenated (row order =
    file order), then their record written and their parts deleted. Every process writes its share,
    so no process waits on one writing them all."""
    from safetensors import safe_open

    partial = part_path(0).parent
    for entry in layout[rank::world]:
        if entry["assembled"]:
            continue
        tensors: dict[str, list[torch.Tensor]] = {"global": [], "dense": []}
        record = {"shard": entry["shard"], "file": entry["file"], "rows": entry["rows"], "parts": []}
        for k in entry["parts"]:
            with safe_open(str(part_path(k)), "pt") as f:
                tensors["global"].append(f.get_tensor("global"))
                if dense:
                    tensors["dense"].append(f.get_tensor("dense"))
                metadata = f.metadata() or {}
                record["plan_sha256"] = metadata.get("plan_sha256")
                record["parts"].append({"part": k, "index": f.get_tensor("index").tolist(),
                                        "skipped": json.loads(metadata["skipped"])})
        rows = write_shard(out / entry["file"], torch.cat(tensors["global"]), entry["start"],
                           torch.cat(tensors["dense"]) if dense else None)
        if rows != entry["rows"]:
            raise UserError(f"the parts of {out / entry['file']} changed while it was written; run the same mlsctl "
                            f"embed command again")
        atomic.write_text(_record_path(partial, entry["shard"]), json.dumps(record))  # then the parts may go
        for k in entry["parts"]:
            part_path(k).unlink(missing_ok=True)


def _write_manifest(out: Path, plan: dict, plan_sha: str, layout: list[dict], relpaths: list[str],
                    not_images: list[list[str]], model, preprocessing: Preprocessing) -> dict:
    """The manifest, from the shards' records, written last: the commit of the new features. Then
    the replaced shards and the records go."""
    assembled = _assembled_parts(out / PARTIAL, plan_sha, [entry["shard"] for entry in layout])
    files: list[str] = []
    skipped: list[list[str]] = []
    for entry in layout:
        for k in entry["parts"]:
            if k not in assembled:  # the record says which parts it holds: only a hand could make this
                raise UserError(f"part {k} of {out} is in no shard's record; run the same mlsctl embed command again")
            index, part_skipped = assembled[k]
            files += [relpaths[i] for i in index]
            skipped += part_skipped
    replaced = _shard_files(out)
    shards = [{"file": entry["file"], "rows": entry["rows"]} for entry in layout]
    manifest = feature_manifest(
        input_root=plan["input_root"], model=model.info, preprocessing=preprocessing.to_dict(), dtype=plan["dtype"],
        normalization="none: features are stored as the backbone returns them (after its final norm); consumers "
                      "L2-normalise where their protocol says so",
        dim=plan["dim"], grid=plan["grid"], files=files, skipped=skipped + not_images, shards=shards, plan=plan)
    atomic.write_json(out / MANIFEST, manifest)  # the commit: the new features replace the old ones here
    for name in replaced - {entry["file"] for entry in shards}:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    return manifest


def _shard_files(out: Path) -> set[str]:
    """The shard files the manifest of ``out`` lists (none without a readable manifest)."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        return {entry["file"] for entry in manifest["shards"] if isinstance(entry.get("file"), str)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


# ----------------------------------------------------------------------------------- features on demand


def cache_dir(images: str | os.PathLike, model, root: str | os.PathLike = CACHE_ROOT, dense: bool = True,
              resize: str = "square", resolution: Optional[int] = None, dtype: str = "fp16") -> Path:
    """Where the features of a folder of images live unless told otherwise, for ``embed`` (its default
    ``--out``) and the commands that take images (``eval knn-seg --train IMAGES``, which reuse them):
    ``features/<model>-<fingerprint>/<folder>-<hash>`` (:func:`model_label`, :func:`folder_label`: two
    folders of the same name, or two models' features of one folder, never share one), with ``-global``
    appended for global features alone, ``-center-crop`` for images centre-cropped rather than resized
    whole, ``-rN`` for a resolution other than the model's (``--protocol hummingbird``'s 512 px) and ``-fp32``
    for ``embed --dtype fp32``: each kind of features has a folder of its own, so one never replaces
    another's (reviews, 2026-12-06)."""
    return Path(root) / model_label(model) / (folder_label(images) + _cache_suffix(model, dense, resize, resolution, dtype))


def _cache_suffix(model, dense: bool, resize: str, resolution: Optional[int], dtype: str = "fp16") -> str:
    other = resolution is not None and resolution != model.info.get("img_size")
    return (("" if dense else "-global") + ("" if resize == "square" else f"-{resize}") + (f"-r{resolution}" if other else "")
            + ("" if dtype == "fp16" else f"-{dtype}"))


def split_cache_dir(split, model, root: str | os.PathLike = CACHE_ROOT, dense: bool = True,
                    resize: str = "square", resolution: Optional[int] = None, dtype: str = "fp16") -> Path:
    """:func:`cache_dir` of one split of a benchmark: ``features/<model>-<fingerprint>/<dataset>-<split>-<root label>``."""
    return Path(root) / model_label(model) / (f"{split.dataset}-{split.split}-{folder_label(split.tree.path)}"
                                              + _cache_suffix(model, dense, resize, resolution, dtype))


def _cache_options(embed_options: dict) -> dict:
    """What of an evaluation's embed options names its cache folder (:func:`cache_dir`)."""
    return {"resize": embed_options.get("resize", "square"), "resolution": embed_options.get("resolution"),
            "dtype": embed_options.get("dtype", "fp16")}


def _made_otherwise(out: Path, plan: dict) -> bool:
    """``out`` is a feature folder (complete, or an unfinished embed) of another plan than ``plan``."""
    return _why_made_otherwise(out, plan) is not None


def _why_made_otherwise(out: Path, plan: dict) -> Optional[str]:
    """Why ``out`` is a feature folder made otherwise than by ``plan`` (what differs, and whether it was
    finished), or None where it is not one or was made the same way."""
    for record in (out / MANIFEST, out / PARTIAL / "plan.json"):
        if record.is_file():
            try:
                found = json.loads(record.read_text())
            except (OSError, ValueError):
                return None  # damaged: left to the usual refusal
            previous = found.get("plan", {}) if record.name == MANIFEST and isinstance(found, dict) else found
            if not isinstance(previous, dict):
                return None
            complete = record.name == MANIFEST  # read as it is; an unfinished one is resumed only by its own plan
            what, was = ("the features there", "were") if complete else ("the unfinished embed there", "was")
            # a cache that cannot say what its images were (made before contents were recorded) is made again
            # once, rather than trusted (a probe, 2026-12-06: a pre-upgrade cache kept serving changed images)
            if previous.get("contents_sha256") is None and plan.get("contents_sha256") is not None:
                return f"{what} recorded no sizes or times of its images (an older mlsctl)"
            if not _same_plan(previous, plan, complete=complete, any_dtype=complete):
                why = _plan_difference(previous, plan, complete=complete, reading=complete) or "unknown"
                return f"{what} {was} made otherwise ({why})"
    return None


def features_or_embed(path: str | os.PathLike, get_model: Callable[[], object], *, dense: bool, what: str,
                      say: Callable[[str], None] = to_stderr, **embed_options) -> Features:
    """``path`` itself when it is a feature folder; otherwise ``path`` is a folder of images,
    embedded (or found already embedded) under :func:`cache_dir` with the model ``get_model()``."""
    if is_feature_folder(path):
        return require_rows(Features(path, what), what)
    if not Path(path).is_dir():  # said before a model loads (a probe, 2026-12-06)
        from mlsctl.data.images import scan_images

        scan_images(path, f"{what} (a folder of images)")
    check_images_folder(Path(path))
    # run from inside the images, the cache would lie among them (a code-health review, 2026-12-07)
    check_outside_images_folder(CACHE_ROOT, path, default="the evaluations' feature cache")
    model = get_model()
    where = _cache_options(embed_options)
    out = cache_dir(path, model, dense=dense, **where)
    # a cache: images changed, added or removed since it was made are embedded again, not refused; global
    # features are read from a complete dense cache of the same images where there is one (eval knn-seg's)
    summary = embed_folder(path, out, model, dense=dense, say=say, refresh=True,
                           dense_cache=None if dense else cache_dir(path, model, dense=True, **where), **embed_options)
    _say_embedded(summary, str(path), summary.out, what, say)
    return require_rows(Features(summary.out, what), what)


def require_rows(features: Features, what: str) -> Features:
    """An evaluation needs rows: a folder whose every image was skipped is one sentence, not a crash."""
    if len(features) == 0:
        raise UserError(f"{what} {features.path} hold no rows: none of the images could be read "
                        f"({len(features.manifest.get('skipped', []))} skipped, with their reasons in "
                        f"{features.path / MANIFEST}); embed a folder of readable images")
    return features


def features_of_split(split, get_model: Callable[[], object], *, dense: bool, what: str,
                      say: Callable[[str], None] = to_stderr, **embed_options) -> Features:
    """The features of one split of a benchmark (:mod:`mlsctl.data.datasets`), embedded (or found
    already embedded) under :func:`split_cache_dir` with the model ``get_model()``."""
    model = get_model()
    where = _cache_options(embed_options)
    out = split_cache_dir(split, model, dense=dense, **where)
    dense_cache = None if dense else split_cache_dir(split, model, dense=True, **where)
    summary = embed_split(split, out, model, dense=dense, say=say, refresh=True, dense_cache=dense_cache,
                          **embed_options)
    _say_embedded(summary, f"{split.dataset} {split.split} ({split.tree.path})", summary.out, what, say)
    return require_rows(Features(summary.out, what), what)


def _say_embedded(summary: EmbedSummary, source: str, out: Path, what: str, say: Callable[[str], None]) -> None:
    if summary.reused:
        say(f"{what}: using the features of {source} already in {out}")
    else:
        rate = f"{summary.images_per_s:.0f} images/s" if summary.images_per_s else "from parts embedded before"
        say(f"{what}: embedded {summary.rows} images of {source} into {out} ({rate})")
    from mlsctl.data.images import NOT_AN_IMAGE

    unreadable = [path for path, reason in summary.skipped if not str(reason).startswith(NOT_AN_IMAGE)]
    if unreadable:  # scored without them: said, not silently (a new user's probe, 2026-12-08)
        named = ", ".join(unreadable[:3]) + (f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else "")
        say(f"note: {what}: {len(unreadable)} image file{'s' if len(unreadable) != 1 else ''} of {source} could not "
            f"be read and {'are' if len(unreadable) != 1 else 'is'} not scored ({named}; the reasons are in "
            f"{out / MANIFEST})")
