"""Image discovery and decoding.

* :func:`scan_images` lists a folder recursively, sorted by relative path, keeping the files
  Pillow can open as raster images (:data:`IMAGE_EXTENSIONS`, case-insensitive; animated formats
  give their first frame). Every real folder is visited once and every real file listed once
  (identified by device and inode), so symbolic-link loops and links to folders or files already
  listed cost nothing: they are counted in :attr:`ImageScan.links_skipped`. A folder that cannot
  be read, a broken link, and a name that mlsctl's lists cannot store (not valid UTF-8, or with a
  control character such as a newline) are skipped and reported with their reason.
  :func:`find_images` is the list of images alone; a missing folder, a file, or a folder without
  images is a :class:`~mlsctl.errors.UserError`.
* :func:`load_rgb` decodes one file fully, applies the EXIF orientation and converts every mode to
  8-bit RGB (grayscale, palette, RGBA/LA composited on white, CMYK, 16- and 32-bit integer and
  float images rescaled). Anything that cannot be decoded (zero bytes, truncated, not an image,
  more pixels than the limit, not enough memory) or read (permission denied, removed since the
  listing) raises :class:`BadImage` with a short reason; a missing folder or an I/O error is the
  machine's, not the file's, and stops the command. :func:`check_image` refuses what the header
  alone shows (all of that but damaged image data) without decoding.
* :class:`SkipLog` prints one warning line per skipped file and a count at the end.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import re
import stat
import struct
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlsctl.atomic import is_litter_file
from mlsctl.errors import UserError

log = logging.getLogger("mlsctl")

# Pillow's own guard against decompression bombs (89,478,485 pixels, about 9459²): a larger image
# is skipped like any other bad file. Pretraining raises it with data.max_image_pixels, embed with
# --max-image-pixels; the message names that way (``raise_with``) only where the caller has one.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# What a photo of an object searched or added to a gallery (search, index add and build, serve's uploads) must
# be: a 1x1 or a 100000x1 image, resized to the model's square input, was searched and added with confident
# scores (a new user's probe, 2026-12-07). 8 pixels is the tiny models' patch; 20:1 is wider than a panorama.
MIN_PHOTO_SIDE = 8
MAX_PHOTO_ASPECT = 20


def photo_shape_problem(width: int, height: int) -> Optional[str]:
    """Why an image of ``width`` x ``height`` cannot be a photo of an object (None if it can): its shorter side
    under :data:`MIN_PHOTO_SIDE` pixels, or its sides further apart than :data:`MAX_PHOTO_ASPECT`:1."""
    short, long = min(width, height), max(width, height)
    if short < MIN_PHOTO_SIDE:
        return (f"{width}x{height} is too small to show an object (photos need at least {MIN_PHOTO_SIDE} pixels on "
                f"their shorter side)")
    if long > MAX_PHOTO_ASPECT * short:
        return (f"{width}x{height} is a strip, not a photo of an object (its sides are {long / short:,.0f}:1; photos "
                f"may be at most {MAX_PHOTO_ASPECT}:1)")
    return None

# Formats Pillow registers but that are not raster photographs it can decode by itself (stubs that
# need another library, video, vector and page formats).
_NOT_PHOTOS = {"BUFR", "GRIB", "HDF5", "FITS", "MPEG", "EPS", "WMF"}


# Photo formats Pillow reads only through a plugin, and the plugin's package: where one is installed it reads
# them (pillow-heif registered below); where none is, such files are said with the package to install (a new
# user's probe, 2026-12-07: a phone's .HEIC photos were "not an image file" and "no images (bmp, gif, ...)").
PLUGINS = {".heic": "pillow-heif", ".heif": "pillow-heif", ".hif": "pillow-heif", ".avif": "pillow-avif-plugin",
           ".avifs": "pillow-avif-plugin"}


def _register_plugins() -> None:
    """Let Pillow read HEIC/HEIF where pillow-heif is installed, and AVIF where pillow-avif-plugin is (optional
    packages: no dependency of mlsctl). Pillow reads AVIF itself where it was built with libavif, as recent
    wheels are; pillow_avif registers itself as it is imported."""
    try:
        import pillow_heif
    except ImportError:
        pass
    else:
        pillow_heif.register_heif_opener()
    if ".avif" not in Image.registered_extensions():
        with contextlib.suppress(ImportError):
            importlib.import_module("pillow_avif")  # registers the AVIF plugin


def _image_extensions() -> tuple[str, ...]:
    _register_plugins()
    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items()
                        if fmt in Image.OPEN and fmt not in _NOT_PHOTOS))


IMAGE_EXTENSIONS = _image_extensions()
# The formats Pillow may try on a file: those of IMAGE_EXTENSIONS. Anything else (PostScript, which
# Pillow hands to Ghostscript; vector and page formats) is "not an image file" whatever it is named.
IMAGE_FORMATS = tuple(sorted({fmt for ext, fmt in Image.registered_extensions().items() if ext in IMAGE_EXTENSIONS}))
# how a feature folder's manifest begins the reason of a file of the images folder that is not an image (its
# extension follows), which embed says in one line for them all (others_note)
NOT_AN_IMAGE = "not an image file (extension "
# the extensions of PLUGINS that Pillow here cannot read
NEEDS_PLUGIN = {ext: package for ext, package in PLUGINS.items() if ext not in IMAGE_EXTENSIONS}


def plugin_hint(extensions: Iterable[str]) -> str:
    """What to install for those of ``extensions`` (lower case, with the dot) that need a plugin, or ""."""
    needing = sorted({e for e in extensions if e in NEEDS_PLUGIN})
    if not needing:
        return ""
    packages = " ".join(sorted({NEEDS_PLUGIN[e] for e in needing}))
    return (f"{'/'.join(e[1:].upper() for e in needing)} photos need a Pillow plugin: pip install {packages} (mlsctl "
            f"reads them once it is installed)")


def others_note(relpaths: Sequence[str]) -> Optional[str]:
    """One line for the files of a folder that are not images, or None: how many, their extensions, one example,
    and the plugin photos of a format Pillow reads only through one need. ``embed`` said each of 300 annotation
    files on its own line and ``pretrain`` none (a new user's probe, 2026-12-07); both say this line now."""
    if not relpaths:
        return None
    counts = Counter(PurePosixPath(p).suffix.lower() or "(none)" for p in relpaths)
    shown = ", ".join(f"{n} {ext}" for ext, n in counts.most_common(4))
    if len(counts) > 4:
        shown += f" and {len(counts) - 4} more extensions"
    n = len(relpaths)
    line = (f"left out {n} file{'s' if n != 1 else ''} that {'are not images' if n != 1 else 'is not an image'} "
            f"({shown}; e.g. {relpaths[0]})")
    hint = plugin_hint(counts)
    return f"{line}; {hint}" if hint else line


class BadImage(Exception):
    """A file that cannot be decoded as an image; ``str(exc)`` is the reason."""


def printable_name(name: str) -> str:
    """``name`` with undecodable bytes written ``\\xe9`` and control characters escaped, for messages
    and manifests."""
    out = []
    for c in name:
        if "\udc80" <= c <= "\udcff":  # a byte that is not UTF-8, as os.fsdecode keeps it
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp"):
            out.append(c.encode("unicode_escape").decode("ascii"))
        else:
            out.append(c)
    return "".join(out)


def name_problem(name: str) -> Optional[str]:
    """Why mlsctl cannot store ``name`` in its lists (images.txt, object ids), or None."""
    for c in name:
        if "\ud800" <= c <= "\udfff":
            return "is not valid UTF-8"
        if unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            return f"contains the control character {c.encode('unicode_escape').decode('ascii')}"
    return None


@dataclass
class ImageScan:
    """What :func:`scan_images` found under ``root``."""

    root: Path
    files: list[Path] = field(default_factory=list)  # images, sorted by relative path
    # (size, modification time in ns) of each of files, from the scan's own stat: what embed's resume
    # and its feature caches compare to see an image changed under the same name
    file_stats: list[tuple[int, int]] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)  # other visible files
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    links_skipped: int = 0  # links to folders or files already visited (loops, duplicates)
    what: str = "image folder"
    reported: bool = False  # notes() was called: the skipped entries were shown

    def notes(self, what: str) -> list[str]:
        """One line per skipped entry, one for the files that are not images and one for the skipped links,
        for the console."""
        self.reported = True
        lines = [f"skipped {path}: {reason}" for path, reason in self.skipped]
        others = others_note([printable_name(p.relative_to(self.root).as_posix()) for p in self.others])
        if others:
            lines.append(f"{what} {self.root}: {others}")
        if self.links_skipped:
            n = self.links_skipped
            lines.append(f"{what} {self.root}: skipped {n} symbolic link{'s' if n != 1 else ''} to folders or files "
                         f"already listed (loops or duplicates); each real image is listed once")
        return lines


