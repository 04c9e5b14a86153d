"""Galleries of objects for image-set search: one MILE set embedding per object, in faiss.

A gallery folder::

    GALLERY/gallery.json        kind "mlsctl-gallery", format_version, the model (run, step,
                                fingerprint of backbone + set encoder, attend, dim), the index
                                (flat, or ivfpq with nlist, m, nbits, nprobe, refine) and the count
    GALLERY/objects.txt         object ids, line i = faiss id i
    GALLERY/latents.safetensors latent [n, D]: each object's latent state L (not normalised, so
                                `index add` can fold more images into it); count [n]: images folded
    GALLERY/index.faiss         the L2-normalised latents (inner product = cosine)

:class:`SetModel` embeds images with a MILE run's teacher: backbone CLS (and patch tokens with
``attend: patches``) and the set encoder's recurrence. Folding images one at a time gives the
same latent as embedding the set at once (``tests/test_mile.py``), which is what lets
``index add`` fold new photos into an object without recomputing its earlier ones.

Search is exact with the flat index. With IVF-PQ, faiss returns ``refine × k`` candidates from
the compressed codes and their exact cosines (from the stored latents) re-rank them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mlsctl import __version__, atomic
from mlsctl.errors import UserError

GALLERY_FORMAT_VERSION = 1
MANIFEST = "gallery.json"


# ---------------------------------------------------------------------------------------- the model
@dataclass
class SetModel:
    backbone: object  # ModelChoice of the teacher backbone
    encoder: torch.nn.Module  # SetEncoder
    attend: str
    resolution: int
    run: str
    step: int

    @property
    def dim(self) -> int:
        return self.backbone.backbone.embed_dim

    @property
    def fingerprint(self) -> str:
        from mlsctl.models.source import fingerprint

        return hashlib.sha256((self.backbone.fingerprint + fingerprint(self.encoder) + self.attend).encode()).hexdigest()

    @torch.no_grad()
    def image_tokens(self, images: Sequence, batch_size: int = 64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """PIL images → CLS [n, D] and, with ``attend: patches``, patch tokens [n, p, D]."""
        from mlsctl.features import Preprocessing

        preprocessing = Preprocessing(self.resolution, "square")
        cls, tokens = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([preprocessing(img) for img in images[start:start + batch_size]])
            out = self.backbone.backbone(batch)
            cls.append(out.cls.float())
            if self.attend == "patches":
                tokens.append(out.patches.flatten(1, 2).float())
        return torch.cat(cls), (torch.cat(tokens) if tokens else None)

    @torch.no_grad()
    def fold(self, latent: Optional[torch.Tensor], cls: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fold images (CLS [t, D], tokens [t, p, D]) one by one into ``latent`` [D] (None: a new set,
        ``L_0 = e_0``)."""
        start = 0
        if latent is None:
            latent, start = cls[0], 1
        latent = latent[None]
        for t in range(start, cls.shape[0]):
            context = cls[t][None, None] if tokens is None else tokens[t][None]
            latent = self.encoder.fold(latent, context)
        return latent[0]


def load_set_model(run_dir: str | os.PathLike) -> SetModel:
    """The teacher backbone and set encoder of a MILE run's latest checkpoint."""
    import dataclasses

    from safetensors.torch import load_file

    from mlsctl import config as config_lib, methods
    from mlsctl.models.source import model_choice
    from mlsctl.runs import Run
    from mlsctl.schedules import Schedule

    run = Run(run_dir)
    if not run.config_path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml); give a MILE run written by mlsctl pretrain")
    recipe = config_lib.load_recipe(str(run.config_path))
    if recipe.method.name != "mile":
        raise UserError(f"run {run.root} trained {recipe.method.name}, not mile; galleries need a MILE run's set encoder")
    checkpoint = run.checkpoint()
    recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, weights=None, pretrained=False))
    method = methods.method_class("mile")(recipe, Schedule(steps_per_epoch=1, epochs=recipe.optim.epochs))
    method.load_state_dict(load_file(str(checkpoint.model_path)), strict=True)
    method.eval()
    backbone = model_choice(method.teacher_backbone(), f"teacher of MILE run {run.root} at step {checkpoint.step}",
                            "run-checkpoint", str(checkpoint.path), recipe.model.img_size)
    return SetModel(backbone, method.teacher_encoder(), recipe.method.attend, recipe.data.global_crops.size,
                    str(run.root), checkpoint.step)


# ---------------------------------------------------------------------------------------- objects
def check_object_id(object_id: str, where: str = "--object") -> str:
    """Refuse an object id the gallery cannot store and find again: empty or blank, with a control
    character (a newline would split objects.txt), or not valid UTF-8."""
    from mlsctl.data.images import name_problem, printable_name

    if not object_id or not object_id.strip():
        raise UserError(f"{where} {object_id!r} is empty or blank; give each object a visible id")
    problem = name_problem(object_id)
    if problem:
        raise UserError(f"{where} '{printable_name(object_id)}' {problem}; object ids are single-line text")
    return object_id


