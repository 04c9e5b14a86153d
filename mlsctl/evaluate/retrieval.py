"""Image-set retrieval (MILE's protocol, docs/methods.md#eval-retrieval): R@1..R@10 and AR@10.

The gallery holds one entry per object (its gallery photos); each query is a set of other photos
of one gallery object. A query's rank is the number of gallery objects scoring at least as high
as its own object (ties count against it). R@k is the fraction of queries ranked within k;
AR@10 = mean(R@1..R@10).

Scores (``backbone`` says which backbone embedded the photos: the MILE-trained teacher, or
``start``, the backbone the run started from, as the authors compute their single-image baselines):

* ``mile``: cosine between the MILE set embeddings (the set encoder folds the images in order);
* ``max-pairwise``: the single-image baseline, max over the |Q|×|G| pairwise cosines of per-image
  CLS (its cost grows with |Q|·|G|);
* ``mean-cls``: cosine between the means of the per-image CLS (what a gallery of a run that is not MILE
  searches with: :class:`mlsctl.gallery.MeanCLSSetModel`).

A run of any method can be evaluated: one that is not MILE scores the two baselines only (it has no set encoder).

The noise test replaces a fraction of every query set's photos with random photos of other
objects (seeded), as the paper's robustness study does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mlsctl.console import to_stderr

METHODS = ("mile", "max-pairwise", "mean-cls")
NEVER_FOUND = 2**62  # the rank of a query whose own score is NaN


def ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's target among the gallery: #{g : s[q, g] >= s[q, target]}. A NaN
    score of the target (a NaN embedding) gets :data:`NEVER_FOUND`, a miss at every k (NaN compares
    false with everything, so it would have ranked 0, a hit)."""
    own = scores.gather(1, targets[:, None])
    return torch.where(own[:, 0].isnan(), NEVER_FOUND, (scores >= own).sum(1))


def recall_at(ranks_: torch.Tensor, ks: Sequence[int] = tuple(range(1, 11))) -> dict[int, float]:
    return {k: float((ranks_ <= k).double().mean()) for k in ks}


def average_recall(recalls: dict[int, float], up_to: int = 10) -> float:
    """AR@n = mean(R@1..R@n)."""
    return sum(recalls[k] for k in range(1, up_to + 1)) / up_to


def chance_recalls(objects: int, ks: Sequence[int] = tuple(range(1, 11))) -> dict[int, float]:
    """R@k of a random ranking of ``objects`` gallery objects, exactly: a query's own object ranks
    uniformly in 1..objects, so R@k = min(k, objects) / objects. Printed beside the scores because with few
    objects a large R@k or AR@10 is no finding (a new user's probe, 2026-12-07: AR@10 95.0 of 2 objects, the
    chance level itself)."""
    return {k: min(k, objects) / objects for k in ks}


def chance_scores(objects: int) -> dict[str, float]:
    """:func:`chance_recalls` in a result's keys (``AR@10``, ``R@1`` ... ``R@10``)."""
    recalls = chance_recalls(objects)
    return {"AR@10": average_recall(recalls), **{f"R@{k}": v for k, v in recalls.items()}}


def trivial_ks(objects: int, ks: Sequence[int] = tuple(range(1, 11))) -> list[int]:
    """The k of ``ks`` whose R@k is 100 % by construction: k of ``objects`` or more takes in every object."""
    return [k for k in ks if k >= objects]


def objects_note(objects: int) -> Optional[str]:
    """The note on R@k that the number of gallery objects decides (:func:`trivial_ks`), or None."""
    trivial = trivial_ks(objects)
    if not trivial:
        return None
    ks = f"R@{trivial[0]}" + (f" to R@{trivial[-1]}" if len(trivial) > 1 else "")
    return (f"note: {ks} {'are' if len(trivial) > 1 else 'is'} 100 % by construction: the gallery holds "
            f"{objects} objects, so every query's object ranks within {objects}; compare AR@10 and R@k with the "
            f"chance row (a random ranking), not with 100 %")


def max_pairwise_scores(query_sets: list[torch.Tensor], gallery_sets: list[torch.Tensor]) -> torch.Tensor:
    """[Q, G]: max over the pairwise cosines of a query set's and a gallery set's images."""
    gallery = F.normalize(torch.cat(gallery_sets).float(), dim=1)
    owner = torch.cat([torch.full((len(g),), i) for i, g in enumerate(gallery_sets)])
    out = torch.empty(len(query_sets), len(gallery_sets))
    for q, images in enumerate(query_sets):
        pairwise = F.normalize(images.float(), dim=1) @ gallery.T  # [|Q|, all gallery images]
        best = pairwise.max(0).values
        out[q] = torch.full((len(gallery_sets),), -math.inf).scatter_reduce(0, owner, best, reduce="amax")
    return out


def cosine_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    return F.normalize(queries.float(), dim=1) @ F.normalize(gallery.float(), dim=1).T


def mean_cls_scores(query_sets: list[torch.Tensor], gallery_sets: list[torch.Tensor]) -> torch.Tensor:
    """[Q, G]: ``mean-cls``, the cosine between the means of a query set's and a gallery set's raw CLS rows (not
    normalised before the mean); a gallery of a run that is not MILE scores the same
    (:class:`mlsctl.gallery.MeanCLSSetModel`)."""
    return cosine_scores(torch.stack([c.float().mean(0) for c in query_sets]),
                         torch.stack([c.float().mean(0) for c in gallery_sets]))


@dataclass
class RetrievalResult:
    method: str
    noise: float
    recalls: dict[int, float]
    queries: int
    gallery: int
    backbone: str = "trained"
    replaced: tuple[int, ...] = ()  # the photos of each query set the noise replaced

    @property
    def ar10(self) -> float:
        return average_recall(self.recalls)

    def to_dict(self) -> dict:
        return {"method": self.method, "backbone": self.backbone, "noise": self.noise, "AR@10": self.ar10,
                "queries": self.queries, "gallery": self.gallery, **replaced_record(self.replaced),
                **{f"R@{k}": v for k, v in self.recalls.items()}}