# the benchmarks `mlsctl data` builds, by the folder the shipped recipes expect them in
_BENCHMARK_COMMANDS = (("fmnist-sop", "mlsctl data fmnist-products --layout sop --out {0}"),
                       ("fmnist-scenes", "mlsctl data fmnist-scenes --out {0}"),
                       ("fmnist-products", "mlsctl data fmnist-products --out {0}"),
                       # the shipped backbone's training images: the two benchmarks' training images, linked
                       ("fmnist-backbone", "mlsctl data fmnist-scenes --out {1}/fmnist-scenes && mlsctl data "
                                           "fmnist-products --out {1}/fmnist-products && mkdir -p {0} && ln -sfn "
                                           "../fmnist-scenes/train/images {0}/scenes && ln -sfn ../fmnist-products/train "
                                           "{0}/products (recipes/dino_fmnist_backbone.yaml)"))


def _how_to_make(root: Path) -> str:
    """The command that builds a missing benchmark folder the shipped recipes point at (a new user's
    probe, 2026-12-06: "data.root .../data/fmnist-sop/train does not exist; check the path"), else
    "check the path"."""
    for depth, part in enumerate(reversed(root.parts)):
        for name, command in _BENCHMARK_COMMANDS:
            built = Path(*root.parts[:len(root.parts) - depth])
            if part == name and depth <= 3 and not built.exists():  # built already: a typo below it, not a build
                shown = os.path.relpath(built) if not os.path.relpath(built).startswith("..") else str(built)
                return f"build it with: {command.format(shown, os.path.dirname(shown) or '.')}"
    # a relative path, or one made absolute from it (pretrain's data.root): a new user's probe, 2026-12-07
    if not root.is_absolute() or Path.cwd() in root.parents:
        return f"check the path (relative paths are read from the current folder, {Path.cwd()})"
    return "check the path"


