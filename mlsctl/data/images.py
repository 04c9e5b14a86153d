"""Image discovery and decoding.

* :func:`find_images` lists a folder recursively, sorted by relative path, keeping the
  extensions of :data:`IMAGE_EXTENSIONS` (case-insensitive). A missing folder, a file, or a folder
  without images is a :class:`~mlsctl.errors.UserError`.
* :func:`load_rgb` decodes one file fully, applies the EXIF orientation and converts every mode to
  8-bit RGB (grayscale, palette, RGBA/LA composited on white, CMYK, 16- and 32-bit integer and
  float images rescaled). Anything that cannot be decoded (zero bytes, truncated, not an image)
  raises :class:`BadImage` with a short reason.
* :class:`SkipLog` prints one warning line per skipped file and a count at the end.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlsctl.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
log = logging.getLogger("mlsctl")

# Scenes of real photos are large; this only guards against decompression bombs.
Image.MAX_IMAGE_PIXELS = 40_000 * 40_000


class BadImage(Exception):
    """A file that cannot be decoded as an image; ``str(exc)`` is the reason."""


def find_images(root: str | os.PathLike, what: str = "image folder", others: list[Path] | None = None) -> list[Path]:
    """Image files under ``root``, sorted by relative path; other visible files are appended to
    ``others`` when a list is given (``embed`` reports them as skipped)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{what} {root} does not exist; check the path")
    if not root.is_dir():
        raise UserError(f"{what} {root} is a file, not a folder of images")
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath, name))
            elif others is not None:
                others.append(Path(dirpath, name))
    if not found:
        raise UserError(f"{what} {root} contains no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}); "
                        "point it at a folder of images")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        if mode == "F":
            low, high = float(np.nanmin(array)), float(np.nanmax(array))
            scale = high - low if high > low else 1.0
            array = (array - low) / scale * 255.0
        else:
            top = 65535.0 if mode.startswith("I;16") or array.max() <= 65535 else float(array.max())
            array = array / top * 255.0
        gray = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` completely into an 8-bit RGB image with EXIF orientation applied."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image file") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text.lower():
            raise BadImage("truncated image data") from None
        raise BadImage(f"cannot decode ({text or type(exc).__name__})") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadImage(f"cannot decode ({exc})") from None


class SkipLog:
    """Collects skipped files: one warning line each (once per file), a count at the end."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else None
        self.reasons: dict[str, str] = {}

    def add(self, path: str, reason: str) -> None:
        if path in self.reasons:
            return
        self.reasons[path] = reason
        log.warning(f"skipped {path}: {reason}")

    def extend(self, items: Iterable[tuple[str, str]]) -> None:
        for path, reason in items:
            self.add(path, reason)

    def summary(self) -> str | None:
        if not self.reasons:
            return None
        where = f" in {self.root}" if self.root is not None else ""
        n = len(self.reasons)
        return f"skipped {n} unreadable file{'s' if n != 1 else ''}{where}"


class ImageFolder:
    """The images of a folder (see :func:`find_images`), addressed by row index."""

    def __init__(self, root: str | os.PathLike, what: str = "image folder"):
        self.root = Path(root)
        self.files = find_images(self.root, what)

    def __len__(self) -> int:
        return len(self.files)

    def relpath(self, index: int) -> str:
        return self.files[index].relative_to(self.root).as_posix()

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.files[index])