def replaced_record(replaced: Sequence[int]) -> dict:
    """How many photos of each query set a noise level replaced, as a result records it: the fraction alone
    hid that round(0.25 × 2) = 0 replaces none (a new user's probe, 2026-12-07: the 25 % rows equalled the
    0 % rows)."""
    if not replaced:
        return {}
    return {"photos_replaced": sum(replaced), "replaced_per_set": {"min": min(replaced), "max": max(replaced)}}


def replaced_text(record: dict, set_sizes: Optional[dict] = None) -> str:
    """A result's noise in words, with the photos it replaced a set: ``25 % (1 a set)``. Results from before
    they were recorded give them through the query sets' sizes (``set_sizes``, their ``query_set_sizes``):
    :func:`replaced_photos` grows with the size, so the smallest and largest sets bound them exactly."""
    noise = f"{100 * record['noise']:.0f}%"
    per_set = record.get("replaced_per_set")
    if per_set is None and isinstance(set_sizes, dict) and {"min", "max"} <= set_sizes.keys():
        per_set = {end: replaced_photos(record["noise"], set_sizes[end]) for end in ("min", "max")}
    if not isinstance(per_set, dict) or not record["noise"]:
        return noise
    low, high = per_set.get("min"), per_set.get("max")
    return f"{noise} ({low if low == high else f'{low}-{high}'} a set)"


def sample_sets(sets: list[list[int]], size: Optional[int], seed: int) -> list[list[int]]:
    """``size`` photos of each set drawn without replacement (seeded; a set with fewer keeps all),
    as the authors sample 4 photos per set; ``None`` keeps every photo in its order."""
    if size is None:
        return [list(s) for s in sets]
    rng = np.random.default_rng(seed)
    return [[s[i] for i in sorted(rng.choice(len(s), size, replace=False))] if len(s) > size else list(s) for s in sets]


def replaced_photos(fraction: float, size: int) -> int:
    """The photos of a query set of ``size`` that the noise ``fraction`` replaces: round(fraction × size),
    rounded half to even (a set of 2 loses none at 0.25)."""
    return min(int(round(fraction * size)), size) if fraction > 0 else 0


def noisy_sets(query_rows: list[list[int]], fraction: float, pool: list[list[int]], seed: int) -> list[list[int]]:
    """Replace :func:`replaced_photos` photos of each query set (at random positions) with random
    photos of other objects (``pool[i]``: the photos objects other than i may lend)."""
    if fraction <= 0:
        return [list(r) for r in query_rows]
    rng = np.random.default_rng(seed)
    lent = np.array([r for p in pool for r in p], dtype=np.int64)  # pool's photos in order; pool[i] is
    starts = np.cumsum([0] + [len(p) for p in pool])                # lent[starts[i]:starts[i + 1]]
    out = []
    for i, rows in enumerate(query_rows):
        rows = list(rows)
        own = int(starts[i + 1] - starts[i])
        for position in rng.choice(len(rows), size=replaced_photos(fraction, len(rows)), replace=False):
            other = int(rng.integers(0, len(lent) - own))  # the other-th photo of the objects but i
            rows[position] = int(lent[other if other < starts[i] else other + own])
        out.append(rows)
    return out


def evaluate_retrieval(model, gallery_sets: list[list[int]], query_sets: list[list[int]], cls: torch.Tensor,
                       tokens: Optional[torch.Tensor], noise: Sequence[float] = (0.0,), seed: int = 0,
                       methods: Sequence[str] = METHODS, backbone: str = "trained") -> list[RetrievalResult]:
    """Every (method, noise) result. ``cls`` [n, D] (and ``tokens``) are the per-image embeddings
    of ``backbone``, ``gallery_sets[i]`` / ``query_sets[i]`` the rows of object i's gallery and
    query photos."""
    from mlsctl.errors import UserError

    empty = [i for i, rows in enumerate(gallery_sets) if not rows] + [i for i, rows in enumerate(query_sets) if not rows]
    if empty:
        raise UserError(f"object {empty[0]} has an empty gallery or query set ({len(empty)} such sets): every object "
                        f"needs at least one photo on each side")
    if len(gallery_sets) != len(query_sets):
        raise UserError(f"{len(gallery_sets)} gallery sets but {len(query_sets)} query sets: query set i is of "
                        f"gallery object i")
    if any(not 0 <= fraction < 1 for fraction in noise):
        raise UserError(f"noise fractions must be in [0, 1), got {list(noise)}")

    def fold(rows):
        return model.fold(None, cls[rows], tokens[rows] if tokens is not None else None)

    targets = torch.arange(len(query_sets))
    gallery_latents = torch.stack([fold(r) for r in gallery_sets]) if "mile" in methods else None
    gallery_cls = [cls[r] for r in gallery_sets]
    results = []
    for fraction in noise:
        sets = noisy_sets(query_sets, fraction, query_sets, seed)
        replaced = tuple(replaced_photos(fraction, len(rows)) for rows in query_sets)
        for method in methods:
            if method == "mile":
                scores = cosine_scores(torch.stack([fold(r) for r in sets]), gallery_latents)
            elif method == "max-pairwise":
                scores = max_pairwise_scores([cls[r] for r in sets], gallery_cls)
            elif method == "mean-cls":
                scores = mean_cls_scores([cls[r] for r in sets], gallery_cls)
            else:
                raise ValueError(f"unknown retrieval method {method!r}")
            results.append(RetrievalResult(method, fraction, recall_at(ranks(scores, targets)), len(sets),
                                           len(gallery_sets), backbone, replaced))
    return results


# ------------------------------------------------------------------------------------------ a run


@dataclass
class PairedPhotos:
    """The photos of the objects a gallery folder and a query folder share: ``paths`` in order,
    ``gallery_rows[i]`` / ``query_rows[i]`` the rows of object ``objects[i]``'s photos."""
    objects: list[str]
    paths: list
    gallery_rows: list[list[int]]
    query_rows: list[list[int]]
    gallery_objects: int  # the objects of each folder, shared or not
    query_objects: int


class TooMuchToCompare(Exception):
    """:func:`identical_files` would read more than its ``max_bytes`` (``needed``) to compare files of
    equal size: the caller says what it compared instead."""

    def __init__(self, needed: int):
        super().__init__(f"{needed} bytes of files of equal size to compare")
        self.needed = needed