def scan_images(root: str | os.PathLike, what: str = "image folder") -> ImageScan:
    """Images under ``root`` (see the module docstring); raises when ``root`` is not a folder."""
    root = Path(root)
    try:
        root_stat = root.stat()
    except FileNotFoundError:
        raise UserError(f"{what} {root} does not exist; {_how_to_make(root)}") from None
    except OSError as exc:
        raise UserError(f"{what} {root} cannot be read ({exc.strerror}); check the path and its permissions") from None
    if not stat.S_ISDIR(root_stat.st_mode):
        raise UserError(f"{what} {root} is a file, not a folder of images")
    scan = ImageScan(root, what=what)
    seen_folders = {(root_stat.st_dev, root_stat.st_ino)}
    seen_files: set[tuple[int, int]] = set()
    found: list[tuple[str, Path, tuple[int, int]]] = []
    pending = [(root, "")]  # depth first, names sorted: which of two links to one file is kept is fixed
    while pending:
        folder, rel = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            scan.skipped.append((rel or ".", f"folder cannot be read ({exc.strerror or exc})"))
            continue
        subfolders = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            relpath = f"{rel}/{name}" if rel else name
            try:
                is_folder = entry.is_dir()  # follows links
            except OSError:
                is_folder = False
            if not is_folder and not name.lower().endswith(IMAGE_EXTENSIONS):
                if name_problem(name) is None and not is_litter_file(Path(entry.path)):  # Thumbs.db is no one's file
                    scan.others.append(Path(entry.path))
                continue
            if is_folder:
                if _first_visit(entry, relpath, "folder", seen_folders, scan) is not None:
                    subfolders.append((Path(entry.path), relpath))
                continue
            st = _first_visit(entry, relpath, "file", seen_files, scan)
            if st is not None:
                found.append((relpath, Path(entry.path), (st.st_size, st.st_mtime_ns)))
        pending += reversed(subfolders)
    found.sort(key=lambda item: item[0])
    scan.files = [path for _, path, _ in found]
    scan.file_stats = [stat for _, _, stat in found]
    scan.others.sort(key=lambda p: p.relative_to(root).as_posix())
    if scan.skipped:
        _UNREPORTED.append(scan)
    return scan