def object_folders(root: str | os.PathLike) -> dict[str, list[Path]]:
    """``ROOT/<object_id>/*`` images, files sorted by name (the folding order). Files whose names
    cannot be stored are skipped and reported (see :func:`~mlsctl.data.images.scan_images`)."""
    import logging

    from mlsctl.data.images import require_images, scan_images

    root = Path(root)
    scan = scan_images(root, "gallery images")
    require_images(scan, "gallery images")
    for line in scan.notes("gallery images"):
        logging.getLogger("mlsctl").warning(line)
    groups: dict[str, list[Path]] = {}
    for path in scan.files:
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            raise UserError(f"{path} is not inside an object folder; put each object's images in {root}/<object_id>/")
        groups.setdefault(check_object_id(rel.parts[0], "object folder"), []).append(path)
    return {k: sorted(v) for k, v in sorted(groups.items())}


def load_images(paths: Sequence[Path]) -> list:
    from mlsctl.data.images import BadImage, load_rgb

    images = []
    for path in paths:
        try:
            images.append(load_rgb(path))
        except (BadImage, OSError) as exc:
            raise UserError(f"cannot read {path}: {exc}") from None
    return images


# ---------------------------------------------------------------------------------------- index
@dataclass
class IndexSettings:
    kind: str = "flat"  # flat | ivfpq
    nlist: Optional[int] = None  # IVF lists [default: sqrt(n), at most n / 39]
    m: Optional[int] = None  # PQ sub-quantisers [default: D / 8]
    nbits: int = 8
    nprobe: int = 32
    refine: int = 10  # candidates per result re-ranked exactly

    def to_dict(self) -> dict:
        return dict(vars(self))


def _normalized(latents: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(latents.float(), dim=1).numpy(), dtype=np.float32)


