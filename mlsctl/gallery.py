"""Galleries of objects for image-set search: one set embedding per object, in faiss.

A gallery folder (format 2)::

    GALLERY/gallery.json   kind "mlsctl-gallery", format_version, the model (absolute run path,
                           step, set_model "mile" or "mean-cls", fingerprint of backbone + set
                           encoder or of backbone + "mean-cls", attend, dim), the
                           preprocessing of its photos, the index settings, ``rows`` (committed
                           rows), ``objects`` (live ids), ``indexed_rows`` / ``trained_rows`` (rows
                           when index.faiss was saved / its quantiser trained), ``storage_dtype``
    GALLERY/objects.txt    one id per row; the last row of an id is its live one
    GALLERY/latents.bin    raw rows [rows, D] (fp32, or fp16): each object's latent state L, not
                           normalised, so `index add` can fold more photos into it
    GALLERY/unit.bin       the same rows L2-normalised (what search re-ranks with)
    GALLERY/counts.bin     int64 [rows]: photos folded; -1 (:data:`REMOVED_COUNT`) in a tombstone row
    GALLERY/index.faiss    IVF-PQ only: the index as last saved (a flat index is built at open)

Every file grows by appending, and ``rows`` in gallery.json (written atomically, last) commits an
append: a kill leaves the gallery as before or after an add, and an add costs the same at 10k or
1M objects. The row files are memory-mapped, not loaded.

Removing an object (:meth:`Gallery.remove`, ``mlsctl index remove``) appends a tombstone row for its id,
committed the same way: count -1 (:data:`REMOVED_COUNT`), a zero latent. An id whose last row is a tombstone
is absent to every reader (ids, searches, counts, ``index info``); its rows stay in the files until
``index retrain`` writes the live rows alone. A gallery that holds tombstone rows says format 4, which the
mlsctl of format 3 refuses (it would read them as objects); build and retrain write format 3. The ids removed
(never their latents) outlive the tombstones: a compaction (retrain, ``index remove --purge``) and a rebuild with
``--overwrite`` write the ids ever removed (those added again since included; a rebuild leaves out those it
builds, ``--restore-removed`` or ``--restore-removed-id``) into ``removed.txt`` of the new version folder
(:data:`REMOVED_IDS`, counted by the manifest's ``removed_ids``), and the gallery says format 5, which the mlsctl of
format 4 refuses (its compaction would drop the record, and its rebuild bring the objects back);
:meth:`Gallery.removed_ids` is that record and the ids tombstoned since, less those added again. A rebuild skips
every id ever removed in its source (matched by :func:`lookalike_key`, as every reader matches ids), and counts a
removed object added again as added since the build.

Each photo folded from a file or an upload is remembered by the sha256 of its bytes (as read, before decoding: each file
is read once, and the bytes hashed are those decoded, :func:`read_photo`, :class:`_Photos`) in
``photos.bin`` of the version folder (:data:`PHOTO_HASHES`: 40-byte records, the row that folded it (int64) and the
digest, counted by the manifest's ``photo_hashes``; format 5 too). It grows by appending with the row files and is
committed by the same manifest write, so a kill leaves both as before or after an add. A photo's digest belongs to the
object of its row, from the object's last tombstone on (a removed object's photos leave with it); an add skips the
photos the object already holds (:meth:`Gallery.photos_to_fold`), so a retried add, or a rerun of adds killed half-way,
folds nothing twice. The file is read when an add first asks, not at open (:class:`HeldPhotos`); a compaction writes
the live objects' records again. A gallery built from a feature folder, or written before format 5, holds no digests
for its earlier photos: those are not known, and adding them again folds them again.

:class:`SetModel` embeds images with a MILE run's teacher: backbone CLS (and patch tokens with
``attend: patches``) and the set encoder's recurrence (the model and its fold are
:class:`mlsctl.methods.mile.set_model.MILESetModel`; this class adds the photos' preprocessing).
Two kinds of set model fold an object's photos into its latent, and :func:`load_set_model` picks by the run:
:class:`SetModel` for a MILE run, :class:`MeanCLSSetModel` for a run of any other method, whose teacher embeds the
photos and whose latent is the sum of their raw CLS embeddings, with the cosine of their mean (MILE's paper's
mean-CLS baseline; ``eval retrieval``'s ``mean-cls`` scores the same). Both share the photo side,
:class:`SetPhotos`. With either, folding images one at a time gives the same latent as embedding the set at once
(``tests/test_mile.py``, ``tests/test_gallery.py``), which is what lets ``index add`` fold new photos into an
object without recomputing its earlier ones.

Search is exact with the flat index. With IVF-PQ, faiss returns ``refine × k`` candidates from
the compressed codes and their exact cosines (from the stored latents) re-rank them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import numpy as np
import torch

from mlsctl import __version__, atomic, threads
from mlsctl.console import LogProgress, counted, to_stderr
from mlsctl.data.archive import Tree
from mlsctl.data.kinds import GALLERY_MANIFEST
from mlsctl.data.loader import Loader, worker_init
from mlsctl.errors import UserError, first_line
from mlsctl.features import TreeImages, collate_images, default_workers, embedding_device, is_feature_folder
from mlsctl.locks import LOCK_NAME, FolderLock
from mlsctl.methods.mile.set_model import MILESetModel
from mlsctl.runs import RUNS_ROOT

log = logging.getLogger("mlsctl")

GALLERY_FORMAT_VERSION = 5  # the newest format read and written: format 4 that records removed ids (REMOVED_IDS)
TOMBSTONE_FORMAT_VERSION = 4  # format 3 that may hold removals (tombstone rows)
PLAIN_FORMAT_VERSION = 3  # a gallery without tombstone rows, as build, retrain and the move of format 2 write it
READABLE_FORMAT_VERSION = 2  # format 2 (row files beside gallery.json) is read, and moved by writers
REMOVED_COUNT = -1  # counts.bin of a tombstone row: `index remove` removed its id (its latent and unit rows are zero)
MANIFEST = GALLERY_MANIFEST


# ---------------------------------------------------------------------------------------- the model
# The kinds of set model, as a gallery records them (model.set_model), and what their sets are in words
SET_MODEL_KINDS = {"mile": "MILE sets (a MILE run's set encoder folds the photos)",
                   "mean-cls": "mean-CLS sets (the mean of the photos' CLS embeddings)"}


class SetPhotos:
    """The photo side of a set model, the same for every kind (:class:`SetModel`, :class:`MeanCLSSetModel`): how
    photos become its inputs (the preprocessing a gallery records) and the CLS (and patch tokens) its
    ``fold`` takes. A set model using it has ``backbone`` (a ModelChoice), ``resolution``, ``attend`` and ``dim``."""

    def preprocessing(self) -> dict:
        """How photos become model inputs (recorded in the gallery: its rows and every query must agree)."""
        return {"resolution": self.resolution, "resize": "square", "dtype": "float32"}

    def preprocessor(self):
        from mlsctl.features import Preprocessing

        return Preprocessing(self.resolution, "square")

    @torch.no_grad()
    def image_tokens(self, images: Sequence, batch_size: int = 64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Photos (PIL images, or paths read with :func:`load_images`) → CLS [n, D] and, with
        ``attend: patches``, patch tokens [n, p, D]: what :meth:`fold` takes. A path is decoded and
        resized to the model's input at once, so only that small copy of it is kept (as the server
        keeps its photos): 40 phone photos of 4000x3000, all decoded before any was resized, took
        2.65 GB in `index add` and `search --set` (an attacker's probe, 2026-12-07)."""
        cls, tokens, _ = self.photo_tokens(images, batch_size, hashed=False)  # a search records nothing
        return cls, tokens

    @torch.no_grad()
    def photo_tokens(self, images: Sequence, batch_size: int = 64, hashed: bool = True
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor], list[Optional[bytes]]]:
        """:meth:`image_tokens`, and the :func:`photo_digest` of each image: of the bytes a path's file was read as
        and decoded from (read once: :func:`read_photo`), None for a decoded image (no bytes to know it by) and
        without ``hashed``."""
        preprocessing = self.preprocessor()
        pixels, digests = [], []
        for image in images:
            digest, image = read_photo(image, hashed) if isinstance(image, (str, os.PathLike)) else (None, image)
            pixels.append(preprocessing.pixels(image))
            digests.append(digest)
        if not pixels:
            return (*self.pixel_tokens(torch.empty(0, 3, self.resolution, self.resolution, dtype=torch.uint8)), [])
        return (*self.pixel_tokens(torch.stack(pixels), batch_size), digests)

    @torch.no_grad()
    def pixel_tokens(self, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images already resized by :meth:`preprocessor` (uint8 [n, 3, R, R]) → what
        :meth:`image_tokens` returns (the server keeps only these small copies of its photos), on
        the CPU, computed where the backbone is."""
        preprocessing = self.preprocessor()
        device = next(self.backbone.backbone.parameters()).device
        if not len(pixels):
            return torch.empty(0, self.dim), (torch.empty(0, 0, self.dim) if self.attend == "patches" else None)
        cls, tokens = [], []
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start:start + batch_size].to(device, non_blocking=True)
            out = self.backbone.backbone(preprocessing.normalize(batch))
            cls.append(out.cls.float().cpu())
            if self.attend == "patches":
                tokens.append(out.patches.flatten(1, 2).float().cpu())
        return torch.cat(cls), (torch.cat(tokens) if tokens else None)

    @torch.no_grad()
    def path_tokens(self, paths: Sequence[Path], *, batch_size: int = 64, workers: Optional[int] = None,
                    progress: Optional[bool] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Photo files → what :meth:`image_tokens` returns, decoded in loader workers a batch at a
        time (:func:`set_tokens` of one set): for many photos, where :meth:`image_tokens` of
        :func:`load_images` would hold every decoded photo at once."""
        if not paths:
            return self.pixel_tokens(torch.empty(0, 3, self.resolution, self.resolution, dtype=torch.uint8))
        cls, tokens, _ = next(set_tokens([paths], self, batch_size=batch_size, workers=workers, progress=progress))
        return cls, tokens


class SetModel(SetPhotos, MILESetModel):
    """A MILE set model (:class:`~mlsctl.methods.mile.set_model.MILESetModel`: backbone, set encoder,
    :meth:`fold`) with the photo side a gallery needs (:class:`SetPhotos`)."""

    kind: ClassVar[str] = "mile"  # what a gallery records as model.set_model


@dataclass
class MeanCLSSetModel(SetPhotos):
    """Any backbone as a set model: a set's latent is the sum of its photos' raw CLS embeddings (not normalised), so
    its cosine is that of their mean, MILE's paper's mean-CLS baseline (``eval retrieval``'s ``mean-cls``). What a
    gallery of a run that is not MILE folds with; the photo side is :class:`SetPhotos`, as :class:`SetModel`'s."""

    backbone: object  # ModelChoice of the run's teacher (mlsctl.restore.from_run)
    resolution: int
    run: str
    step: int
    attend: str = "cls"  # the CLS only: no patch tokens
    set_length: Optional[int] = None  # no set length a mean holds: no long-set note

    kind: ClassVar[str] = "mean-cls"

    @property
    def dim(self) -> int:
        return self.backbone.backbone.embed_dim

    @property
    def device(self) -> torch.device:
        """Where the backbone is (:meth:`to`)."""
        return next(self.backbone.backbone.parameters()).device

    def to(self, device: torch.device | str) -> "MeanCLSSetModel":
        """Move the backbone to ``device``; returns the model."""
        self.backbone.backbone.to(device)
        return self

    @functools.cached_property
    def fingerprint(self) -> str:
        """The backbone's fingerprint and the kind: a mean-CLS gallery's fingerprint is never its backbone's alone
        (nor a MILE set model's, which hashes a set encoder with it)."""
        return hashlib.sha256((self.backbone.fingerprint + self.kind).encode()).hexdigest()

    @torch.no_grad()
    def fold(self, latent: Optional[torch.Tensor], cls: torch.Tensor, tokens: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
        """Add images' raw CLS rows (CLS [t, D], float32; ``tokens`` unused) one by one to ``latent`` [D] (None: a new
        set, the first row): the running sum, so folding photos one at a time gives the latent of folding them at
        once, to the bit. On ``cls``'s device."""
        rows = cls.float()
        start = 0
        if latent is None:
            latent, start = rows[0].clone(), 1
        latent = latent.to(rows.device, torch.float32)
        for t in range(start, rows.shape[0]):
            latent = latent + rows[t]
        return latent


def load_set_model(run_dir: str | os.PathLike,
                   device: Optional[torch.device | str] = None) -> SetModel | MeanCLSSetModel:
    """The set model of a run, on ``device`` (None: where ``mlsctl embed`` runs,
    :func:`mlsctl.features.embedding_device`: this process's GPU when there is one): of a MILE run, the teacher
    backbone and set encoder of its latest checkpoint (:class:`SetModel`); of a run of any other method that trains
    a backbone, the mean-CLS model of its teacher (:class:`MeanCLSSetModel`, what ``mlsctl embed --run`` embeds
    with: the exported teacher, or the latest checkpoint's)."""
    from mlsctl.models.source import model_choice
    from mlsctl.restore import method_from_checkpoint, open_run, recipe_of

    run = open_run(run_dir, hint="give a run written by mlsctl pretrain")
    recipe = recipe_of(run)
    if recipe.method.name != "mile":
        return _mean_cls_set_model(run, recipe).to(device if device is not None else embedding_device())
    recipe, method, checkpoint = method_from_checkpoint(run, recipe=recipe)
    method.eval()
    backbone = model_choice(method.teacher_backbone(), f"teacher of MILE run {run.root} at step {checkpoint.step}",
                            "run-checkpoint", str(checkpoint.path), recipe.model.img_size)
    model = SetModel(backbone, method.teacher_encoder(), recipe.method.attend, recipe.data.global_crops.size,
                     str(run.root), checkpoint.step, recipe.method.set_length)
    return model.to(device if device is not None else embedding_device())


def set_model_kind_of_run(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(the run's folder as a set model names it, the kind of set model :func:`load_set_model` gives for it:
    :data:`SET_MODEL_KINDS`), from its config.yaml alone, no weights read: "mile" for a MILE run, else "mean-cls"."""
    from mlsctl.restore import open_run, recipe_of

    run = open_run(run_dir, hint="give a run written by mlsctl pretrain")
    return str(run.root), "mile" if recipe_of(run).method.name == "mile" else "mean-cls"


def _mean_cls_set_model(run, recipe) -> MeanCLSSetModel:
    """:class:`MeanCLSSetModel` of the teacher of ``run`` (not MILE): its exported teacher, or its latest
    checkpoint's (:func:`mlsctl.restore.from_run`), at the size of the views it trained on, as a MILE run's."""
    from mlsctl import methods
    from mlsctl.restore import from_run

    if not methods.method_class(recipe.method.name).has_backbone:
        raise UserError(f"run {run.root} trained {recipe.method.name}, which trains no backbone (it refines features); "
                        f"set embeddings (galleries, search, eval retrieval) need a run that trains one: give a run "
                        f"of mlsctl pretrain")
    backbone = from_run(run.root)
    checkpoint = run.latest()
    step = backbone.info.get("step", checkpoint.step if checkpoint is not None else run.summary().get("steps"))
    return MeanCLSSetModel(backbone, recipe.data.global_crops.size, str(run.root), step)


def unfinished_run_note(model: SetModel) -> Optional[str]:
    """The note for a gallery built with a run that has not finished (no summary.json): its latest checkpoint embeds
    the objects, and once the run is resumed the gallery refuses it (newer weights) while old checkpoints are
    rotated away, so the gallery must be built again and what was added to it since is lost (a new user's probe,
    2026-12-07: nothing said so at the build)."""
    from mlsctl.runs import Run

    if Run(model.run).summary():
        return None
    return (f"note: run {model.run} has not finished: its latest checkpoint (step {model.step}) embeds the objects; "
            f"resumed, the run answers with newer weights, the gallery refuses them, and it must be built again, "
            f"without what was added to it since; finish the run before building a gallery to keep")


def run_of_features(source: str | os.PathLike) -> Optional[Path]:
    """The run whose teacher (or checkpoint) embedded the feature folder ``source``, where its manifest
    names one that is still there; else None."""
    from mlsctl.features import Features
    from mlsctl.runs import run_of_model

    record = Features(source).model
    run = run_of_model(record.get("source"), record.get("path"))
    return run if run is not None and run.is_dir() else None


def choose_set_model(run_dir: Optional[str | os.PathLike], say: Callable[[str], None] = to_stderr,
                     features: Optional[str | os.PathLike] = None,
                     gallery: Optional["Gallery"] = None) -> SetModel | MeanCLSSetModel:
    """:func:`load_set_model` of ``run_dir``; when it is None, of the run that embedded ``features`` (a
    feature folder the gallery is built from), else of the newest MILE run under ./runs. Says which
    model it is (:func:`set_model_words`: its kind, backbone and set fingerprints). ``gallery``: the gallery it
    embeds for, which refuses a run of the other kind before its weights load (:meth:`Gallery.check_run_kind`)."""
    from mlsctl.restore import load_default_run, newest_run

    if gallery is not None and run_dir is not None:
        gallery.check_run_kind(run_dir)  # a model of the other kind: said before its weights load (a review)
    if run_dir is None and features is not None and is_feature_folder(features):
        # the run that made them, not the newest (a new user's probe, 2026-12-06: refused as another model)
        run_dir = run_of_features(features)
    if run_dir is None:
        found = newest_run(RUNS_ROOT, method="mile")
        if found is None:
            raise UserError(f"no --run given and no MILE run under {RUNS_ROOT}/; give --run RUN (a run of any "
                            f"method: one that is not MILE folds mean-CLS sets), or train one with mlsctl pretrain "
                            f"mile_fmnist_quick")
        model = load_default_run(load_set_model, found, RUNS_ROOT, "--run", "MILE run")
        model.backbone.description += f" (the newest MILE run under {RUNS_ROOT}/: no --run given)"
    else:
        model = load_set_model(run_dir)
    say(f"model: {model.backbone.description} ({set_model_words(model)}), on {model.device}")
    return model


def set_model_words(model: SetModel | MeanCLSSetModel) -> str:
    """How a set model folds its sets, with its fingerprints, as the ``model:`` line says it."""
    if model.kind == "mean-cls":
        return (f"mean-CLS sets: the mean of the photos' CLS embeddings; backbone {model.backbone.fingerprint[:12]}, "
                f"set model {model.fingerprint[:12]}")
    return (f"MILE sets: backbone {model.backbone.fingerprint[:12]}, with its set encoder "
            f"{model.fingerprint[:12]}")


# ---------------------------------------------------------------------------------------- objects
MAX_OBJECT_ID_CHARS = 256  # an id is a name, not a payload: objects.txt, URLs and answers stay small

# Characters that draw nothing although Unicode calls them letters or symbols (fillers, blank braille).
_BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")


def _visible(c: str) -> bool:
    import unicodedata

    return unicodedata.category(c) not in ("Cf", "Cc", "Cn", "Zs", "Zl", "Zp", "Mn", "Me") and c not in _BLANK_CHARACTERS


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def check_object_id(object_id: str, where: str = "--object") -> str:
    """Refuse an object id the gallery cannot store and find again: empty or blank, made only of
    invisible characters (U+200B, U+2060, ...), longer than :data:`MAX_OBJECT_ID_CHARS`
    characters, with a control character (a newline would split objects.txt), not valid UTF-8,
    ``.`` or ``..``, or with a ``/`` (the service's URLs could not name it)."""
    from mlsctl.data.images import name_problem, printable_name

    if len(object_id) > MAX_OBJECT_ID_CHARS:
        raise UserError(f"{where} '{printable_name(object_id[:40])}...' is {len(object_id):,} characters long; object "
                        f"ids have at most {MAX_OBJECT_ID_CHARS}")
    if not object_id or not object_id.strip():
        raise UserError(f"{where} {object_id!r} is empty or blank; give each object a visible id")
    if object_id in (".", ".."):  # a URL drops these segments: /objects/../photos never reaches the object
        raise UserError(f"{where} '{object_id}' cannot be an object id (URLs drop '.' and '..'); give it a name")
    if "/" in object_id:  # a new user's probe (2026-12-06): stored by index add, then out of serve's reach
        raise UserError(f"{where} '{printable_name(object_id)}' contains '/', which the service's URLs "
                        f"(/objects/<id>) cannot carry; give an id without it")
    problem = name_problem(object_id)
    if problem:
        raise UserError(f"{where} '{printable_name(object_id)}' {problem}; object ids are single-line text")
    if not any(_visible(c) for c in object_id):
        codes = ", ".join(sorted({f"U+{ord(c):04X}" for c in object_id if c != " "}))
        raise UserError(f"{where} '{object_id.encode('unicode_escape').decode('ascii')}' has no visible character "
                        f"(only {codes or 'spaces'}); give each object a visible id")
    return object_id


class LookalikeId(UserError):
    """A new id that reads like a stored one (:func:`lookalike_key`): the service answers 409."""


class DamagedGallery(UserError):
    """The gallery's files hold what no writer of ours writes (NaN rows): its operator's to rebuild, not a
    client's mistake (the service answers 500 with a sentence that names no path)."""


REBUILD = "rebuild it with mlsctl index build --overwrite (index retrain copies the rows, so it cannot mend them)"


_JOINERS = frozenset("\u200c\u200d")
# the explicit bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069)
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Unicode's default-ignorable code points (DerivedCoreProperties.txt) beyond the format characters (Cf): the
# combining grapheme joiner, variation selectors, Hangul and Khmer fillers, Mongolian free variation selectors,
# ... which draw nothing (a hostile probe, 2026-12-06: 'obj0' + U+3164 or U+FE0F was taken as a new object)
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
                     (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))


def _conjoining_jamo(c: str) -> bool:
    point = ord(c)
    return 0x1100 <= point <= 0x11FF or 0xA960 <= point <= 0xA97F or 0xD7B0 <= point <= 0xD7FF


def _drawn_in_context(text: str, i: int) -> bool:
    """Whether ``text[i]``, a character that draws nothing alone, changes what its neighbours draw: a
    Hangul choseong or jungseong filler (U+115F, U+1160) beside conjoining jamo (it makes a syllable
    block of its own: U+1100 U+1160 U+1161 is two blocks, 가 one), a tag character in a flag's tag
    sequence after U+1F3F4 (England, Scotland and Wales are three flags; a review, 2026-12-06)."""
    c = text[i]
    if c in "\u115f\u1160":
        return any(0 <= j < len(text) and _conjoining_jamo(text[j]) for j in (i - 1, i + 1))
    if 0xE0020 <= ord(c) <= 0xE007F:
        j = i
        while j > 0 and 0xE0020 <= ord(text[j - 1]) <= 0xE007F:
            j -= 1
        return j > 0 and text[j - 1] == "\U0001F3F4"
    return False


def _draws_nothing(c: str) -> bool:
    """A character a reader cannot see: a format character, a default-ignorable one, or a blank filler."""
    import unicodedata

    point = ord(c)
    return (unicodedata.category(c) == "Cf" or c in _BLANK_CHARACTERS
            or any(low <= point <= high for low, high in _IGNORABLE_RANGES))


def lookalike_key(object_id: str) -> str:
    """What a reader sees of an id: its Unicode composition unified (NFC: a folder made on macOS
    names ``café`` with a combining accent, a browser sends it precomposed), invisible format
    characters (U+200B, U+2060, soft hyphens, variation selectors, fillers, ...) dropped, and whitespace runs cut to one space
    and off both ends. Two ids with one key are look-alikes: a gallery never gets both. One joiner
    (U+200C, U+200D) stays where both its neighbours are letters or symbols beyond the Latin blocks:
    there it changes how Persian or Indic text and emoji sequences are drawn, while ``b\u200dob``
    reads as ``bob`` (reviews, 2026-12-06)."""
    import unicodedata

    source = unicodedata.normalize("NFC", object_id)
    text = [c for i, c in enumerate(source)
            if not _draws_nothing(c) or c in _JOINERS or _drawn_in_context(source, i)]  # other invisible ones first

    def joins(c: Optional[str]) -> bool:
        return (c is not None and ord(c) > 0x24F and c not in _JOINERS and not c.isspace()
                and unicodedata.category(c)[0] in "LSM")

    kept: list[str] = []
    for i, c in enumerate(text):
        if c in _JOINERS:
            following = next((d for d in text[i + 1:] if d not in _JOINERS), None)
            if not (kept and kept[-1] not in _JOINERS and joins(kept[-1]) and joins(following)):
                continue  # a run of joiners counts as its first
        kept.append(c)
    return " ".join(unicodedata.normalize("NFC", "".join(kept)).split())  # composed again where a joiner left


def printable(object_id: str, limit: Optional[int] = 80) -> str:
    """An id as a message shows it: :func:`~mlsctl.data.images.printable_name`, with invisible
    characters and spaces other than U+0020 spelt as escapes too and a decomposed id marked, cut at ``limit``
    characters (None: whole, as ``search``'s table shows it), so that two look-alikes read apart."""
    import unicodedata

    from mlsctl.data.images import printable_name

    cut = object_id if limit is None else object_id[:limit]
    shown = "".join(c if c == " " or (unicodedata.category(c) != "Zs" and not _draws_nothing(c))
                    else c.encode("unicode_escape").decode("ascii") for c in printable_name(cut))
    if unicodedata.normalize("NFC", object_id) != object_id:
        shown += " [decomposed]"
    return shown + ("..." if len(cut) < len(object_id) else "")


def typable(object_id: str) -> Optional[str]:
    """``object_id`` as bash's ``$'...'`` quoting types it (``$'cafe\\u0301'``), where :func:`printable` shows it
    otherwise than it is spelt (a decomposed id, an invisible character), so that a message naming it says how to give
    it (a probe, 2026-12-08: "give 'café [decomposed]' to remove it" cannot be typed); None where it reads as it is."""
    if printable(object_id, None) == object_id:
        return None
    quoted = {"'": "\\'", "\\": "\\\\"}
    return "$'" + "".join(quoted.get(c, c) if 0x20 <= ord(c) < 0x7f else
                          (f"\\u{ord(c):04x}" if ord(c) <= 0xffff else f"\\U{ord(c):08x}") for c in object_id) + "'"


def _format_end(text: str, i: int) -> bool:
    """``text[i]`` is a Unicode format character (category Cf: U+200B, U+200D, U+2060, U+FEFF, a soft hyphen, ...)
    that draws nothing where it is (a tag that ends a flag's tag sequence does: :func:`_drawn_in_context`)."""
    import unicodedata

    return unicodedata.category(text[i]) == "Cf" and not _drawn_in_context(text, i)


def _invisible_ends(object_id: str) -> list[str]:
    """The format characters at either end of ``object_id`` (whitespace between them and the end counts as an end
    too), as ``U+XXXX``, each once."""
    found: list[str] = []
    for order in (range(len(object_id)), range(len(object_id) - 1, -1, -1)):
        for i in order:
            if object_id[i].isspace():
                continue
            if not _format_end(object_id, i):
                break
            found.append(f"U+{ord(object_id[i]):04X}")
    return list(dict.fromkeys(found))


def _trimmed(object_id: str) -> str:
    """``object_id`` without whitespace and invisible format characters at its ends (what a refusal offers)."""
    start, end = 0, len(object_id)
    while start < end and (object_id[start].isspace() or _format_end(object_id, start)):
        start += 1
    while end > start and (object_id[end - 1].isspace() or _format_end(object_id, end - 1)):
        end -= 1
    return object_id[start:end]


def new_id_problem(object_id: str, lookalike: Optional[str] = None) -> Optional[str]:
    """Why ``object_id`` cannot name a new object (None if it can): whitespace at an end (a slip of
    whoever built the URL or named the folder), bidirectional controls, an invisible format character (category
    Cf: U+200B, U+200D, U+FEFF, ...) at an end, or ``lookalike``, an id already taken with the same
    :func:`lookalike_key`. Ids already stored stay reachable as they are; only new ones are held to
    this. The sentence follows the id: ``f"{where} '{printable(id)}' {problem}"``."""
    if object_id != object_id.strip():
        return f"begins or ends with whitespace; remove it (the id '{printable(_trimmed(object_id))}')"
    controls = sorted({f"U+{ord(c):04X}" for c in object_id if c in _BIDI_CONTROLS})
    if controls:  # an attacker's probe (2026-12-07): U+202E made answers and tables show the id reversed
        return (f"holds bidirectional controls ({', '.join(controls)}), which draw the text around them reversed "
                f"or reordered in answers and tables; give an id without them")
    ends = _invisible_ends(object_id)
    if ends:  # a new user's probe (2026-12-07): 'x' + U+200B was created, and 'x' then refused as reading like it
        return (f"begins or ends with an invisible format character ({', '.join(ends)}); remove it (the id "
                f"'{printable(_trimmed(object_id))}')")
    if lookalike is not None:
        return (f"looks like the object '{printable(lookalike)}' (they differ only in whitespace, invisible "
                f"characters or Unicode composition); use '{printable(lookalike)}' or another name")
    return None


def check_new_ids(ids: Sequence[str], where: str) -> None:
    """The ids of a new gallery (folder names, feature paths' first parts): none with whitespace at
    an end, no two look-alikes (:func:`lookalike_key`)."""
    seen: dict[str, str] = {}
    for object_id in ids:
        problem = new_id_problem(object_id)
        if problem:
            raise UserError(f"{where} '{printable(object_id)}' {problem}")
        other = seen.setdefault(lookalike_key(object_id), object_id)
        if other != object_id:
            raise UserError(f"{where}s '{printable(other)}' and '{printable(object_id)}' differ only in whitespace, "
                            f"invisible characters or Unicode composition, so they would read as one object; merge "
                            f"or rename one")


def object_folders(root: str | os.PathLike, objects_file: Optional[str | os.PathLike] = None,
                   option: str = "--objects", what: str = "gallery images", prefer: tuple[str, ...] = ("gallery",)
                   ) -> dict[str, list[Path]]:
    """``ROOT/<object_id>/*`` images, files in the order of their paths relative to ``ROOT`` as strings
    (the folding order: the scan's, the order of a feature folder's rows and of ``eval retrieval``'s
    sets, so a gallery built from the images and one built from their features fold alike). Files whose
    names cannot be stored are skipped and reported (see :func:`~mlsctl.data.images.scan_images`).
    With ``objects_file`` (given as ``option``), the objects are those it lists instead, a CSV/JSONL of
    ``object_id,path`` with paths relative to ``ROOT``, as MILE's ``method.objects_file`` (In-shop's item folders
    lie three levels down: a new user's probe, 2026-12-07), their photos in the same order. ``what`` names ``root`` in
    messages (``--query`` for eval retrieval's queries, not "gallery images": a probe, 2026-12-08), and ``prefer`` the
    sub-folder a note on nested objects suggests (``query`` for a query)."""
    from mlsctl.data.images import require_images, scan_images
    from mlsctl.data.objects import listed_objects

    root = Path(root)
    scan = scan_images(root, what)
    require_images(scan, what)
    for line in scan.notes(what):
        logging.getLogger("mlsctl").warning(line)
    if objects_file is not None:
        listing = {path.relative_to(root).as_posix(): path for path in scan.files}
        listed = listed_objects(Path(objects_file), listing, root, option)
        order = {path: i for i, path in enumerate(scan.files)}
        return {check_object_id(object_id, f"{option} {objects_file}: object id"): sorted(paths, key=order.__getitem__)
                for object_id, paths in sorted(listed.items())}
    groups: dict[str, list[Path]] = {}
    for path in scan.files:
        rel = path.relative_to(root)
        if len(rel.parts) < 2:
            raise UserError(f"{path} is not inside an object folder; put each object's images in {root}/<object_id>/, "
                            f"or list them in an objects file (CSV/JSONL of object_id,path) given with {option}")
        groups.setdefault(check_object_id(rel.parts[0], "object folder"), []).append(path)
    _say_nested_objects(root, groups, option, prefer)
    _say_folders_without_photos(root, groups)
    return dict(sorted(groups.items()))  # each list in the scan's order: by relative path, as a string


def _say_folders_without_photos(root: Path, groups: dict[str, list[Path]]) -> None:
    """A warning naming the folders right under ``root`` that hold no photo, so make no object: `index build` said
    "5 objects" of 6 folders without a word (a new user's probe, 2026-12-07)."""
    try:
        empty = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith(".")
                       and entry.name not in groups)
    except OSError:  # the scan read it a moment ago; nothing to add
        return
    if empty:
        shown = ", ".join(f"'{printable(name)}'" for name in empty[:5]) + (", ..." if len(empty) > 5 else "")
        logging.getLogger("mlsctl").warning(
            f"{counted(len(empty), 'folder')} of {root} {'holds' if len(empty) == 1 else 'hold'} no photo and "
            f"{'makes' if len(empty) == 1 else 'make'} no object: {shown}")


def _say_nested_objects(root: Path, groups: dict[str, list[Path]], option: str,
                        prefer: tuple[str, ...] = ("gallery",)) -> None:
    """A warning, before anything is embedded, where objects gather their photos from many sub-folders
    (:func:`~mlsctl.data.objects.nested_groups_note`); ``option`` gives an objects file instead."""
    from mlsctl.data.objects import nested_groups_note

    note = nested_groups_note(root, {name: [p.relative_to(root) for p in paths] for name, paths in groups.items()},
                              prefer=prefer, objects_option=f"{option} ",
                              objects_name=f"{option.lstrip('-')}.csv")
    if note:
        logging.getLogger("mlsctl").warning(note)


def read_query_sets(path: Path) -> list[tuple[int, object, list[Path]]]:
    """--sets FILE: one JSON object per line, {"photos": [paths...], "id": optional, any JSON value,
    given back as it is}; relative paths are relative to the file's folder. (line number, id,
    photos) of each set (``mlsctl search --sets``)."""
    sets = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark (Windows editors) is not data
    except UnicodeDecodeError:  # a UTF-16 file (a Windows editor's "Unicode"): the codec's own words said nothing
        raise UserError(f"--sets {path} is not UTF-8 text; save it as UTF-8 (one JSON object per line)") from None
    except OSError as exc:
        raise UserError(f"--sets {path} cannot be read ({exc.strerror or exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:  # NaN and Infinity are no JSON: an id of them came back as invalid JSON (a probe, 2026-12-06)
            record = json.loads(line, parse_constant=_no_constant)
            photos = record["photos"]
            if not (isinstance(photos, list) and photos and all(isinstance(p, str) for p in photos)):
                raise ValueError
            query_id = record.get("id")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise UserError(f"--sets {path} line {number} is not a JSON object with a non-empty list of paths "
                            f"'photos' (and an optional 'id')") from None
        unknown = sorted(str(key) for key in record if key not in ("photos", "id"))
        if unknown:  # ignored, a typo or an option ({"k": 5}) went unsaid; serve refuses them too (a new user's probe)
            shown = ", ".join(f"'{printable(key, 40)}'" for key in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
            hint = " (k goes on the command line: -k 5)" if "k" in unknown else ""
            raise UserError(f"--sets {path} line {number} has {'a key' if len(unknown) == 1 else 'keys'} search "
                            f"does not take ({shown}); each line takes only 'photos' and 'id'{hint}")
        sets.append((number, query_id, [_beside(path.parent, p) for p in photos]))  # the id comes back as given
    if not sets:
        raise UserError(f"--sets {path} holds no query set")
    return sets


def _beside(folder: Path, photo: str) -> Path:
    """``photo`` of a --sets file in ``folder``, relative to it: ``q/../x`` said as ``x`` where both name
    the same file (they differ where ``q`` is a link to elsewhere: then as joined)."""
    joined = folder / photo
    plain = Path(os.path.normpath(joined))
    if plain != joined:
        try:
            if not os.path.samefile(joined, plain):
                return joined
        except OSError:  # either is missing: the joined path is the one read, and said if unreadable
            return joined
    return plain


def _set_error(source: str, number: int, unreadable: Sequence[tuple[Path, str]]) -> str:
    """The 'error' of a query set some of whose photos cannot be read: the first named, the others counted."""
    path, reason = unreadable[0]
    more = f" (and {len(unreadable) - 1} more of its photos)" if len(unreadable) > 1 else ""
    return f"{source} line {number}: cannot read {path}: {reason}{more}"


def missing_sets(queries: Sequence[tuple[int, object, list[Path]]], source: str = "--sets") -> Optional[list]:
    """The records of :func:`search_sets` where no query set can be searched because a photo of each
    cannot be opened (told without loading a model); None where some set's photos all open."""
    records = []
    for number, query_id, photos in queries:
        missing = [(p, reason) for p in photos if (reason := _unopenable(p))]
        if not missing:
            return None
        records.append((number, {"id": query_id, "set": [str(p) for p in photos],
                                 "error": _set_error(source, number, missing)}))
    return records


def _unopenable(path: Path) -> Optional[str]:
    """Why ``path`` cannot be opened for reading (as :class:`_Photos` says it), or None (also for
    what is no regular file or folder, a FIFO say, which is not opened here: the reader says it)."""
    import stat

    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            with open(path, "rb"):
                return None
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def ranked(found: Sequence[tuple[str, float]]) -> list[dict]:
    """Search results as the JSON of ``search --json`` and of the service: rank (1 first), object, score."""
    return [{"rank": i + 1, "object": object_id, "score": score} for i, (object_id, score) in enumerate(found)]


SEARCH_BATCH = 256  # sets searched at once by search_sets (flat, 200k objects: 88 ms a set alone, 34 ms batched)


def search_sets(gallery: "Gallery", model: SetModel, queries: Sequence[tuple[int, object, list[Path]]], k: int, *,
                workers: Optional[int] = None, source: str = "--sets", batch: Optional[int] = None):
    """Search every query set of :func:`read_query_sets` in ``gallery``: yields lists of ``(line number,
    record)`` in input order, ``batch`` sets searched at once, each record ``{"id", "set", "results"}``
    (:func:`ranked`) or ``{"id", "set", "error"}`` where a photo of the set cannot be read (that set alone
    fails). Photos are embedded across sets (:func:`set_tokens`). Stopped (Ctrl-C), it yields the sets
    already embedded before the interruption goes on; a caller that pops each record as it writes it
    can write the rest of a list it was writing when stopped, each record once."""
    import torch

    batch = batch or SEARCH_BATCH
    pending: list[tuple[int, dict, object]] = []  # (line, record, its latent or its error), in input order

    def answered() -> list[tuple[int, dict]]:
        latents = [latent for _, _, latent in pending if not isinstance(latent, str)]
        found = iter(gallery.search_many(torch.stack(latents), k) if latents else [])
        out = []
        for number, record, latent in pending:
            record.update({"error": latent} if isinstance(latent, str) else {"results": ranked(next(found))})
            out.append((number, record))
        pending.clear()
        return out

    embedded = set_tokens([photos for _, _, photos in queries], model, workers=workers, strict=False)
    try:
        for (number, query_id, photos), (cls, tokens, unreadable) in zip(queries, embedded):
            record = {"id": query_id, "set": [str(p) for p in photos]}
            if unreadable:
                pending.append((number, record, _set_error(source, number, unreadable)))
            else:
                note = long_set_note(model, len(photos))
                if note:  # in a JSON record, as the service's answers: without the console's "note: "
                    record["note"] = note[len("note: "):]
                pending.append((number, record, model.fold(None, cls, tokens)))
            if len(pending) >= batch:
                yield answered()
    except KeyboardInterrupt:  # the sets already embedded are given before the interruption is said
        if pending:
            yield answered()
        raise
    if pending:
        yield answered()


def photo_batches(paths: Sequence[Path], preprocessing, *, batch_size: int = 64, workers: Optional[int] = None,
                  progress: Optional[bool] = None, strict: bool = True, pin_memory: bool = False,
                  photos: bool = False, digests: bool = False):
    """``(rows, pixels, unreadable)`` of ``paths`` in order, ``batch_size`` photos a batch, decoded
    and resized by ``preprocessing`` in ``workers`` loader processes (None:
    :func:`mlsctl.features.default_workers`), with a progress bar on a terminal and a line every 30 s in a log
    (:class:`~mlsctl.console.LogProgress`; ``progress=False``: never), in pinned memory with ``pin_memory``
    (for a GPU): ``rows`` the batch's rows (a consecutive range), ``pixels`` uint8 [b, 3, R, R] of those that
    could be read (None if none) and ``unreadable`` ``[(row, reason)]`` of the others. ``strict``:
    the first unreadable photo stops it instead, with one sentence naming it. ``photos``: an image that cannot
    be a photo of an object (:func:`~mlsctl.data.images.photo_shape_problem`) is unreadable too. ``digests``: each
    batch also gives ``{row: digest}`` of the photos read, each the :func:`photo_digest` of the very bytes decoded
    (each file is read once)."""
    from tqdm import tqdm

    batches = [list(range(start, min(start + batch_size, len(paths)))) for start in range(0, len(paths), batch_size)]
    workers = min(default_workers(len(paths)) if workers is None else workers, len(batches))  # no idle workers
    loader = Loader(_Photos(Tree("."), [str(p) for p in paths], preprocessing, None, photos=photos, hashed=digests),
                    batch_sampler=batches, num_workers=workers, collate_fn=collate_photos,
                    worker_init_fn=worker_init if workers else None, pin_memory=pin_memory, workers_key="--workers")
    show = progress is not False and sys.stderr.isatty()
    if progress is None and not sys.stderr.isatty():  # a log: a line every 30 s, where a long build said nothing
        shown = contextlib.nullcontext(LogProgress(len(paths), "embedding", unit="photos"))  # (a new user's probe)
    else:
        shown = tqdm(total=len(paths), unit="photo", desc="photos", disable=not show, leave=False, dynamic_ncols=True)
    with shown as bar:
        for rows, (_, pixels, unreadable, read) in zip(batches, loader):
            if unreadable and strict:
                row, reason = unreadable[0]
                raise UserError(f"cannot read {paths[row]}: {reason}")
            yield (rows, pixels, unreadable, read) if digests else (rows, pixels, unreadable)
            bar.update(len(rows))


def set_tokens(sets: Sequence[Sequence[Path]], model: SetModel, *, batch_size: int = 64,
               workers: Optional[int] = None, progress: Optional[bool] = None, strict: bool = True,
               digests: bool = False):
    """``(CLS [t, D], tokens [t, p, D] or None, unreadable)`` of each set of photo paths in
    ``sets``, in order: the photos of all sets go through the model ``batch_size`` at a time
    (decoded by :func:`photo_batches`, so a batch spans sets and fills a GPU however small the
    sets), and each set comes out as soon as its last photo has: the tokens held are at most a
    batch's and those of the set being embedded. ``unreadable`` is ``[(path, reason)]`` of the
    set's photos that could not be read (its CLS and tokens are then of the others); ``strict``:
    the first one stops it instead. ``digests``: each set also gives the :func:`photo_digest` of each photo read, in
    order, of the bytes its CLS was decoded from."""
    paths = [path for photos in sets for path in photos]
    waiting: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []  # embedded rows not yet handed out, by batch
    unreadable: dict[int, str] = {}
    read: dict[int, bytes] = {}  # the digests of the rows not yet handed out
    current, first = 0, 0  # the set handed out next, and its first row
    for rows, pixels, batch_unreadable, batch_read in photo_batches(
            paths, model.preprocessor(), batch_size=batch_size, workers=workers, progress=progress, strict=strict,
            pin_memory=model.device.type == "cuda", photos=True, digests=True):
        unreadable.update(batch_unreadable)
        read.update(batch_read)
        if pixels is not None:
            waiting.append(model.pixel_tokens(pixels, batch_size))
        if current < len(sets) and first + len(sets[current]) <= rows[-1] + 1:  # a set ends in this batch
            cls = torch.cat([c for c, _ in waiting]) if waiting else torch.empty(0, model.dim)
            tokens = torch.cat([t for _, t in waiting]) if waiting and waiting[0][1] is not None else None
            while current < len(sets) and first + len(sets[current]) <= rows[-1] + 1:
                end = first + len(sets[current])
                failed = [(paths[row], unreadable.pop(row)) for row in range(first, end) if row in unreadable]
                n = end - first - len(failed)
                out = (cls[:n], (tokens[:n] if tokens is not None else None), failed)
                of_set = [read.pop(row) for row in range(first, end) if row in read]
                yield (*out, of_set) if digests else out
                cls, tokens = cls[n:], (tokens[n:] if tokens is not None else None)
                current, first = current + 1, end
            waiting = [(cls, tokens)] if len(cls) else []


class _Photos(TreeImages):
    """:class:`~mlsctl.features.TreeImages` of photo files (a folder tree), where a file that cannot be opened (gone,
    no permission) is unreadable too, as :func:`load_images` has it; with ``photos``, so is an image that
    cannot be a photo of an object (:func:`~mlsctl.data.images.photo_shape_problem`), as there too. Each file is read
    once, and with ``hashed`` its item ``(i, pixels, reason, digest)`` carries the :func:`photo_digest` of the bytes
    decoded (None where unreadable, or without ``hashed``: a search records nothing): a gallery records what it
    folded, even where the file is replaced meanwhile (:func:`collate_photos`)."""

    def __init__(self, *args, photos: bool = False, hashed: bool = False):
        super().__init__(*args)
        self.photos, self.hashed = photos, hashed

    def __getitem__(self, index: int):
        from mlsctl.data.images import DEFAULT_MAX_IMAGE_PIXELS, BadImage, photo_shape_problem, read_rgb

        limit = DEFAULT_MAX_IMAGE_PIXELS if self.max_pixels is None else self.max_pixels
        try:
            digest, image = read_rgb(self.tree.path / self.relpaths[index], limit, self.raise_with, hashed=self.hashed)
        except BadImage as exc:
            return index, None, str(exc), None
        except OSError as exc:  # the message names the photo: its reason need not
            return index, None, exc.strerror or str(exc), None
        problem = self.photos and photo_shape_problem(*image.size)  # one rule with load_images and serve's uploads
        if problem:
            return index, None, problem, None
        return index, self.preprocessing.pixels(image), None, digest


def collate_photos(items):
    """:class:`_Photos` items → what :func:`~mlsctl.features.collate_images` gives, and the digests of those read
    (``{index: digest}``)."""
    indices, pixels, skipped = collate_images([item[:3] for item in items])
    return indices, pixels, skipped, {i: digest for i, _, _, digest in items if digest is not None}


def load_images(paths: Sequence[Path]) -> list:
    from mlsctl.data.images import load_rgb

    return [_read_photo(lambda p: load_rgb(p, photo=True), path) for path in paths]


def read_photo(path: str | os.PathLike, hashed: bool = True):
    """A photo file read once: (the :func:`photo_digest` of its bytes, None without ``hashed``; the image decoded from
    those same bytes), so that the digest a gallery records is that of what it folded (a review, 2026-12-07: a second
    read hashed a file replaced meanwhile); a photo that cannot be read is :func:`load_images`'s sentence."""
    from mlsctl.data.images import read_rgb

    return _read_photo(lambda p: read_rgb(p, photo=True, hashed=hashed), path)  # the sha256: photo_digest's


def photos_of_folders(photos: Sequence, option: str = "--set") -> list:
    """``photos`` with each folder among them replaced by its images, in the order index build folds an object
    folder's (by path relative to it, as a string: :func:`object_folders`): ``search --set DIR`` searches the
    object photographed in DIR (a new user's probe, 2026-12-07: "DIR is not a file")."""
    from mlsctl.data.images import require_images, scan_images

    out = []
    for photo in photos:
        if isinstance(photo, (str, os.PathLike)) and Path(photo).is_dir():
            scan = scan_images(photo, f"{option} folder")
            require_images(scan, f"{option} folder")
            for line in scan.notes(f"{option} folder"):
                log.warning(line)
            out.extend(scan.files)
        else:
            out.append(photo)
    return out


def check_photos(photos: Sequence, option: str = "") -> None:
    """What can be said of the photos given as paths before a model loads (decoded images pass): each
    is a file, and its header opens as an image within the pixel limit (:func:`mlsctl.data.images.check_image`).
    `index add` said a corrupt photo only after its model had loaded (a known issue of the twentieth
    session). :func:`load_images` decodes them later all the same, saying in the same words what the
    header does not show (damaged image data) or what changed in between. ``option`` (``--set``)
    heads the sentence on a missing photo."""
    from mlsctl.data.images import check_image

    paths = [photo for photo in photos if isinstance(photo, (str, os.PathLike))]
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:  # every missing one counted, before any photo is read
        raise UserError(f"{option} {missing[0]} is not a file".lstrip() + (f" (nor {len(missing) - 1} more of the photos)"
                                                         if len(missing) > 1 else "") + "; check the path")
    for path in paths:
        _read_photo(lambda p: check_image(p, photo=True), path)


def _read_photo(read: Callable, path):
    """``read(path)`` (:func:`~mlsctl.data.images.load_rgb`, or the header check of :func:`check_photos`);
    a photo it cannot read is one sentence naming the photo (the same from both)."""
    from mlsctl.data.images import BadImage

    try:
        return read(path)
    except (BadImage, OSError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def photos_skipped_note(object_id: str, held: int, repeated: int) -> Optional[str]:
    """The one line of an add that skipped photos (:meth:`Gallery.photos_to_fold`), or None: ``held`` that the object
    holds already, ``repeated`` that repeat another photo of the add (same bytes: folded once). (A photo given
    twice was folded twice until 2026-12-07, and a retried add folded its photos again.)"""
    said = []
    if held:
        said.append(f"{counted(held, 'photo')} already in the gallery for '{printable(object_id)}' "
                    f"(same bytes) {'was' if held == 1 else 'were'} skipped")
    if repeated:
        said.append(f"{counted(repeated, 'photo')} repeating another of this add (same bytes) "
                    f"{'was' if repeated == 1 else 'were'} folded once")
    return f"note: {'; '.join(said)}" if said else None


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

    def check(self) -> "IndexSettings":
        """The settings of a new index: a known kind, and no IVF-PQ settings for a flat index, which
        has nothing they could set (galleries built before this check may store them: read as they are,
        dropped by their next retrain)."""
        if self.kind not in INDEX_KINDS:
            raise UserError(f"--index {self.kind} is not one of {', '.join(INDEX_KINDS)}")
        given = [name for name, value in (("--nlist", self.nlist), ("--pq-m", self.m)) if value is not None]
        if self.kind == "flat" and given:  # a new user's probe (2026-12-06): taken without a word, and nothing done
            raise UserError(f"{' and '.join(given)} set{'s' if len(given) == 1 else ''} up an IVF-PQ index, and "
                            f"--index flat (the default) searches exactly without one; add --index ivfpq, or leave "
                            f"{'it' if len(given) == 1 else 'them'} out")
        return self


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` objects where --nlist is not given: sqrt(n), at most n / 39 (faiss's least per list)."""
    return max(1, min(int(n ** 0.5), n // 39))


def check_index_fits(settings: IndexSettings, n: int, dim: Optional[int] = None, retrain: bool = False,
                     gallery: str = "GALLERY") -> None:
    """Refuse IVF-PQ settings that cannot be trained on ``n`` objects of width ``dim`` (None: not known yet):
    faiss needs 39 objects a list and one a PQ centroid (2 ** bits), and --pq-m must divide the width. Said
    before anything is embedded (a new user's probe, 2026-12-07: 16 s of embedding, then the refusal), with
    the settings that would fit. ``retrain``: for ``index retrain``, which keeps the build's settings, so the
    build options that would fit are named as those of a new build (a probe: retrain was told to use
    ``--pq-bits``, an option it does not take)."""
    if settings.kind != "ivfpq":
        return
    nlist = settings.nlist or default_nlist(n)
    m = settings.m or (max(1, dim // 8) if dim else None)
    if dim and m and dim % m:
        raise UserError(f"--pq-m {m} must divide the embedding width {dim}")
    if n >= 39 * nlist and n >= 2 ** settings.nbits:
        return
    need = max(39 * nlist, 2 ** settings.nbits)
    head = (f"IVF-PQ with {counted(nlist, 'list')} and {settings.nbits}-bit codes needs at least {need:,} objects "
            f"to train, the gallery has {n:,}")
    fixes = []
    if n >= 39 and n < 39 * nlist:
        fixes.append(f"--nlist {n // 39} or fewer")
    if n >= 39 and n < 2 ** settings.nbits:
        fixes.append(f"--pq-bits {n.bit_length() - 1} or fewer")
    fit = f"{' and '.join(fixes)}, or --index flat" if fixes else "--index flat"
    if retrain:
        raise UserError(f"{head}; a retrain keeps the build's index settings: add objects until it holds {need:,} "
                        f"(mlsctl index add), or build it again with {fit} (mlsctl index build --overwrite); to purge "
                        f"removed objects' latents, mlsctl index remove {gallery} --purge keeps the trained index")
    if n < 39:  # one list needs 39: no setting fits
        raise UserError(f"{head}; IVF-PQ needs at least 39 objects whatever its settings, so use --index flat (exact, "
                        f"and fast at this size)")
    raise UserError(f"{head}; use {fit} (exact, and fast at this size)")


def _normalized(latents) -> np.ndarray:
    """Rows L2-normalised as float32 (a zero row stays zero), in numpy: no tensor round trip."""
    x = np.asarray(latents.detach().cpu().numpy() if isinstance(latents, torch.Tensor) else latents, dtype=np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def train_index(unit: np.ndarray, settings: IndexSettings):
    """An empty index for L2-normalised rows ``unit`` [n, D] (IVF-PQ trained on a sample of them)."""
    faiss = threads.faiss()

    n, d = unit.shape
    if settings.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    if settings.kind not in INDEX_KINDS:
        raise UserError(f"--index {settings.kind} is not one of {', '.join(INDEX_KINDS)}")
    nlist = settings.nlist or default_nlist(n)
    m = settings.m or max(1, d // 8)
    check_index_fits(settings, n, d)
    settings.nlist, settings.m = nlist, m
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, m, settings.nbits, faiss.METRIC_INNER_PRODUCT)
    # faiss asks for 39 training vectors per centroid and prints a warning per sub-quantiser (16 raw
    # lines for a 1,000-object gallery) below that: one sentence of ours instead
    index.cp.min_points_per_centroid = index.pq.cp.min_points_per_centroid = 1
    if n < 39 * 2 ** settings.nbits:
        logging.getLogger("mlsctl").warning(
            f"IVF-PQ trains codebooks of {2 ** settings.nbits} centroids on {n} objects, fewer than the "
            f"{39 * 2 ** settings.nbits:,} faiss asks for (39 a centroid), so its codes are coarse; a gallery this "
            f"small is searched exactly, and fast, with --index flat")
    # k-means on 64 vectors per list (faiss asks for at least 39 per list, 39 per PQ centroid)
    # keeps training to a minute at 1M on 2 cores
    wanted = max(64 * nlist, 64 * 2 ** settings.nbits)
    sample = np.sort(np.random.default_rng(0).choice(n, wanted, replace=False)) if n > wanted else slice(None)
    index.train(np.ascontiguousarray(unit[sample], dtype=np.float32))
    index.nprobe = settings.nprobe
    return index


def build_index(latents, settings: IndexSettings):
    """``latents`` [n, D] (row i = id i) normalised and indexed: trained and filled."""
    unit = _normalized(latents)
    index = train_index(unit, settings)
    index.add_with_ids(unit, np.arange(len(unit), dtype=np.int64))
    return index


def search_index(index, unit_rows_: Optional[np.ndarray], queries: np.ndarray, k: int, settings: IndexSettings
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(cosines [q, k], ids [q, k]) of the nearest rows for L2-normalised ``queries`` [q, D]. With
    IVF-PQ, ``refine × k`` candidates from the compressed codes are re-ranked exactly against
    ``unit_rows_`` (the normalised rows, row = id: a memory map is fine, only the candidates are
    read). Missing results have id -1."""
    threads.faiss()  # faiss's threads in this thread (a server searches in its request threads)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal))
    if settings.kind == "flat":
        return index.search(queries, k)
    index.nprobe = settings.nprobe
    _, candidates = index.search(queries, min(index.ntotal, k * settings.refine))
    scores, ids = np.full((len(queries), k), -np.inf, dtype=np.float32), np.full((len(queries), k), -1, dtype=np.int64)
    for row, found in enumerate(candidates):
        found = np.sort(found[found >= 0])  # ascending rows: a memory map reads them in file order
        exact = np.asarray(unit_rows_[found], dtype=np.float32) @ queries[row]
        order = np.argsort(-exact, kind="stable")[:k]
        scores[row, :len(order)], ids[row, :len(order)] = exact[order], found[order]
    return scores, ids


# ---------------------------------------------------------------------------------------- gallery
# Format 2: append-only row files, committed by gallery.json's row count. An object's latent is
# never overwritten: folding photos into it appends a new row and the older row is dead (the last
# row of an id in objects.txt is its live one). A kill at any moment leaves bytes beyond the
# committed rows, which readers ignore and the next writer cuts off: the gallery is as before or
# after the add, never torn, and readers never see a row change under them.
LATENTS, UNIT, COUNTS, IDS, INDEX = "latents.bin", "unit.bin", "counts.bin", "objects.txt", "index.faiss"
REMOVED_IDS = "removed.txt"  # format 5: the ids ever removed before the version folder was written, one a line
PHOTO_HASHES = "photos.bin"  # format 5: one record per photo folded, its row and the sha256 of its bytes
HASH_RECORD = np.dtype([("row", "<i8"), ("sha256", "V32")])
STORAGE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
INDEX_KINDS = ("flat", "ivfpq")


def photo_digest(data: bytes) -> bytes:
    """The sha256 of a photo's bytes, as uploaded or read from its file (before decoding): how a gallery knows a
    photo it has folded (:data:`PHOTO_HASHES`)."""
    return hashlib.sha256(data).digest()


def file_digest(path: str | os.PathLike) -> bytes:
    """:func:`photo_digest` of a photo file, read a block at a time; a file that cannot be read (gone or changed
    since it was listed) is one sentence naming it (a review: "internal error" at the end of a build)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise UserError(f"photo {path} cannot be read to record it ({exc.strerror or exc}): was it moved or changed "
                        f"while the command ran? Run the command again once the photos stay put") from None
    return digest.digest()


class HeldPhotos:
    """The photo digests of a gallery (:data:`PHOTO_HASHES`) and the rows that folded them, sorted by the digests'
    first 8 bytes for lookup by binary search (numpy arrays: 40 bytes a photo, no dict of a million entries), with
    the records committed since they were read kept apart (a dict, as small as this writer's adds)."""

    def __init__(self, records: np.ndarray):
        keys = _digest_keys(records["sha256"])
        order = np.argsort(keys, kind="stable")
        self.keys, self.rows, self.digests = keys[order], records["row"][order], records["sha256"][order]
        self.fresh: dict[bytes, list[int]] = {}

    def rows_of(self, digest: bytes) -> list[int]:
        """The rows that folded a photo of ``digest``."""
        key = np.uint64(int.from_bytes(digest[:8], "little"))
        low, high = np.searchsorted(self.keys, key, "left"), np.searchsorted(self.keys, key, "right")
        found = [int(self.rows[i]) for i in range(low, high) if self.digests[i].tobytes() == digest]
        return found + self.fresh.get(digest, [])

    def add(self, records: np.ndarray) -> None:
        for row, digest in zip(records["row"].tolist(), records["sha256"]):
            self.fresh.setdefault(digest.tobytes(), []).append(row)


def _digest_keys(digests: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each 32-byte digest as an unsigned integer."""
    return np.frombuffer(np.ascontiguousarray(digests).tobytes(), dtype="<u8")[::4].copy()


def _hash_records(rows: Sequence[int], digests: Sequence[Sequence[bytes]]) -> np.ndarray:
    """:data:`HASH_RECORD` records: each of ``digests[i]`` with row ``rows[i]``."""
    pairs = [(row, digest) for row, of_row in zip(rows, digests) for digest in of_row]
    records = np.empty(len(pairs), dtype=HASH_RECORD)
    if pairs:
        records["row"] = [row for row, _ in pairs]
        records["sha256"] = np.frombuffer(b"".join(digest for _, digest in pairs), dtype="V32")
    return records


class Gallery:
    """A gallery folder, opened for search (and :meth:`add`, :meth:`remove`, :meth:`retrain` under its lock).

    Latents and their normalised rows are memory maps of the row files: only the index is held in
    memory (a flat index is built from the live rows when the gallery opens; an IVF-PQ index is
    read from ``index.faiss`` and brought up to date with the rows written since it was saved)."""

    def __init__(self, path: str | os.PathLike, recover: bool = False, with_index: bool = True,
                 with_unit: bool = True):
        """Open the gallery as its manifest commits it. ``recover`` (writers, under the gallery's
        lock): first finish what a killed writer left — a gallery of the previous layout moves into a
        version folder, and folders and files no manifest names are removed. ``with_index=False``: the
        rows only (:meth:`retrain` makes the index again from them, a damaged or missing one included).
        ``with_unit=False`` (with ``with_index=False``): a unit.bin missing or cut short is no obstacle — it is
        the latents normalised, which :meth:`retrain` writes again (``unit`` is then None)."""
        self.path = Path(path)
        self.with_index = with_index
        self.with_unit = with_unit or with_index
        if recover:
            recover_gallery(self.path)
        for attempt in range(3):
            seen = _manifest_bytes(self.path)
            try:
                self._open()
                return
            except UserError:
                # a writer swapped in a new version while this reader opened the old one: open the new one
                if attempt == 2 or _manifest_bytes(self.path) == seen:
                    raise

    def _open(self) -> None:
        self.manifest = read_manifest(self.path)
        self.data = data_folder(self.path, self.manifest)
        self.settings = IndexSettings(**self.manifest["index"])
        self.dim = int(self.manifest["dim"])
        self.dtype = STORAGE_DTYPES[self.manifest["storage_dtype"]]
        self.rows = int(self.manifest["rows"])
        rebuild = "rebuild the gallery with mlsctl index build"
        try:
            self.row_ids, self.ids_bytes = _read_ids(self.data / IDS, self.rows)
            self.latents = self._map(LATENTS, self.dtype, (self.rows, self.dim))
            self.counts = self._map(COUNTS, np.int64, (self.rows,))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path} is damaged ({_what_failed(exc)}); {rebuild}") from None
        try:
            self.unit = self._map(UNIT, self.dtype, (self.rows, self.dim))
        except (OSError, ValueError) as exc:
            if self.with_unit:
                # unit.bin is latents.bin normalised: retrain writes it again, nothing lost (a new user's probe,
                # 2026-12-07: "rebuild" of a gallery grown over the service dropped every object added to it)
                raise UserError(f"{self.path} is damaged ({_what_failed(exc)}); mlsctl index retrain {self.path} "
                                f"writes {UNIT} and the index again from {LATENTS}") from None
            self.unit = None  # missing or cut short: retrain writes it again
        try:
            if self.unit is not None:
                self._check_rows()  # rows that are no unit vectors: a manifest of other dim or dtype, or NaN
        except ValueError as exc:
            if self.with_unit or not self._latents_read_finite():
                raise UserError(f"{self.path} is damaged ({exc}); {rebuild}") from None
            self.unit = None  # unit.bin damaged, the latents whole: retrain writes it again (a review, 2026-12-07)
        self.row_of: dict[str, int] = dict(zip(self.row_ids, range(self.rows)))  # the last row of an id wins
        self.removed_rows = 0  # tombstone rows: objects removed, whose latents stay in the files until retrain
        self._tombstone_of: dict[str, int] = {}  # id -> its last tombstone row (ids in order of their first); append
        if self.manifest["format_version"] >= TOMBSTONE_FORMAT_VERSION:
            tombstones = np.flatnonzero(np.asarray(self.counts) == REMOVED_COUNT)
            self.removed_rows = len(tombstones)
            for row in tombstones.tolist():
                self._tombstone_of[self.row_ids[row]] = row
                if self.row_of[self.row_ids[row]] == row:  # removed, not added again since: absent
                    del self.row_of[self.row_ids[row]]
        self._lookalikes: Optional[dict[str, str]] = None  # lookalike_key -> stored id, made when first asked
        self._lookalikes_collide = False  # two stored ids share a key (stored before look-alikes were refused)
        # the committed records of PHOTO_HASHES (format 5: read_manifest checked the count; none before)
        self.photo_records = int(self.manifest.get("photo_hashes", 0)) if self.manifest["format_version"] >= 5 else 0
        self._held: Optional[HeldPhotos] = None  # PHOTO_HASHES, read when an add first asks (photos_to_fold)
        self._recorded: Optional[list[str]] = None  # REMOVED_IDS, read and checked once (recorded_removals)
        self._recorded_set: Optional[frozenset[str]] = None  # the same as a set (was_removed)
        self.index = self._open_index() if self.with_index else None

    # ------------------------------------------------------------------ files
    def _check_rows(self) -> None:
        """The committed rows read as what the manifest says they are. A row file may be longer than its
        committed rows (an interrupted append leaves a tail, of any length, that the next append cuts
        off), so a size beyond them proves nothing: a manifest saying fp16 over fp32 files, or a narrower
        ``dim``, was read without a word and gave nonsense scores (an attacker's probe, 2026-12-07). But
        unit.bin's rows are unit vectors (or zero, for a zero latent), which rows read with another
        width or dtype are not: a few rows spread over the committed ones are checked."""
        if not self.rows or not self.dim:
            return
        sample = np.unique(np.linspace(0, self.rows - 1, num=min(self.rows, 8)).round().astype(np.int64))
        with np.errstate(all="ignore"):  # fp32 bytes read as fp16 may be inf
            norms = np.linalg.norm(np.asarray(self.unit[sample], dtype=np.float32), axis=1)
        if not np.all((np.abs(norms - 1) < 0.01) | (norms == 0)):  # False for NaN
            raise ValueError(f"the rows of {UNIT} do not read as unit vectors of width {self.dim} in "
                             f"{self.manifest['storage_dtype']}: they hold NaN or inf, or {MANIFEST}'s dim or "
                             f"storage_dtype is not the files'")

    def _latents_read_finite(self) -> bool:
        """The committed latents read as finite numbers (a few rows spread over them, as :meth:`_check_rows`
        samples): where unit.bin fails its check but these hold, it is unit.bin that is damaged. (fp32 files read
        as fp16 by an edited manifest read as inf or NaN; a narrower ``dim`` is not told apart.)"""
        if not self.rows or not self.dim:
            return True
        sample = np.unique(np.linspace(0, self.rows - 1, num=min(self.rows, 8)).round().astype(np.int64))
        with np.errstate(all="ignore"):
            return bool(np.isfinite(np.asarray(self.latents[sample], dtype=np.float32)).all())

    def _map(self, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        path = self.data / name
        need = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if not path.is_file() or path.stat().st_size < need:
            raise ValueError(f"{name} is missing or shorter than its {shape[0]} rows")
        if need == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    @property
    def ids(self) -> list[str]:
        """The live object ids, oldest first."""
        return [i for row, i in enumerate(self.row_ids) if self.row_of.get(i) == row]

    def __len__(self) -> int:
        return len(self.row_of)

    def removed_ids(self) -> list[str]:
        """The ids removed from the gallery (``index remove``, ``DELETE``) and not added again since, oldest first:
        those recorded when its version folder was written (:data:`REMOVED_IDS`: a purge, a retrain or a rebuild
        keeps them, ids alone), then those whose last row is a tombstone. ``index build --overwrite`` skips them."""
        recorded = self.recorded_removals()
        tombstoned = (i for i in self.row_ids if i not in self.row_of)  # absent, yet in a row: its last is a tombstone
        return [i for i in dict.fromkeys([*recorded, *tombstoned]) if i not in self.row_of]

    def ever_removed_ids(self) -> list[str]:
        """The ids ever removed from the gallery, those added again since included, oldest first: those
        :data:`REMOVED_IDS` records, then those of its tombstone rows. What a compaction records, and what
        ``index build --overwrite`` skips in its source (a re-added one counts as added since the build)."""
        return list(dict.fromkeys([*self.recorded_removals(), *self._tombstone_of]))

    def recorded_removals(self) -> list[str]:
        """The ids :data:`REMOVED_IDS` of the version folder records, read and checked when first asked and kept
        (a new version folder is a new :meth:`_open`): a damaged record is one sentence (a probe, 2026-12-07: each
        DELETE of an unknown id read the file again, 2 s for 2M ids)."""
        if self._recorded is None:
            self._recorded = _recorded_removals(self.data, self.manifest, self.path)
        return self._recorded

    def was_removed(self, object_id: str) -> bool:
        """``object_id`` names no object now, and one of that id was removed (:meth:`removed_ids`)."""
        if object_id in self.row_of:
            return False
        if self._recorded_set is None:
            self._recorded_set = frozenset(self.recorded_removals())
        return object_id in self._recorded_set or object_id in self._tombstone_of

    def live_rows(self, start: int = 0) -> np.ndarray:
        """The live rows from ``start`` on, ascending (no superseded row, no tombstone, no removed object's)."""
        if len(self.row_of) == self.rows:  # no id was written twice: every row is live
            return np.arange(start, self.rows, dtype=np.int64)
        return np.array([r for r in range(start, self.rows) if self.row_of.get(self.row_ids[r]) == r], dtype=np.int64)

    def latent(self, object_id: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.latents[self.row_of[object_id]], dtype=np.float32).copy())

    def count(self, object_id: str) -> int:
        return int(self.counts[self.row_of[object_id]])

    # ------------------------------------------------------------------ photos held (PHOTO_HASHES)
    def read_photo_records(self) -> np.ndarray:
        """The committed records of :data:`PHOTO_HASHES` (none before format 5); a file missing or short of them is
        a damaged gallery, said in one sentence."""
        if not self.photo_records:
            return np.empty(0, dtype=HASH_RECORD)
        path = self.data / PHOTO_HASHES
        problem = None
        try:
            with open(path, "rb") as f:
                records = np.fromfile(f, dtype=HASH_RECORD, count=self.photo_records)
        except (OSError, ValueError) as exc:
            records, problem = None, _what_failed(exc)
        if records is not None and len(records) < self.photo_records:
            problem = f"{PHOTO_HASHES} is shorter than its {self.photo_records} records"
        elif records is not None and (records["row"].min() < 0 or records["row"].max() >= self.rows):
            problem = f"{PHOTO_HASHES} names rows outside the gallery's {self.rows:,}"  # a review: an IndexError
        if problem is not None:
            raise UserError(f"{self.path} is damaged ({problem}): the record of the photos it holds cannot be read; "
                            f"rebuild the gallery with mlsctl index build --overwrite") from None
        return records

    def photo_records_of_rows(self, live: np.ndarray) -> np.ndarray:
        """The :data:`HASH_RECORD` records of the photos the objects of ``live`` rows (ascending, one per object)
        hold, their rows renumbered as a compaction to these rows writes them (row i: ``live[i]``): a removed
        object's records, and those of an earlier life of an id removed and added again, are left out."""
        records = self.read_photo_records()
        self._held_photos()  # the tombstones
        new_row = {self.row_ids[row]: i for i, row in enumerate(live.tolist())}
        owners = [self.row_ids[row] for row in records["row"].tolist()]
        rows = np.asarray([new_row.get(owner, -1) if self._holds(owner, row) else -1
                           for owner, row in zip(owners, records["row"].tolist())], dtype=np.int64)
        kept = records[rows >= 0].copy()
        kept["row"] = rows[rows >= 0]
        return kept[np.argsort(kept["row"], kind="stable")]

    def photos_known(self) -> int:
        """The :data:`PHOTO_HASHES` records the live objects hold (a removed object's, tombstoned and not yet purged,
        no longer count: a probe, 2026-12-07, found ``index info`` counting them); without a tombstone every record
        is held, and the file is not read."""
        if not self.removed_rows or not self.photo_records:
            return self.photo_records
        return len(self.photo_records_of_rows(self.live_rows()))

    def _held_photos(self) -> HeldPhotos:
        if self._held is None:
            self._held = HeldPhotos(self.read_photo_records())
        return self._held

    def _holds(self, object_id: str, row: int) -> bool:
        """Row ``row`` is one of ``object_id``'s present life: its id, after the id's last tombstone."""
        return self.row_ids[row] == object_id and row > self._tombstone_of.get(object_id, -1)

    def photos_to_fold(self, object_id: str, digests: Sequence[Optional[bytes]]) -> tuple[list[int], int, int]:
        """Which photos of an add to ``object_id`` to fold, by their digests (:func:`photo_digest`; None: a photo
        without bytes to know it by, always folded): (their indices, in order; how many the object holds already;
        how many repeat an earlier photo of the same add). A new or removed object holds none."""
        held = self._held_photos() if object_id in self.row_of and self.photo_records else None
        fold, already, repeated, seen = [], 0, 0, set()
        for i, digest in enumerate(digests):
            if digest is None:
                fold.append(i)
            elif digest in seen:
                repeated += 1
            elif held is not None and any(self._holds(object_id, row) for row in held.rows_of(digest)):
                already += 1
                seen.add(digest)
            else:
                fold.append(i)
                seen.add(digest)
        return fold, already, repeated

    # ------------------------------------------------------------------ index
    def _open_index(self):
        faiss = threads.faiss()

        if self.settings.kind == "flat":
            live = self.live_rows()
            index = train_index(np.zeros((0, self.dim), np.float32), self.settings)
            for start in range(0, len(live), 65536):  # the live rows, a block at a time
                block = live[start:start + 65536]
                index.add_with_ids(np.asarray(self.unit[block], dtype=np.float32), block)
            return index
        index_path = self.data / (index_file(self.manifest) or INDEX)
        # the rows hold every object (those added since the build too): the index is made again from them
        # (a new user's probe, 2026-12-06: "rebuild with index build" dropped every later add)
        again = f"make it again from the gallery's rows with mlsctl index retrain {self.path}"
        if not index_path.is_file():
            raise UserError(f"{index_path} is missing; {again}")
        try:
            index = faiss.read_index(str(index_path))
        except Exception:  # faiss raises RuntimeError with its C++ message (its source lines) for any junk
            raise UserError(f"{index_path} is damaged (faiss cannot read it as an index); {again}") from None
        if index.d != self.dim:
            raise UserError(f"{index_path} indexes {index.d} dimensions, the gallery has {self.dim}; {again}")
        saved = int(self.manifest["indexed_rows"])
        if saved > self.rows or index.ntotal > saved:
            raise UserError(f"{self.path} is inconsistent ({index.ntotal} indexed of {saved} rows, {self.rows} "
                            f"committed); {again}")
        # rows written since the index was saved: the rows they supersede leave it (an id written
        # again after the save, or removed: a tombstone supersedes its row too), the live ones join it
        dead = []
        if len(self.row_of) < self.rows:
            saved_row = dict(zip(self.row_ids[:saved], range(saved)))
            dead = sorted({saved_row[i] for i in self.row_ids[saved:] if i in saved_row})
        if dead:
            index.remove_ids(faiss.IDSelectorBatch(np.asarray(dead, dtype=np.int64)))
        fresh = self.live_rows(saved)
        if len(fresh):
            index.add_with_ids(np.asarray(self.unit[fresh], dtype=np.float32), fresh)
        self._unsaved = len(fresh) + len(dead)
        return index

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"]["fingerprint"]

    @property
    def set_model(self) -> str:
        """The kind of set model that folded the gallery's objects (:data:`SET_MODEL_KINDS`); a gallery written before
        it was recorded is MILE's (no other kind could build one)."""
        return self.manifest["model"].get("set_model", "mile")

    def built_with_run(self) -> Path:
        """The run the gallery was built with (its manifest's), said in one sentence when it has moved
        away (a new user, 2026-12-06: the error named only the old path, as if the user had typed it)."""
        from mlsctl.runs import Run

        run = Path(self.manifest["model"]["run"])
        if not Run(run).has_config():
            gone = "which has no config.yaml any more" if run.is_dir() else "which is not there any more"
            raise UserError(f"gallery {self.path} was built with run {run}, {gone}; give the run's new place with "
                            f"--run")
        return run

    def check_run_kind(self, run_dir: str | os.PathLike) -> None:
        """Refuse, from the run's config.yaml and the manifest alone (before any weights load: a review,
        2026-12-07), a run whose set model is of the other kind than the gallery's, in :meth:`check_model`'s
        sentence."""
        run, kind = set_model_kind_of_run(run_dir)
        if kind != self.set_model:
            raise UserError(self._other_kind(run, kind))

    def _other_kind(self, run: str, kind: str) -> str:
        """The refusal of a model of run ``run`` that folds sets of ``kind``, not the gallery's kind."""
        return (f"gallery {self.path} holds {SET_MODEL_KINDS[self.set_model]}, from run "
                f"{self.manifest['model']['run']}; the model given ({run}) folds {SET_MODEL_KINDS[kind]}: leave --run "
                f"out to embed with the run the gallery was built with, or rebuild the gallery with this one")

    def check_model(self, model: "SetModel") -> None:
        """Refuse a model whose latents this gallery's are not: the gallery's run trained on since, a model
        of another width, another model, other preprocessing. (A manifest whose ``dim`` was edited is
        refused at open: :meth:`_check_rows`.)"""
        built = self.manifest["model"]
        if model.kind != self.set_model:  # before the run's checks: the same run never gives both kinds
            raise UserError(self._other_kind(model.run, model.kind))
        if model.fingerprint != self.fingerprint and os.path.realpath(model.run) == os.path.realpath(built["run"]):
            raise UserError(f"run {model.run} is no longer the model gallery {self.path} was built with (step "
                            f"{built['step']} then, {model.step} now: trained on or again since); rebuild the gallery "
                            f"with mlsctl index build --overwrite")  # not "leave --run out": it was (a review)
        if model.dim != self.dim:  # said as another model, not as an edited manifest (a known issue, 2026-12-07)
            raise UserError(f"gallery {self.path} holds latents of {self.dim} dimensions, from the model of "
                            f"{built['run']} at step {built['step']}; the model given ({model.run} at step "
                            f"{model.step}) embeds {model.dim}: leave --run out to embed with the run the gallery "
                            f"was built with, or rebuild the gallery with this one")
        if model.fingerprint != self.fingerprint:
            raise UserError(f"gallery {self.path} was built with model {self.fingerprint[:12]} "
                            f"({self.manifest['model']['run']} at step {self.manifest['model']['step']}); the model "
                            f"given {model.fingerprint[:12]} ({model.run} at step {model.step}) differs: leave --run out to "
                            f"embed with the run the gallery was built with, or rebuild the gallery with this one")
        recorded = self.manifest.get("preprocessing")
        if recorded is not None and recorded != model.preprocessing():
            raise UserError(f"gallery {self.path} embedded its photos with {recorded}, queries are embedded with "
                            f"{model.preprocessing()}; rebuild the gallery from the images with mlsctl index build")

    # ------------------------------------------------------------------ search
    def search(self, latent: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The ``k`` objects nearest to one set latent [D] (cosine), best first: ``(object id, cosine)``."""
        if latent.ndim != 1:
            raise ValueError(f"search takes one set latent of shape [{self.dim}], got {list(latent.shape)}; for a batch "
                             f"[q, {self.dim}] use search_many")
        return self.search_many(latent[None], k)[0]

    def search_many(self, latents: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """``search`` for a batch of latents [q, D]; the query is normalised, the gallery never. A
        ``k`` below 1, latents of another width or with NaN/inf are refused (ValueError): they are a
        caller's mistake, not a query with no answer."""
        if int(k) < 1:
            raise ValueError(f"search needs k of 1 or more, got {k}")
        if latents.ndim != 2 or latents.shape[1] != self.dim:
            raise ValueError(f"search expects set latents of shape [q, {self.dim}] (this gallery's width), got "
                             f"{list(latents.shape)}")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("a set latent to search with holds NaN or inf (a photo the model could not embed?)")
        if not len(self.row_of):
            return [[] for _ in range(len(latents))]
        queries = _normalized(latents.detach().float())
        scores, rows = search_index(self.index, self.unit, queries, k, self.settings)
        return [[(self.row_ids[r], float(s)) for s, r in zip(score_row, id_row) if r >= 0]
                for score_row, id_row in zip(scores, rows)]

    # ------------------------------------------------------------------ writing (under the gallery's lock)
    def add(self, model: "SetModel", object_id: str, images: Sequence,
            digests: Optional[Sequence[Optional[bytes]]] = None) -> tuple[bool, int]:
        """Fold every one of ``images`` (photo paths, or decoded PIL images) into ``object_id`` (created when new);
        returns (created, images now folded). Costs one appended row, whatever the gallery's size (see the module's
        format notes). Each path is read once, and the sha256 of the bytes decoded is recorded with the row
        (:data:`PHOTO_HASHES`), so a later add of the same photo to the object skips it, as with ``index add``; a
        decoded image has no bytes and is not recorded, unless ``digests`` gives its digest. ``digests``: one per
        image (None: unknown) or None; a path's must be that of the bytes read now, or the file changed since the
        caller chose it by that digest (:meth:`photos_to_fold`, which this method does not call: it folds what it is
        given) and nothing is written. The caller holds the gallery's lock (:func:`add_to_gallery` takes it)."""
        check_object_id(object_id)
        self.check_model(model)
        cls, tokens, read = model.photo_tokens(images)
        given = list(digests) if digests is not None else [None] * len(images)
        if len(given) != len(images):
            raise ValueError(f"{len(given)} digests for {len(images)} images; give one per image (None: unknown)")
        for image, expected, found in zip(images, given, read):
            if found is not None and expected is not None and expected != found:
                raise UserError(f"photo {image} changed while the command ran (its bytes are not those it was checked "
                                f"by against the gallery); nothing was added: run the command again once the photos "
                                f"stay put")
        recorded = [found if found is not None else expected for found, expected in zip(read, given)]
        return self.fold_into(model.fold, object_id, cls, tokens, len(images), [d for d in recorded if d is not None])

    def lookalike(self, object_id: str) -> Optional[str]:
        """The stored id that reads like ``object_id`` but is another string (:func:`lookalike_key`),
        or None. The keys are computed once per opened gallery, then kept up to date by :meth:`append`."""
        if self._lookalikes is None:
            self._lookalikes = {}
            for stored in self.row_of:
                if self._lookalikes.setdefault(lookalike_key(stored), stored) != stored:
                    self._lookalikes_collide = True
        found = self._lookalikes.get(lookalike_key(object_id))
        return None if found == object_id else found

    def check_new_id(self, object_id: str, where: str = "object id") -> None:
        """Refuse ``object_id`` as a new object's id (:func:`new_id_problem`): a :class:`LookalikeId`
        where it reads like a stored one, a UserError where whitespace ends it."""
        lookalike = self.lookalike(object_id)
        problem = new_id_problem(object_id, lookalike)
        if problem:  # 409 for a look-alike alone; 400 for an id no gallery takes (whitespace, Cf at an end)
            kind = LookalikeId if lookalike is not None and new_id_problem(object_id) is None else UserError
            raise kind(f"{where} '{printable(object_id)}' {problem}")

    def fold_into(self, fold, object_id: str, cls: torch.Tensor, tokens: Optional[torch.Tensor],
                  photos: int, digests: Sequence[bytes] = ()) -> tuple[bool, int]:
        """Fold the embedded ``photos`` (``cls``, ``tokens``) into ``object_id``'s latent with ``fold``
        (the set model's :meth:`~SetModel.fold`: a server passes it wrapped in its model lock) and commit
        the row, with ``digests``, those of the photos that have them (:meth:`photos_to_fold` chose them: none the
        object holds); returns (created, images now folded)."""
        created = object_id not in self.row_of
        if created:
            self.check_new_id(object_id)
        previous = None if created else self.latent(object_id)
        if previous is not None and not bool(torch.isfinite(previous).all()):
            # a damaged latents.bin: its NaN would reach append's check as "internal error (ValueError)" (a probe,
            # 2026-12-07); nothing folded into that row can be mended by retrain, which copies it
            raise DamagedGallery(f"gallery {self.path} is damaged: the stored latent of '{printable(object_id)}' holds "
                                 f"NaN or inf, so no photo can be folded into it; {REBUILD}")
        latent = fold(previous, cls, tokens)
        count = photos + (0 if created else self.count(object_id))
        self.append([object_id], latent[None], [count], [list(digests)])
        return created, count

    def append(self, ids: Sequence[str], latents: torch.Tensor, counts: Sequence[int],
               digests: Optional[Sequence[Sequence[bytes]]] = None) -> None:
        """Append rows, one per id, and commit them (gallery.json's row count, written atomically, last). A row
        whose count is :data:`REMOVED_COUNT` is a tombstone (:meth:`remove`): its id leaves the gallery. Where the
        commit fails (a full disk), the gallery in memory is put back as it was, so that searches never
        see rows the files do not hold; the rows written past the committed count are cut off by the
        next append. ``digests``: per id, those of the photos its row folds in (:data:`PHOTO_HASHES`), appended and
        committed with the rows."""
        for object_id in ids:
            check_object_id(object_id)
        if len(set(ids)) < len(ids):  # the earlier row of the id would stay in the index, dead
            raise ValueError(f"the rows to append name an id more than once ({', '.join(ids[:3])}); nothing was added")
        if not bool(torch.isfinite(latents).all()):  # one such row would answer every search with NaN scores
            raise ValueError(f"the set latents to add ({', '.join(ids[:3])}) hold NaN or inf (photos the model could "
                             f"not embed?); nothing was added")
        latents = latents.detach().float().numpy()
        _check_storable(latents, self.dtype, ids, self.path)
        unit = _normalized(latents).astype(self.dtype)
        counts = np.asarray(counts, dtype=np.int64)
        before = (self.rows, self.ids_bytes, self.manifest, getattr(self, "_unsaved", 0), self.removed_rows,
                  {i: self.row_of.get(i) for i in ids}, self.photo_records)
        records = _hash_records(range(self.rows, self.rows + len(ids)), digests or [])
        new_ids_bytes = _append_rows(self.data, self.rows, self.ids_bytes, ids, latents.astype(self.dtype), unit,
                                     counts, (records, self.photo_records))
        done: dict[str, np.ndarray] = {}  # the index's changes, undone where the commit fails
        try:
            self.photo_records += len(records)
            self._commit_rows(ids, unit.astype(np.float32), counts, new_ids_bytes, done)
        except BaseException:
            self._put_back(before, done)
            raise
        if self._held is not None:
            self._held.add(records)
        self._tombstone_of.update((i, row) for row, (i, count) in enumerate(zip(ids, counts.tolist()), before[0])
                                  if count == REMOVED_COUNT)
        self.latents = self._map(LATENTS, self.dtype, (self.rows, self.dim))
        self.unit = self._map(UNIT, self.dtype, (self.rows, self.dim))
        self.counts = self._map(COUNTS, np.int64, (self.rows,))
        self._update_lookalikes(ids, counts)

    def _commit_rows(self, ids: Sequence[str], unit: np.ndarray, counts: np.ndarray, ids_bytes: int,
                     done: dict) -> None:
        """:meth:`append`'s rows, written to the files, taken into memory and the index and committed; ``done``
        gets the rows taken out of the index (``removed``) and put in (``added``) as it goes."""
        faiss = threads.faiss()

        start = self.rows
        rows = np.arange(start, start + len(ids), dtype=np.int64)
        live = counts != REMOVED_COUNT
        old_rows = np.asarray([self.row_of[i] for i in ids if i in self.row_of], dtype=np.int64)
        self.ids_bytes, self.rows = ids_bytes, start + len(ids)
        if len(old_rows):
            self.index.remove_ids(faiss.IDSelectorBatch(old_rows))
            done["removed"] = old_rows
        for object_id, row, kept in zip(ids, rows.tolist(), live.tolist()):
            if kept:
                self.row_of[object_id] = row
            else:
                self.row_of.pop(object_id, None)
        self.row_ids.extend(ids)
        if live.any():
            self.index.add_with_ids(unit[live], rows[live])
            done["added"] = rows[live]
        self.removed_rows += int((~live).sum())
        self._unsaved = getattr(self, "_unsaved", 0) + len(ids) + len(old_rows)
        version = self.manifest["format_version"]
        if self.removed_rows:
            version = max(version, TOMBSTONE_FORMAT_VERSION)
        held = {"photo_hashes": self.photo_records} if self.photo_records else {}
        if held:  # a reader of format 4 would keep the count and drop the file at a compaction
            version = max(version, GALLERY_FORMAT_VERSION)
        self.manifest = dict(self.manifest, rows=self.rows, objects=len(self.row_of), format_version=version,
                             updated=time.strftime("%Y-%m-%dT%H:%M:%S"), **held)
        if self.settings.kind != "flat" and self._unsaved > max(1024, self.rows // 100):
            self.save_index()  # the rows written since the last save stay a small share
        else:
            atomic.write_json(self.path / MANIFEST, self.manifest)

    def _put_back(self, before: tuple, done: dict) -> None:
        """The gallery in memory as it was before an :meth:`append` whose commit failed (``done``: what
        :meth:`_commit_rows` changed in the index)."""
        faiss = threads.faiss()

        start, ids_bytes, manifest, unsaved, removed_rows, replaced, self.photo_records = before
        if "added" in done:
            self.index.remove_ids(faiss.IDSelectorBatch(done["added"]))
        if "removed" in done:  # the replaced rows are still on disk, committed: index them again
            old_rows = done["removed"]
            self.index.add_with_ids(np.asarray(self.unit[old_rows], dtype=np.float32), old_rows)
        del self.row_ids[start:]
        for object_id, row in replaced.items():
            if row is None:
                self.row_of.pop(object_id, None)
            else:
                self.row_of[object_id] = row
        self.rows, self.ids_bytes, self.manifest, self._unsaved = start, ids_bytes, manifest, unsaved
        self.removed_rows = removed_rows

    def _update_lookalikes(self, ids: Sequence[str], counts: np.ndarray) -> None:
        """The look-alike keys (:meth:`lookalike`) after rows were appended: an added id's key joins them, a
        removed id's leaves (all are made again on the next ask where two stored ids share a key)."""
        if self._lookalikes is None:
            return
        for object_id, count in zip(ids, counts.tolist()):
            key = lookalike_key(object_id)
            if count != REMOVED_COUNT:
                if self._lookalikes.setdefault(key, object_id) != object_id:
                    self._lookalikes_collide = True
            elif self._lookalikes_collide:
                self._lookalikes = None  # another stored id may read alike: every key is made again when asked
                return
            elif self._lookalikes.get(key) == object_id:
                del self._lookalikes[key]

    def remove(self, ids: Sequence[str], missing_ok: bool = False, where: str = "object id",
               named: Optional[dict[str, str]] = None) -> tuple[list[str], list[str]]:
        """Remove the objects ``ids``: a tombstone row per id (count :data:`REMOVED_COUNT`, a zero latent)
        appended and committed as an add's row is (:meth:`append`), all or none, each id checked before
        anything is written; returns (removed, missing). An id not in the gallery is one sentence naming
        it, unless ``missing_ok`` (then it is in ``missing``); one that reads like a stored id
        (:func:`lookalike_key`) is refused all the same, naming the stored one. A removed id added again
        is a new object. The removed latents stay in the row files (and an IVF-PQ index file saved
        before) until :meth:`retrain`. ``named``: where an id was given, said in its sentences instead of ``where``
        (``--ids-file F line N: the id``). The caller holds the gallery's lock (:func:`remove_from_gallery`)."""
        if self.manifest["format_version"] < PLAIN_FORMAT_VERSION:
            raise UserError(f"gallery {self.path} is of format {self.manifest['format_version']}; open it as its "
                            f"writer (Gallery(path, recover=True)) to move it to the current format first")
        self.recorded_removals()  # a damaged record: said before anything is written (a probe, 2026-12-07)
        wanted = list(dict.fromkeys(ids))  # an id given twice is removed once
        missing = self.absent_ids(wanted, missing_ok, where, named)
        removed = [object_id for object_id in wanted if object_id not in missing]
        if removed:
            self.append(removed, torch.zeros(len(removed), self.dim), [REMOVED_COUNT] * len(removed))
        return removed, missing

    def absent_ids(self, ids: Sequence[str], missing_ok: bool = False, where: str = "object id",
                   named: Optional[dict[str, str]] = None) -> list[str]:
        """The ids of ``ids`` that name no object of the gallery; one sentence naming the first unless
        ``missing_ok``, and one naming the stored id where an id reads like it (whatever ``missing_ok``); each
        sentence names the id as ``named`` says where it was given (an ``--ids-file`` line), else as ``where``."""
        named, missing = named or {}, []
        for object_id in ids:
            check_object_id(object_id, named.get(object_id, where))
            if object_id in self.row_of:
                continue
            stored = self.lookalike(object_id)
            if stored is not None:  # its --ids-file line named, as other bad lines are (a review, 2026-12-07)
                raise UserError(f"{named.get(object_id, where)} '{printable(object_id)}' is not in gallery "
                                f"{self.path}, which holds "
                                f"'{printable(stored)}' (they differ only in whitespace, invisible characters or "
                                f"Unicode composition); give '{printable(stored)}'"
                                + (f" (in bash: {typable(stored)})" if typable(stored) else "")
                                + " to remove it (nothing was removed)")
            missing.append(object_id)
        if missing and not missing_ok:
            where = named.get(missing[0], where)
            others = len(missing) - 1
            more = f" (nor {'is' if others == 1 else 'are'} {others} more of the ids given)" if others else ""
            if self.was_removed(missing[0]):
                purged = missing[0] not in set(self.row_ids)  # recorded alone: its rows left at a purge or retrain
                raise UserError(f"{where} '{printable(missing[0])}' was removed from gallery {self.path} already"
                                f"{more}; nothing was removed now" + (" (its latent has left the files)" if purged
                                else f" (its latent leaves the files with mlsctl index remove {self.path} --purge, or "
                                     f"index retrain)"))
            removed_as = self.removed_lookalike(missing[0])
            if removed_as is not None:  # a look-alike of a removed id: removed, as every reader matches ids
                raise UserError(f"{where} '{printable(missing[0])}' reads like '{printable(removed_as)}', removed from "
                                f"gallery {self.path} already{more}; nothing was removed now")
            raise UserError(f"{where} '{printable(missing[0])}' is not in gallery {self.path}{more}; nothing was "
                            f"removed: check the id with mlsctl index info {self.path} --objects, or give "
                            f"--missing-ok to pass over ids that are not there")
        return missing

    def removed_lookalike(self, object_id: str) -> Optional[str]:
        """The removed id (:meth:`removed_ids`) that ``object_id`` reads like but is another string of
        (:func:`lookalike_key`), or None (a probe, 2026-12-08: index remove café of an object removed as 'cafe' +
        U+0301 said "not in gallery")."""
        key = lookalike_key(object_id)
        return next((i for i in self.removed_ids() if i != object_id and lookalike_key(i) == key), None)

    def save_index(self) -> None:
        """Write the in-memory index (IVF-PQ) as a new file named by its row count, commit it in the
        manifest with the rows it holds, then remove the file it replaces: a kill leaves the manifest
        naming the old file and its rows, or the new file and its rows, never one with the other's."""
        faiss = threads.faiss()

        old = index_file(self.manifest)
        name = None
        if self.settings.kind != "flat":
            name = f"index.{self.rows}.faiss"
            atomic.write_with(self.data / name, lambda tmp: faiss.write_index(self.index, str(tmp)))
        self.manifest = dict(self.manifest, indexed_rows=self.rows, index_file=name)
        atomic.write_json(self.path / MANIFEST, self.manifest)
        self._unsaved = 0
        if old and old != name:  # committed: a file that cannot be removed now is only a leftover
            try:
                (self.data / old).unlink(missing_ok=True)
            except OSError as exc:
                log.warning(f"could not remove the replaced index {self.data / old} ({first_line(exc)}); delete it")

    def added_since_training(self) -> float:
        """The share of live objects written since the IVF quantiser was trained (0 for flat)."""
        if self.settings.kind == "flat" or not len(self.row_of):
            return 0.0
        trained = int(self.manifest.get("trained_rows", self.rows))
        return sum(1 for r in self.row_of.values() if r >= trained) / len(self.row_of)

    def check_live_latents(self, live: Optional[np.ndarray] = None) -> np.ndarray:
        """The latents of the ``live`` rows (default: all) as float32; a damage sentence where one is NaN or inf:
        copied, it would answer every search with NaN scores (a probe, 2026-12-07)."""
        live = self.live_rows() if live is None else live
        latents = np.asarray(self.latents[live], dtype=np.float32)
        bad = [self.row_ids[live[i]] for i in np.flatnonzero(~np.isfinite(latents).all(axis=1))] if latents.size else []
        if bad:
            named = ", ".join(f"'{printable(i)}'" for i in bad[:5]) + (f" and {len(bad) - 5:,} more" if len(bad) > 5 else "")
            raise DamagedGallery(f"gallery {self.path} is damaged: the stored latents of {counted(len(bad), 'object')} "
                                 f"({named}) hold NaN or inf, and retrain would copy them; {REBUILD}")
        return latents

    def retrain_settings(self) -> IndexSettings:
        """The index settings :meth:`retrain` trains with: those asked for at the build (lists and
        sub-quantisers not given are derived from the size again)."""
        # a flat index has no lists to ask for (a gallery built before IndexSettings.check may store some)
        asked = (self.manifest.get("index_asked") or {}) if self.settings.kind != "flat" else {}
        return IndexSettings(**{**self.settings.to_dict(), "nlist": asked.get("nlist"), "m": asked.get("m")})

    def retrain(self, keep_quantiser: bool = False,
                checked: Optional[tuple[np.ndarray, np.ndarray]] = None) -> dict:
        """Compact the gallery to its live rows (superseded rows, tombstones and removed objects' rows are
        dropped: this purges removed latents from the files) and re-train the IVF-PQ quantiser on them, or with
        ``keep_quantiser`` keep the trained one (``index remove --purge``: no k-means, and no refusal of a gallery
        too small to train); written as a new version folder and swapped in by one atomic replace of the
        manifest (:func:`write_gallery`). ``checked``: (rows, their latents) as :meth:`check_live_latents` gave them
        since, rows that may have left the live ones but none added (``index remove --purge`` checks before it
        removes): latents.bin is then not read again. The caller holds the gallery's lock (:func:`retrain_gallery`)."""
        live = self.live_rows()
        ids = [self.row_ids[r] for r in live]
        latents = self.check_live_latents(live) if checked is None else _latents_of_rows(checked, live)
        counts = np.asarray(self.counts[live], dtype=np.int64)
        kept = keep_quantiser and self.settings.kind != "flat"
        trained_rows = int((live < int(self.manifest.get("trained_rows", self.rows))).sum()) if kept else None
        write_gallery(self.path, ids, torch.from_numpy(latents), counts,
                      self.settings if kept else self.retrain_settings(), self.manifest,
                      self.manifest["storage_dtype"], trained=self.index if kept else None, trained_rows=trained_rows,
                      removed_ids=self.ever_removed_ids(), photo_records=self.photo_records_of_rows(live))
        reopened = Gallery(self.path)
        self.__dict__.update(reopened.__dict__)
        return self.manifest


def _latents_of_rows(checked: tuple[np.ndarray, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The latents of ``rows`` (ascending) out of ``checked`` (ascending rows, their latents), which holds them all."""
    checked_rows, latents = checked
    at = np.searchsorted(checked_rows, rows)
    if len(rows) and (at[-1] >= len(checked_rows) or not np.array_equal(checked_rows[at], rows)):
        raise ValueError("the rows to write are not all among those whose latents were checked")
    return latents if len(at) == len(checked_rows) else latents[at]


def _what_failed(exc: Exception) -> str:
    """A read error of a gallery's files in words, naming the file where the error does."""
    where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
    return f"{where}{getattr(exc, 'strerror', None) or exc}"


def _read_ids(path: Path, rows: int) -> tuple[list[str], int]:
    """The first ``rows`` lines of objects.txt and their length in bytes (ids never hold a line
    break: :func:`check_object_id`; lines beyond the committed rows are an interrupted append)."""
    data = path.read_bytes()
    parts = data.split(b"\n", rows)  # the committed lines, then whatever follows them
    if len(parts) <= rows:
        raise ValueError(f"{path.name} lists {len(parts) - 1} ids for {rows} committed rows")
    length = len(data) - len(parts[-1])
    return (data[:length].decode("utf-8").split("\n")[:-1] if rows else []), length


_PLAIN_ID = re.compile(r"[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # ids check_object_id passes, checked fast


def _recorded_removals(data: Path, manifest: dict, gallery: Path) -> list[str]:
    """The ids :data:`REMOVED_IDS` of the version folder ``data`` records (format 5; none before), as many as the
    manifest counts, each an id :func:`check_object_id` takes; a record where the format has none, one missing, of
    another count, or with a line that is no id (blank, a ``\\r`` left of a CRLF) is a damaged gallery, said in
    one sentence naming the file (and line) (a probe, 2026-12-07: it was trusted, and a rebuild undid takedowns)."""
    record, version = data / REMOVED_IDS, manifest["format_version"]
    count = manifest.get("removed_ids", 0) if version >= 5 else 0
    problem, ids = None, []
    if version < 5 and ("removed_ids" in manifest or record.exists()):
        problem = (f"a gallery of format {version} holds {'removed_ids' if 'removed_ids' in manifest else REMOVED_IDS}"
                   f", which only format 5 has")
    elif not count and record.exists():
        problem = f"{record} is there, but {MANIFEST} counts no removed id"
    elif count:
        try:
            ids = record.read_bytes().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            problem = _what_failed(exc)
        else:
            problem = _record_problem(record, ids, count)
    if problem:
        raise UserError(f"{gallery} is damaged ({problem}): the record of the ids removed from it cannot be read; "
                        f"restore the gallery from a backup, or rebuild it with mlsctl index build --overwrite "
                        f"--restore-removed, which builds back the removed objects its source holds") from None
    return ids[:-1]


def _record_problem(record: Path, lines: list[str], count: int) -> Optional[str]:
    """What is wrong with the ``lines`` of :data:`REMOVED_IDS` (split at each ``\\n``) for ``count`` ids, or None."""
    if lines[-1] != "" or len(lines) - 1 != count:
        return f"{record} holds {len(lines) - 1} whole lines for the {count} removed ids {MANIFEST} counts"
    for number, line in enumerate(lines[:-1], 1):
        if len(line) > MAX_OBJECT_ID_CHARS or not _PLAIN_ID.fullmatch(line):
            try:
                check_object_id(line, f"{record} line {number}:")
            except UserError as exc:
                return first_line(exc, 200)
    return None


def _append_rows(path: Path, start: int, ids_bytes: int, ids: Sequence[str], latents: np.ndarray,
                 unit: np.ndarray, counts: np.ndarray, records: Optional[tuple[np.ndarray, int]] = None) -> int:
    """Cut every row file back to ``start`` committed rows (objects.txt to ``ids_bytes``: an
    interrupted append), append the new rows and flush them to disk; returns objects.txt's new
    length. ``records``: (:data:`HASH_RECORD` records to append to :data:`PHOTO_HASHES`, the records it commits
    now), written the same way where there are any. gallery.json is the caller's to commit."""
    width = latents.shape[1] * latents.dtype.itemsize
    files = [(LATENTS, latents, width, start), (UNIT, unit, width, start), (COUNTS, counts, 8, start)]
    if records is not None and len(records[0]):
        files.append((PHOTO_HASHES, records[0], HASH_RECORD.itemsize, records[1]))
    for name, data, row_bytes, start in files:
        with open(path / name, "r+b" if (path / name).exists() else "w+b") as f:
            f.truncate(start * row_bytes)
            f.seek(start * row_bytes)
            f.write(np.ascontiguousarray(data).tobytes())
            f.flush()
            os.fsync(f.fileno())
    text = "".join(f"{i}\n" for i in ids).encode("utf-8")
    with open(path / IDS, "r+b" if (path / IDS).exists() else "w+b") as f:
        f.truncate(ids_bytes)
        f.seek(ids_bytes)
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return ids_bytes + len(text)


def read_manifest(path: Path) -> dict:
    """gallery.json, checked for the fields and types the gallery needs."""
    manifest_path = path / MANIFEST
    if not Path(path).exists():  # a new user's probe (2026-12-06): "is not a gallery (no gallery.json)" for a typo
        raise UserError(f"gallery {path} does not exist; give a gallery folder, or build one with mlsctl index build")
    if not manifest_path.is_file():
        from mlsctl.runs import Run

        what = " but a run folder" if Run(path).has_config() else ""
        raise UserError(f"{path} is not a gallery{what} (no {MANIFEST}); give a gallery folder, or build one with "
                        f"mlsctl index build")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        reason = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise UserError(f"{manifest_path} is damaged ({reason}); rebuild the gallery with mlsctl index build") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "mlsctl-gallery":
        raise UserError(f"{manifest_path} is not an mlsctl gallery manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise UserError(f"{manifest_path} is damaged (no integer format_version); rebuild the gallery")
    if version > GALLERY_FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer mlsctl; upgrade mlsctl")
    if version < READABLE_FORMAT_VERSION:
        raise UserError(f"{path} is a gallery of an older mlsctl (format {version}); build it again with "
                        f"mlsctl index build --overwrite (the new format grows by appending and searches from disk)")
    model, index = manifest.get("model"), manifest.get("index")
    known = set(IndexSettings().to_dict())
    problem = None
    if not (isinstance(model, dict) and isinstance(model.get("fingerprint"), str) and isinstance(model.get("run"), str)):
        problem = "'model' must hold the run and fingerprint"
    elif not isinstance(model.get("set_model", "mile"), str) or model.get("set_model", "mile") not in SET_MODEL_KINDS:
        problem = f"'model.set_model' must be {' or '.join(SET_MODEL_KINDS)}"
    elif not (isinstance(index, dict) and set(index) <= known and index.get("kind") in ("flat", "ivfpq")
              and all(v is None or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v < 2**31)
                      for k, v in index.items() if k != "kind")
              and all(isinstance(index.get(k, 1), int) for k in ("nprobe", "refine"))):
        # (a probe, 2026-12-06: nprobe -1, 0 or null, refine 0 were internal errors of the search)
        problem = "'index' must hold kind flat|ivfpq and settings that are positive integers (nprobe and refine set)"
    elif not all(isinstance(manifest.get(k), int) and manifest[k] >= 0 for k in ("rows", "objects", "dim", "indexed_rows")):
        problem = "'rows', 'objects', 'dim' and 'indexed_rows' must be counts"
    elif manifest.get("storage_dtype") not in STORAGE_DTYPES:
        problem = "'storage_dtype' must be fp32 or fp16"
    elif version >= 3 and not (isinstance(manifest.get("data"), str) and _VERSION_NAME.fullmatch(manifest["data"])):
        problem = "'data' must name its version folder (v000001)"
    elif version >= 3 and not (manifest.get("index_file") is None or (
            isinstance(manifest["index_file"], str) and _INDEX_NAME.fullmatch(manifest["index_file"]))):
        problem = "'index_file' must name an index file (index.N.faiss) or be null"
    elif version >= 5 and not _positive_counts(manifest, "removed_ids", "photo_hashes"):
        problem = (f"'removed_ids' must count the ids of {REMOVED_IDS}, and 'photo_hashes' the records of "
                   f"{PHOTO_HASHES}, at least one of them")
    if problem:
        raise UserError(f"{manifest_path} is damaged ({problem}); rebuild the gallery with mlsctl index build")
    return manifest


def _records_of_version(manifest: dict, removed_ids: int, photo_records: int) -> dict:
    """``manifest`` with the format and the counts of the records of a new version folder (:data:`REMOVED_IDS`,
    :data:`PHOTO_HASHES`): format 5 where it holds either, format 3 (no tombstones) where neither."""
    manifest = {key: value for key, value in manifest.items() if key not in ("removed_ids", "photo_hashes")}
    counts = {key: n for key, n in (("removed_ids", removed_ids), ("photo_hashes", photo_records)) if n}
    return dict(manifest, format_version=GALLERY_FORMAT_VERSION if counts else PLAIN_FORMAT_VERSION, **counts)


def _positive_counts(manifest: dict, *keys: str) -> bool:
    """Each of ``keys`` the manifest holds is a count above 0, and it holds one at least."""
    held = [manifest[key] for key in keys if key in manifest]
    return bool(held) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in held)


def _check_storable(latents: np.ndarray, dtype, ids: Sequence[str], path: Path) -> None:
    """Refuse latents that the storage dtype cannot hold (fp16 ends at 65,504): a mean-CLS latent is a sum that
    grows with its photos, and an inf row would make the object's next add and every retrain refuse the gallery (a
    review, 2026-12-07: about 15,600 photos of one object with the project's backbone)."""
    if dtype == np.float32 or not len(latents):
        return
    too_large = np.flatnonzero(np.abs(latents).max(axis=1) > np.finfo(dtype).max)
    if len(too_large):
        named = ", ".join(f"'{printable(ids[i])}'" for i in too_large[:3])
        raise UserError(f"the latents of {counted(len(too_large), 'object')} ({named}) exceed what gallery {path}'s "
                        f"{np.dtype(dtype).name} rows hold; nothing was written: build the gallery with --dtype fp32")


def write_gallery(path: Path, ids: list[str], latents: torch.Tensor, counts, settings: IndexSettings,
                  manifest: dict, storage_dtype: str = "fp32", trained=None,
                  trained_rows: Optional[int] = None, removed_ids: Sequence[str] = (),
                  photo_records: Optional[np.ndarray] = None) -> dict:
    """Write a whole gallery (build, retrain) and swap it in at once: the row files and index go into
    a new version folder (written as ``.vN.tmp``, flushed, renamed ``vN``), then one atomic replace
    of ``gallery.json`` — which names the folder — commits it, and only then is the previous
    version removed. A reader, or a writer killed at any moment, sees the old gallery or the new one
    (leftovers of a kill are removed by the next writer: :func:`recover_gallery`). ``trained``: an IVF-PQ
    index whose quantiser to keep (emptied and filled with these rows; no k-means: ``index remove --purge``),
    ``trained_rows`` the first rows it was trained on. ``removed_ids``: the ids removed from the gallery (ids
    alone, :meth:`Gallery.removed_ids`), written into the version folder as :data:`REMOVED_IDS` (format 5).
    ``photo_records``: the digests of the photos each row folds (:data:`HASH_RECORD`, rows of ``ids``), written
    as :data:`PHOTO_HASHES` (format 5)."""
    dtype = STORAGE_DTYPES[storage_dtype]
    photo_records = np.empty(0, dtype=HASH_RECORD) if photo_records is None else photo_records
    raw = latents.detach().float().numpy()
    _check_storable(raw, dtype, ids, path)
    unit = _normalized(raw)
    asked = {"nlist": settings.nlist, "m": settings.m}  # None: derived from the size, again at each retrain
    if trained is not None and settings.kind != "flat":
        index = threads.faiss().clone_index(trained)
        index.reset()
        index.add_with_ids(unit.astype(dtype).astype(np.float32), np.arange(len(ids), dtype=np.int64))
    else:
        index = build_index(unit.astype(dtype).astype(np.float32), settings) if len(ids) else None
    path.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    version = _next_version(path)
    tmp = path / f".{version}.tmp"
    tmp.mkdir()
    try:
        _append_rows(tmp, 0, 0, ids, raw.astype(dtype), unit.astype(dtype), np.asarray(counts, dtype=np.int64),
                     (photo_records, 0))
        if removed_ids:
            (tmp / REMOVED_IDS).write_bytes("".join(f"{i}\n" for i in removed_ids).encode("utf-8"))
            _fsync(tmp / REMOVED_IDS)
        name = None
        if settings.kind != "flat" and index is not None:
            faiss = threads.faiss()

            name = f"index.{len(ids)}.faiss"
            faiss.write_index(index, str(tmp / name))
            _fsync(tmp / name)
        atomic.fsync_dir(tmp)
        os.replace(tmp, path / version)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic.fsync_dir(path)
    manifest = dict(_records_of_version(manifest, len(removed_ids), len(photo_records)),
                    index=settings.to_dict(), index_asked=asked, rows=len(ids), objects=len(ids), indexed_rows=len(ids),
                    trained_rows=len(ids) if trained_rows is None else trained_rows,
                    dim=int(raw.shape[1]), storage_dtype=storage_dtype, data=version, index_file=name,
                    updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic.write_json(path / MANIFEST, manifest)  # the swap
    _remove_leftovers(path, manifest)
    return manifest


# ---------------------------------------------------------------------------------------- versions
# Format 3: GALLERY/gallery.json names the version folder ("data": "v000002") that holds the row
# files, and the IVF-PQ index file in it ("index_file"). Format 2 kept the row files beside
# gallery.json; it is read as it is, and a writer moves it into a version folder first.
_VERSION_NAME = re.compile(r"v\d{6}")
_INDEX_NAME = re.compile(r"index(\.\d+)?\.faiss")
_ROW_FILES = (LATENTS, UNIT, COUNTS, IDS)


def data_folder(path: Path, manifest: dict) -> Path:
    """The folder holding the row files of the gallery ``manifest`` commits."""
    return path / manifest["data"] if manifest.get("format_version", 0) >= 3 else path


def index_file(manifest: dict) -> Optional[str]:
    """The name of the saved IVF-PQ index in the data folder (None: none saved, a flat gallery)."""
    if manifest.get("format_version", 0) >= 3:
        return manifest.get("index_file")
    return INDEX if manifest.get("index", {}).get("kind") != "flat" else None


def _manifest_bytes(path: Path) -> bytes:
    try:
        return (path / MANIFEST).read_bytes()
    except OSError:
        return b""


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _next_version(path: Path) -> str:
    numbers = [int(p.name.strip(".").split(".")[0][1:]) for p in path.iterdir()
               if _VERSION_NAME.fullmatch(p.name.strip(".").split(".")[0])]
    return f"v{max(numbers, default=0) + 1:06d}"


def _remove_leftovers(path: Path, manifest: Optional[dict] = None) -> list[str]:
    """Remove what no committed manifest names: version folders but the current one, unfinished
    ``.vN.tmp`` folders and temporary files, index files the manifest does not name, and the row
    files of the previous layout once the gallery lives in a version folder. Only ever called by
    the gallery's writer (it holds the lock). Returns what was removed."""
    import shutil

    if manifest is None:
        try:
            manifest = read_manifest(path) if (path / MANIFEST).is_file() else None
        except UserError:
            return []  # a damaged manifest: nothing can be told apart from the gallery, touch nothing
    current = data_folder(path, manifest) if manifest else None
    removed = []
    for entry in path.iterdir():
        name = entry.name
        stale = (_VERSION_NAME.fullmatch(name) and (current is None or entry != current)) or \
            (name.startswith(".v") and name.endswith(".tmp")) or name == ".gallery.tmp" or \
            (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")) or \
            (current is not None and current != path and name in (*_ROW_FILES, INDEX))
        if not stale:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(name)
    if current is not None and current.is_dir():
        keep = index_file(manifest)
        for entry in current.iterdir():
            if (_INDEX_NAME.fullmatch(entry.name) and entry.name != keep) or (
                    entry.name.startswith(".") and entry.name.endswith(".tmp")):
                entry.unlink(missing_ok=True)
                removed.append(f"{current.name}/{entry.name}")
    return removed


def recover_gallery(path: Path) -> None:
    """What a writer does before it opens the gallery (it holds the lock): a gallery of the previous
    layout (format 2, row files beside gallery.json) is moved into a version folder — hard links
    into ``.v000001.tmp``, renamed, then one atomic replace of the manifest — and leftovers of a
    killed writer are removed (:func:`_remove_leftovers`)."""
    if not (path / MANIFEST).is_file():
        return
    _remove_leftovers(path)
    manifest = read_manifest(path)
    if manifest["format_version"] >= 3:
        return
    import shutil

    version = _next_version(path)
    tmp = path / f".{version}.tmp"
    tmp.mkdir()
    names = [n for n in (*_ROW_FILES, INDEX) if (path / n).is_file()]
    for name in names:
        try:
            os.link(path / name, tmp / name)
        except OSError:  # a file system without hard links
            shutil.copy2(path / name, tmp / name)
    atomic.fsync_dir(tmp)
    os.replace(tmp, path / version)
    atomic.fsync_dir(path)
    moved = dict(manifest, format_version=PLAIN_FORMAT_VERSION, data=version,
                 index_file=INDEX if INDEX in names and manifest["index"]["kind"] != "flat" else None)
    atomic.write_json(path / MANIFEST, moved)
    _remove_leftovers(path, moved)


def _feature_groups(source: Path, model: SetModel) -> dict[str, torch.Tensor]:
    """CLS features of a feature folder (mlsctl embed of ROOT/<object_id>/*) grouped by object."""
    from mlsctl.features import Features

    features = Features(source)
    if features.model.get("fingerprint") != model.backbone.fingerprint:
        raise UserError(f"{source} was embedded with backbone {str(features.model.get('fingerprint'))[:12]}, not the "
                        f"teacher backbone of {model.run} ({model.backbone.fingerprint[:12]}); embed with --run {model.run}")
    if model.attend != "cls":
        raise UserError(f"run {model.run} attends to patch tokens; build the gallery from the images, not from {source}")
    seen = features.preprocessing
    wanted = model.preprocessing()
    if (seen.get("resolution"), seen.get("resize")) != (wanted["resolution"], wanted["resize"]) or features.dtype != "float32":
        raise UserError(f"{source} was embedded at {seen.get('resolution')} px ({seen.get('resize')}, {features.dtype}) "
                        f"but searches embed at {wanted['resolution']} px (square, float32), so the gallery would not match "
                        f"its own queries: embed with --run {model.run} --resolution {wanted['resolution']} --dtype fp32, "
                        f"or build from the images")
    rows: dict[str, list[int]] = {}
    for row, name in sorted(enumerate(features.files), key=lambda rf: rf[1]):
        parts = Path(name).parts
        if len(parts) < 2:
            raise UserError(f"{name} in {source} is not inside an object folder")
        rows.setdefault(check_object_id(parts[0], "object folder"), []).append(row)
    check_new_ids(sorted(rows), f"{source}: object folder")
    cls = features.global_features()
    return {object_id: cls[r] for object_id, r in sorted(rows.items())}


def check_gallery_target(out: Path, overwrite: bool, source: Optional[str | os.PathLike] = None) -> None:
    """``--out`` of index build: a new or empty folder, or a gallery with ``overwrite``; never inside
    the images ``source`` it is built from (a probe, 2026-12-06: its files sat among the objects)."""
    if source is not None and not is_feature_folder(source):
        source_folder, target = Path(source).resolve(), Path(out).resolve()
        if target == source_folder or source_folder in target.parents:
            raise UserError(f"--out {out} is inside the images it is built from ({source}); choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder for the gallery")
    if out.exists() and any(p for p in out.iterdir() if p.name != LOCK_NAME):
        if not (out / MANIFEST).is_file():
            raise UserError(f"{out} exists and is not a gallery; choose another --out")
        if not overwrite:
            raise UserError(f"{out} already holds a gallery; add --overwrite to rebuild it (or add images with mlsctl index add)")


def check_gallery_free(out: Path) -> None:
    """Refuse, in the lock's words, a gallery folder ``out`` that a server or another writer holds: what
    index build says before its model loads (a new user's probe, 2026-12-07: said after 8.6 s of loading)."""
    if Path(out).is_dir():
        FolderLock(out, "gallery").acquire().release()


def count_source_objects(source, groups: Optional[dict[str, list[Path]]]) -> int:
    """The objects a build of ``source`` makes: ``groups`` of its image folders, or a feature folder's."""
    return len(source_counts(source, groups))


def source_counts(source, groups: Optional[dict[str, list[Path]]]) -> dict[str, int]:
    """Photos per object of what a build reads: ``groups`` of its image folders, or a feature folder's rows."""
    if groups is not None:
        return {object_id: len(paths) for object_id, paths in groups.items()}
    from mlsctl.features import Features

    counts: dict[str, int] = {}
    for name in Features(source).files:
        counts[Path(name).parts[0]] = counts.get(Path(name).parts[0], 0) + 1
    return counts


def check_what_a_rebuild_drops(out: Path, source_counts: dict[str, int], drop_added: bool = False,
                               say: Callable[[str], None] = to_stderr, restore_removed: bool = False
                               ) -> Optional[list[str]]:
    """Before --overwrite embeds anything: the objects and photos of the gallery in ``out`` that the
    source does not hold (added with ``index add`` or ``serve`` since its build), which the rebuilt
    gallery will not have and nothing can make again (a gallery keeps no photos). Refused unless
    ``drop_added``, then said (a new user's probe, 2026-12-07: the note said "stop now to keep them" and the
    build went on, dropping 17 objects uploaded to the service; 2026-12-06: they went without a word). A gallery
    that cannot be read (a damaged record of its removals, a bad manifest field, an older format) is refused unless
    ``restore_removed``, then replaced with a note: its removals cannot be known, and the rebuild would bring the
    removed objects back (a probe, 2026-12-07: a note said so, and takedowns were undone). An object removed and
    added again counts as added (its new photos are not the source's), under its id or a look-alike of it
    (:func:`removed_in_source`), and the refusal names both spellings. Returns the ids ever removed from the gallery
    (:meth:`Gallery.ever_removed_ids`, added again since or not), which the rebuild skips (:func:`build_gallery`), or
    None where it cannot be read."""
    removed: list[str] = []
    try:
        held = _objects_held(out, removed)  # ids and counts only: damaged latents, unit.bin or index no obstacle
    except (UserError, OSError, ValueError, UnicodeDecodeError) as exc:  # nothing in it can be counted
        if not (out.is_dir() and (out / MANIFEST).is_file()):
            return None
        if not restore_removed and not _holds_no_removals(out):  # a takedown undone by a rebuild: the worst surprise
            raise UserError(f"--overwrite would replace {out}, which cannot be read ({first_line(exc, 160)}), so "
                            f"the objects removed from it (mlsctl index remove) cannot be known and a rebuild would "
                            f"bring back those its source holds; mend the gallery, or give --restore-removed to "
                            f"rebuild it with every object of the source (nothing was written)") from None
        say(f"note: --overwrite replaces {out}, which cannot be read ({first_line(exc, 160)}), so "
            f"what it holds beyond the source cannot be counted: the rebuild holds every object of the source")
        return None
    # removed, then added again (a look-alike too: a probe, 2026-12-08, 'cafe' + U+0301 removed, then 'café' (NFC)
    # added with new photos, was taken for the source's object and its new photos dropped by a rebuild): an add
    again = removed_in_source(list(held), removed)
    gone = [object_id for object_id in held if object_id not in source_counts and object_id not in again]
    more = {object_id: held[object_id] - source_counts[object_id] for object_id in held
            if object_id in source_counts and held[object_id] > source_counts[object_id] and object_id not in again}
    if not gone and not more and not again:
        return removed
    parts = []
    if again:  # the source's photos are those of before the takedown (a probe, 2026-12-07: they came back silently)
        shown = _shown_ids(list(again), matched=again)
        parts.append(f"{counted(len(again), 'object')} removed and added again ({shown}), which the source holds as "
                     f"before the removal if at all")
    if gone:
        shown = ", ".join(printable(i) for i in gone[:3]) + (", ..." if len(gone) > 3 else "")
        parts.append(f"{counted(len(gone), 'object')} that the source does not have ({shown})")
    if more:
        parts.append(f"{counted(sum(more.values()), 'photo')} more than the source for {counted(len(more), 'object')}")
    held = f"{out} holds {' and '.join(parts)}: added with mlsctl index add or serve since it was built"
    if not drop_added:
        raise UserError(f"--overwrite would drop what a rebuild from the source cannot make again: {held}; add those "
                        f"photos to the source first, or give --drop-added to rebuild without them")
    say(f"note: --overwrite --drop-added replaces {out}; {held}, they will not be in the rebuilt gallery")
    return removed


def _holds_no_removals(out: Path) -> bool:
    """The manifest of the gallery in ``out`` says a format before removals (3 or older: no tombstone, no
    :data:`REMOVED_IDS`), so a rebuild of it can bring no removed object back."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    return (isinstance(version, int) and not isinstance(version, bool) and version < TOMBSTONE_FORMAT_VERSION
            and "removed_ids" not in manifest)


def removals_kept_out(source_ids: Sequence[str], removed: Optional[Sequence[str]], out: Path, restore_removed: bool,
                      say: Callable[[str], None] = to_stderr, restore_ids: Sequence[str] = (),
                      source: Optional[str | os.PathLike] = None) -> set[str]:
    """The objects of the source that a rebuild of ``out`` leaves out: those ``removed`` from the gallery it
    replaces (:func:`check_what_a_rebuild_drops`), matched by :func:`lookalike_key` as every other reader matches
    ids (a folder renamed ``café`` in NFC is the object removed as ``cafe`` + U+0301), said in one line with how to
    bring them back, and with the removed id where it is spelt otherwise; none with ``restore_removed``, which says
    how many it builds back; all but ``restore_ids`` (``--restore-removed-id``: one taken-down object back without
    undoing the other takedowns), each of which must be a removed object of the source (:func:`_restored_ids`)."""
    matched = removed_in_source(source_ids, removed or [])  # source id -> the removed id it reads as
    back = list(matched)
    restored = _restored_ids(restore_ids, matched, removed or [], out, source)
    if not back:
        return set()
    if restore_removed or restored:
        built = back if restore_removed else [object_id for object_id in back if object_id in restored]
        option = "--restore-removed" if restore_removed else "--restore-removed-id"
        say(f"note: {option} builds back {counted(len(built), 'object')} of the source removed from {out} with mlsctl "
            f"index remove ({_shown_ids(built, matched=matched)})")
        back = [object_id for object_id in back if object_id not in built]
        if not back:
            return set()
    say(f"note: skipped {counted(len(back), 'object')} of the source removed from {out} with mlsctl index remove "
        f"({_shown_ids(back, matched=matched)}); give --restore-removed to build them back, or --restore-removed-id ID "
        f"for one")
    return set(back)


def removed_in_source(source_ids: Sequence[str], removed: Sequence[str]) -> dict[str, str]:
    """The ids of ``source_ids`` (a rebuild's source, or the live ids of the gallery it replaces: those added again)
    that read as a ``removed`` id (the same :func:`lookalike_key`), each with that removed id (the same id where it
    was removed itself), in the order of ``removed``."""
    keys: dict[str, str] = {}
    for object_id in source_ids:
        keys.setdefault(lookalike_key(object_id), object_id)
    matched: dict[str, str] = {}
    for object_id in removed:
        found = keys.get(lookalike_key(object_id))
        if found is not None and (found not in matched or object_id == found):
            matched[found] = object_id
    return matched


def _restored_ids(restore_ids: Sequence[str], matched: dict[str, str], removed: Sequence[str], out: Path,
                  source: Optional[str | os.PathLike]) -> set[str]:
    """The source ids that ``--restore-removed-id`` names, each a removed object of the source (``matched``: source
    id -> removed id), matched by :func:`lookalike_key` as the skip is: an id removed from ``out`` that the source
    lacks cannot be built back, and one never removed is likely a typo; either is one sentence, before anything is
    embedded."""
    by_key = {lookalike_key(object_id): object_id for object_id in matched}
    removed_keys = {lookalike_key(object_id) for object_id in removed}
    restored = set()
    for object_id in restore_ids:
        key = lookalike_key(object_id)
        if key in by_key:
            restored.add(by_key[key])
        elif key in removed_keys:
            raise UserError(f"--restore-removed-id '{printable(object_id)}' was removed from {out}, but "
                            f"{source if source is not None else 'the source'} holds no such object, so it cannot be "
                            f"built back; add its photos to the source, or leave the id out")
        else:
            which = (f"the removed objects of the source are {_shown_ids(list(matched), 5)}" if matched else
                     "no object of the source was removed from it")
            raise UserError(f"--restore-removed-id '{printable(object_id)}' was not removed from {out}, so there is "
                            f"nothing to build back ({which}); give the id of a removed object, or leave the option "
                            f"out")
    return restored


def _shown_ids(ids: Sequence[str], limit: int = 3, matched: Optional[dict[str, str]] = None) -> str:
    """The first ``limit`` of ``ids`` as messages show them (:func:`printable`), then "..." where there are more;
    each with the removed id it ``matched`` where that is spelt otherwise."""
    def shown(object_id: str) -> str:
        other = (matched or {}).get(object_id, object_id)
        return printable(object_id) + ("" if other == object_id else f", removed as '{printable(other)}'")

    return ", ".join(shown(i) for i in ids[:limit]) + (", ..." if len(ids) > limit else "")


def _objects_held(path: Path, removed: Optional[list] = None) -> dict[str, int]:
    """Photos folded per live object of the gallery at ``path``, read from its ids and counts alone (objects.txt and
    counts.bin): what a rebuild would drop is counted even where its latents or unit.bin are damaged (a review,
    2026-12-07: such a gallery was replaced with a note, and what was added to it dropped). ``removed`` gets the
    ids ever removed, those added again since included (:meth:`Gallery.ever_removed_ids`: those its version folder
    records, then those of its tombstone rows)."""
    manifest = read_manifest(path)
    rows = int(manifest["rows"])
    recorded = _recorded_removals(data_folder(path, manifest), manifest, path)
    ids, _ = _read_ids(data_folder(path, manifest) / IDS, rows)
    counts_path = data_folder(path, manifest) / COUNTS
    if counts_path.stat().st_size < rows * 8:
        raise ValueError(f"{COUNTS} is shorter than its {rows} rows")
    counts = np.fromfile(counts_path, dtype=np.int64, count=rows)
    held = {object_id: int(counts[row]) for row, object_id in enumerate(ids)}  # the last row of an id wins
    if removed is not None:
        tombstoned = [ids[row] for row in np.flatnonzero(counts == REMOVED_COUNT).tolist()]
        removed.extend(dict.fromkeys([*recorded, *tombstoned]))
    return {object_id: count for object_id, count in held.items() if count != REMOVED_COUNT}  # removed: absent


def check_objects_source(source: str | os.PathLike, objects_file: Optional[str | os.PathLike]) -> None:
    """An objects file lists photos: refused with a feature folder, whose objects are its folders, and when
    it is no file (before the model loads)."""
    from mlsctl.data.objects import check_objects_file

    if objects_file is not None and is_feature_folder(source):
        raise UserError(f"--objects lists photos, and {source} is a feature folder; give the photos' folder, or embed "
                        f"them with one folder per object")
    check_objects_file(objects_file, "--objects")


def build_gallery(source: str | os.PathLike, model: SetModel, out: str | os.PathLike, settings: IndexSettings,
                  *, overwrite: bool = False, progress: Optional[bool] = None, storage_dtype: str = "fp32",
                  workers: Optional[int] = None, batch_size: int = 64, say: Callable[[str], None] = to_stderr,
                  objects_file: Optional[str | os.PathLike] = None,
                  groups: Optional[dict[str, list[Path]]] = None, drop_added: bool = False,
                  restore_removed: bool = False, restore_ids: Sequence[str] = ()) -> dict:
    """One set embedding per object of ``source``: ``ROOT/<object_id>/*`` images, or those
    ``objects_file`` lists (:func:`object_folders`, or ``groups`` where the caller read them before the model
    loaded; decoded in ``workers`` loader processes and embedded ``batch_size`` at a time, :func:`set_tokens`),
    or a feature folder of them written by ``mlsctl embed`` with the same run (files fold in name order). With
    ``overwrite``, the objects removed from the gallery it replaces are skipped (a takedown sticks) unless
    ``restore_removed`` (all) or named in ``restore_ids`` (those alone), and the ids of those skipped are recorded in
    the new gallery (:meth:`Gallery.removed_ids`)."""
    out = Path(out)
    check_objects_source(source, objects_file)
    settings.check()
    check_gallery_target(out, overwrite, source)
    if storage_dtype not in STORAGE_DTYPES:
        raise UserError(f"--dtype must be fp32 or fp16, got {storage_dtype!r}")
    with contextlib.ExitStack() as held:
        rebuild = overwrite and (out / MANIFEST).is_file()
        if rebuild:  # a rebuild: the gallery's lock from its checks through the swap, so that
            held.enter_context(FolderLock(out, "gallery"))  # a remove or add meanwhile is refused, not undone
        else:  # (a probe, 2026-12-07: a removal made during the embedding came back at the swap)
            check_gallery_free(out)  # a server or another writer holding it: said now, not after the embedding
        if groups is None and not is_feature_folder(source):
            groups = object_folders(source, objects_file)
        removed, skipped = removals_of_rebuild(source, groups, out, overwrite, drop_added, restore_removed, say,
                                               restore_ids)
        if groups is not None:
            groups = {object_id: paths for object_id, paths in groups.items() if object_id not in skipped}
        check_index_fits(settings, len(source_counts(source, groups)) - (len(skipped) if groups is None else 0),
                         getattr(model, "dim", None))  # before embedding
        ids, latents, counts, digests = _embed_objects(source, groups, model, skipped, batch_size=batch_size,
                                                       workers=workers, progress=progress)
        if not ids and skipped:
            raise UserError(f"every object of {source} was removed from {out} with mlsctl index remove; give "
                            f"--restore-removed to build them back (nothing was written)")
        if not ids:
            raise UserError(f"{source} holds no object")
        if not rebuild:  # a new gallery: locked for the swap alone
            held.enter_context(FolderLock(out, "gallery"))
        # again under the lock: another build into the same new --out may have finished meanwhile (a probe,
        # 2026-12-06: both said "built", the second replacing the first without --overwrite)
        check_gallery_target(out, overwrite)
        built = {lookalike_key(object_id) for object_id in ids}  # a removed id built back leaves the record
        manifest = write_gallery(out, ids, torch.stack(latents), counts, settings, _build_manifest(source, model,
                                 objects_file), storage_dtype,
                                 removed_ids=[object_id for object_id in removed
                                              if lookalike_key(object_id) not in built],
                                 photo_records=_hash_records(range(len(ids)), digests))
    return dict(manifest, images=int(sum(counts)))


def _build_manifest(source, model: SetModel, objects_file: Optional[str | os.PathLike]) -> dict:
    """The manifest of a gallery :func:`build_gallery` writes (before :func:`write_gallery` adds its counts)."""
    return {"kind": "mlsctl-gallery", "format_version": PLAIN_FORMAT_VERSION, "mlsctl_version": __version__,
            "source": os.path.abspath(source),
            "objects_file": None if objects_file is None else os.path.abspath(objects_file),
            "model": {"run": os.path.abspath(model.run), "step": model.step, "fingerprint": model.fingerprint,
                      "set_model": model.kind,
                      "attend": model.attend, "dim": model.dim, "resolution": model.resolution,
                      "arch": model.backbone.info["arch"]},
            "preprocessing": model.preprocessing(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _embed_objects(source, groups: Optional[dict[str, list[Path]]], model: SetModel, skipped: set[str], *,
                   batch_size: int, workers: Optional[int], progress: Optional[bool]
                   ) -> tuple[list[str], list[torch.Tensor], list[int], list[list[bytes]]]:
    """:func:`build_gallery`'s objects folded: (ids, set latents, photos folded, the distinct digests of each
    object's photo files, :data:`PHOTO_HASHES`), from the photos of ``groups`` (every unreadable photo named in one
    sentence at the end, nothing written), or from a feature folder ``source`` where ``groups`` is None (no photo
    bytes: no digests), less the objects ``skipped``."""
    ids, latents, counts, digests = [], [], [], []
    if groups is None:
        for object_id, cls in _feature_groups(Path(source), model).items():
            if object_id in skipped:
                continue
            ids.append(object_id)
            latents.append(model.fold(None, cls.float()))
            counts.append(len(cls))
            digests.append([])
        return ids, latents, counts, digests
    check_new_ids(list(groups), f"{source}: object folder")  # before anything is embedded
    unreadable = []  # every photo that cannot be read, named at the end: not one per attempt
    embedded = set_tokens(list(groups.values()), model, batch_size=batch_size, workers=workers, progress=progress,
                          strict=False, digests=True)  # the digests of the bytes decoded: each file read once
    for object_id, (cls, tokens, failed, read) in zip(groups, embedded):
        unreadable += failed
        if not failed:
            ids.append(object_id)
            latents.append(model.fold(None, cls, tokens))
            counts.append(len(cls))
            digests.append(list(read))  # one record a photo folded, two files of the same bytes two: as counted
    if unreadable:
        shown = "; ".join(f"{path} ({reason})" for path, reason in unreadable[:5])
        raise UserError(f"{len(unreadable)} photo{'s' if len(unreadable) != 1 else ''} of {source} cannot be read: "
                        f"{shown}{'; ...' if len(unreadable) > 5 else ''}; replace or remove "
                        f"{'them' if len(unreadable) != 1 else 'it'} and build again (nothing was written)")
    return ids, latents, counts, digests


def removals_of_rebuild(source, groups: Optional[dict[str, list[Path]]], out: Path, overwrite: bool,
                        drop_added: bool = False, restore_removed: bool = False,
                        say: Callable[[str], None] = to_stderr, restore_ids: Sequence[str] = ()
                        ) -> tuple[list[str], set[str]]:
    """What a build into ``out`` checks of the gallery it replaces (``overwrite``): what it would drop
    (:func:`check_what_a_rebuild_drops`), then the ids removed from it, recorded again in the new gallery, and those
    of the source it skips (:func:`removals_kept_out`: all, none with ``restore_removed``, all but ``restore_ids``);
    returns (removed ids, skipped ids)."""
    for option, given in (("--restore-removed", restore_removed), ("--restore-removed-id", restore_ids)):
        if given and not overwrite:
            raise UserError(f"{option} goes with --overwrite: it builds back objects removed from the gallery a "
                            f"rebuild replaces")
    if restore_removed and restore_ids:
        raise UserError("give --restore-removed (every removed object of the source back) or --restore-removed-id ID "
                        "(those named), not both")
    if not overwrite:
        return [], set()
    counts = source_counts(source, groups)
    removed = check_what_a_rebuild_drops(out, counts, drop_added, say, restore_removed) or []
    return removed, removals_kept_out(list(counts), removed, out, restore_removed, say, restore_ids, source)


def add_to_gallery(path: str | os.PathLike, object_id: str, photos: Sequence, *, run: Optional[str | os.PathLike] = None,
                   say: Callable[[str], None] = to_stderr) -> tuple["Gallery", bool, int, int, int]:
    """``mlsctl index add``: fold ``photos`` (paths, each decoded and resized as it is read, or decoded
    images: :meth:`SetModel.image_tokens`; a folder among the paths gives its photos, :func:`photos_of_folders`)
    into ``object_id`` (created when new) with ``run``'s model (default: the gallery's run), under the
    gallery's lock; returns (the gallery as written, created, photos now folded into the object, photos
    added, photos skipped). A photo the object holds already (same bytes, :meth:`Gallery.photos_to_fold`), or
    given twice, is folded once, and said in one line; where every photo is held already, nothing is written. A
    server holds the lock for its lifetime and calls :meth:`Gallery.add` itself."""
    path = Path(path)
    # what is cheap to check first, each before the next, and all before the model loads: the id, the gallery (a
    # run folder given as the gallery is said so, not locked and "being written" by its run), the photos' paths
    # and headers (a corrupt photo was said only after the model had loaded)
    check_object_id(object_id)
    read_manifest(path)
    photos = photos_of_folders(photos, "index add")  # a folder: its photos, as index build folds an object folder
    check_photos(photos)
    digests = [file_digest(p) if isinstance(p, (str, os.PathLike)) else None for p in photos]  # decoded: no bytes
    with FolderLock(path, "gallery"):
        target = Gallery(path, recover=True)
        if object_id not in target.row_of:
            target.check_new_id(object_id, "--object")
        chosen, held, repeated = target.photos_to_fold(object_id, digests)
        skipped = photos_skipped_note(object_id, held, repeated)
        if skipped:
            say(skipped)
        if not chosen and run is None:  # every photo held already: nothing written, no model loaded
            return target, False, target.count(object_id), 0, len(photos)
        model = choose_set_model(run or target.built_with_run(), say=say, gallery=target)
        if not chosen:  # a --run given is checked all the same: a wrong one is said, not passed over
            target.check_model(model)
            return target, False, target.count(object_id), 0, len(photos)
        created, count = target.add(model, object_id, [photos[i] for i in chosen], [digests[i] for i in chosen])
    note = long_set_note(model, count, object_id)
    if note:
        say(note)
    return target, created, count, len(chosen), len(photos) - len(chosen)


def long_set_note(model: SetModel, photos: int, object_id: Optional[str] = None, *,
                  name_run: bool = True) -> Optional[str]:
    """The note for a set of more than twice the photos of the sets its MILE run trained on (``method.set_length``;
    a mean-CLS model has none), or None: object ``object_id``'s folded photos, or without it a query set's. The set
    encoder folds photos one after another, and sets much longer than training's are untested: a new user's probe
    (2026-12-07, a 12-step run) saw an object of 8 photos rank 10th and one of 32 (8 photos given 4 times) 76th for
    two of its own photos, where one of 4 ranked first, and a query of one photo given again score its own object
    0.46 where the photo once scored 0.87; a query of a few of the photos is what the model was trained to fold.
    Without ``name_run`` (the service's answers: no server paths) the run is "the gallery's run"."""
    length = model.set_length
    if not length or photos <= 2 * length:
        return None
    run = f"run {model.run}" if name_run else "the gallery's run"
    trained = (f"more than twice the {length} a set held when {run} trained (method.set_length): "
               f"sets much longer than training's are untested")
    if object_id is None:
        return (f"note: the query set folds {photos} photos, {trained}: its object may rank lower than for a few of "
                f"its photos; search with {length} to {2 * length} of them")
    return (f"note: object '{printable(object_id)}' now folds {photos} photos, {trained}, and an object of many "
            f"photos (or of one photo given again) may rank lower for its own photos")


def remove_from_gallery(path: str | os.PathLike, ids: Sequence[str], *, missing_ok: bool = False,
                        purge: bool = False, named: Optional[dict[str, str]] = None,
                        outcome: Optional[dict] = None) -> tuple["Gallery", list[str], list[str]]:
    """``mlsctl index remove``: :meth:`Gallery.remove` of ``ids`` under the gallery's lock, all or none;
    with ``purge``, then the gallery compacted to its live rows under the same lock (:meth:`Gallery.retrain`
    keeping the IVF-PQ quantiser: no k-means, and never refused for too few objects), so that the removed
    latents leave the files at once; ``purge`` without ``ids`` purges earlier removals. Returns (the gallery
    as written, removed ids, ids not in the gallery). ``named``: where an id was given (:meth:`Gallery.remove`).
    ``outcome`` gets ``purged``: whether a purge wrote a new version folder (none where every row is live: nothing
    to purge, nothing written; a probe, 2026-12-07, found a version folder written and "purged" said each time)."""
    path = Path(path)
    if not ids and not purge:
        raise UserError("give the ids of the objects to remove")
    for object_id in ids:  # the ids, then the gallery, before the folder is locked
        check_object_id(object_id, (named or {}).get(object_id, "object id"))
    read_manifest(path)
    with FolderLock(path, "gallery"):
        target = Gallery(path, recover=True)
        target.recorded_removals()  # a damaged record: one sentence before anything is written (a probe, 2026-12-07)
        checked = None
        if purge:  # a damaged gallery cannot be purged: said before anything is removed; the purge writes these
            live = target.live_rows()
            checked = (live, target.check_live_latents(live))
        removed, missing = target.remove(ids, missing_ok, named=named) if ids else ([], [])
        purge = purge and target.rows > len(target)  # a tombstone or a superseded row to drop
        if outcome is not None:
            outcome["purged"] = purge
        if purge:
            done = f"{counted(len(removed), 'object')} removed, " if removed else ""
            again = f"run mlsctl index remove {path} --purge again to purge the removed latents"
            try:
                target.retrain(keep_quantiser=True, checked=checked)  # latents.bin read once
            except (UserError, OSError) as exc:
                raise UserError(f"{done}but the purge failed ({first_line(exc, 200)}): {again}" if done else
                                f"the purge failed ({first_line(exc, 200)}): {again}") from None
            except KeyboardInterrupt:  # a stop during the purge: the removal is committed, and said so (a probe)
                log.warning(f"note: {done}but the purge was interrupted: {again}")
                raise
            _say_unpurged_versions(target)
    return target, removed, missing


def _say_unpurged_versions(gallery: "Gallery") -> None:
    """A warning naming each version folder but the current one still in the gallery after a purge or a retrain
    (the swap's clean-up could not delete it): it holds the removed latents, which a takedown must not leave
    unsaid."""
    left = sorted(p.name for p in gallery.path.iterdir() if _VERSION_NAME.fullmatch(p.name) and p != gallery.data)
    if left:
        log.warning(f"{', '.join(left)} in {gallery.path} could not be deleted and still "
                    f"{'holds' if len(left) == 1 else 'hold'} the removed latents; delete "
                    f"{'it' if len(left) == 1 else 'them'} (the gallery reads only {gallery.data.name})")


def retrain_gallery(path: str | os.PathLike) -> tuple[int, dict]:
    """``mlsctl index retrain``: :meth:`Gallery.retrain` under the gallery's lock, a damaged index no
    obstacle (it is made again); returns (rows before, the new manifest)."""
    path = Path(path)
    read_manifest(path)  # not a gallery: said before the folder is locked
    with FolderLock(path, "gallery"):
        target = Gallery(path, recover=True, with_index=False, with_unit=False)
        check_index_fits(target.retrain_settings(), len(target), target.dim, retrain=True, gallery=str(path))
        before = target.rows
        manifest = target.retrain()
        _say_unpurged_versions(target)  # the documented purge: an old version left holds what was removed
        return before, manifest


def newest_gallery(root: str | os.PathLike = ".", max_depth: int = 4) -> Optional[Path]:
    """The gallery under ``root`` (at most ``max_depth`` folders down) whose manifest is newest, of
    those that read as galleries (a manifest of ours whose data folder is there)."""
    root = Path(root)
    best, best_time = None, -1.0
    skip = {".git", ".venv", "node_modules", "__pycache__"}
    for directory, subdirs, files in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        subdirs[:] = [d for d in subdirs if d not in skip and depth < max_depth]
        if MANIFEST in files:
            path = Path(directory) / MANIFEST
            try:
                manifest = json.loads(path.read_text())
                if manifest.get("kind") != "mlsctl-gallery":
                    continue
                # one whose data folder is gone is passed over, not chosen to fail (a new user, 2026-12-06); one of
                # an older or newer format is still chosen, for Gallery() to say how to rebuild it (a review)
                if manifest.get("format_version") in range(3, GALLERY_FORMAT_VERSION + 1) \
                        and not data_folder(Path(directory), manifest).is_dir():
                    continue
            except (OSError, ValueError, AttributeError, TypeError, KeyError, RecursionError):
                continue
            stamp = path.stat().st_mtime
            if stamp > best_time:
                best, best_time = Path(directory), stamp
    return best


def describe_gallery(path: str | os.PathLike, objects: bool = False) -> dict:
    """``mlsctl index info``: what a gallery holds, from its files alone (no model, no index built): its objects,
    photos folded, rows (superseded ones included, which ``index retrain`` drops; ``removed_rows``: the
    tombstones of removed objects, whose latents stay in the files until then; ``removed_objects``: the ids removed
    and not added again, which the gallery keeps, purged or not, and a rebuild skips; ``photo_digests``: the photos
    remembered by their bytes that the live objects hold, :data:`PHOTO_HASHES`: a removed object's no longer count,
    as formats.md says), the model that embeds it, the
    index (IVF-PQ: ``nprobe_effective``, the lists a search reads, at most ``nlist``) and its share of objects
    written since the quantiser was trained, bytes on disk, and with ``objects``
    each object's id and photo count, oldest first (a new user's probe, 2026-12-07: a gallery grown over the
    service could only be listed by searching it)."""
    gallery = Gallery(path, with_index=False, with_unit=False)  # a unit.bin cut short is said, not refused
    manifest = gallery.manifest
    live = gallery.live_rows()
    files = [p for p in gallery.data.rglob("*") if p.is_file()]
    photos = int(np.asarray(gallery.counts)[live].sum()) if len(live) else 0
    record = {"gallery": str(gallery.path), "objects": len(gallery), "photos": photos, "rows": gallery.rows,
              "superseded_rows": gallery.rows - len(live), "removed_rows": gallery.removed_rows,
              "removed_objects": len(gallery.removed_ids()), "photo_digests": gallery.photos_known(),
              "dim": gallery.dim, "storage_dtype": manifest["storage_dtype"], "index": dict(manifest["index"]),
              "written_since_training": gallery.added_since_training(),
              "model": dict(manifest["model"], set_model=gallery.set_model),
              "source": manifest.get("source"), "objects_file": manifest.get("objects_file"),
              "created": manifest.get("created"), "mlsctl_version": manifest.get("mlsctl_version"),
              "format_version": manifest["format_version"],
              "bytes": sum(p.stat().st_size for p in files) + (gallery.path / MANIFEST).stat().st_size}
    if manifest["index"]["kind"] != "flat":  # faiss searches min(nprobe, nlist) lists
        nlist, nprobe = manifest["index"].get("nlist"), manifest["index"]["nprobe"]
        record["index"]["nprobe_effective"] = min(nprobe, nlist) if nlist else nprobe
    if gallery.unit is None:
        record["damaged"] = (f"{UNIT} is missing or cut short: searches refuse the gallery until mlsctl index retrain "
                             f"{gallery.path} writes it again from {LATENTS}")
    if objects:
        record["object_photos"] = [{"object": gallery.row_ids[row], "photos": int(gallery.counts[row])}
                                   for row in live.tolist()]
    return record