# Scans that skipped files whose notes no command has shown yet: a command refused afterwards (too
# few images, too few for a batch) shows them before its error (mlsctl.cli.main), so the user sees
# which files were left out and why.
_UNREPORTED: list[ImageScan] = []


def unreported_skips() -> list[str]:
    """The notes of every scan whose skipped files were not shown yet (and forget them)."""
    lines = []
    for scan in _UNREPORTED:
        if not scan.reported:
            lines += scan.notes(scan.what)
    _UNREPORTED.clear()
    return lines


def _first_visit(entry: os.DirEntry, relpath: str, kind: str, seen: set[tuple[int, int]],
                 scan: ImageScan) -> Optional[os.stat_result]:
    """The stat of ``entry`` (a folder or an image) when it is listed: its name can be stored, its
    target exists, and no link led to the same real folder or file before (a skipped link is
    counted); None when it is not."""
    problem = name_problem(entry.name)
    if problem:
        scan.skipped.append((printable_name(relpath), f"{kind} name {problem}; rename it"))
        return None
    try:
        st = entry.stat()  # follows links
    except OSError as exc:
        reason = (f"folder cannot be read ({exc.strerror or exc})" if kind == "folder"
                  else "broken link (its target does not exist)")
        scan.skipped.append((printable_name(relpath), reason))
        return None
    key = (st.st_dev, st.st_ino)
    if key in seen:
        scan.links_skipped += 1
        return None
    seen.add(key)
    return st


def find_images(root: str | os.PathLike, what: str = "image folder", others: list[Path] | None = None) -> list[Path]:
    """Image files under ``root``, sorted by relative path (see :func:`scan_images`); other visible
    files are appended to ``others`` when a list is given (``embed`` reports them as skipped)."""
    scan = scan_images(root, what)
    require_images(scan, what)
    if others is not None:
        others += scan.others
    return scan.files


def require_images(scan: ImageScan, what: str) -> None:
    if not scan.files:
        hint = plugin_hint({p.suffix.lower() for p in scan.others})
        if hint:
            raise UserError(f"{what} {scan.root} contains no images Pillow here reads; {hint}")
        kinds = ", ".join(e[1:] for e in IMAGE_EXTENSIONS if e in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".gif"))
        raise UserError(f"{what} {scan.root} contains no images ({kinds}, ...); point it at a folder of images")


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


# ImageOps.exif_transpose's transposition for each EXIF orientation (1: none)
_ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                          7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
ORIENTATION_TAG = 0x0112
_XMP_ORIENTATION = re.compile(r'tiff:Orientation(="|>)([0-9])')  # the pattern Pillow's getexif reads XMP with


