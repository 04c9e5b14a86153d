"""Feature shards, the one format ``embed`` writes (:mod:`mlsctl.features`, through :func:`write_shard`
and :func:`feature_manifest`, as ``refine apply`` does) and ``eval``, ``viz``, ``index``, ``bank`` and
the refinement method read (:class:`Features`).

A feature folder holds ``manifest.json`` (written last) and ``shard-NNNNN-of-NNNNN.safetensors``
files (``global`` [n, D], optional ``dense`` [n, h, w, D], ``row`` [n]; named
``shard-NNNNN-of-NNNNN.PLAN.safetensors`` where ``embed --overwrite`` wrote one beside the shard it
replaced); the format is described in :mod:`mlsctl.features`. :class:`Features` reads one through ``safetensors.safe_open``
(memory-mapped), shard by shard; a damaged, unfinished or foreign folder raises a
:class:`~mlsctl.errors.UserError` saying what is wrong and what to do.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from mlsctl import __version__, atomic
from mlsctl.errors import UserError, first_line

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARTIAL = ".partial"
SHARD_BYTES = 256 * 2**20  # target size of one shard
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.safetensors"


def write_shard(path: Path, global_: torch.Tensor, start: int, dense: Optional[torch.Tensor] = None) -> int:
    """One shard file of a feature folder, written atomically: ``global`` [n, D], ``dense`` [n, h, w, D]
    when given, and ``row``, their row numbers in the folder from ``start``. Returns n."""
    from safetensors.torch import save_file

    shard = {"global": global_.contiguous()}
    if dense is not None:
        shard["dense"] = dense.contiguous()
    shard["row"] = torch.arange(start, start + len(global_), dtype=torch.long)
    atomic.write_with(path, lambda tmp: save_file(shard, str(tmp), metadata={"format": "mlsctl-features"}))
    return len(global_)


def feature_manifest(*, input_root, model: dict, preprocessing: dict, dtype: str, normalization: str, dim: int,
                     grid, files: list[str], skipped: list, shards: list[dict], plan: dict) -> dict:
    """The ``manifest.json`` of a feature folder (docs/formats.md): what every reader checks."""
    return {"kind": "mlsctl-features", "format_version": FORMAT_VERSION, "mlsctl_version": __version__,
            "input_root": str(input_root), "model": model, "preprocessing": preprocessing, "dtype": dtype,
            "normalization": normalization, "dim": int(dim), "grid": grid, "files": list(files),
            "skipped": list(skipped), "shards": shards, "plan": plan}


def is_feature_folder(path: str | os.PathLike) -> bool:
    """An unfinished embed (``.partial/``), or a ``manifest.json`` that names our kind in its first
    4 KB (``"kind"`` is written first; a manifest can be hundreds of MB) or lies beside shards (a
    damaged one, said when read). A ``manifest.json`` of one's own among images is not one: such a
    folder was refused by ``embed`` as features, and replaced whole by ``embed --out X --overwrite``
    (a review, 2026-12-07)."""
    path = Path(path)
    if (path / PARTIAL).is_dir():
        return True
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    if not os.access(manifest, os.R_OK) or names_kind(manifest, "mlsctl-features"):
        return True  # an unreadable one is said when read, as a feature folder's
    return any(path.glob("shard-*.safetensors"))


def names_kind(record: Path, kind: str) -> bool:
    """Whether the JSON record ``record`` (a feature manifest, a gallery.json) names ``kind`` in its
    first 4 KB: mlsctl writes ``"kind"`` first, and a manifest can be hundreds of MB, not parsed to
    be told apart. False where it cannot be read."""
    try:
        with open(record, "rb") as handle:
            return f'"{kind}"'.encode() in handle.read(4096)
    except OSError:  # not there, a folder, unreadable
        return False


@dataclass
class ShardInfo:
    path: Path
    rows: int
    start: int  # first row of this shard in the concatenation
    identity: tuple = ()  # (device, inode, size, mtime) when the folder was opened: a replaced shard is told apart


def _identity(path: Path) -> tuple:
    found = os.stat(path)
    return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns


# shard-NNNNN-of-NNNNN.safetensors; written beside the shard of that name it replaces (embed --overwrite), with the
# first 12 hex digits of its plan's hash before the suffix (mlsctl.features._shard_layout)
_SHARD_NAME = re.compile(r"shard-\d{5}-of-\d{5}(\.[0-9a-f]{12})?\.safetensors")
#: What embed and refine apply write in a feature folder, for :func:`mlsctl.atomic.refuse_others`: the manifest,
#: the shards, and ``.partial/`` of an unfinished embed (its plan, parts and records of the shards assembled)
FEATURES_LAYOUT: atomic.Layout = {
    re.escape(MANIFEST): None, _SHARD_NAME.pattern: None,
    re.escape(PARTIAL): {r"plan\.json": None, r"part-\d{5,}\.safetensors": None, r"shard-\d{5,}\.json": None},
}


def _is_count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _preprocessing_problem(p: dict) -> Optional[str]:
    """What in a manifest's ``preprocessing`` cannot be what embed wrote (a probe, 2026-12-06: a resolution
    of 1,000,000 made viz pca take every byte of memory, 0 a ZeroDivisionError), or None."""
    from mlsctl.data.preprocessing import RESIZE_MODES

    if "resolution" in p and not (_is_count(p["resolution"], 1) and p["resolution"] <= 16384):
        return f"'preprocessing.resolution' must be an image size of 1 to 16384 pixels, got {p['resolution']!r}"
    if "resize" in p and p["resize"] not in RESIZE_MODES:
        return f"'preprocessing.resize' must be one of {', '.join(RESIZE_MODES)}, got {p['resize']!r}"
    for key in ("mean", "std"):
        values = p.get(key, [0.5, 0.5, 0.5])
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values)
                and (key == "mean" or all(v > 0 for v in values))):
            return f"'preprocessing.{key}' must be 3 finite numbers{' above 0' if key == 'std' else ''}, got {values!r}"
    return None


def _manifest_problem(m: dict) -> Optional[str]:
    """What in a manifest has the wrong type, or None."""
    if not (isinstance(m["files"], list) and all(isinstance(f, str) for f in m["files"])):
        return "'files' must be a list of paths"
    if len(set(m["files"])) != len(m["files"]):  # one image, two rows: every k-NN vote would count it twice
        seen: set = set()
        twice = next(f for f in m["files"] if f in seen or seen.add(f))
        return f"'files' lists {twice} twice"
    shards = m["shards"]
    if not (isinstance(shards, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str)
                                             and _SHARD_NAME.fullmatch(e["file"]) and _is_count(e.get("rows"))
                                             for e in shards)):
        return "'shards' must be a list of {file: shard-NNNNN-of-NNNNN[.PLAN].safetensors, rows: count}"
    if not _is_count(m["dim"], 1):
        return f"'dim' must be a positive integer, got {m['dim']!r}"
    grid = m.get("grid")
    if grid is not None and not (isinstance(grid, list) and len(grid) == 2 and all(_is_count(g, 1) for g in grid)):
        return f"'grid' must be null or [h, w], got {grid!r}"
    if m["dtype"] not in ("float16", "float32"):
        return f"'dtype' must be float16 or float32, got {m['dtype']!r}"
    for key in ("model", "preprocessing"):
        if not isinstance(m[key], dict):
            return f"'{key}' must be a mapping"
    problem = _preprocessing_problem(m["preprocessing"])
    if problem:
        return problem
    if not isinstance(m["input_root"], str):
        return "'input_root' must be a path"
    skipped = m.get("skipped", [])
    if not (isinstance(skipped, list) and all(isinstance(x, list) and len(x) == 2 and all(isinstance(y, str) for y in x)
                                              for x in skipped)):
        return "'skipped' must be a list of [path, reason]"
    return None


def _row_column_problem(row: torch.Tensor, start: int) -> Optional[str]:
    """What is wrong with a shard's ``row`` column, which :func:`write_shard` writes as its rows' numbers in the folder
    (``start``, ``start + 1``, ...), or None. A writer that put a shard's rows out of order (the global features and
    their row numbers reversed together: a probe, 2026-12-08, where eval knn scored 33 % instead of 100 % without a
    word) is caught here, as each shard is opened: one vectorised comparison, 2 to 5 ms per million rows (measured on this
    project's 2-core CPU, 2026-12-08)."""
    if row.dtype.is_floating_point or row.dtype == torch.bool:
        return f"holds {str(row.dtype).replace('torch.', '')} values, not row numbers"
    if not len(row):
        return None
    # numpy, not torch: a shard may be opened under a default device of "meta" (a refine run rebuilt on meta)
    wrong = np.flatnonzero(row.cpu().numpy().astype(np.int64, copy=False) != np.arange(start, start + len(row)))
    if not len(wrong):
        return None
    first = int(wrong[0])
    return (f"is not the rows {start} to {start + len(row) - 1} in order (position {first} holds row "
            f"{int(row[first])})")


class Features:
    """A complete feature folder, read shard by shard (memory-mapped through safetensors)."""

    def __init__(self, path: str | os.PathLike, what: str = "feature folder"):
        self.path = Path(path)
        self.what = what
        self.manifest = self._read_manifest()
        m = self.manifest
        self.files: list[str] = m["files"]
        self.skipped: list[list[str]] = m.get("skipped", [])
        self.dim: int = int(m["dim"])
        self.grid: Optional[tuple[int, int]] = tuple(m["grid"]) if m.get("grid") else None
        self.dtype: str = m["dtype"]
        self.input_root = Path(m["input_root"])
        self.model: dict = m["model"]
        self.preprocessing: dict = m["preprocessing"]
        self.shards: list[ShardInfo] = []
        start = 0
        for entry in m["shards"]:
            shard = ShardInfo(self.path / entry["file"], int(entry["rows"]), start)
            self._check_shard(shard)
            self.shards.append(shard)
            start += shard.rows
        if start != len(self.files):
            raise UserError(f"{what} {self.path} is damaged: its shards hold {start} rows but manifest.json lists "
                            f"{len(self.files)} files; embed it again with --overwrite")

    # ------------------------------------------------------------------ validation
    def _read_manifest(self) -> dict:
        path, what = self.path, self.what
        if path.is_file():
            holder = f" {path.parent}" if path.name == MANIFEST else ""
            raise UserError(f"{what} {path} is a file, not a feature folder; give the folder{holder} that mlsctl embed "
                            f"wrote (it holds {MANIFEST} and the shards)")
        if not path.is_dir():
            raise UserError(f"{what} {path} does not exist; create it with mlsctl embed (refined features: mlsctl "
                            f"refine apply)")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            if (path / PARTIAL).is_dir():
                raise UserError(f"{what} {path} is unfinished (its embed was interrupted); run the same mlsctl embed "
                                f"command again to complete it")
            from mlsctl.runs import Run

            if Run(path).has_config():  # a new user, 2026-12-06
                raise UserError(f"{what} {path} is a run folder, not a feature folder; embed images with it first: "
                                f"mlsctl embed IMAGES --run {path}")
            raise UserError(f"{what} {path} is not a feature folder (no {MANIFEST}); create one with mlsctl embed")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{manifest_path} is damaged ({exc}); embed the folder again with --overwrite") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != "mlsctl-features":
            raise UserError(f"{manifest_path} is not an mlsctl feature manifest; point at a folder written by mlsctl embed")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"{what} {path} has format_version {version}, newer than this mlsctl reads "
                            f"({FORMAT_VERSION}); upgrade mlsctl")
        missing = [k for k in ("files", "shards", "dim", "dtype", "model", "preprocessing", "input_root")
                   if k not in manifest]
        if missing:
            raise UserError(f"{manifest_path} lacks {', '.join(missing)}; embed the folder again with --overwrite")
        problem = _manifest_problem(manifest)
        if problem:
            raise UserError(f"{manifest_path} is damaged ({problem}); embed the folder again with --overwrite")
        return manifest

    def _check_shard(self, shard: ShardInfo) -> None:
        from safetensors import safe_open

        if not shard.path.is_file():
            raise UserError(f"{self.what} {self.path} is damaged: {shard.path.name} is missing; embed it again with --overwrite")
        try:
            shard.identity = _identity(shard.path)
            with safe_open(str(shard.path), "pt") as f:
                shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
                row = f.get_tensor("row") if shapes.get("row") == [shard.rows] else None
        except Exception as exc:
            raise UserError(f"{shard.path} is damaged ({first_line(exc, 120)}); embed the folder again "
                            f"with --overwrite") from None
        expected = {"global": [shard.rows, self.dim], "row": [shard.rows]}
        if self.grid:
            expected["dense"] = [shard.rows, *self.grid, self.dim]
        if shapes != expected:
            raise UserError(f"{shard.path} holds {shapes}, manifest.json expects {expected}; embed the folder again "
                            f"with --overwrite")
        problem = _row_column_problem(row, shard.start)
        if problem:
            raise UserError(f"{self.what} {self.path} is damaged: {shard.path.name}'s row column {problem}, so its "
                            f"features may not be those of the files manifest.json lists; embed it again with "
                            f"--overwrite")

    def check_same_model(self, other: "Features") -> None:
        """Refuse to compare features of two different models (or widths), or of images prepared
        differently (resize, input size, interpolation, normalisation): neighbours across them
        would measure the preprocessing as much as the model."""
        if self.dim != other.dim or self.model.get("fingerprint") != other.model.get("fingerprint"):
            raise UserError(f"{self.what} {self.path} and {other.what} {other.path} come from different models; "
                            f"embed both with the same one")
        differing = [key for key in sorted(set(self.preprocessing) | set(other.preprocessing))
                     if self.preprocessing.get(key) != other.preprocessing.get(key)]
        if "resize" in differing and "rounding" in differing:  # a centre crop's rounding goes with its resize
            differing.remove("rounding")
        if differing:
            shown = ", ".join(f"{key} {self.preprocessing.get(key)} vs {other.preprocessing.get(key)}"
                              if key != "rounding" else "the centre crop's rounding: one was embedded by an mlsctl "
                              "before 2026-12-06, so embed it again" for key in differing)
            raise UserError(f"{self.what} {self.path} and {other.what} {other.path} were embedded with different "
                            f"preprocessing ({shown}); embed both with the same --resize and --resolution")

    # ------------------------------------------------------------------ access
    def _open_shard(self, shard: ShardInfo):
        """``safe_open`` of a shard that is still the one this folder held when it was opened: another
        command may replace a feature folder while this one reads it (an evaluation's cache, rebuilt by
        a concurrent ``eval knn-seg`` of another plan), and a shard gone or rewritten is one sentence,
        not a raw FileNotFoundError or rows of the other plan read silently."""
        from safetensors import safe_open

        changed = UserError(f"{self.what} {self.path} changed while it was read ({shard.path.name} was replaced or "
                            f"removed, by another command writing that folder); run the command again")
        try:
            opened = safe_open(str(shard.path), "pt")
            same = _identity(shard.path) == shard.identity  # checked after the open: the mapped file is the one seen
        except FileNotFoundError:
            raise changed from None
        if not same:
            opened.__exit__(None, None, None)
            raise changed
        return opened

    def __len__(self) -> int:
        return len(self.files)

    @property
    def has_dense(self) -> bool:
        return self.grid is not None

    def image_path(self, row: int) -> Path:
        return self.input_root / self.files[row]

    def load_image(self, row: int):
        """The image of ``row`` decoded to RGB, read from the input root: a folder or an archive."""
        from mlsctl.data.archive import open_tree

        if getattr(self, "_tree", None) is None:
            self._tree = open_tree(self.input_root, f"the input root of {self.what} {self.path}")
        return self._tree.load_rgb(self.files[row])

    def _shard_rows(self, rows: Optional[Sequence[int]]) -> Iterator[tuple[ShardInfo, Optional[np.ndarray]]]:
        """(shard, local row indices or None for all) for each shard holding requested rows."""
        if rows is None:
            for shard in self.shards:
                yield shard, None
            return
        rows = np.asarray(sorted(rows), dtype=np.int64)
        if len(rows) and (rows[0] < 0 or rows[-1] >= len(self)):
            raise IndexError(f"rows out of range 0..{len(self) - 1}")
        for shard in self.shards:
            lo, hi = np.searchsorted(rows, [shard.start, shard.start + shard.rows])
            if hi > lo:
                yield shard, rows[lo:hi] - shard.start

    def global_features(self, rows: Optional[Sequence[int]] = None, dtype=torch.float32) -> torch.Tensor:
        """Global features [n, D] of every row, or of ``rows`` in the order given (row i of the
        result is ``rows[i]``; a row asked twice comes twice)."""
        wanted, back = (None, None) if rows is None else np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        parts = []
        for shard, local in self._shard_rows(wanted):
            with self._open_shard(shard) as f:
                tensor = f.get_tensor("global")
            parts.append((tensor if local is None else tensor[torch.from_numpy(local)]).to(dtype))
        found = torch.cat(parts) if parts else torch.empty(0, self.dim, dtype=dtype)
        return found if back is None or not len(back) else found[torch.from_numpy(back.reshape(-1))]

    def finite_global_features(self) -> torch.Tensor:
        """:meth:`global_features` of every row, refused in one sentence when one holds NaN or inf (a
        diverged model or a damaged shard): a k-NN vote or a probe would score it silently."""
        embeddings = self.global_features()
        finite = torch.isfinite(embeddings).all(dim=-1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise UserError(f"features {self.path}: {len(bad)} of {len(finite)} embeddings hold NaN or inf (first: "
                            f"{self.files[bad[0]]}); embed the folder again (a diverged model or a damaged shard)")
        return embeddings

    def iter_dense(self, rows: Optional[Sequence[int]] = None, batch: int = 64,
                   dtype=torch.float32) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(rows [b], dense [b, h, w, D])`` in row order (sorted, whatever the order of ``rows``:
        each batch names its rows), reading at most one shard slice at a time."""
        if batch < 1:
            raise ValueError(f"iter_dense needs a batch of 1 or more, got {batch}")

        if not self.has_dense:
            raise UserError(f"{self.what} {self.path} has no dense features; embed it with --dense")
        for shard, local in self._shard_rows(rows):
            local = np.arange(shard.rows) if local is None else local
            with self._open_shard(shard) as f:
                dense = f.get_slice("dense")
                for i in range(0, len(local), batch):
                    chunk = local[i:i + batch]
                    lo, hi = int(chunk[0]), int(chunk[-1]) + 1
                    block = dense[lo:hi]
                    block = block[torch.from_numpy(chunk - lo)]
                    yield torch.from_numpy(chunk + shard.start), block.to(dtype)