def identical_files(first: Sequence[Path], second: Sequence[Path], *, missing_ok: bool = False,
                    max_bytes: Optional[int] = None) -> list[tuple[Path, Path]]:
    """The files of ``second`` whose bytes equal a file of ``first``'s, each with one such file of
    ``first``. Only files of equal size are read (and each at most once), so folders of distinct
    photos cost a ``stat`` each. ``missing_ok``: a file that is gone or cannot be read is not
    compared (an evaluation of feature folders whose images were moved since: the features are
    what it scores). ``max_bytes``: :class:`TooMuchToCompare` is raised before anything is read
    where the files of equal size hold more (a large folder of JPEGs shares many sizes)."""
    import hashlib

    def size_of(path: Path) -> Optional[int]:
        try:
            return path.stat().st_size
        except OSError:
            if not missing_ok:
                raise
            return None

    by_size: dict[int, list[Path]] = {}
    for path in first:
        size = size_of(path)
        if size is not None:
            by_size.setdefault(size, []).append(path)
    candidates = [(path, size) for path in second for size in (size_of(path),) if size in by_size]
    if max_bytes is not None:
        needed = (sum(size * len(by_size[size]) for size in {size for _, size in candidates})
                  + sum(size for _, size in candidates))
        if needed > max_bytes:
            raise TooMuchToCompare(needed)
    digests: dict[Path, Optional[bytes]] = {}

    def digest(path: Path) -> Optional[bytes]:
        if path not in digests:
            hasher = hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        hasher.update(block)
            except OSError:
                if not missing_ok:
                    raise
                digests[path] = None
            else:
                digests[path] = hasher.digest()
        return digests[path]

    by_digest: dict[int, dict[bytes, Path]] = {}  # per size, the first's files by digest: each read once (a review:
    found = []  # comparing each query with every gallery file of its size was quadratic for photos of one size)
    for path, size in candidates:
        if size not in by_digest:
            by_digest[size] = {}
            for other in by_size[size]:
                other_digest = digest(other)
                if other_digest is not None:
                    by_digest[size].setdefault(other_digest, other)
        own = digest(path)
        match = by_digest[size].get(own) if own is not None else None
        if match is not None:
            found.append((match, path))
    return found


def _ids_from(gallery_objects, query_objects) -> str:
    """Where the object ids of a gallery and a query come from, for a refusal: the probe of 2026-12-07 read "give
    folders whose object folders match" with both sides named by objects files."""
    sides = [f"the object_id column of {option}" if listed is not None else f"{side}'s sub-folders"
             for side, option, listed in (("the gallery", "--gallery-objects", gallery_objects),
                                          ("the query", "--query-objects", query_objects))]
    return f"the ids are {sides[0]} and {sides[1]}"


def paired_photos(gallery, query, gallery_objects=None, query_objects=None) -> PairedPhotos:
    """The objects of two ``ROOT/<object_id>/*`` folders (or those their objects files list:
    :func:`~mlsctl.gallery.object_folders`), refused (one sentence) when they share fewer than 2
    objects or under half of the smaller folder's: they are not photos of the same objects."""
    from mlsctl.errors import UserError
    from mlsctl.gallery import object_folders

    gallery_groups = object_folders(gallery, gallery_objects, "--gallery-objects", "--gallery")
    query_groups = object_folders(query, query_objects, "--query-objects", "--query", ("query",))
    objects = [o for o in gallery_groups if o in query_groups]
    if len(objects) < 2:
        raise UserError(f"{gallery} and {query} share {len(objects)} objects; retrieval needs at least 2 "
                        f"({_ids_from(gallery_objects, query_objects)})")
    smaller = min(len(gallery_groups), len(query_groups))
    if len(objects) < 0.5 * smaller:
        raise UserError(f"{gallery} ({len(gallery_groups)} objects) and {query} ({len(query_groups)} objects) share only "
                        f"{len(objects)} object ids: are they photos of the same objects? Give a gallery and a query "
                        f"whose object ids match ({_ids_from(gallery_objects, query_objects)})")
    shared = {p.resolve() for o in objects for p in gallery_groups[o]} & {p.resolve() for o in objects
                                                                          for p in query_groups[o]}
    if shared:
        raise UserError(f"{gallery} and {query} share {len(shared)} photos (e.g. {min(shared)}): a query set of the "
                        f"gallery's own photos finds its object trivially; give other photos of the objects as --query")
    # copies count as the same photos: two builds of one seed gave R@1 100 % without a word (a new user's probe)
    copies = identical_files([p for o in objects for p in gallery_groups[o]], [p for o in objects for p in query_groups[o]])
    if copies:
        first, second = copies[0]
        raise UserError(f"{gallery} and {query} hold {len(copies)} identical photos (e.g. {first} and {second}, the same "
                        f"bytes): a query set of copies of the gallery's photos finds its object trivially; give other "
                        f"photos of the objects as --query")
    paths, gallery_rows, query_rows = [], [], []
    for o in objects:
        gallery_rows.append(list(range(len(paths), len(paths) + len(gallery_groups[o]))))
        paths += gallery_groups[o]
        query_rows.append(list(range(len(paths), len(paths) + len(query_groups[o]))))
        paths += query_groups[o]
    return PairedPhotos(objects, paths, gallery_rows, query_rows, len(gallery_groups), len(query_groups))


def trained_methods(model) -> tuple[str, ...]:
    """The methods ``eval retrieval`` scores with a run's trained teacher: all of :data:`METHODS` for a MILE run's
    set model, the single-image baselines (``max-pairwise``, ``mean-cls``) for a run of another method, which has no
    set encoder (its :class:`~mlsctl.gallery.MeanCLSSetModel` folds what ``mean-cls`` scores)."""
    return METHODS if model.kind == "mile" else ("max-pairwise", "mean-cls")