def _tiff_header_orientation(data: bytes) -> tuple[bool, Optional[int]]:
    """Tag 0x0112 of the first IFD of a TIFF-structured block (an EXIF block), read in place: (whether
    the tag is there, its value when it is one orientation, 1 to 8). The last of repeated tags counts,
    as in Pillow, and of several numbers the first."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8 or struct.unpack_from(order + "H", data, 2)[0] != 42:  # TIFF's magic number
        return False, None
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    if ifd + 2 > len(data):
        return False, None
    (entries,) = struct.unpack_from(order + "H", data, ifd)
    present, value = False, None
    for i in range(min(entries, (len(data) - ifd - 2) // 12)):
        at = ifd + 2 + 12 * i
        tag, kind, count = struct.unpack_from(order + "HHI", data, at)
        if tag != ORIENTATION_TAG:
            continue
        present, value = True, None
        fmt = {3: "H", 4: "I", 8: "h", 9: "i"}.get(kind)  # SHORT, LONG, SSHORT, SLONG
        if fmt is None or count < 1:
            continue
        width = struct.calcsize(fmt)
        where = at + 8  # the value itself when it fits in 4 bytes, else where it is
        if count * width > 4:
            (where,) = struct.unpack_from(order + "I", data, at + 8)
            if where + width > len(data):
                continue
        (number,) = struct.unpack_from(order + fmt, data, where)  # the first of several, as Pillow takes it
        value = number if 1 <= number <= 8 else None
    return present, value


def exif_orientation(img: Image.Image) -> int:
    """The orientation (1 to 8; 1 when none) Pillow's ``ImageOps.exif_transpose`` would apply: tag
    0x0112 of the EXIF block, else (when the block has no such tag) XMP's ``tiff:Orientation``. Read
    from the raw block in place: ``getexif()`` loads every tag, and copies a tag's data once for each
    tag pointing at it — a 1 MB photo whose 1,500 tags share one 1 MiB value cost gigabytes. A TIFF's
    own tags are read by Pillow when it opens the file, so for a TIFF its parsed tags are used. (Not
    read: ImageMagick's "Raw profile type exif" text chunks of PNG, which Pillow's reader decodes.)"""
    if img.format == "TIFF":
        value = img.getexif().get(ORIENTATION_TAG)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    raw = img.info.get("exif")
    if isinstance(raw, (bytes, bytearray)):
        present, value = _tiff_header_orientation(bytes(raw[6:] if raw[:6] == b"Exif\x00\x00" else raw))
        if present:
            return value or 1
    xmp = img.info.get("XML:com.adobe.xmp") or img.info.get("xmp")
    if isinstance(xmp, (bytes, bytearray)):
        xmp = bytes(xmp).decode("utf-8", "ignore")
    if isinstance(xmp, str):
        found = _XMP_ORIENTATION.search(xmp)
        if found and 1 <= int(found.group(2)) <= 8:
            return int(found.group(2))
    return 1


def apply_exif_orientation(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation says (:func:`exif_orientation`), as displayed."""
    method = _ORIENTATION_TRANSPOSE.get(exif_orientation(img))
    return img.transpose(method) if method is not None else img