def build_index(latents: torch.Tensor, settings: IndexSettings):
    import faiss

    vectors = _normalized(latents)
    n, d = vectors.shape
    ids = np.arange(n, dtype=np.int64)
    if settings.kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    elif settings.kind == "ivfpq":
        nlist = settings.nlist or max(1, min(int(n ** 0.5), n // 39))
        m = settings.m or max(1, d // 8)
        if d % m:
            raise UserError(f"--pq-m {m} must divide the embedding width {d}")
        if n < 39 * nlist or n < 2 ** settings.nbits:
            raise UserError(f"IVF-PQ with {nlist} lists and {settings.nbits}-bit codes needs at least "
                            f"{max(39 * nlist, 2 ** settings.nbits)} objects to train, the gallery has {n}; use --index flat")
        settings.nlist, settings.m = nlist, m
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, settings.nbits, faiss.METRIC_INNER_PRODUCT)
        # k-means on 64 vectors per list (faiss asks for at least 39 per list, 39 per PQ centroid)
        # keeps training to a minute at 1M on 2 cores
        wanted = max(64 * nlist, 64 * 2 ** settings.nbits)
        train = vectors if n <= wanted else vectors[np.random.default_rng(0).choice(n, wanted, replace=False)]
        index.train(train)
        index.nprobe = settings.nprobe
    else:
        raise UserError(f"--index must be flat or ivfpq, got {settings.kind!r}")
    index.add_with_ids(vectors, ids)
    return index


def search_index(index, unit_latents: np.ndarray, queries: torch.Tensor, k: int, settings: IndexSettings
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(cosines [q, k], ids [q, k]) of the nearest objects; IVF-PQ candidates re-ranked exactly
    with ``unit_latents`` (the L2-normalised latents, row = faiss id, see :func:`unit_rows`)."""
    q = _normalized(queries)
    k = min(k, index.ntotal)
    if settings.kind == "flat":
        return index.search(q, k)
    index.nprobe = settings.nprobe
    _, candidates = index.search(q, min(index.ntotal, k * settings.refine))
    scores, ids = np.full((len(q), k), -np.inf, dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
    for row, found in enumerate(candidates):
        found = found[found >= 0]
        exact = unit_latents[found] @ q[row]
        order = np.argsort(-exact, kind="stable")[:k]
        scores[row, :len(order)], ids[row, :len(order)] = exact[order], found[order]
    return scores, ids


def unit_rows(latents: torch.Tensor) -> np.ndarray:
    """The L2-normalised latents as float32 numpy rows (what IVF-PQ re-ranking reads)."""
    return _normalized(latents)


# ---------------------------------------------------------------------------------------- gallery
class Gallery:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        from safetensors.torch import load_file

        import faiss

        rebuild = "rebuild the gallery with mlsctl index build"
        try:
            self.ids = _read_ids(self.path / "objects.txt")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path / 'objects.txt'} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                            f"{rebuild}") from None
        try:
            state = load_file(str(self.path / "latents.safetensors"))
            self.latents, self.counts = state["latent"], state["count"]
        except Exception as exc:  # missing, truncated, foreign
            raise UserError(f"{self.path / 'latents.safetensors'} cannot be read ({_first_line(exc)}); {rebuild}") from None
        if self.latents.ndim != 2 or self.counts.shape != (len(self.latents),):
            raise UserError(f"{self.path / 'latents.safetensors'} holds tensors of the wrong shape; {rebuild}")
        index_path = self.path / "index.faiss"
        if not index_path.is_file():
            raise UserError(f"{index_path} is missing; {rebuild}")
        try:
            self.index = faiss.read_index(str(index_path))
        except Exception as exc:  # faiss raises RuntimeError with its C++ message for any junk
            raise UserError(f"{index_path} is not a faiss index ({_first_line(exc)}); {rebuild}") from None
        self.settings = IndexSettings(**self.manifest["index"])
        if not (len(self.ids) == len(self.latents) == self.index.ntotal == self.manifest["objects"]):
            raise UserError(f"{self.path} is inconsistent ({len(self.ids)} ids, {len(self.latents)} latents, "
                            f"{self.index.ntotal} indexed); {rebuild}")
        if self.index.d != self.latents.shape[1]:
            raise UserError(f"{index_path} indexes {self.index.d} dimensions, the latents have {self.latents.shape[1]}; "
                            f"{rebuild}")
        self.row_of = {object_id: i for i, object_id in enumerate(self.ids)}

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    def check_model(self, model: SetModel) -> None:
        if model.fingerprint != self.fingerprint:
            raise UserError(f"gallery {self.path} was built with model {self.fingerprint[:12]} "
                            f"({self.manifest['model']['run']} at step {self.manifest['model']['step']}); the query model "
                            f"{model.fingerprint[:12]} ({model.run} at step {model.step}) differs: rebuild the gallery "
                            f"or query with its run")

    def search(self, latent: torch.Tensor, k: int) -> list[tuple[str, float]]:
        unit = unit_rows(self.latents) if self.settings.kind != "flat" else None
        scores, ids = search_index(self.index, unit, latent[None], k, self.settings)
        return [(self.ids[i], float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]

    def add(self, model: SetModel, object_id: str, images: Sequence) -> tuple[bool, int]:
        """Fold ``images`` into ``object_id`` (created when new); returns (created, images now folded)."""
        check_object_id(object_id)
        self.check_model(model)
        cls, tokens = model.image_tokens(images)
        row = self.row_of.get(object_id)
        created = row is None
        latent = model.fold(None if created else self.latents[row], cls, tokens)
        if created:
            row = len(self.ids)
            self.ids.append(object_id)
            self.row_of[object_id] = row
            self.latents = torch.cat([self.latents, latent[None]])
            self.counts = torch.cat([self.counts, torch.tensor([len(images)])])
        else:
            self.latents[row] = latent
            self.counts[row] += len(images)
            self.index.remove_ids(np.array([row], dtype=np.int64))
        self.index.add_with_ids(_normalized(latent[None]), np.array([row], dtype=np.int64))
        self._save()
        return created, int(self.counts[row])

    def _save(self) -> None:
        save(self.path, self.ids, self.latents, self.counts, self.index, self.manifest)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def _read_ids(path: Path) -> list[str]:
    """objects.txt: one id per line (ids never hold a line break: :func:`check_object_id`)."""
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1] if text.endswith("\n") else (text.split("\n") if text else [])


def read_manifest(path: Path) -> dict:
    """gallery.json, checked for the fields and types the gallery needs."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{path} is not a gallery (no {MANIFEST}); build one with mlsctl index build")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{manifest_path} is damaged ({exc}); rebuild the gallery with mlsctl index build") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "mlsctl-gallery":
        raise UserError(f"{manifest_path} is not an mlsctl gallery manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{manifest_path} is damaged (no integer format_version); rebuild the gallery")
    if version > GALLERY_FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer mlsctl; upgrade mlsctl")
    model, index = manifest.get("model"), manifest.get("index")
    known = set(IndexSettings().to_dict())
    problem = None
    if not (isinstance(model, dict) and isinstance(model.get("fingerprint"), str) and isinstance(model.get("run"), str)):
        problem = "'model' must hold the run and fingerprint"
    elif not (isinstance(index, dict) and set(index) <= known and index.get("kind") in ("flat", "ivfpq")
              and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for k, v in index.items() if k != "kind")):
        problem = "'index' must hold kind flat|ivfpq and integer settings"
    elif not (isinstance(manifest.get("objects"), int) and manifest["objects"] >= 0):
        problem = "'objects' must be a count"
    if problem:
        raise UserError(f"{manifest_path} is damaged ({problem}); rebuild the gallery with mlsctl index build")
    return manifest


def save(path: Path, ids: list[str], latents: torch.Tensor, counts: torch.Tensor, index, manifest: dict) -> None:
    """Write every file atomically, the manifest (with the count) last."""
    import faiss
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path / "objects.txt", "".join(f"{i}\n" for i in ids))
    atomic.write_with(path / "latents.safetensors", lambda tmp: save_file(
        {"latent": latents.contiguous(), "count": counts.contiguous()}, str(tmp)))
    atomic.write_with(path / "index.faiss", lambda tmp: faiss.write_index(index, str(tmp)))
    manifest = dict(manifest, objects=len(ids), updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic.write_json(path / MANIFEST, manifest)


def _feature_groups(source: Path, model: SetModel) -> dict[str, torch.Tensor]:
    """CLS features of a feature folder (mlsctl embed of ROOT/<object_id>/*) grouped by object."""
    from mlsctl.features import Features

    features = Features(source)
    if features.model.get("fingerprint") != model.backbone.fingerprint:
        raise UserError(f"{source} was embedded with model {str(features.model.get('fingerprint'))[:12]}, not the "
                        f"teacher of {model.run} ({model.backbone.fingerprint[:12]}); embed with --run {model.run}")
    if model.attend != "cls":
        raise UserError(f"run {model.run} attends to patch tokens; build the gallery from the images, not from {source}")
    rows: dict[str, list[int]] = {}
    for row, name in sorted(enumerate(features.files), key=lambda rf: rf[1]):
        parts = Path(name).parts
        if len(parts) < 2:
            raise UserError(f"{name} in {source} is not inside an object folder")
        rows.setdefault(parts[0], []).append(row)
    cls = features.global_features()
    return {object_id: cls[r] for object_id, r in sorted(rows.items())}


def build_gallery(source: str | os.PathLike, model: SetModel, out: str | os.PathLike, settings: IndexSettings,
                  *, overwrite: bool = False, progress: bool = True) -> dict:
    """One set embedding per object of ``source``: ``ROOT/<object_id>/*`` images, or a feature
    folder of them written by ``mlsctl embed`` with the same run (files fold in name order)."""
    from tqdm import tqdm

    from mlsctl.features import is_feature_folder

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise UserError(f"{out} exists and is not a gallery; choose another --out")
        if not overwrite:
            raise UserError(f"{out} already holds a gallery; add --overwrite to rebuild it (or add images with mlsctl index add)")
    ids, latents, counts = [], [], []
    if is_feature_folder(source):
        for object_id, cls in _feature_groups(Path(source), model).items():
            ids.append(object_id)
            latents.append(model.fold(None, cls.float()))
            counts.append(len(cls))
    else:
        groups = object_folders(source)
        for object_id, paths in tqdm(groups.items(), desc="gallery", unit="object", disable=None if progress else True,
                                     leave=False):
            cls, tokens = model.image_tokens(load_images(paths))
            ids.append(object_id)
            latents.append(model.fold(None, cls, tokens))
            counts.append(len(paths))
    if not ids:
        raise UserError(f"{source} holds no object")
    latents_t = torch.stack(latents)
    index = build_index(latents_t, settings)
    manifest = {"kind": "mlsctl-gallery", "format_version": GALLERY_FORMAT_VERSION, "mlsctl_version": __version__,
                "source": os.path.abspath(source),
                "model": {"run": os.path.abspath(model.run), "step": model.step, "fingerprint": model.fingerprint, "attend": model.attend,
                          "dim": model.dim, "resolution": model.resolution, "arch": model.backbone.info["arch"]},
                "index": settings.to_dict(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save(out, ids, latents_t, torch.tensor(counts), index, manifest)
    return dict(manifest, objects=len(ids), images=int(sum(counts)))


def newest_gallery(root: str | os.PathLike = ".", max_depth: int = 4) -> Optional[Path]:
    """The gallery under ``root`` (at most ``max_depth`` folders down) whose manifest is newest."""
    root = Path(root)
    best, best_time = None, -1.0
    skip = {".git", ".venv", "node_modules", "__pycache__"}
    for directory, subdirs, files in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        subdirs[:] = [d for d in subdirs if d not in skip and depth < max_depth]
        if MANIFEST in files:
            path = Path(directory) / MANIFEST
            try:
                if json.loads(path.read_text()).get("kind") != "mlsctl-gallery":
                    continue
            except (OSError, ValueError, AttributeError):
                continue
            stamp = path.stat().st_mtime
            if stamp > best_time:
                best, best_time = Path(directory), stamp
    return best