def _say_query_set_notes(sizes: list[int], query_size: Optional[int], noise: Sequence[float], say) -> None:
    """The notes on the sampled query sets (``sizes``, sorted): objects with fewer than ``query_size`` query photos,
    whose sets hold all they have, and each noise fraction that replaces no photo of any set."""
    if query_size is not None and sizes[0] < query_size:
        fewer = sum(size < query_size for size in sizes)
        say(f"note: {fewer} of {len(sizes)} objects have fewer than {query_size} query photos; their sets hold all "
            f"they have ({sizes[0]}{'' if sizes[0] == sizes[-1] else f' to {sizes[-1]}'} photos a set)")
    for fraction in noise:
        if fraction > 0 and not any(replaced_photos(fraction, size) for size in sizes):
            say(f"note: noise {100 * fraction:.0f}% replaces no photo of any query set (round({fraction:g} × "
                f"{sizes[-1]}) = 0): its rows score the clean sets again; give larger query sets (--query-size) or "
                f"a larger --noise")


def _embed_photos(model, start, paths: list, workers: Optional[int]
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Each photo's CLS token and patch tokens under the run's trained teacher (the tokens None unless its set model
    attends to patches), and its CLS token under ``start``, the backbone the run started from (None without one:
    ``--index`` scores the gallery's model alone): one decoding of each photo for both. A photo is admitted as
    ``mlsctl search`` and ``eval retrieval --index`` admit it (a 7x7 image is refused by both forms, by its header
    before the model loads: :func:`~mlsctl.gallery.check_photos`)."""
    from mlsctl.gallery import photo_batches

    cls, tokens, start_cls = [], [], []
    for _, pixels, _ in photo_batches(paths, model.preprocessor(), workers=workers,
                                      pin_memory=model.device.type == "cuda", photos=True):  # search's rule
        batch_cls, batch_tokens = model.pixel_tokens(pixels)
        cls.append(batch_cls)
        tokens.append(batch_tokens)
        if start is not None:
            start_cls.append(start.pixel_tokens(pixels)[0])
    return (torch.cat(cls), (torch.cat(tokens) if model.attend == "patches" else None),
            torch.cat(start_cls) if start is not None else None)


def renumbered(sets: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """The rows ``sets`` use (ascending: the photos to embed, not those the draw left out) and the sets with their
    rows renumbered to positions in them: both forms of ``eval retrieval`` embed only what they score."""
    used = sorted({row for rows in sets for row in rows})
    new_row = {row: i for i, row in enumerate(used)}
    return used, [[new_row[row] for row in rows] for rows in sets]


def evaluate_set_model(model, photos: PairedPhotos, gallery, query, *, query_size: Optional[int],
                       noise: Sequence[float], seed: int, workers: Optional[int] = None, say=to_stderr,
                       gallery_objects=None, query_objects=None) -> dict:
    """``mlsctl eval retrieval``: the set model of a run (:func:`mlsctl.gallery.load_set_model`) on the objects
    ``gallery`` and ``query`` share, ``photos`` (:func:`paired_photos` of their folders, or of those
    ``gallery_objects`` and ``query_objects`` list, paired before the model loads) — :func:`trained_methods` with
    its trained teacher (MILE's sets only for a MILE run), the baselines again with the backbone the run started
    from (as the authors compute theirs) — as the result JSON's fields."""
    import dataclasses
    import time

    from mlsctl.restore import from_run_start

    say(f"{len(photos.objects)} objects in both {gallery} ({photos.gallery_objects}) and {query} "
        f"({photos.query_objects})")
    query_rows = sample_sets(photos.query_rows, query_size, seed)
    sizes = sorted(len(rows) for rows in query_rows)
    _say_query_set_notes(sizes, query_size, noise, say)
    used, sets = renumbered(photos.gallery_rows + query_rows)  # not the query photos left out
    gallery_rows, query_rows = sets[:len(photos.gallery_rows)], sets[len(photos.gallery_rows):]
    say(f"embedding {len(used)} photos of {len(photos.objects)} objects with the trained teacher and with the "
        f"backbone the run started from")
    started = time.perf_counter()
    start = dataclasses.replace(model, backbone=from_run_start(model.run), attend="cls")  # its baselines need CLS only
    start.backbone.backbone.to(model.device)
    cls, tokens, start_cls = _embed_photos(model, start, [photos.paths[row] for row in used], workers)
    results = evaluate_retrieval(model, gallery_rows, query_rows, cls, tokens, noise=noise, seed=seed,
                                 methods=trained_methods(model))
    results += evaluate_retrieval(start, gallery_rows, query_rows, start_cls, None, noise=noise, seed=seed,
                                  methods=("max-pairwise", "mean-cls"), backbone="start")
    listed = {**({"gallery_objects": str(gallery_objects)} if gallery_objects is not None else {}),
              **({"query_objects": str(query_objects)} if query_objects is not None else {})}
    return {"gallery": str(gallery), "query": str(query), **listed, "run": model.run, "step": model.step,
            "fingerprint": model.fingerprint,
            "model": {**model.backbone.info, "step": model.step, "set_fingerprint": model.fingerprint,
                      "set_model": model.kind},
            "start": start.backbone.description, "query_size": query_size if query_size is not None else "all",
            "query_set_sizes": {"min": sizes[0], "max": sizes[-1], "mean": sum(sizes) / len(sizes)},
            "seed": seed, "objects": len(photos.objects), "photos": len(photos.paths), "photos_embedded": len(used),
            # a random ranking's scores, and the k that take in every object (100 % by construction)
            "chance": chance_scores(len(photos.objects)), "ks_at_least_objects": trivial_ks(len(photos.objects)),
            "seconds": time.perf_counter() - started, "results": [r.to_dict() for r in results]}


# ------------------------------------------------------------------------------------------ a gallery index


@dataclass
class GalleryQueries:
    """The query objects of ``eval retrieval --index``: ``objects`` (those the gallery holds, in the query's
    order) with their photos ``sets``; ``removed`` (removed from the gallery) and ``absent`` (never in it), left
    out of R@k; ``rows`` the gallery's live rows (their stored latents checked finite: what the exact search
    scores against) and ``ids`` their objects, row for row."""
    objects: list[str]
    sets: list[list[Path]]
    removed: list[str]
    absent: list[str]
    query_objects: int
    ids: list[str]
    rows: np.ndarray
    # the query objects whose gallery photos were not all compared with the query photos: the gallery folded more
    # photos into them than it recorded digests of (built from features, or before format 5). A gallery-wide flag
    # said "compared" where one object had records (a review, 2026-12-08), so it is counted per object.
    unchecked: list[str] = dataclasses.field(default_factory=list)
    lookalikes: dict[str, str] = dataclasses.field(default_factory=dict)  # an absent id -> the stored id it reads like
    # a removed query id spelt otherwise than the id removed -> that removed id (the same lookalike_key)
    removed_as: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def digests_checked(self) -> bool:
        return not self.unchecked


def _shown(ids: Sequence[str], limit: int = 5) -> str:
    from mlsctl.gallery import printable

    return ", ".join(printable(i) for i in ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _removed_shown(ids: Sequence[str], removed_as: dict[str, str], limit: int = 5) -> str:
    """The removed query ids as :func:`_shown` names them, each spelt otherwise than the id removed with "reads like
    removed '<that id>'" (a probe, 2026-12-08: a query 'café' (NFC) of an object removed as 'cafe' + U+0301 was
    "never in it")."""
    from mlsctl.gallery import printable

    def shown(object_id: str) -> str:
        other = removed_as.get(object_id)
        return printable(object_id) + ("" if other is None else f" (reads like removed '{printable(other)}')")

    return ", ".join(shown(i) for i in ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _removed_lookalikes(target, ids: Sequence[str]) -> dict[str, str]:
    """The ``ids`` that read like an id removed from ``target`` (and not added again) though spelt otherwise, each
    with that removed id (:func:`~mlsctl.gallery.lookalike_key`, as every reader matches ids)."""
    from mlsctl.gallery import lookalike_key

    if not ids:
        return {}
    keys: dict[str, str] = {}
    for object_id in target.removed_ids():
        keys.setdefault(lookalike_key(object_id), object_id)
    return {o: keys[lookalike_key(o)] for o in ids if lookalike_key(o) in keys}


def _lookalikes_shown(lookalikes: dict[str, str], limit: int = 3) -> str:
    """``'café' reads like the gallery's 'café'``, for the first ``limit`` look-alike ids: a query folder named in
    another Unicode composition (or with a Cyrillic letter) reads as the stored id, yet is another string, and was
    "never in it" with no hint (a review, 2026-12-08). They are named, never matched: the ids differ."""
    from mlsctl.gallery import printable

    shown = [f"'{printable(given)}' reads like the gallery's '{printable(stored)}'"
             for given, stored in list(lookalikes.items())[:limit]]
    more = f" and {len(lookalikes) - limit} more" if len(lookalikes) > limit else ""
    return f"{'; '.join(shown)}{more} (another string: rename the query folder to the stored id)"


def gallery_queries(target, query, query_objects=None) -> GalleryQueries:
    """The query objects of ``query`` (``ROOT/<object_id>/*``, or those ``query_objects`` lists) that ``target``
    (an open :class:`~mlsctl.gallery.Gallery`) holds, checked before any model loads: one sentence where it holds
    none of them (naming the stored ids they read like, if any), where a query photo cannot be a photo of an object
    (its header: the rule of ``mlsctl search``), where a query photo is one the gallery holds already (the same bytes:
    its object would be found trivially; galleries record their photos' sha256 since format 5), or where a stored
    latent is damaged."""
    from mlsctl.console import counted
    from mlsctl.errors import UserError
    from mlsctl.gallery import check_photos, object_folders

    groups = object_folders(query, query_objects, "--query-objects", "--query", ("query",))
    live = target.live_rows()
    for start in range(0, len(live), EXACT_BLOCK):  # a NaN latent: one sentence, before the model loads
        target.check_live_latents(live[start:start + EXACT_BLOCK])
    ids = [target.row_ids[row] for row in live.tolist()]
    held = set(ids)
    objects = [o for o in groups if o in held]
    removed = [o for o in groups if o not in held and target.was_removed(o)]
    absent = [o for o in groups if o not in held and o not in set(removed)]
    lookalikes = {o: stored for o in absent for stored in (target.lookalike(o),) if stored is not None}
    removed_as = _removed_lookalikes(target, [o for o in absent if o not in lookalikes])
    if removed_as:  # a look-alike of a removed id: removed, as every reader matches ids
        removed = [o for o in groups if o in set(removed) or o in removed_as]
        absent = [o for o in absent if o not in removed_as]
    source = f"the object_id column of --query-objects {query_objects}" if query_objects is not None else \
        f"the sub-folders of {query}"
    if not len(target):
        raise UserError(f"gallery {target.path} holds no objects (every one removed, or none added), so no query can "
                        f"find its own; add objects with mlsctl index add, or build it again with mlsctl index build")
    if not objects:
        gone = (f"; {len(removed)} of the query objects {'was' if len(removed) == 1 else 'were'} removed from it: "
                f"{_removed_shown(removed, removed_as)}" if removed else "")
        alike = f"; {_lookalikes_shown(lookalikes)}" if lookalikes else ""
        raise UserError(f"none of the {counted(len(groups), 'query object')} of {query} is in gallery {target.path}, "
                        f"which holds {counted(len(target), 'object')}{gone}: the ids are {source} and the gallery's "
                        f"object ids (mlsctl index info {target.path} --objects lists them){alike}")
    check_photos([path for o in objects for path in groups[o]])  # a 7x7 photo: before the model, as search says it
    unchecked = _photos_held_already(target, live, ids, {o: groups[o] for o in objects})
    return GalleryQueries(objects, [list(groups[o]) for o in objects], removed, absent, len(groups), ids, live,
                          unchecked, lookalikes, removed_as)


def _photos_held_already(target, live: np.ndarray, ids: list[str], sets: dict[str, list[Path]]) -> list[str]:
    """Refuse a query photo (of ``sets``) that the gallery holds already, by its recorded digests, naming the object
    it is folded into; the query objects the gallery did not record every photo of (their photo count exceeds their
    digests: built from features, or an older gallery) are returned, unchecked."""
    from mlsctl.errors import UserError
    from mlsctl.gallery import file_digest, printable

    records = target.photo_records_of_rows(live)
    recorded = np.bincount(np.asarray(records["row"], dtype=np.int64), minlength=len(live))
    position = {object_id: i for i, object_id in enumerate(ids)}
    unchecked = [o for o in sets if int(target.counts[live[position[o]]]) > int(recorded[position[o]])]
    owner = {bytes(digest): ids[row] for row, digest in zip(records["row"].tolist(), records["sha256"])}
    for o, paths in sets.items():
        for path in paths:
            found = owner.get(file_digest(path))
            if found is not None:
                which = ("its own object" if found == o else
                         f"object '{printable(found)}', not the query's '{printable(o)}'")
                raise UserError(f"{path} is a photo gallery {target.path} holds already (the same bytes, folded into "
                                f"{which}): a query set of the gallery's own photos is no test of retrieval; give "
                                f"other photos of the objects as --query")
    return unchecked


EXACT_BLOCK = 65536  # the most stored latents read and scored at once by the exact search (384 wide: 100 MB)
EXACT_SCORES_BYTES = 256 << 20  # the most a block's [queries, rows] scores hold: the block shrinks as queries grow
RANKED_UP_TO = 10  # R@1..R@10: a rank beyond it is a miss at every k, and is given as RANKED_UP_TO + 1


def exact_block(queries: int) -> int:
    """The stored rows the exact search scores at once for ``queries`` queries: at most :data:`EXACT_BLOCK`, and
    few enough that their [queries, rows] float scores stay within :data:`EXACT_SCORES_BYTES` (65,536 rows a block
    for any count of queries held 11.7 GB at 12,000 queries: a review, 2026-12-08)."""
    return max(1, min(EXACT_BLOCK, EXACT_SCORES_BYTES // (4 * max(1, queries))))


def exact_ranks(queries: torch.Tensor, target, rows: np.ndarray, own: torch.Tensor) -> torch.Tensor:
    """:func:`ranks` of set latents ``queries`` [Q, D] against the stored latents of ``target``'s ``rows`` (``own``:
    the position in ``rows`` of each query's object), cosine, brute force, within R@10: a rank beyond
    :data:`RANKED_UP_TO` is given as ``RANKED_UP_TO + 1``, which every R@k with k up to 10 counts a miss alike. One
    pass over blocks of :func:`exact_block` rows (the score matrix of a large gallery is never held whole, nor a block
    of it larger than :data:`EXACT_SCORES_BYTES`) keeps each query's 11 best scores, and takes its own score from the
    very product that scores the others in its block (computed apart, its rounding could differ, and the own object
    out-rank itself); the rank is then the best scores at least as high as the own, ties counting against it."""
    unit = F.normalize(queries.float(), dim=1)
    keep = min(RANKED_UP_TO + 1, len(rows))
    best = torch.full((len(queries), keep), -math.inf)
    own_scores = torch.full((len(queries),), math.nan)
    size = exact_block(len(queries))
    for start in range(0, len(rows), size):
        block = torch.from_numpy(np.asarray(target.latents[rows[start:start + size]], dtype=np.float32))
        scores = unit @ F.normalize(block, dim=1).T
        inside = (own >= start) & (own < start + scores.shape[1])
        own_scores[inside] = scores[inside.nonzero()[:, 0], own[inside] - start]
        top = scores.topk(min(keep, scores.shape[1]), dim=1).values
        best = torch.cat([best, top], dim=1).topk(keep, dim=1).values
        del scores, top
    counts = (best >= own_scores[:, None]).sum(1)
    counts = torch.where(counts >= keep, RANKED_UP_TO + 1, counts) if keep > RANKED_UP_TO else counts
    return torch.where(own_scores.isnan(), NEVER_FOUND, counts)


def left_out_note(queries: GalleryQueries) -> Optional[str]:
    """The one note line on the query objects left out of R@k: removed from the gallery, or never in it (naming the
    stored ids that those read like, :func:`_lookalikes_shown`)."""
    from mlsctl.console import counted

    if not queries.removed and not queries.absent:
        return None
    parts = [f"{len(ids)} {what}: {shown}" for ids, what, shown in (
        (queries.removed, "removed from the gallery", _removed_shown(queries.removed, queries.removed_as)),
        (queries.absent, "never in it", _shown(queries.absent))) if ids]
    left = len(queries.removed) + len(queries.absent)
    alike = f"; {_lookalikes_shown(queries.lookalikes)}" if queries.lookalikes else ""
    return (f"note: {left} of the {counted(queries.query_objects, 'query object')} {'is' if left == 1 else 'are'} "
            f"left out of R@k, {'; '.join(parts)}{alike}")


def unchecked_note(queries: GalleryQueries, gallery) -> Optional[str]:
    """The note on the query objects whose photos could not all be compared with the gallery's (None if none)."""
    from mlsctl.console import counted

    if not queries.unchecked:
        return None
    n = len(queries.unchecked)
    return (f"note: gallery {gallery} does not record the digests of every photo folded into "
            f"{counted(n, 'query object')} ({_shown(queries.unchecked)}), so query photos that are those objects' own "
            f"could not be told apart (they would find {'its object' if n == 1 else 'their objects'} trivially)")


def check_noise_for_queries(queries: GalleryQueries, noise: Sequence[float]) -> None:
    """Refuse, before the model loads, noise with fewer than 2 query objects in the gallery: the noise lends photos
    of the other query objects, and with one there are none (it stopped after the model loaded with "internal
    error (ValueError: high <= 0)": a review, 2026-12-08)."""
    from mlsctl.errors import UserError
    from mlsctl.gallery import printable

    noisy = [fraction for fraction in noise if fraction > 0]
    if noisy and len(queries.objects) < 2:
        raise UserError(f"--noise {noisy[0]:g} replaces query photos with photos of the other query objects, but only "
                        f"one query object ('{printable(queries.objects[0])}') is in the gallery: give --noise 0, or "
                        f"query photos of more of the gallery's objects")


def check_run_for_gallery(target, run, from_option: bool = True) -> None:
    """``eval retrieval --index G --run RUN``: refuse, from the run's config.yaml and the gallery's manifest alone
    (before any weights load), a run whose model cannot be the one that folded the gallery's latents: a set model of
    the other kind, another architecture, input size or attention (MILE), or the gallery's own run trained on since
    (its latest checkpoint is of another step). A run of the same configuration elsewhere (the gallery's run moved)
    is loaded, and its weights' fingerprint checked as ``mlsctl search`` checks it. ``from_option``: ``run`` came from
    ``--run`` (else the gallery's own run, named as such in what is said)."""
    import os

    from mlsctl.errors import UserError
    from mlsctl.restore import recipe_of
    from mlsctl.runs import open_run

    named = "--run" if from_option else "the gallery's run"
    opened = open_run(run, hint="give a run written by mlsctl pretrain", flag=named)
    target.check_run_kind(run)  # a model of the other kind
    recipe = recipe_of(opened)
    built = target.manifest["model"]
    given = {"arch": recipe.model.arch, "resolution": recipe.data.global_crops.size}
    if target.set_model == "mile":
        given["attend"] = recipe.method.attend
    differ = [f"{key} {built[key]} (the run's: {value})" for key, value in given.items()
              if built.get(key) is not None and built[key] != value]
    if differ:
        fix = ("leave --run out to score the gallery with its own model" if from_option else
               "its config.yaml changed since: rebuild the gallery (mlsctl index build --overwrite), or give the "
               "run it was built with as --run")
        raise UserError(f"{named} {run} is not the model gallery {target.path} was built with (run {built['run']} at "
                        f"step {built['step']}): the gallery's {', '.join(differ)}; {fix}")
    latest = opened.latest()
    if (target.set_model == "mile" and latest is not None and latest.step != built.get("step")
            and os.path.realpath(run) == os.path.realpath(built["run"])):
        raise UserError(f"run {run} is no longer the model gallery {target.path} was built with (step {built['step']} "
                        f"then, {latest.step} now: trained on or again since); rebuild the gallery with mlsctl index "
                        f"build --overwrite")


def index_ranks(found: list[list[tuple[str, float]]], own: Sequence[str]) -> torch.Tensor:
    """The rank of each query's own object in the gallery's search answers (``found``, best first, as
    :meth:`~mlsctl.gallery.Gallery.search_many` gives them for ``mlsctl search``'s k of 10): the answers scoring at
    least as high as it (ties count against it, as :func:`ranks`), :data:`NEVER_FOUND` where the search did not
    return it. Only what the search returned is counted: an object tied with the 10th answer that it did not return
    does not push the own object out (``search -k 10`` shows it), and a higher-scoring object it did not return
    cannot outrank it, so a query can rank better than exactly (:func:`compared_ranks`)."""
    out = []
    for answers, object_id in zip(found, own):
        scores = {o: s for o, s in answers}
        out.append(sum(s >= scores[object_id] for _, s in answers) if object_id in scores else NEVER_FOUND)
    return torch.tensor(out, dtype=torch.int64)


def compared_ranks(index: torch.Tensor, exact: torch.Tensor) -> dict:
    """How many queries the index ranks worse and better than the exact search, within R@10 (a rank beyond 10, or
    none, is one miss): the AR@10 difference nets losses (objects the index did not return among its candidates)
    against gains (higher-scoring objects it did not return, which then could not outrank the query's own; a
    review, 2026-12-08, found the index above exact on 40 of 400 queries, said as "cosines rounded apart")."""
    index, exact = index.clamp(max=RANKED_UP_TO + 1), exact.clamp(max=RANKED_UP_TO + 1)
    return {"ranked_worse_than_exact": int((index > exact).sum()), "ranked_better_than_exact": int((index < exact).sum())}


def index_words(settings) -> str:
    """A gallery's search settings in words (its manifest's ``index``)."""
    if settings.kind == "flat":
        return "flat (exact)"
    probed = min(settings.nprobe, settings.nlist) if settings.nlist else settings.nprobe  # faiss reads at most nlist
    asked = f" of the {settings.nprobe} asked" if probed != settings.nprobe else ""
    return (f"ivfpq (nlist {settings.nlist}, m {settings.m}, {settings.nbits} bits, nprobe {probed}{asked}, "
            f"refine {settings.refine})")


def evaluate_gallery(target, model, queries: GalleryQueries, query, *, query_size: Optional[int],
                     noise: Sequence[float], seed: int, workers: Optional[int] = None, say=to_stderr,
                     query_objects=None) -> dict:
    """``mlsctl eval retrieval --index GALLERY``: each query object's photos (``queries``, :func:`gallery_queries`),
    ``query_size`` of them drawn with ``seed`` and ``noise`` replaced as the photo-folder form draws them, embedded
    and folded by the gallery's own set model ``model`` (loaded and checked as ``mlsctl search`` loads it), searched
    in the gallery as ``mlsctl search`` searches (:meth:`~mlsctl.gallery.Gallery.search_many` with its k of 10: its
    index and search settings, after every add and removal) and, to show what the approximate index costs, scored
    exactly (cosine against every live stored latent); as the result JSON's fields."""
    import time

    from mlsctl.gallery import long_set_note

    paths, rows = [], []
    for photos in queries.sets:
        rows.append(list(range(len(paths), len(paths) + len(photos))))
        paths += photos
    drawn = sample_sets(rows, query_size, seed)  # as the photo-folder form draws the query photos
    sizes = sorted(len(r) for r in drawn)
    _say_query_set_notes(sizes, query_size, noise, say)
    long_set = long_set_note(model, sizes[-1])
    if long_set:
        say(long_set)
    used, query_rows = renumbered(drawn)
    say(f"embedding {len(used)} query photos of {len(queries.objects)} objects with the gallery's model")
    started = time.perf_counter()
    cls, tokens, _ = _embed_photos(model, None, [paths[row] for row in used], workers)
    embedded = time.perf_counter()
    results, seconds = _search_and_rank(target, model, queries, query_rows, cls, tokens, noise, seed)
    settings = target.settings
    listed = {"query_objects": str(query_objects)} if query_objects is not None else {}
    return {"index": str(target.path), "gallery": str(target.path), "query": str(query), **listed,
            # which state of the gallery was scored (adds and removals change it): its manifest's data folder and rows
            "gallery_state": {key: target.manifest.get(key) for key in ("data", "rows", "objects", "updated")},
            "run": model.run, "step": model.step, "fingerprint": model.fingerprint,
            "model": {**model.backbone.info, "step": model.step, "set_fingerprint": model.fingerprint,
                      "set_model": model.kind},
            "search": {**settings.to_dict(), "nprobe_effective": (min(settings.nprobe, settings.nlist)
                                                                  if settings.kind != "flat" and settings.nlist
                                                                  else None),
                       "k": min(RANKED_UP_TO, len(queries.ids)),
                       "written_since_training": round(target.added_since_training(), 4)},
            "query_size": query_size if query_size is not None else "all",
            "query_set_sizes": {"min": sizes[0], "max": sizes[-1], "mean": sum(sizes) / len(sizes)},
            "seed": seed, "objects": len(queries.ids), "queries": len(queries.objects),
            "query_objects_in_query": queries.query_objects,
            "left_out": {"removed": queries.removed, "absent": queries.absent},
            "photos": len(paths), "photos_embedded": len(used),
            "query_photos_compared_with_gallery": queries.digests_checked,
            "query_objects_unchecked": len(queries.unchecked),  # per object: their photos' digests not all recorded
            "chance": chance_scores(len(queries.ids)), "ks_at_least_objects": trivial_ks(len(queries.ids)),
            "seconds": {"embedding": embedded - started, **seconds, "total": time.perf_counter() - started},
            "results": results}


def _search_and_rank(target, model, queries: GalleryQueries, query_rows: list[list[int]], cls: torch.Tensor,
                     tokens: Optional[torch.Tensor], noise: Sequence[float], seed: int) -> tuple[list[dict], dict]:
    """The result rows of each noise level (the index's, with :func:`compared_ranks`, and the exact search's) and
    the seconds each search took: the sets folded once a level, searched as ``mlsctl search -k 10`` answers."""
    position = {object_id: i for i, object_id in enumerate(queries.ids)}
    targets = torch.tensor([position[o] for o in queries.objects], dtype=torch.int64)
    k = min(RANKED_UP_TO, len(queries.ids))  # search's default k: the index row is what search -k 10 answers
    results, seconds = [], {"search": 0.0, "exact": 0.0}
    for fraction in noise:
        sets = noisy_sets(query_rows, fraction, query_rows, seed)
        replaced = tuple(replaced_photos(fraction, len(r)) for r in query_rows)
        latents = torch.stack([model.fold(None, cls[r], tokens[r] if tokens is not None else None) for r in sets])
        latents = latents.float().cpu()
        at = time.perf_counter()
        finite = torch.isfinite(latents).all(1)  # a set the model folds to NaN: a miss (search_many refuses it)
        answers = iter(target.search_many(latents[finite], k) if finite.any() else [])  # as mlsctl search searches
        found = [next(answers) if ok else [] for ok in finite.tolist()]
        seconds["search"] += time.perf_counter() - at
        at = time.perf_counter()
        exact = exact_ranks(latents, target, queries.rows, targets)
        seconds["exact"] += time.perf_counter() - at
        index = index_ranks(found, queries.objects)
        for search, rank, extra in (("index", index, compared_ranks(index, exact)), ("exact", exact, {})):
            result = RetrievalResult(model.kind, fraction, recall_at(rank), len(sets), len(queries.ids), "trained",
                                     replaced)
            results.append({**result.to_dict(), "search": search, **extra})
    return results, seconds


def index_cost_note(payload: dict) -> str:
    """What the gallery's approximate index costs against the exact search of the same queries, in one line: the net
    AR@10 difference, and the queries it ranks worse (objects it did not return among its candidates) and better
    (higher-scoring objects it did not return could not outrank the query's own: :func:`index_ranks`) apart. Only a
    flat index's differences are near-equal cosines rounded apart (it returns what the exact search ranks)."""
    rows = payload["results"]
    pairs = [(a, b) for a in rows if a["search"] == "index" for b in rows
             if b["search"] == "exact" and b["noise"] == a["noise"]]
    equal = all(a[f"R@{k}"] == b[f"R@{k}"] for a, b in pairs for k in range(1, 11))
    worse, better = (sum(a.get(key, 0) for a, _ in pairs) for key in ("ranked_worse_than_exact",
                                                                      "ranked_better_than_exact"))
    sets = sum(a.get("queries", 0) for a, _ in pairs)
    of = f"of {sets} query sets{' (every noise level)' if len(pairs) > 1 else ''}"
    if payload["search"]["kind"] == "flat":
        if equal and not worse and not better:
            return "the gallery's index is flat: it searches exactly, so its rows equal the exact ones"
        return (f"the gallery's index is flat (exact), yet its rows differ from the exact ones ({worse} {of} ranked "
                f"worse, {better} better): near-equal cosines rounded apart (the index scores the stored unit rows, "
                f"the exact search the latents)")
    settings = payload["search"]
    words = (f"nprobe {settings.get('nprobe_effective') or settings['nprobe']} of {settings['nlist']} lists, refine "
             f"{settings['refine']}")
    if equal and not worse and not better:
        return f"the index ({words}) retrieves as the exact search does on these queries"
    worst = max(pairs, key=lambda p: p[1]["AR@10"] - p[0]["AR@10"])
    cost = worst[1]["AR@10"] - worst[0]["AR@10"]
    gain = max(a["AR@10"] - b["AR@10"] for a, b in pairs)
    net = (f"costs {100 * cost:.1f} points of AR@10 against the exact search (noise {100 * worst[0]['noise']:.0f}%)"
           if cost > 0 else f"scores {100 * gain:.1f} points of AR@10 above the exact search" if gain > 0
           else "scores the exact search's AR@10")
    stale = settings.get("written_since_training") or 0
    retrain = (f"; {100 * stale:.0f}% of the objects were written after its quantiser was trained: mlsctl index "
               f"retrain may recover them" if stale > 0.2 and worse else "")
    return (f"the index ({words}) {net}: {worse} {of} ranked worse than exactly (objects it did not return among its "
            f"candidates), {better} better (higher-scoring objects it did not return, which could not outrank the "
            f"query's own){retrain}")