def allow_image_pixels(max_pixels: int) -> None:
    """Let Pillow open images up to ``max_pixels`` (it refuses twice its own limit while opening);
    only ever raises Pillow's limit, for a user who asked for larger images."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def load_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, raise_with: str = "",
             photo: bool = False) -> Image.Image:
    """Decode ``path`` completely into an 8-bit RGB image with EXIF orientation applied; an image of
    more than ``max_pixels`` pixels is refused before it is decoded, the refusal naming ``raise_with``
    (the caller's option or key for the limit) if it has one; with ``photo``, so is one that cannot be a
    photo of an object (:func:`photo_shape_problem`)."""
    return _decode(_not_empty(Path(path)), max_pixels, raise_with=raise_with, photo=photo)


def read_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, raise_with: str = "",
             photo: bool = False, hashed: bool = True) -> tuple[Optional[bytes], Image.Image]:
    """:func:`load_rgb` of ``path`` opened once: (the sha256 of its bytes, the image decoded from the same open file),
    so that what a caller records of the file (a gallery, its :func:`~mlsctl.gallery.photo_digest`) is what was
    decoded, even where the file is replaced between two opens (a review, 2026-12-07: a build hashed a second read).
    The header is checked first and the bytes are hashed in chunks: a file is never held whole in memory (a review,
    2026-12-08: a photo padded with 300 MB cost 600 MB), only what its decoder needs; without ``hashed`` (a search
    records nothing) the digest is None and the bytes are not hashed. Refused as :func:`load_rgb` refuses."""
    import hashlib

    from mlsctl.atomic import open_regular

    path = Path(path)
    try:
        file = open_regular(path)  # a FIFO named .png: refused, not waited on (a probe, 2026-12-08: a build hung)
        if file is None:
            raise BadImage("not a regular file (a pipe or a device)")
        with file:
            if os.fstat(file.fileno()).st_size == 0:
                raise BadImage("empty file (0 bytes)")
            # the header first: a file over the pixel limit is refused before its bytes are read
            _decode(file, max_pixels, raise_with=raise_with, header_only=True, photo=photo, name=path)
            digest = None
            if hashed:
                file.seek(0)
                digest = hashlib.sha256()
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
            file.seek(0)
            return (digest.digest() if digest is not None else None,
                    _decode(file, max_pixels, raise_with=raise_with, photo=photo, name=path))
    except OSError as exc:
        raise _unreadable(exc, path) from None


def check_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, raise_with: str = "",
                photo: bool = False) -> None:
    """What :func:`load_rgb` refuses of ``path`` that its header shows, without decoding it (a
    header costs a read of a few KB): a file that cannot be read, is empty, is no image Pillow
    identifies, or has more than ``max_pixels`` pixels raises the same :class:`BadImage`. Damaged
    image data past the header (a truncated file) is found only by decoding it."""
    _decode(_not_empty(Path(path)), max_pixels, raise_with=raise_with, header_only=True, photo=photo)


def _not_empty(path: Path) -> Path:
    """``path``, refused as :class:`BadImage` where it is no regular file (a FIFO or a device: said as such, not as
    empty), empty, or the file system refuses it (:func:`_unreadable`)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):  # a folder: the file system's word
            raise BadImage("not a regular file (a pipe or a device)")
        if info.st_size == 0:
            raise BadImage("empty file (0 bytes)")
    except OSError as exc:
        raise _unreadable(exc, path) from None
    return path


# A file the file system refuses is skipped like one that cannot be decoded. Any other OSError is the
# machine's, not the file's, and is raised as it is: too many open files, an input/output error (a
# failing disk or network file system: skipping would commit files as unreadable for good during an
# outage), and a missing file whose folder is missing too (an unmounted or renamed root).
_FILE_ERRORS = {
    errno.EACCES: "cannot read it (permission denied)",
    errno.EPERM: "cannot read it (operation not permitted)",
    errno.ENOENT: "no such file",
    errno.EISDIR: "a folder, not a file",
    errno.ELOOP: "a link that leads back to itself",
}


