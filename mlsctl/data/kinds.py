"""What kind of mlsctl folder a path is, told from a file or two with nothing loaded.

For the refusals that must come before a model loads or anything is written: a run folder or a
gallery given where images go (``embed``, ``index build``), a data build into another folder that
a command reads as a whole (``data``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from mlsctl.data.shards import is_feature_folder, names_kind
from mlsctl.runs import Run

GALLERY_MANIFEST = "gallery.json"  # a gallery's record (mlsctl.gallery, a layer above, writes it)


def folder_kind(path: str | os.PathLike) -> Optional[str]:
    """"a data set built by mlsctl data", "a gallery", "a run folder"
    (:meth:`~mlsctl.runs.Run.written_by_pretrain`), "a feature folder", or None for any other path.
    A gallery's and a feature folder's record (:func:`~mlsctl.data.shards.is_feature_folder`) are
    told by the kind they begin with, not by their names alone: a ``manifest.json`` or
    ``gallery.json`` of one's own among images is no reason to refuse them (a review, 2026-12-07)."""
    path = Path(path)
    if is_data_build(path / "meta.json"):
        return "a data set built by mlsctl data"
    if names_kind(path / GALLERY_MANIFEST, "mlsctl-gallery"):
        return "a gallery"
    if Run(path).written_by_pretrain():
        return "a run folder"
    if is_feature_folder(path):
        return "a feature folder"
    return None


def is_data_build(meta_path: Path) -> bool:
    """Whether ``meta_path`` is the meta.json of a data build (it records the build's parameters)."""
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("parameters"), dict)