def _unreadable(exc: OSError, path: Path) -> Exception:
    """:class:`BadImage` naming why the file system refused the file ``path``, or ``exc`` itself
    when the cause is not the file's."""
    reason = _FILE_ERRORS.get(exc.errno)
    if reason is None or (exc.errno == errno.ENOENT and not path.parent.is_dir()):
        return exc
    return BadImage(reason)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, formats: Sequence[str] = IMAGE_FORMATS,
               quiet: bool = True, raise_with: str = "", photo: bool = False) -> Image.Image:
    """:func:`load_rgb` for the bytes of an image file (an archive member, an upload), in one of
    ``formats``; ``quiet=False`` leaves Pillow's warnings to the process's filters (``catch_warnings``
    swaps them process-wide, which threads decoding at once must not do)."""
    import io

    if not data:
        raise BadImage("empty file (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels, formats, quiet, raise_with, photo=photo)


def _decode(source, max_pixels: int, formats: Sequence[str] = IMAGE_FORMATS, quiet: bool = True,
            raise_with: str = "", header_only: bool = False, photo: bool = False,
            name: Optional[Path] = None) -> Optional[Image.Image]:
    """``source`` decoded (None with ``header_only``: opened, identified and sized only), or the
    :class:`BadImage` of why not (with ``photo``, also where it cannot be a photo: :func:`photo_shape_problem`).
    ``name``: the file the bytes of ``source`` were read from, whose suffix names a missing plugin."""
    # the way to raise the limit only where the command has one: `search --set huge.png` was told to raise
    # data.max_image_pixels or --max-image-pixels, neither of which it has (an attacker's probe, 2026-12-07)
    too_large = (f"more than {max_pixels:,} pixels (a decompression bomb, or "
                 + (f"raise the limit: {raise_with})" if raise_with else "an image to shrink below the limit)"))
    try:
        with warnings.catch_warnings() if quiet else contextlib.nullcontext():
            if quiet:
                warnings.simplefilter("ignore")
            with Image.open(source, formats=formats) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImage(f"{width}x{height} is {too_large}")
                problem = photo_shape_problem(width, height) if photo else None
                if problem:
                    raise BadImage(problem)
                if header_only:
                    return None
                img.load()
                return _to_rgb(apply_exif_orientation(img))
    except BadImage:
        raise
    except UnidentifiedImageError:
        named = name if name is not None else source
        hint = plugin_hint([named.suffix.lower()]) if isinstance(named, Path) else ""
        raise BadImage(f"not an image file Pillow here reads: {hint}" if hint else "not an image file") from None
    except Image.DecompressionBombError as exc:  # Pillow refuses twice its own limit while opening
        import re

        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise BadImage(f"{int(found.group(1)):,} pixels is {too_large}" if found else too_large) from None
    except MemoryError:
        raise BadImage("not enough memory to decode it") from None
    except OSError as exc:
        if exc.errno is not None and exc.filename is not None:  # the file system's refusal, not the decoder's
            raise _unreadable(exc, Path(os.fsdecode(exc.filename))) from None
        text = str(exc)
        if "truncated" in text.lower():
            raise BadImage("truncated image data") from None
        raise BadImage(f"cannot decode ({text or type(exc).__name__})") from None
    except (ValueError, SyntaxError, EOFError) as exc:
        raise BadImage(f"cannot decode ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a plugin's own failure on a malformed file (IndexError, ...)
        raise BadImage(f"cannot decode ({type(exc).__name__} in Pillow's reader)") from None


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
    """The images of a folder (see :func:`scan_images`), addressed by row index; ``scan`` keeps what
    the listing skipped.

    The relative paths are one NumPy array of UTF-8 bytes, not a list of ``Path`` objects: a
    data-loading worker forked from the training process touches a Python object's reference count
    whenever it reads it, which copies its memory page, so a list of 1.28 M paths (about 450 MB)
    grew into a private copy in every worker; the array is never written, so every worker shares it."""

    def __init__(self, root: str | os.PathLike, what: str = "image folder",
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        import numpy as np

        self.root = Path(root)
        self.scan = scan_images(self.root, what)
        require_images(self.scan, what)
        self._relpaths = np.array([f.relative_to(self.root).as_posix().encode("utf-8", "surrogateescape")
                                   for f in self.scan.files])
        self.scan.files, self.scan.file_stats = [], []  # the array holds them; training compares no contents
        self.max_pixels = max_pixels
        allow_image_pixels(max_pixels)

    def __setstate__(self, state: dict) -> None:
        """Unpickled in another process (the training loop lists ``data.root`` on process 0 only and
        sends the listing to the others; a spawned loader worker): Pillow's limit is set there too."""
        self.__dict__.update(state)
        allow_image_pixels(self.max_pixels)

    def __len__(self) -> int:
        return len(self._relpaths)

    def relpath(self, index: int) -> str:
        return self._relpaths[index].decode("utf-8", "surrogateescape")

    def relpaths(self) -> list[str]:
        return [p.decode("utf-8", "surrogateescape") for p in self._relpaths.tolist()]

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.root / self.relpath(index), self.max_pixels, raise_with="data.max_image_pixels")
