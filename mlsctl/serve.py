"""``mlsctl serve``: a gallery kept loaded behind an HTTP JSON API (FastAPI, served by uvicorn).

A thin face over the library calls ``search``, ``index add`` and ``index remove`` use (:mod:`mlsctl.gallery`):

* ``POST /search?k=10`` — photos of one object, as multipart files (``photos``, repeated) or as a
  JSON body ``{"paths": [...]}`` naming files under the server's ``--root``: the ranked objects;
* ``POST /objects/{id}/photos`` — the same photo inputs, folded into object ``id`` (created when
  new): one appended gallery row, persisted before the answer;
* ``DELETE /objects/{id}`` — removes object ``id`` (``mlsctl index remove``: one appended tombstone row,
  persisted before the answer; an unknown id is a 404); searches never return it again;
* ``GET /objects/{id}`` — how many photos the object has folded; ``GET /health``.

The server holds the gallery's lock for its lifetime (it is the gallery's writer: a concurrent
``mlsctl index add`` or ``index remove`` is refused naming it). Photos are embedded outside any lock; the
index is searched, grown and pruned under one lock, so a search during an add or a removal sees the gallery
before or after it: the gallery in memory is the one written (no reload).

Who may ask (:class:`Guard`, before a byte of the body is read; docs/service.md says what this
protects against and what it does not):

* the ``Host`` header must name the bound address, ``localhost``, a loopback address or an
  ``--allow-host`` (a web page that rebinds its own name to 127.0.0.1 is refused);
* a request whose ``Origin`` is not the server itself, or whose ``Sec-Fetch-Site`` is another
  site's, is refused, whatever its method (a page on another site can send a form without asking
  first, and learn from a ``GET``'s outcome which objects exist; it cannot send the token);
* writes (``POST`` and ``DELETE`` on ``/objects/``) need ``Authorization: Bearer TOKEN``: a token generated
  at start into ``GALLERY/.mlsctl.token`` (mode 0600, beside the lock, removed at exit; never printed: the start
  line reads it with ``$(cat …)``) or read from
  ``--token-file``; with ``--token-file`` every request but ``GET /health`` needs it; listening
  beyond loopback (``--host 0.0.0.0``) needs ``--token-file``. ``--read-only`` serves searches only.

What a request may cost (checked in this order, each before the next is done):

0. the connection: its request line and headers arrive within :data:`REQUEST_HEAD_SECONDS` of its
   opening or of its last answer, or it is closed; one that leaves its answers unread for
   :data:`WRITE_STALL_SECONDS` is aborted (:func:`head_timeout_protocol`); an answer given before the
   request's body was read (a refusal) closes the connection;
1. the body: it needs a ``Content-Length`` (chunked: 411); one over the limit (``--max-request-mb``;
   1 MiB for JSON) is refused before reading; while reading, bytes are counted and the request is
   refused at the limit; the bytes received at once, counted as they arrive, stay within
   :attr:`Limits.body_budget_bytes` for requests without the token and as much again for token
   holders (beyond: 503, retry); a body must arrive within :data:`BODY_SECONDS`, and at
   :data:`MIN_BODY_RATE` at least after :data:`BODY_GRACE_SECONDS`;
2. multipart: at most :data:`MAX_PHOTOS` files and :data:`MAX_FIELDS` other fields of
   :data:`MAX_FIELD_BYTES` each; every file at most ``--max-upload-mb``;
3. the photos' headers alone (nothing decoded yet), in one of :func:`upload_formats`: at most
   ``DEFAULT_MAX_IMAGE_PIXELS`` pixels each, :data:`MAX_REQUEST_PIXELS` per request, and each photo's decoding memory (pixels × the
   bytes per pixel its mode needs, :data:`BYTES_PER_PIXEL`) within the decode budget;
4. decoding: one photo at a time per request, each holding its decoding memory from the
   server-wide decode budget (``--decode-budget-mb``; others wait) and resized to the model's input
   (uint8) at once; :data:`WORKING` requests decode and embed at a time (others wait, holding only
   their received body, at most :data:`QUEUE_SECONDS`: then 503 with ``Retry-After``).

So the server's memory stays under its idle size + the decode budget + twice the two body
allowances + a few MB per working request, whatever the requests (docs/service.md has the measurements).

Bad requests get a 4xx with ``{"error": "one sentence"}``, FastAPI's own answers (404, 405, 422)
included, and so does a query parameter, a JSON key or a multipart field the endpoint does not take
(400); an unexpected failure a 500 with one sentence and no path; the server keeps serving.
Every request is one line in the server's log (stderr): method, path, status and milliseconds, and
for a failed request the sentence its client got; never a header (the token), a query string or a
body (but the name of a body key it refuses, where that reads as a name). Stopped (SIGTERM, Ctrl-C),
the server says what it saved: every add was written to disk before it was answered, so there is
nothing left to write at the end (:meth:`GalleryService.summary`).
SIGTERM ends it normally (exit code 0: a service manager's stop); Ctrl-C as every interrupted command (130).
"""


import asyncio
import errno
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import threading
import time
import warnings
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Optional, Sequence
from urllib.parse import urlsplit

from mlsctl.console import to_stderr
from mlsctl.errors import Interrupted, Terminated, UserError

MAX_PHOTOS = 64
MAX_REQUEST_PIXELS = 3 * 89_478_485  # three photos at Pillow's per-photo limit (decoding time, not memory)
MAX_JSON_BYTES = 2**20
MAX_FIELDS = 8  # multipart fields that are not files (none is used)
MAX_FIELD_BYTES = 4096
MAX_PATH_CHARS = 1024
MIN_LIMIT_BYTES = 1024  # the least --max-upload-mb, --max-request-mb and --decode-budget-mb may be
BODY_SECONDS = 60.0  # a request body must arrive within this time
BODY_GRACE_SECONDS = 5.0  # ... and, after these seconds, at MIN_BODY_RATE at least
MIN_BODY_RATE = 64 * 1024  # bytes per second
REQUEST_HEAD_SECONDS = 10.0  # a connection sends its request line and headers within this time, or is closed
WRITE_STALL_SECONDS = 30.0  # a connection that reads none of its answers for this long is aborted
WAIT_SECONDS = 120.0  # the longest a request waits for the decode budget
WORKING = 4  # requests decoding and embedding at once
QUEUE_SECONDS = 60.0  # the longest a received request waits for one of the WORKING slots (then 503, retry)
MAX_CONNECTIONS = 128  # uvicorn answers 503 beyond
MAX_JPEG_SCANS = 64  # a progressive JPEG has about 10; each scan is a pass over the whole image
MAX_CONNECTIONS_PER_CLIENT = 32  # connections one client address may hold open (--max-connections-per-client)
SHUTDOWN_SECONDS = 30.0  # after SIGTERM or Ctrl-C, requests under way have this long to finish
REFUSAL_LOG_SECONDS = 60.0  # a client's refusals are logged once in this time
REFUSED_LINGER_SECONDS = 2.0  # a connection refused for its address's cap is closed after this, or at its EOF
TOKEN_NAME = ".mlsctl.token"
API = "POST /search, POST /objects/ID/photos, DELETE /objects/ID, GET /objects/ID, GET /health"
_AUTH_SCHEMES = {"basic", "digest", "token", "negotiate", "ntlm", "hoba", "mutual", "oauth", "apikey", "jwt"}

# Peak memory of decoding one pixel with mlsctl.data.images.decode_rgb, by the mode Pillow reads
# from the header (measured on 88 MP images, +10%: benchmarks/serve_soak.py --bombs).
BYTES_PER_PIXEL = {"1": 7, "L": 7, "P": 11, "RGB": 9, "YCbCr": 9, "LAB": 9, "HSV": 9, "CMYK": 13,
                   "RGBA": 26, "RGBa": 26, "LA": 26, "La": 26, "PA": 26, "I;16": 31, "I;16L": 31, "I;16B": 31,
                   "I;16N": 31, "I": 35, "F": 35}
WORST_BYTES_PER_PIXEL = 35
# ... where a format's decoder needs more than the mode says (measured by a probe, 2026-12-05, 40 MP photos, +10%):
# libwebp decodes into RGBA canvases before Pillow's image (16 and 32 bytes a pixel); AVIF is not taken (below)
BYTES_PER_PIXEL_BY_FORMAT = {"WEBP": {"RGB": 18, "RGBA": 36, "RGBa": 36}}
# ... and a progressive JPEG in colour holds its whole coefficient array while it decodes: 10.04 bytes a pixel
# measured at 16 MP without chroma subsampling (a hostile probe, 2026-12-06), +10%; grey and CMYK stay in charge
PROGRESSIVE_JPEG_BYTES_PER_PIXEL = {"RGB": 12, "YCbCr": 12}
# ... and per row and per column, what decoding and resizing hold besides the pixels: 30-38 bytes were
# measured for a 10,000,000 x 1 and a 1 x 10,000,000 greyscale PNG (44 bytes per pixel in all), which the
# per-pixel cost alone let through at a sixth of their memory.
LINE_BYTES = 64

log = logging.getLogger("mlsctl.serve")


def upload_formats() -> tuple[str, ...]:
    """The image formats a photo sent to the server may have: raster formats whose header gives the size
    that is decoded (of those training reads). Not ICO, CUR or ICNS: Pillow decodes an icon's frames
    while it opens the file, and a frame may be far larger than the header says; nor GIF, whose first
    frame Pillow lays out (up to its own size, not the header's) while opening it: a 43-byte GIF
    took 171 MiB to measure. Nor TIFF: Pillow copies a tag's data once for each tag pointing at it
    while it opens the file (a 1 MB TIFF of 1,500 such tags cost 1.5 GB), and libtiff decodes a
    whole tile however small the image (a 1 MB 64x64 TIFF declaring one 32768x32768 tile took 1 GB).
    Nor AVIF: its decoder decodes the whole coded frame whatever size the header (``ispe``) gives, then
    crops it: a 1,888-byte file saying 64x64 decoded 16384x8192 pixels (+484 MB; an attacker's probe,
    2026-12-06). BMP only uncompressed (:func:`check_structure`)."""
    from mlsctl.data.images import IMAGE_FORMATS

    return tuple(f for f in ("PNG", "JPEG", "WEBP", "BMP") if f in IMAGE_FORMATS)


MAX_JPEG_SEGMENTS = 512  # before the first scan; a camera's JPEG has about 10 to 30 (APPn, DQT, DHT, SOF)
MAX_PNG_CHUNKS = 20_000  # a 20 MiB PNG in 1 KiB IDAT chunks has about 20,000; writers use 8 to 64 KiB
MAX_PNG_ANCILLARY_CHUNKS = 1_000  # chunks besides the image data (text, colour, time ...): photos have a handful
PNG_IMAGE_CHUNKS = (b"IDAT", b"fdAT", b"fcTL")  # an APNG's frames are image data too (only its first is decoded)
PNG_TEXT_BYTES = 1 << 20  # Pillow's limits on a PNG's text: one chunk, decompressed, and all of them together


def check_structure(f: BinaryIO) -> Optional[str]:
    """Why a photo's structure is refused before Pillow opens it, or None. Pillow parses a JPEG's
    segments and a PNG's chunks in Python, one at a time, keeping each: 5.2 million empty APP15
    segments (a 20 MB JPEG) took 12 s of CPU and 700 MB, and 64 PNGs of 64 zTXt chunks inflating to
    1 MB each 19 s (an attacker's probe, 2026-12-06); the decode charge counts pixels, not these."""
    head = f.read(8)
    f.seek(0)
    if head[:2] == b"\xff\xd8":
        return _jpeg_structure(f)
    if head == b"\x89PNG\r\n\x1a\n":
        return _png_structure(f)
    return None


def _jpeg_structure(f: BinaryIO) -> Optional[str]:
    """The segments before the first scan (SOS): at most MAX_JPEG_SEGMENTS."""
    import struct

    f.seek(2)
    segments = 0
    while True:
        if f.read(1) != b"\xff":
            return None  # not at a marker, or the end: Pillow says what is wrong with it
        marker, fill = f.read(1), 0
        while marker == b"\xff":  # fill bytes before a marker
            marker, fill = f.read(1), fill + 1
            if fill > 4096:
                return "a JPEG padded with thousands of fill bytes between its segments"
        if marker in (b"", b"\xda", b"\xd9"):  # the end, the first scan, the end of the image
            return None
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            return (f"a JPEG with more than {MAX_JPEG_SEGMENTS} segments before its image data (photos have about "
                    f"10 to 30)")
        if b"\xd0" <= marker <= b"\xd7" or marker == b"\x01":  # markers without a length
            continue
        length = f.read(2)
        if len(length) < 2:
            return None
        f.seek(struct.unpack(">H", length)[0] - 2, 1)


def _png_structure(f: BinaryIO) -> Optional[str]:
    """At most MAX_PNG_CHUNKS chunks, of which MAX_PNG_ANCILLARY_CHUNKS are not IDAT."""
    import struct

    f.seek(8)
    chunks = ancillary = 0
    while True:
        header = f.read(8)
        if len(header) < 8:
            return None
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return None
        chunks += 1
        ancillary += kind not in PNG_IMAGE_CHUNKS
        if chunks > MAX_PNG_CHUNKS or ancillary > MAX_PNG_ANCILLARY_CHUNKS:
            return (f"a PNG of more than {MAX_PNG_CHUNKS:,} chunks, or of more than {MAX_PNG_ANCILLARY_CHUNKS:,} "
                    f"besides its image data (photos have a handful)")
        f.seek(length + 4, 1)  # the data and its CRC


def limit_png_text() -> None:
    """Pillow's limits on a PNG's text chunks, lowered for the server's process (64 MB by default: a
    request of 64 photos could make it inflate 4 GB of zTXt)."""
    from PIL import PngImagePlugin

    PngImagePlugin.MAX_TEXT_CHUNK = PNG_TEXT_BYTES
    PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES


def jpeg_scans(f: BinaryIO, max_bytes: int) -> int:
    """How many scans (SOS markers, FF DA) a JPEG holds: in its entropy-coded data a byte FF is
    always followed by 00 or a restart marker, so every FF DA is a marker. A baseline JPEG has one
    scan for its components, a progressive one about ten; a file repeating a scan thousands of times
    decodes for minutes (each scan is a pass over the whole image). Only its first ``max_bytes`` are
    read (--max-upload-mb, which the decode charge holds already): a --root file may grow after its
    size was checked (an attacker's probe, 2026-12-07)."""
    return f.read(max_bytes).count(b"\xff\xda")


def decode_bytes(mode: str, info: dict, image_format: Optional[str] = None) -> int:
    """Bytes per pixel that decoding an image of ``mode`` (in ``image_format``) needs at its peak."""
    if mode == "P" and "transparency" in info:
        mode = "RGBA"
    by_format = BYTES_PER_PIXEL_BY_FORMAT.get(image_format or "", {})
    cost = by_format.get(mode, BYTES_PER_PIXEL.get(mode, WORST_BYTES_PER_PIXEL))
    if image_format in ("JPEG", "MPO") and (info.get("progressive") or info.get("progression")):
        cost = max(cost, PROGRESSIVE_JPEG_BYTES_PER_PIXEL.get(mode, cost))
    return cost


class RequestError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass
class Limits:
    max_upload_bytes: int = 20 * 2**20  # one photo file
    max_request_bytes: int = 64 * 2**20  # one request body
    decode_budget_bytes: int = 2**30  # decoding, all requests together

    @property
    def body_budget_bytes(self) -> int:
        """Bodies being received at once, all requests together."""
        return 4 * self.max_request_bytes

    @classmethod
    def from_mib(cls, max_upload_mb: float, max_request_mb: float, decode_budget_mb: float) -> "Limits":
        for option, value in (("--max-upload-mb", max_upload_mb), ("--max-request-mb", max_request_mb),
                              ("--decode-budget-mb", decode_budget_mb)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 2**20):
                raise UserError(f"{option} must be a number of MiB above 0 and at most {2**20:,}, got {value}")
            if int(value * 2**20) < MIN_LIMIT_BYTES:  # 1e-9 MiB was taken as a limit of 0 bytes (a probe, 2026-12-07)
                raise UserError(f"{option} {value:g} is {int(value * 2**20):,} bytes, under the least a limit may be "
                                f"(1 KiB): give {option} 0.001 or more")
        if max_upload_mb > max_request_mb:
            raise UserError(f"--max-upload-mb {max_upload_mb:g} is over --max-request-mb {max_request_mb:g}: a photo "
                            f"must fit in a request; raise --max-request-mb or lower --max-upload-mb")
        return cls(int(max_upload_mb * 2**20), int(max_request_mb * 2**20), int(decode_budget_mb * 2**20))


class Budget:
    """A count of bytes shared by threads: :meth:`hold` waits until ``amount`` fits."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, amount: int, timeout: float = WAIT_SECONDS):
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + amount <= self.total, timeout):
                raise RequestError(503, "the server is decoding too many photos at once; retry in a moment",
                                   {"Retry-After": "5"})
            self.used += amount
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= amount
                self._cond.notify_all()


@dataclass
class Photo:
    """One photo of a request: its name for messages, its size, and how to read it."""

    name: str
    size: int
    open: Callable[[], BinaryIO]
    pixels: int = 0
    cost: int = 0  # bytes of memory decoding it needs (with the file's bytes)


def _shown(name: str, limit: int = 80) -> str:
    """``name`` cut to ``limit`` characters, with characters that draw nothing or break lines escaped."""
    import unicodedata

    name = name[:limit + 1]
    out = "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in
                  ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") else c for c in name)
    return out if len(out) <= limit else out[:limit] + "..."


def _open_checked(path: Path, checked: os.stat_result, given: str, max_bytes: int):
    """``path`` opened for reading only if it is still the file checked under ``--root`` (same device
    and inode): a folder on the path swapped for a link to elsewhere between the check and the open
    would otherwise have the server read a file outside the root (left by the last session's probe).
    And only if it still has the size checked: a file grown in place (same inode) to 2 GiB after its
    check was read whole into memory by the header checks (an attacker's probe, 2026-12-07). What is
    read is bounded by that size all the same (:class:`_Bounded`), for a file that grows after this
    check. A file removed or replaced meanwhile is the client's 404 (a 500 "internal error
    (FileNotFoundError)" until 2026-12-07, an attacker's probe); one replaced by a FIFO is not waited
    on (opened without blocking, then refused as not the file checked)."""
    gone = RequestError(404, f"{_shown(given)} does not exist under the served root (it was removed or replaced "
                             f"while the request waited)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise gone from None
    except PermissionError:
        raise RequestError(403, f"{_shown(given)} cannot be read by the server (permission denied)") from None
    except OSError as exc:
        raise RequestError(400, f"{_shown(given)} cannot be read ({exc.strerror or type(exc).__name__})") from None
    opened = os.fstat(fd)
    same = (opened.st_dev, opened.st_ino) == (checked.st_dev, checked.st_ino)  # a new file may reuse the inode
    if not same or not stat.S_ISREG(opened.st_mode):
        os.close(fd)
        if stat.S_ISDIR(opened.st_mode):  # a folder opens for reading: it is no file of the root
            raise gone
        raise RequestError(409, f"{_shown(given)} changed while the request was read; send it again")
    f = open(fd, "rb")
    if opened.st_size != checked.st_size:
        f.close()
        if opened.st_size > max_bytes:
            raise RequestError(413, f"{_shown(given)} grew to {opened.st_size:,} bytes while the request was read, "
                                    f"over the limit of {max_bytes:,} per photo")
        raise RequestError(409, f"{_shown(given)} changed size while the request was read; send it again")
    return _Bounded(f, checked.st_size)


class _Bounded:
    """A file of which at most its first ``size`` bytes are read, whatever a reader asks (Pillow's
    WebP reader reads the whole file as it opens it): a --root file may grow after it was checked."""

    def __init__(self, file: BinaryIO, size: int):
        self.file, self.size = file, size

    def read(self, n: Optional[int] = -1) -> bytes:
        left = max(self.size - self.file.tell(), 0)
        return self.file.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


SERVED = ("stop the server and run this command again, or add photos through its API (POST /objects/ID/photos) "
          "and remove objects (DELETE /objects/ID)")
SERVED_READ_ONLY = "stop the server and run this command again (it serves read-only: its API changes nothing)"


class GalleryService:
    """The gallery and its model, loaded once; what the endpoints call."""

    def __init__(self, gallery_path: Path, run: "Optional[Path]" = None, root: "Optional[Path]" = None,
                 limits: Optional[Limits] = None, read_only: bool = False):
        from mlsctl.gallery import Gallery, load_set_model
        from mlsctl.locks import FolderLock

        # a read-only server holds the lock too (writers would change the gallery under its in-memory index);
        # others are told it serves, not that it writes (a new user's probe, 2026-12-06)
        # and a server never finishes: others are told to stop it, or to add through it (a new user's probe, 2026-12-07)
        self.lock_file = FolderLock(gallery_path, "gallery",
                                    doing="being served read-only" if read_only else "being served",
                                    advice=SERVED_READ_ONLY if read_only else SERVED).acquire()
        try:
            self.gallery = Gallery(gallery_path, recover=not read_only)  # a read-only server changes nothing
            # the record of removed ids, checked and kept in memory now (index info refuses a damaged one alike): a
            # probe (2026-12-07) found a damaged one served, each DELETE of an unknown id a 500 reading it again
            self.gallery.recorded_removals()
            if run is not None:
                self.gallery.check_run_kind(run)  # a model of the other kind: said before its weights load
            self.model = load_set_model(run or self.gallery.built_with_run())
            self.gallery.check_model(self.model)
            if not read_only:
                self.gallery.lookalike("")  # the look-alike keys of every stored id, made now rather than in a request
        except BaseException:
            self.lock_file.release()
            raise
        self.root = root.resolve() if root is not None else None
        self.limits = limits or Limits()
        self.read_only = read_only
        self.preprocessing = self.model.preprocessor()
        self.decode_budget = Budget(self.limits.decode_budget_bytes)
        self.index_lock = threading.Lock()
        self.model_lock = threading.Lock()  # one forward pass at a time: torch threads are shared anyway
        self.added = {"requests": 0, "photos": 0, "objects": 0}  # adds answered this session (under index_lock)
        self.removed = 0  # objects removed this session (under index_lock)

    def close(self) -> None:
        self.lock_file.release()

    # ------------------------------------------------------------------ inputs
    def _check_count(self, n: int) -> None:
        if not n:
            raise RequestError(400, "the request holds no photo: send files as 'photos' or a JSON body {\"paths\": [...]}")
        if n > MAX_PHOTOS:
            raise RequestError(413, f"{n} photos in one request; at most {MAX_PHOTOS}")

    def _check_size(self, name: str, size: int) -> None:
        if size > self.limits.max_upload_bytes:
            raise RequestError(413, f"{_shown(name)} is {size:,} bytes, over the limit of "
                                    f"{self.limits.max_upload_bytes:,} per photo")

    def uploads(self, files: Sequence[tuple[str, int, BinaryIO]]) -> list[Photo]:
        """Photos from multipart files (name, size, file object): counted and sized, nothing read."""
        self._check_count(len(files))
        photos = []
        for name, size, file in files:
            self._check_size(name, size)

            def opener(file=file):
                file.seek(0)
                return _Unclosed(file)

            photos.append(Photo(name or "upload", size, opener))
        return photos

    def paths(self, paths) -> list[Photo]:
        """Photos named by path under ``--root``: every path checked (inside the root, a file, its
        size) before any is read."""
        from mlsctl.data.images import name_problem

        if self.root is None:
            raise RequestError(403, "this server reads no paths (start it with --root DIR); upload the photos instead")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise RequestError(400, "'paths' must be a list of file paths")
        self._check_count(len(paths))
        photos = []
        for given in paths:
            if not given:  # it resolves to the root itself: said with a blank name until 2026-12-07 (a probe)
                raise RequestError(400, "'paths' holds an empty path; name a file under the served root")
            if len(given) > MAX_PATH_CHARS:
                raise RequestError(400, f"a path of {len(given):,} characters; paths have at most {MAX_PATH_CHARS}")
            problem = name_problem(given)
            if problem or "\x00" in given:
                raise RequestError(400, f"the path '{_shown(given)}' {problem or 'contains a NUL byte'}")
            try:
                path = (self.root / given).resolve()
                inside = path == self.root or self.root in path.parents
                if inside and path.is_dir():  # said as missing until 2026-12-07 (a new user's probe)
                    raise RequestError(400, f"{_shown(given)} is a folder under the served root, not an image file; "
                                            f"name its photos, one path each")
                if inside and not path.is_file():
                    raise RequestError(404, f"{_shown(given)} does not exist under the served root")
                found = path.stat() if inside else None
                size = found.st_size if found is not None else 0
            except PermissionError:  # as measure() says it of a photo it may not open (a review, 2026-12-06)
                raise RequestError(403, f"{_shown(given)} cannot be read by the server (permission denied)") from None
            except OSError as exc:
                raise RequestError(400, f"{_shown(given)} cannot be read ({exc.strerror or type(exc).__name__})") from None
            except (ValueError, RuntimeError):  # a NUL byte that slipped through, a symlink loop
                raise RequestError(400, f"{_shown(given)} is not a usable path") from None
            if not inside:
                raise RequestError(403, f"{_shown(given)} is outside the served root")
            self._check_size(given, size)
            photos.append(Photo(given, size, lambda path=path, found=found, given=given:
                                _open_checked(path, found, given, self.limits.max_upload_bytes)))
        if sum(p.size for p in photos) > self.limits.max_request_bytes:
            raise RequestError(413, f"the {len(photos)} files hold {sum(p.size for p in photos):,} bytes, over the "
                                    f"request limit of {self.limits.max_request_bytes:,}")
        return photos

    def measure(self, photos: list[Photo]) -> None:
        """Read each photo's header (nothing is decoded): its pixels and decoding memory, refused
        above the per-photo, per-request and decode-budget limits."""
        from PIL import Image, UnidentifiedImageError

        from mlsctl.data.images import DEFAULT_MAX_IMAGE_PIXELS, photo_shape_problem

        total = 0
        for photo in photos:
            if photo.size == 0:
                raise RequestError(400, f"{_shown(photo.name)} cannot be used: empty file (0 bytes)")
            try:
                with photo.open() as f:
                    refused = check_structure(f)
            except PermissionError:  # a --root path the server's user may not read: the client's to fix, no 500
                raise RequestError(403, f"{_shown(photo.name)} cannot be read by the server (permission denied)") from None
            if refused:
                raise RequestError(400, f"{_shown(photo.name)} cannot be used: {refused}")
            try:  # Pillow's warnings: filtered for the whole process at start (catch_warnings is not thread-safe)
                with photo.open() as f, Image.open(f, formats=upload_formats()) as img:
                    width, height = img.size
                    mode, info, image_format = img.mode, dict(img.info), img.format
            except RequestError:  # the file changed since it was checked (_open_checked)
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a reader raises on a malformed header is the client's
                if isinstance(exc, UnidentifiedImageError):
                    reason = f"not an image file in a format this server takes ({', '.join(upload_formats())})"
                elif isinstance(exc, Image.DecompressionBombError):  # the numbers, as the CLI gives them (a probe)
                    found = re.search(r"\((\d+) pixels\)", str(exc))
                    size = f"{int(found.group(1)):,} pixels, " if found else ""
                    raise RequestError(413, f"{_shown(photo.name)} holds {size}more than {DEFAULT_MAX_IMAGE_PIXELS:,} "
                                            f"pixels per photo (a decompression bomb, or a photo to shrink)") from None
                elif isinstance(exc, ValueError) and ("text chunks" in str(exc) or "Decompressed Data" in str(exc)):
                    reason = f"a PNG whose text is over {PNG_TEXT_BYTES // 2**20} MiB (this server's limit)"
                else:
                    reason = f"its header cannot be read ({type(exc).__name__})"
                raise RequestError(400, f"{_shown(photo.name)} cannot be used: {reason}") from None
            if image_format == "BMP" and info.get("compression", 0) not in (0, 3):  # BI_RGB, BI_BITFIELDS
                # Pillow decodes run-length BMPs in Python, without bounds: a 1.3 KB 4,000,000 x 1 RLE8 file took
                # 1.9 GB, a 39 KB one 10 s of CPU (an attacker's probe, 2026-12-06)
                raise RequestError(400, f"{_shown(photo.name)} cannot be used: a compressed (run-length) BMP; send it "
                                        f"as PNG or JPEG")
            if image_format in ("JPEG", "MPO"):  # Pillow calls a JPEG with an MPF segment of 2 images MPO
                with photo.open() as f:
                    scans = jpeg_scans(f, self.limits.max_upload_bytes)
                if scans > MAX_JPEG_SCANS:
                    raise RequestError(400, f"{_shown(photo.name)} cannot be used: a JPEG of {scans:,} scans (photos "
                                            f"have 1 to about 10; this server decodes at most {MAX_JPEG_SCANS})")
            photo.pixels = int(width) * int(height)
            if photo.pixels > DEFAULT_MAX_IMAGE_PIXELS:
                raise RequestError(413, f"{_shown(photo.name)} is {width}x{height}, more than {DEFAULT_MAX_IMAGE_PIXELS:,} "
                                        f"pixels per photo")
            photo.cost = photo.pixels * decode_bytes(mode, info, image_format) + LINE_BYTES * (int(width) + int(height)) + photo.size
            if photo.cost > self.limits.decode_budget_bytes:
                raise RequestError(413, f"{_shown(photo.name)} ({width}x{height}, {mode}) needs "
                                        f"{photo.cost / 2**20:,.0f} MiB to decode, more than this server's decode budget "
                                        f"of {self.limits.decode_budget_bytes / 2**20:,.0f} MiB (--decode-budget-mb)")
            shape = photo_shape_problem(int(width), int(height))  # a 1x1 or 100000x1 was searched with confidence
            if shape:
                raise RequestError(400, f"{_shown(photo.name)} cannot be used: {shape}")
            total += photo.pixels
        if total > MAX_REQUEST_PIXELS:
            raise RequestError(413, f"the {len(photos)} photos hold {total:,} pixels, more than {MAX_REQUEST_PIXELS:,} "
                                    f"per request; send fewer or smaller photos")

    def pixels(self, photos: list[Photo], digests: Optional[list] = None):
        """The photos decoded one at a time, each within the decode budget, and resized to the
        model's input at once: uint8 [n, 3, R, R]. ``digests`` gets the sha256 of the bytes each was decoded from
        (:func:`~mlsctl.gallery.photo_digest`): a ``--root`` file rewritten in place after :meth:`digests` read it is
        recorded as what was folded (a review, 2026-12-07)."""
        import torch

        from mlsctl.data.images import BadImage, decode_rgb
        from mlsctl.gallery import photo_digest

        out = []
        for photo in photos:
            with self.decode_budget.hold(photo.cost):
                with photo.open() as f:
                    data = f.read(self.limits.max_upload_bytes + 1)
                self._check_size(photo.name, len(data))
                if digests is not None:
                    digests.append(photo_digest(data))
                try:
                    image = decode_rgb(data, max_pixels=max(photo.pixels, 1), formats=upload_formats(), quiet=False,
                                       photo=True)
                except BadImage as exc:
                    raise RequestError(400, f"{_shown(photo.name)} cannot be used: {exc}") from None
                del data
                out.append(self.preprocessing.pixels(image))
                del image
        return torch.stack(out)

    def tokens(self, photos: list[Photo], digests: Optional[list] = None):
        """The photos checked (:meth:`measure`), decoded (:meth:`pixels`, which fills ``digests``) and embedded."""
        self._check_count(len(photos))
        self.measure(photos)
        pixels = self.pixels(photos, digests)
        with self.model_lock:
            return self.model.pixel_tokens(pixels)

    # ------------------------------------------------------------------ endpoints
    def search(self, photos: list[Photo], k: int) -> dict:
        from mlsctl.gallery import long_set_note, ranked

        started = time.perf_counter()
        cls, tokens = self.tokens(photos)
        with self.model_lock:
            latent = self.model.fold(None, cls, tokens)
        with self.index_lock:
            found = self.gallery.search(latent, k)
        note = long_set_note(self.model, len(photos), name_run=False)  # many photos (a probe); no server path
        return {"photos": len(photos), "results": ranked(found), **({"note": note[len("note: "):]} if note else {}),
                "seconds": round(time.perf_counter() - started, 4)}

    def check_id(self, object_id: str) -> None:
        from mlsctl.gallery import check_object_id

        try:
            check_object_id(object_id, "object id")
        except UserError as exc:
            raise RequestError(400, exc.message) from None

    def check_new_id(self, object_id: str) -> None:
        """An id that would create an object is held to :func:`~mlsctl.gallery.new_id_problem`: no
        whitespace at an end (400), no look-alike of a stored id (409); stored ids pass as they are."""
        with self.index_lock:
            if object_id not in self.gallery.row_of:
                try:
                    self.gallery.check_new_id(object_id)
                except UserError as exc:
                    raise _new_id_refusal(exc) from None

    def digests(self, photos: list[Photo]) -> list[bytes]:
        """The sha256 of each photo's bytes as sent (:func:`~mlsctl.gallery.photo_digest`), one photo read at a
        time: what tells a photo the object holds already (a client's retry after a lost answer)."""
        from mlsctl.gallery import photo_digest

        out = []
        for photo in photos:
            with photo.open() as f:
                data = f.read(self.limits.max_upload_bytes + 1)
            self._check_size(photo.name, len(data))
            out.append(photo_digest(data))
        return out

    def add(self, object_id: str, photos: list[Photo]) -> dict:
        """``POST /objects/{id}/photos``: the photos the object does not hold yet (by their bytes) folded in and
        committed before the answer, which counts those ``skipped`` (held already, or repeating another of the
        request); where none is new, nothing is written (a retry of an add whose answer was lost)."""
        from mlsctl.gallery import DamagedGallery, long_set_note, printable

        self.check_id(object_id)
        digests = self.digests(photos)  # none: said by tokens()
        with self.index_lock:  # only the new photos are embedded
            chosen = self._new_photos(object_id, digests) if photos else []
            if photos and not chosen:
                return self._unchanged(object_id, len(photos))
        decoded: list[bytes] = []  # the digests of the bytes embedded: what is recorded
        cls, tokens = self.tokens([photos[i] for i in chosen], decoded)

        def fold(previous, cls, tokens):
            with self.model_lock:
                return self.model.fold(previous, cls, tokens)

        with self.index_lock:
            # again under the lock, by the bytes embedded: an add of the same photos (a retry sent before the first
            # was answered) may have been committed meanwhile, and a --root file may have been rewritten
            kept = self._new_photos(object_id, decoded) if chosen else []
            if chosen and not kept:
                return self._unchanged(object_id, len(photos))
            if len(kept) < len(chosen):
                cls, tokens = cls[kept], (None if tokens is None else tokens[kept])
            folded = [decoded[j] for j in kept]
            try:  # a new id is checked again there: a look-alike may have been added meanwhile
                created, count = self.gallery.fold_into(fold, object_id, cls, tokens, len(folded), folded)
            except DamagedGallery:  # the operator's to mend, not the client's; its sentence names the server's path
                raise RequestError(500, f"the gallery's stored latent of '{printable(object_id)}' holds NaN or inf, "
                                        f"so no photo can be folded into it; the server's operator must rebuild the "
                                        f"gallery") from None
            except UserError as exc:
                raise _new_id_refusal(exc) from None
            total = len(self.gallery)
            self.added["requests"] += 1
            self.added["photos"] += len(folded)
            self.added["objects"] += created
        note = long_set_note(self.model, count, object_id, name_run=False)  # many photos (a probe); no server path
        return {"object": object_id, "created": created, "photos": count, "added": len(folded),
                "skipped": len(photos) - len(folded), "objects": total,
                **({"note": note[len("note: "):]} if note else {})}

    def _new_photos(self, object_id: str, digests: list) -> list[int]:
        """The indices of the photos ``object_id`` does not hold yet (:meth:`~mlsctl.gallery.Gallery.photos_to_fold`);
        a record of the held photos that cannot be read is the operator's to mend (503; its sentence names the
        server's path: said in the log only). The caller holds the index lock."""
        try:
            return self.gallery.photos_to_fold(object_id, digests)[0]
        except UserError as exc:
            log.error(f"an add to '{object_id}' refused: {exc}")
            raise RequestError(503, "the gallery's record of the photos it holds cannot be read, so no photo can be "
                                    "added to an object it holds; the server's operator must mend or rebuild the "
                                    "gallery") from None

    def _unchanged(self, object_id: str, skipped: int) -> dict:
        """The answer to an add whose photos the object holds every one of already: nothing written. The caller
        holds the index lock."""
        return {"object": object_id, "created": False, "photos": self.gallery.count(object_id), "added": 0,
                "skipped": skipped, "objects": len(self.gallery)}

    def get(self, object_id: str) -> dict:
        with self.index_lock:
            self._check_known(object_id)
            return {"object": object_id, "photos": self.gallery.count(object_id)}

    def remove(self, object_id: str) -> dict:
        """``DELETE /objects/{id}``: :meth:`~mlsctl.gallery.Gallery.remove` of one object, committed before the
        answer; searches after it never return the object (the index in memory is the one written)."""
        if self.read_only:  # the Guard refuses it first; never written whoever calls
            raise RequestError(403, "this server is read-only (started with --read-only): it serves searches only")
        from mlsctl.gallery import printable

        with self.index_lock:
            try:
                if object_id not in self.gallery.row_of and self.gallery.was_removed(object_id):  # as index remove
                    raise RequestError(404, f"object '{printable(object_id)}' was removed from the gallery already")
                self._check_known(object_id)
                self.gallery.remove([object_id])
            except UserError as exc:  # the gallery's, not the client's (its sentence names the server's path)
                log.error(f"a removal of '{object_id}' refused: {exc}")
                raise RequestError(503, "the gallery cannot remove objects now (damaged, or its disk refuses the "
                                        "write); the server's operator must look at its log") from None
            self.removed += 1
            return {"object": object_id, "removed": True, "objects": len(self.gallery)}

    def _check_known(self, object_id: str) -> None:
        """A 404 naming ``object_id`` where the gallery has no such object, and the stored id it reads like
        (:meth:`~mlsctl.gallery.Gallery.lookalike`). The caller holds the index lock."""
        from mlsctl.gallery import printable

        if object_id not in self.gallery.row_of:
            lookalike = self.gallery.lookalike(object_id)
            hint = f"; did you mean '{printable(lookalike)}'?" if lookalike else ""
            raise RequestError(404, f"no object '{printable(object_id)}' in the gallery{hint}")

    def summary(self) -> str:
        """What the session saved, said when the server stops. Every add was committed to the
        gallery's files before its answer was sent, so nothing is written at the end."""
        with self.index_lock:
            objects, added, removed = len(self.gallery), dict(self.added), self.removed
        path = self.gallery.path
        if self.read_only:
            return f"nothing to save: {path} was served read-only ({_count(objects, 'object')})"
        if not added["requests"] and not removed:
            return f"nothing to save: no photos were added to {path} ({_count(objects, 'object')})"
        done = []
        if added["requests"]:
            done.append(f"{_count(added['photos'], 'photo')} added this session by "
                        f"{_count(added['requests'], 'request')} ({_count(added['objects'], 'new object')})")
        if removed:
            done.append(f"{_count(removed, 'object')} removed this session")
        return (f"saved {path} with {_count(objects, 'object')}: {' and '.join(done)}, each written to disk before "
                f"it was answered")

    def health(self) -> dict:
        with self.index_lock:
            objects = len(self.gallery)
        return {"status": "ok", "gallery": self.gallery.path.name, "objects": objects,
                "model": self.model.fingerprint[:12], "set_model": self.model.kind, "index": self.gallery.settings.kind,
                "read_only": self.read_only}


def _new_id_refusal(exc: UserError) -> RequestError:
    """A new object id the gallery refuses (:meth:`~mlsctl.gallery.Gallery.check_new_id`): 409 for a
    look-alike of a stored id, 400 otherwise."""
    from mlsctl.gallery import LookalikeId

    return RequestError(409 if isinstance(exc, LookalikeId) else 400, exc.message)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


class _Unclosed:
    """A file object whose ``with`` block leaves it open (an upload is read twice: header, then data)."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self.file

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------- who may ask
@dataclass
class Policy:
    """What :class:`Guard` lets through."""

    hosts: frozenset  # Host names accepted (lower case, IPv6 without brackets)
    token: Optional[str] = None  # the bearer token; None: nothing needs one (a read-only server)
    token_everywhere: bool = False  # every request but GET /health needs it (--token-file)
    read_only: bool = False
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def for_server(cls, host: str, allow_hosts: Sequence[str] = (), **kwargs) -> "Policy":
        check_allow_hosts(allow_hosts)
        names = {_host_name(host), "localhost", "127.0.0.1", "::1"} | {_host_name(h) for h in allow_hosts}
        return cls(frozenset(n for n in names if n), **kwargs)


# a DNS name (letters, digits, hyphens inside a label; underscores, which some internal names carry), at most 253
_HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


def check_allow_hosts(allow_hosts: Sequence[str]) -> None:
    """Refuse an ``--allow-host`` that no ``Host`` header can equal: a pattern (``*``,
    ``*.example.com``, ``.example.com``) or a URL was kept as a literal name, which matched nothing,
    so the server started and refused every request through its proxy (a known issue of the
    twentieth session). Names are matched exactly, and the check cannot be turned off: it is what
    stops DNS rebinding."""
    for given in allow_hosts:
        value = given.strip()
        name = _host_name(value)
        if any(c in name for c in "*?") or name.startswith("."):
            raise UserError(f"--allow-host '{_shown(value, 60)}' is a pattern, but host names are matched exactly: "
                            f"give each name clients use, one --allow-host each (--allow-host search.example.com "
                            f"--allow-host www.example.com); no option allows every Host, since the check is what "
                            f"stops DNS rebinding")
        try:
            ipaddress.ip_address(value)  # a bare IPv6 address, whose colons split_host takes for a port's
            continue
        except ValueError:
            pass
        try:
            name = split_host(value)[0]
            if not _is_address(name) and (not _HOST_NAME.fullmatch(name) or name.replace(".", "").isdigit()):
                raise ValueError(value)  # ".", "..", "-", "a..b", "0": kept, they matched nothing (a review, 2026-12-07)
        except (ValueError, IndexError):
            raise UserError(f"--allow-host '{_shown(value, 60)}' is not a host name: give the name clients put in "
                            f"the URL, without scheme or path (search.example.com, or search.example.com:8443)"
                            ) from None


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _host_name(value: str) -> str:
    """A host name as given (``--host``, ``--allow-host``: a name, an address, with or without a port)."""
    value = value.strip().lower()
    try:
        ipaddress.ip_address(value)  # a bare IPv6 address: its colons are not a port
        return value
    except ValueError:
        pass
    try:
        return split_host(value)[0]
    except (ValueError, IndexError):
        return value.rstrip(".")


def split_host(value: str) -> tuple[str, Optional[int]]:
    """``Host`` header → (name, port or None); raises ValueError when it is not one."""
    value = value.strip()
    if value.startswith("["):
        end = value.index("]")
        name, rest = value[1:end], value[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(value)
        port = rest[1:] or None
    elif value.count(":") == 1:
        name, port = value.split(":")
    else:
        if ":" in value:
            raise ValueError(value)
        name, port = value, None
    if not name or any(c.isspace() or c in "/\\@?#" for c in name):
        raise ValueError(value)
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(value)
    return name.lower().rstrip("."), (int(port) if port else None)


def _same_origin(origin: str, host: tuple[str, Optional[int]]) -> bool:
    try:
        parts = urlsplit(origin)
        scheme, name, port = parts.scheme, (parts.hostname or "").rstrip("."), parts.port
    except ValueError:
        return False
    if scheme not in ("http", "https") or not name:
        return False
    port = port or (443 if scheme == "https" else 80)
    host_name, host_port = host
    return name == host_name and port == (host_port or (443 if scheme == "https" else 80))


def _is_write(method: str, path: str) -> bool:
    return method in ("POST", "DELETE") and path.startswith("/objects/")


class Guard:
    """The ASGI layer in front of the application: who may ask, how much they may send, and one
    log line per request (and never a traceback)."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy
        # body bytes received and held, by whether the request showed the token: a client without it cannot fill
        # what token holders (writes) receive into
        self.receiving = {False: 0, True: 0}

    def reserve(self, authenticated: bool, amount: int) -> None:
        """Count ``amount`` more body bytes against the request's allowance (503 beyond it)."""
        if self.receiving[authenticated] + amount > self.policy.limits.body_budget_bytes:
            raise RequestError(503, "the server is receiving too much at once; retry in a moment",
                               {"Retry-After": "2", "Connection": "close"})
        self.receiving[authenticated] += amount

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets: not served
            return
        state = {"status": None, "error": b"", "started": time.perf_counter()}
        # what this request holds of the body allowance, and whether its body has been read to the end
        declared = _declared_length(scope)  # None: chunked or unreadable
        body = {"received": 0, "authenticated": False, "done": declared == 0}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                state["answering"] = message["status"]
                headers = list(message.get("headers", []))
                oversized = declared is None or declared > self.policy.limits.max_request_bytes
                if not body["done"] and oversized and not any(k.lower() == b"connection" for k, _ in headers):
                    # answered before a body larger than any request may be was read (a refusal): the connection
                    # ends with the answer, so the server does not read and discard, say, a declared terabyte. A
                    # body within the limit is read and discarded as usual, so that its sender, still sending,
                    # gets the answer rather than a reset
                    message = dict(message, headers=headers + [(b"connection", b"close")])
            elif message["type"] == "http.response.body" and (state["status"] or 0) >= 400 and len(state["error"]) < 4096:
                state["error"] += message.get("body", b"")
            try:
                await send(message)
            except Exception:
                if message["type"] == "http.response.start":  # the connection cannot take an answer any more
                    state["closed"] = True
                raise
            if message["type"] == "http.response.start":  # the status the client got: logged as such
                state["status"] = message["status"]

        failure = None

        async def answer(status: int, sentence: str, headers: Optional[dict] = None) -> None:
            # a refusal may find the connection closed already: the client gone, or the HTTP server having
            # answered a malformed request itself (h11's plain 400) — nothing to send then, and no traceback
            # in the log for it (a hostile probe, 2026-12-06: one 90-byte request wrote 28 lines)
            try:
                await _answer(tracked_send, status, sentence, headers)
            except Exception:  # noqa: BLE001 - the connection cannot take an answer; the log line says so
                state["unanswered"] = f"{status} {sentence}"

        try:
            refusal, body["authenticated"] = self.refusal(scope)
            if refusal is not None:
                await answer(*refusal)
                return
            limit, length = self.body_limit(scope)
            if length is not None and length > limit:
                await answer(413, f"the request body is {length:,} bytes, over the limit of {limit:,}",
                             {"Connection": "close"})
                return
            await self.app(scope, _counted(receive, limit, self, body), tracked_send)
        except RequestError as exc:  # refused here, before the application saw the request
            if state["status"] is None:
                await answer(exc.status, exc.message, exc.headers)
        except asyncio.CancelledError:
            # the server stopped and this request outlived SHUTDOWN_SECONDS (an upload still arriving): uvicorn
            # cancels it, and answered a plain-text 500 (a new user's probe, 2026-12-06); a 503 in JSON instead,
            # and the log line says it. The cancellation ends here: the server is closing this connection anyway
            if state["status"] is None:
                await answer(503, f"the server stopped before this request was done (it had {SHUTDOWN_SECONDS:.0f} s "
                                  f"to finish); send it again once the server is back", {"Retry-After": "30",
                                                                                        "Connection": "close"})
        except Exception as exc:  # the app's 500 handler answered already; say it in one line
            if state.get("closed"):  # the app's answer found the connection closed: nothing failed in the app
                state["unanswered"] = f"{state['answering']}"
            else:
                failure = exc
                if state["status"] is None:
                    await answer(500, _client_sentence(exc))
        finally:
            if state["status"] is None and "unanswered" in state and failure is None:
                state["error"] = json.dumps({"error": f"the connection closed before the answer "
                                                      f"({state['unanswered']}) could be sent"}).encode()
            self.receiving[body["authenticated"]] -= body["received"]
            self.log_request(scope, state["status"], state["error"], failure, state["started"])

    def refusal(self, scope) -> tuple[Optional[tuple], bool]:
        """(status, sentence, headers) for a request refused before its body is read, or None; and
        whether the request showed the server's token."""
        policy = self.policy
        headers = {}
        for key, value in scope.get("headers", []):
            headers.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        hosts = headers.get("host", [])
        if len(hosts) != 1:
            return (400, "the request needs exactly one Host header", None), False
        try:
            host = split_host(hosts[0])
        except (ValueError, IndexError):
            return (400, f"the Host header '{_shown(hosts[0], 60)}' is not a host name", None), False
        if host[0] not in policy.hosts:
            return (403, f"this server does not answer to the host '{_shown(host[0], 60)}'; it answers to "
                         f"{', '.join(sorted(policy.hosts))} (add a name with --allow-host)", None), False
        method, path = scope["method"], scope["path"]
        # any method: a page on another site must not write, nor learn from a GET's outcome which objects exist
        origin = headers.get("origin", [None])[0]
        site = (headers.get("sec-fetch-site", [None])[0] or "").lower() or None
        if (origin is not None and not _same_origin(origin, host)) or site in ("cross-site", "same-site"):
            return (403, f"a request from another origin ({_shown(origin or site or '?', 60)}) may not {method} "
                         f"here; call the API from the client's own code, not from a web page", None), False
        if _is_write(method, path) and policy.read_only:
            return (403, "this server is read-only (started with --read-only): it serves searches only", None), False
        given = headers.get("authorization", [""])[0]
        scheme, _, credential = given.partition(" ")
        authenticated = policy.token is not None and scheme.lower() == "bearer" and hmac.compare_digest(
            credential.strip().encode("utf-8", "replace"), policy.token.encode())
        needs_token = policy.token is not None and (_is_write(method, path) or (
            policy.token_everywhere and not (method in ("GET", "HEAD") and path == "/health")))
        if needs_token and not given:
            what = "this server needs" if policy.token_everywhere else "writes need"
            return (401, f"{what} the server's token: send 'Authorization: Bearer TOKEN' with the token of the "
                         f"file the server named at start", {"WWW-Authenticate": "Bearer"}), False
        if needs_token and not authenticated and scheme.lower() != "bearer":  # Basic, Token: said as a wrong token
            # (a new user's probe, 2026-12-07); a scheme is named only where it is a known one: a lone token is none
            named = (f"the scheme '{scheme}'" if scheme.lower() in _AUTH_SCHEMES
                     else "a scheme other than Bearer" if credential else "no scheme")
            return (401, f"the Authorization header has {named}; send 'Authorization: Bearer TOKEN' with the token "
                         f"of the file the server named at start", {"WWW-Authenticate": "Bearer"}), False
        if needs_token and not authenticated:
            return (401, "the bearer token is wrong; send the one in the server's token file",
                    {"WWW-Authenticate": "Bearer"}), False
        unknown = _unknown_query_parameter(path, scope.get("query_string", b""))
        if unknown is not None:  # a new user's probe (2026-12-06): /search?kk=2 gave the default 10 results unsaid
            return (400, unknown, None), authenticated
        return None, authenticated

    def body_limit(self, scope) -> tuple[int, Optional[int]]:
        kind, length, chunked = None, None, False
        for key, value in scope.get("headers", []):
            if key == b"content-type":
                if kind is not None:  # the app reads the first, a limit read from the last could be the wrong one
                    raise RequestError(400, "the request has more than one Content-Type header; send one")
                kind = value.decode("latin-1").lower()
            elif key == b"content-length":
                text = value.decode("latin-1").strip()
                length = int(text) if text.isdigit() and len(text) < 20 else -1
            elif key == b"transfer-encoding":
                chunked = True
            elif key == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
                # read as it came, a gzip body was "not an image" or "not JSON" (a new user's probe, 2026-12-07)
                raise RequestError(415, f"Content-Encoding {_shown(value.decode('latin-1').strip(), 40)} is not "
                                        f"supported; send the body uncompressed")
        if length == -1:
            raise RequestError(400, "the Content-Length header is not a number")
        if chunked:  # chunk framing costs the server per chunk: a body of 1-byte chunks took 5 s of CPU a MiB
            raise RequestError(411, "send the body with a Content-Length header (chunked bodies are not taken)",
                               {"Connection": "close"})
        if length is None:
            length = 0  # HTTP/1.1: no Content-Length and no Transfer-Encoding is no body
        limit = MAX_JSON_BYTES if (kind or "").startswith("application/json") else self.policy.limits.max_request_bytes
        return limit, length

    def log_request(self, scope, status, body: bytes, failure, started: float) -> None:
        """One line: method, path (no query string), status, milliseconds; for a failed request,
        the sentence its client got (a 500: the exception's first line)."""
        line = (f"{_shown(scope.get('method', '?'), 16)} {_shown(scope.get('path', ''), 120)} {status or '-'} "
                f"{1000 * (time.perf_counter() - started):.1f}ms")
        if failure is None and status is not None and status < 400:
            log.info(line)
            return
        if failure is not None:
            first = (str(failure).strip().splitlines() or [""])[0][:200]
            message = f"internal error ({type(failure).__name__}{': ' + first if first else ''})"
        else:
            try:
                message = json.loads(body.decode("utf-8")).get("error", "")
            except (ValueError, AttributeError, UnicodeDecodeError):
                message = body[:200].decode("utf-8", "replace")
        log.warning(f"{line}: {message}")


# the query parameters each path takes; the others take none, but /health takes any (uptime checks may add a
# cache-busting one)
QUERY_PARAMETERS = {"/search": ("k",)}


def _unknown_query_parameter(path: str, query: bytes) -> Optional[str]:
    """The sentence for a query parameter ``path`` does not take (a typo would be ignored), or None."""
    from urllib.parse import parse_qsl

    if path == "/health":
        return None
    taken = QUERY_PARAMETERS.get(path, ())
    for name, _ in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if name not in taken:  # not named: the sentence is logged, and no query string is (docs/service.md)
            return (f"the request has a query parameter {path if taken else 'this endpoint'} does not take: it takes "
                    f"{'only ' + ', '.join(taken) if taken else 'none'}")
    return None


def _declared_length(scope) -> Optional[int]:
    """The request's Content-Length (0 without one), None for a chunked body or a length that is no number."""
    length = 0
    for key, value in scope.get("headers", []):
        if key == b"transfer-encoding":
            return None
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            if not (text.isdigit() and len(text) < 20):
                return None
            length = int(text)
    return length


async def _within(awaitable, seconds: float, undo: Optional[Callable[[], None]] = None):
    """``await awaitable``, or :class:`asyncio.TimeoutError` after ``seconds``: :func:`asyncio.wait_for`,
    less its loss of a cancellation on Python < 3.12 (CPython gh-86296: a cancel arriving as the awaited
    receive finished was swallowed). uvicorn's graceful shutdown cancels a request still uploading; the
    lost cancel left it reading until its body deadline, then a 408 (a quarter of 200 tries, on the
    stopped-request test: a final read of the change, 2026-12-07). ``undo`` gives back what the awaited
    call took (a semaphore's ``release``) where it was done as the wait was cancelled: the cancel is raised,
    and nothing is held for a request that will not use it; without it such a result is dropped."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        _drop(task, undo)
        raise
    if not done:
        _drop(task, undo)
        raise asyncio.TimeoutError
    return task.result()


def _drop(task: asyncio.Future, undo: Optional[Callable[[], None]]) -> None:
    """Give up ``task``, whose result nobody will take: cancelled while it runs (a semaphore's acquire
    cancelled gives back a slot it was being handed), given back by ``undo`` where it is done."""
    if not task.done():
        task.cancel()
    elif undo is not None and not task.cancelled() and task.exception() is None:
        undo()


def _counted(receive, limit: int, guard: "Guard", body: dict):
    """``receive`` that refuses a body over ``limit`` bytes while it arrives, one that does not arrive
    within :data:`BODY_SECONDS`, and one that falls behind :data:`MIN_BODY_RATE` once
    :data:`BODY_GRACE_SECONDS` have passed; each chunk is counted in ``body["received"]`` against the
    guard's allowance as it arrives (a body declared but not sent holds nothing)."""
    started = time.monotonic()

    def deadline() -> float:  # when the bytes received so far stop being enough
        return started + min(BODY_SECONDS, BODY_GRACE_SECONDS + (body["received"] + 1) / MIN_BODY_RATE)

    async def counted():
        if body["done"]:
            return await receive()
        try:
            message = await _within(receive(), max(0.01, deadline() - time.monotonic()))
        except asyncio.TimeoutError:
            slow = time.monotonic() - started < BODY_SECONDS - 0.01
            raise RequestError(408, f"the request body did not arrive within {BODY_SECONDS:.0f} s" if not slow else
                               f"the request body arrived slower than {MIN_BODY_RATE // 1024:,} KiB/s",
                               {"Connection": "close"}) from None
        if message["type"] == "http.request":
            chunk = len(message.get("body", b""))
            if body["received"] + chunk > limit:
                raise RequestError(413, f"the request body is over the limit of {limit:,} bytes",
                                   {"Connection": "close"})
            guard.reserve(body["authenticated"], chunk)
            body["received"] += chunk
            if not message.get("more_body", False):
                body["done"] = True
        return message

    return counted


async def _answer(send, status: int, message: str, headers: Optional[dict] = None) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _client_sentence(exc: BaseException) -> str:
    """A 500's sentence for the client: what happened, without the server's paths."""
    from mlsctl.errors import CAUSES, is_memory_error

    if is_memory_error(exc):
        return "the server ran out of memory for this request; send fewer or smaller photos"
    if isinstance(exc, OSError) and exc.errno in CAUSES:
        return f"the server cannot do this now ({CAUSES[exc.errno][0]}); its operator has the details in its log"
    return f"internal error ({type(exc).__name__}); the server's log has the details"


# ---------------------------------------------------------------------------------------- the app
def create_app(service: GalleryService, policy: Optional[Policy] = None, docs: bool = False):
    """The FastAPI application over one :class:`GalleryService`, behind its :class:`Guard`."""
    from fastapi import FastAPI, Request

    from mlsctl import __version__

    policy = policy or Policy.for_server("127.0.0.1", read_only=service.read_only, limits=service.limits)
    app = FastAPI(title="mlsctl gallery", version=__version__, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None,
                  redirect_slashes=False)  # /objects/X/ is a 404 sentence, not a 307 with an empty body
    _answer_errors_in_one_sentence(app)
    slots = asyncio.Semaphore(WORKING)

    @app.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what load balancers and uptime checks send
    def health():
        return service.health()

    @app.post("/search")
    async def search(request: Request, k: int = 10):
        if not 1 <= k <= 1000:
            raise RequestError(400, f"k must be between 1 and 1000, got {k}")
        async with _photos_of(service, request) as photos, _working_slot(slots):
            await _still_waited_for(request)
            return await _threaded(service.search, photos, k)

    @app.post("/objects/{object_id}/photos")
    async def add(object_id: str, request: Request):
        check_path_utf8(request.scope)
        service.check_id(object_id)  # before the body is read
        # a new id's rules, in a worker thread: they read the gallery under its lock, which a search or an add
        # may hold (on the event loop that wait stalled every request, /health included: a review, 2026-12-06)
        await _threaded(service.check_new_id, object_id)
        async with _photos_of(service, request) as photos, _working_slot(slots):
            await _still_waited_for(request)
            return await _threaded(service.add, object_id, photos)

    @app.delete("/objects/{object_id}")
    async def remove(object_id: str, request: Request):
        check_path_utf8(request.scope)
        service.check_id(object_id)
        # under the gallery's lock, which a search or an add may hold: in a worker thread, not on the event loop
        return await _threaded(service.remove, object_id)

    @app.api_route("/objects/{object_id}", methods=["GET", "HEAD"])  # HEAD: wherever GET works (was 405, a probe)
    def get(object_id: str, request: Request):
        check_path_utf8(request.scope)
        service.check_id(object_id)
        return service.get(object_id)

    limit_png_text()
    return Guard(app, policy)


@asynccontextmanager
async def _working_slot(slots: asyncio.Semaphore):
    """One of the :data:`WORKING` slots for decoding and embedding, waited for at most
    :data:`QUEUE_SECONDS` (then 503, retry). A cancel (uvicorn's shutdown) during the wait is raised even
    where the slot came in the same turn of the loop, and that slot is given back (:func:`_within`)."""
    try:
        await _within(slots.acquire(), QUEUE_SECONDS, undo=slots.release)
    except asyncio.TimeoutError:
        raise RequestError(503, f"the server is busy (all {WORKING} working slots): this request waited "
                                f"{QUEUE_SECONDS:g} s for one; retry in a few seconds",
                           {"Retry-After": "5"}) from None
    try:
        yield
    finally:
        slots.release()


async def _still_waited_for(request) -> None:
    """Before the work of a request that has its slot: a client that hung up meanwhile (its photos
    read, then waiting up to :data:`QUEUE_SECONDS` for a slot) gets none of it — no embedding for
    nobody, no photos added that their sender will never know of (499, one log line)."""
    from starlette.requests import ClientDisconnect

    if await request.is_disconnected():
        raise ClientDisconnect("before its work began (its photos read, no work done)")


@asynccontextmanager
async def _photos_of(service: GalleryService, request):
    """The photos of a request: a JSON body ``{"paths": [...]}`` under the service's ``--root``, or
    multipart files named ``photos`` (closed when the request is done)."""
    from starlette.exceptions import HTTPException

    kind = request.headers.get("content-type", "").lower()
    if kind.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the JSON body cannot be parsed") from None
        except RecursionError:
            raise RequestError(400, "the JSON body is nested too deep") from None
        if isinstance(body, dict):
            _refuse_unknown_keys("the JSON body has a key", body, "paths", request.url.path)
        if not isinstance(body, dict) or "paths" not in body:
            raise RequestError(400, "the JSON body must be {\"paths\": [...]}")
        yield service.paths(body["paths"])
        return
    if not kind.startswith("multipart/form-data"):
        raise RequestError(415, "send photos as multipart files named 'photos' (curl -F photos=@a.png), or a JSON "
                                "body {\"paths\": [...]}")
    try:
        form = await request.form(max_files=MAX_PHOTOS, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except HTTPException as exc:
        raise _form_error(str(exc.detail)) from None
    try:
        _refuse_unknown_keys("the multipart body has a field", form.keys(), "photos", request.url.path)
        files = []
        for item in form.getlist("photos"):
            if isinstance(item, str):
                raise RequestError(400, "'photos' must be files (curl -F photos=@a.png)")
            files.append((item.filename or "upload", item.size or 0, item.file))
        yield service.uploads(files)
    finally:
        await form.close()


def _refuse_unknown_keys(what: str, keys, taken: str, path: str) -> None:
    """A 400 for a body's key (a JSON key, a multipart field) other than ``taken``, as for a query
    parameter the endpoint does not take. Ignored, a typo (``{"path": ...}``) or a misplaced option
    (``{"k": 5}``) went unsaid: the request was answered as if the key were not there (a known issue
    of the twentieth session). A key is named only where it reads as a name (letters, digits, ``_.-``,
    at most 40 characters): the sentence is logged, and the log holds no other part of a body
    (docs/service.md)."""
    unknown = {key for key in keys if key != taken}
    if not unknown:
        return
    named = sorted(key for key in unknown if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,39}", key))
    first = (f"'{named[0]}'" if named else "not shown: not a plain name" if len(unknown) == 1
             else f"not shown: {len(unknown)}, none a plain name")
    more = f" and {len(unknown) - 1} more" if named and len(unknown) > 1 else ""
    hint = " (k goes in the query string: /search?k=5)" if path == "/search" and "k" in unknown else ""
    raise RequestError(400, f"{what} the API does not take ({first}{more}); it takes only '{taken}'{hint}")


def _answer_errors_in_one_sentence(app) -> None:
    """The application's error answers: ``{"error": one sentence}`` with a 4xx for what the client can
    fix (a refusal, a request that does not fit the API, an unknown route), 499 for a client gone, and a
    500 that names no path of the server."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"the request does not fit the API ({_shown(problems, 200)})"}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        method, path = request.method, request.scope.get("path", "")
        raw = request.scope.get("raw_path", b"") or b""
        if exc.status_code == 404 and path.startswith("/objects/") and b"%2f" in raw.lower():
            return JSONResponse({"error": "an object id cannot contain '/' (%2F)"}, status_code=400)
        if exc.status_code == 404 and path in ("/docs", "/redoc", "/openapi.json"):  # served with --docs only
            message = (f"no such endpoint: {method} {path}; the API's pages (/docs, /redoc, /openapi.json) are served "
                       f"when the server is started with --docs; the API is {API}")
        elif exc.status_code == 404:
            message = f"no such endpoint: {method} {_shown(path, 100)}; the API is {API}"
        elif exc.status_code == 405:
            message = f"{method} is not allowed on {_shown(path, 100)}; the API is {API}"
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def gone(_, exc: ClientDisconnect):
        return JSONResponse({"error": f"the client went away {str(exc) or 'before the request was read'}"}, status_code=499)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        return JSONResponse({"error": _client_sentence(exc)}, status_code=500)


def check_path_utf8(scope: dict) -> None:
    """The request's path, percent-decoded, is UTF-8: the server decodes it replacing what is not, so
    ids ``caf%E9`` and ``caf%E8`` (Latin-1) both became ``caf\ufffd``, one object (an attacker's probe,
    2026-12-06)."""
    from urllib.parse import unquote_to_bytes

    try:
        unquote_to_bytes(scope.get("raw_path") or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "the object id in the path is not valid UTF-8: percent-encode the UTF-8 bytes of "
                                "the id (curl and requests do)") from None


def _form_error(detail: str) -> RequestError:
    text = detail.lower()
    if "too many files" in text:
        return RequestError(413, f"more than {MAX_PHOTOS} photos in one request; at most {MAX_PHOTOS}")
    if "too many fields" in text:
        return RequestError(413, f"more than {MAX_FIELDS} form fields besides the photos")
    if "exceeded maximum size" in text:
        return RequestError(413, f"a form field that is not a file is over {MAX_FIELD_BYTES:,} bytes")
    if "boundary" in text:
        return RequestError(400, "the multipart body names no boundary (Content-Type: multipart/form-data; "
                                 "boundary=...); let the client build it (curl -F photos=@a.png)")
    return RequestError(400, f"the multipart body cannot be parsed ({_shown(detail, 100)})")


async def _threaded(fn, *args):
    """Run blocking work (decoding, a forward pass, faiss) in a worker thread so the server stays
    responsive."""
    from fastapi.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


# ---------------------------------------------------------------------------------------- starting
def resolve_host(host: str, port: int) -> list[tuple]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--host {host} does not resolve to an address of this machine ({getattr(exc, 'strerror', None) or exc}); "
                        f"give an address such as 127.0.0.1") from None
    if not found:
        raise UserError(f"--host {host} does not resolve to an address; give an address such as 127.0.0.1")
    return found


def is_loopback(addresses: list[tuple]) -> bool:
    try:
        return all(ipaddress.ip_address(a[4][0].split("%")[0]).is_loopback for a in addresses)
    except ValueError:
        return False


def bind(host: str, port: int, addresses: list[tuple]) -> socket.socket:
    family, kind, proto, _, address = addresses[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?); stop it or choose another --port",
                            exit_code=1) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"this user may not listen on port {port}; choose a port above 1023", exit_code=1) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine; give one of its addresses, e.g. "
                            f"127.0.0.1 or 0.0.0.0") from None
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", exit_code=1) from None
    return sock


def read_token_file(path: Path) -> str:
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UserError(f"--token-file {path} does not exist; write a secret into it, e.g. python -c \"import secrets; "
                        f"print(secrets.token_urlsafe(32))\" > {path}; chmod 600 {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--token-file {path} cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UserError(f"--token-file {path} can be read or written by other users or its group (mode "
                        f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 {path}")
    if len(text) < 16 or not (text.isascii() and text.isprintable()) or any(c.isspace() for c in text):
        raise UserError(f"--token-file {path} must hold one secret of at least 16 printable ASCII characters without "
                        f"spaces")
    return text


def write_token(gallery: Path) -> tuple[Path, str]:
    """A fresh token in ``GALLERY/.mlsctl.token``, mode 0600 from its creation: (its path, the token,
    as generated: never read back from a file another writer could replace meanwhile). Written into a
    temporary file renamed over it; where the write or the rename fails (a full disk, a gallery folder
    made read-only meanwhile), the temporary file is removed: it held the token, and it would block the
    next start (a known issue of the twentieth session)."""
    path = gallery / TOKEN_NAME
    token = secrets.token_urlsafe(32)
    tmp = gallery / f".{TOKEN_NAME}.{os.getpid()}.tmp"
    try:  # a new file, never one planted there (a link to another file would be overwritten)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise UserError(f"{tmp} exists; remove it (a leftover of a stopped server, or planted) and start again") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # 0600 whatever the umask took off
            os.write(fd, (token + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:  # a stop (Ctrl-C, SIGTERM) too: no copy of the token is left behind
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path, token


def serve(gallery: Path, run: Optional[Path], host: str, port: int, root: Optional[Path], max_upload_mb: float,
          say=to_stderr, *, max_request_mb: float = 64.0, decode_budget_mb: float = 1024.0, read_only: bool = False,
          token_file: Optional[Path] = None, allow_hosts: Sequence[str] = (), docs: bool = False,
          max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT) -> None:
    import uvicorn

    limits = Limits.from_mib(max_upload_mb, max_request_mb, decode_budget_mb)
    check_allow_hosts(allow_hosts)  # before the model loads, as every other option
    if root is not None and not Path(root).is_dir():  # a new user's probe (2026-12-06): every request was a 404
        raise UserError(f"--root {root} {'is not a folder' if Path(root).exists() else 'does not exist'}; give the "
                        f"folder whose photos requests may name by path, or leave --root out (uploads only)")
    addresses = resolve_host(host, port)
    if not is_loopback(addresses) and token_file is None:
        raise UserError(f"--host {host} listens beyond this machine, so anyone who reaches it could use the gallery: "
                        f"give --token-file FILE (a secret every request must send) and put TLS in front (docs/service.md)")
    token = read_token_file(token_file) if token_file is not None else None
    sock = bind(host, port, addresses)
    token_path = None
    service = None
    try:
        try:
            service = GalleryService(gallery, run, root, limits, read_only)
            if token is None and not read_only:
                # named first: a stop landing between the rename and this assignment left the token's file behind
                # (a review, 2026-12-07); one there before is a stopped server's, as this one holds the gallery's lock
                token_path = Path(gallery) / TOKEN_NAME
                token_path, token = write_token(Path(gallery))
            policy = Policy.for_server(host, allow_hosts, token=token, token_everywhere=token_file is not None,
                                       read_only=read_only, limits=limits)
            _log_to_stderr()
            _return_freed_memory()
            # photos that make Pillow warn are refused or decoded all the same; the log stays one line a request
            warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
            config = uvicorn.Config(create_app(service, policy, docs), log_level="warning", access_log=False,
                                    log_config=uvicorn_log_config(),
                                    limit_concurrency=MAX_CONNECTIONS, proxy_headers=False, server_header=False,
                                    timeout_keep_alive=5, timeout_graceful_shutdown=SHUTDOWN_SECONDS,
                                    http=head_timeout_protocol(max_connections_per_client))
            _say_serving(say, gallery, service, host, port, read_only, token_path, token_file)  # it answers next
            uvicorn.Server(config).run(sockets=[sock])
        except Terminated:  # SIGTERM (while starting, or once uvicorn has answered the requests under way): a
            pass            # service's ordinary stop
        except KeyboardInterrupt:  # Ctrl-C, the same way; exit code 130 as every interrupted command
            raise Interrupted(service.summary() if service is not None else "") from None
        say(service.summary() if service is not None else f"stopped before serving {gallery}; nothing was changed")
    finally:
        if token_path is not None:
            try:
                token_path.unlink()
            except OSError:
                pass
        if service is not None:
            service.close()
        sock.close()


def _say_serving(say, gallery, service, host: str, port: int, read_only: bool, token_path, token_file) -> None:
    """The lines a starting server says once it is about to answer: where, and how to write to it."""
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{port}"
    say(f"serving {gallery} ({len(service.gallery)} objects, model {service.model.fingerprint[:12]} on "
        f"{service.model.device}) on {base}{' read-only' if read_only else ''} — {API}")
    if token_path is not None:  # its path, never the token: this line may end up in a journal
        say(f"writes need the token in {token_path} (mode 0600, valid while this server runs): "
            f"curl -H \"Authorization: Bearer $(cat {token_path})\" -F photos=@a.png {base}/objects/ID/photos")
    elif token_file is not None:
        say(f"every request but GET /health needs the token of {token_file}: curl -H \"Authorization: Bearer "
            f"$(cat {token_file})\" -F photos=@a.png {base}/search")


def client_of(address: str) -> str:
    """The client a peer address's connections are counted under: an IPv4 address itself; an IPv6
    address its /64, the block one host or subscriber is given (counting single IPv6 addresses would
    give one attacker millions of clients); every loopback address one client, "loopback" (any local
    process may connect from any of 127.0.0.0/8)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return "loopback"
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def too_many_connections_answer(per_client: int) -> bytes:
    """The whole HTTP answer to a connection beyond ``per_client`` of one client: 503, JSON, closed."""
    body = json.dumps({"error": f"this client holds {per_client} connections to the server already, the most one "
                                f"client may; close some, or reuse them (keep-alive), and retry"}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nretry-after: 10\r\nconnection: close\r\n\r\n" % len(body)) + body


def head_timeout_protocol(per_client: int = MAX_CONNECTIONS_PER_CLIENT):
    """uvicorn's HTTP/1.1 protocol (h11), closing a connection that has not sent a whole request line
    and headers within :data:`REQUEST_HEAD_SECONDS` of opening or of its last answer (uvicorn waits for
    ever for a first request, and its keep-alive timer stops at the first byte): idle or trickling
    connections cannot hold the :data:`MAX_CONNECTIONS` slots; aborting one that has not read its
    answers for :data:`WRITE_STALL_SECONDS` (a client that pipelines requests and never reads); and
    answering a connection beyond ``per_client`` open from one client (:func:`client_of`) with a 503
    before closing it (0: no cap), so that one client cannot hold every slot. Behind a proxy every
    client has the proxy's address: the proxy's own limits apply then, and the cap is set to 0."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    open_by_address: dict[str, int] = {}  # by client_of(address); one event loop calls these methods: no lock
    refusal_logged: dict[str, float] = {}  # when each client's refusals were last logged (once a minute at most)

    class HeadTimeoutProtocol(H11Protocol):
        head_timer = None
        write_timer = None
        address = None  # the peer address this connection is counted under
        refused = False  # beyond the cap of its address: answered 503, its bytes dropped until it closes

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = client_of(str(peer[0])) if isinstance(peer, (tuple, list)) and peer else None
            if per_client and address is not None and open_by_address.get(address, 0) >= per_client:
                now = time.monotonic()
                if now - refusal_logged.get(address, -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
                    if len(refusal_logged) >= 4096:  # many clients refused: forget all, at worst a line again each
                        refusal_logged.clear()
                    refusal_logged[address] = now
                    log.warning(f"{address} holds {per_client} connections, the most one client may "
                                f"(--max-connections-per-client); its next ones get 503 until it closes some "
                                f"(said once a minute at most)")
                # answered, then a lingering close: what the client sends meanwhile is read and dropped, so the
                # close is not a reset that could discard the answer before the client reads it. It takes no
                # slot of MAX_CONNECTIONS meanwhile: refused connections opened fast must not fill them.
                self.refused = True
                self.connections.discard(self)
                try:
                    transport.write(too_many_connections_answer(per_client))
                    transport.write_eof()
                except OSError:  # the client has gone already
                    transport.abort()
                    return
                self.head_timer = self.loop.call_later(REFUSED_LINGER_SECONDS, transport.close)
                return
            if address is not None:
                self.address = address
                open_by_address[address] = open_by_address.get(address, 0) + 1
            # pause_writing (which arms the write-stall timer) whenever an answer waits in the buffer, not only
            # above 64 KiB: a client that stops reading with less pending, then is closed, would else hold its slot
            transport.set_write_buffer_limits(high=0)
            self._arm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            for timer in (self.head_timer, self.write_timer):
                if timer is not None:
                    timer.cancel()
            if self.address is not None:
                left = open_by_address.pop(self.address) - 1
                if left:
                    open_by_address[self.address] = left
                self.address = None
            super().connection_lost(exc)

        def pause_writing(self) -> None:  # the client stopped reading what it asked for
            super().pause_writing()
            if self.write_timer is None:
                self.write_timer = self.loop.call_later(WRITE_STALL_SECONDS, self._abort_stalled)

        def resume_writing(self) -> None:
            if self.write_timer is not None:
                self.write_timer.cancel()
                self.write_timer = None
            super().resume_writing()

        def _abort_stalled(self) -> None:
            self.write_timer = None
            self.transport.abort()  # its answers cannot be delivered: drop them and free the slot

        def _arm_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(REQUEST_HEAD_SECONDS, self._close_without_request)

        def _close_without_request(self) -> None:
            self.head_timer = None
            if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
                return  # a request is under way: its body has its own deadline
            try:
                self.conn.send(h11.ConnectionClosed())
            except h11.LocalProtocolError:  # half a request line received: nothing to say, only close
                pass
            self.transport.close()

    return HeadTimeoutProtocol


def _return_freed_memory() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own, so that the memory of a decoded
    photo goes back to the system when it is freed, whatever thread decoded it (otherwise each
    thread's arena keeps its largest decode, and the server's size creeps up to threads × photo)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * 2**20)
    except (OSError, AttributeError):  # not glibc: the budget still bounds what is decoded at once
        pass


class OneLineFormatter(logging.Formatter):
    """The service's log line: ``2026-12-06 17:40:01 message``, one line whatever it says (an
    exception as its type and first line, never a traceback)."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            from mlsctl.errors import first_line

            message += f" ({type(record.exc_info[1]).__name__}: {first_line(record.exc_info[1])})"
        return f"{self.formatTime(record, self.datefmt)} {' '.join(message.splitlines())}"


class LibraryWords(logging.Filter):
    """uvicorn's and python-multipart's warnings as the service says things: what happened and how it
    was answered. uvicorn's advice to install a WebSocket library is dropped (the service has no
    WebSocket route: a client asking for one is answered as plain HTTP)."""

    SAID = {"Invalid HTTP request received.": "a request that is not valid HTTP was answered 400",
            "Unsupported upgrade request.": "a request to upgrade its connection (a WebSocket?) was answered as plain "
                                            "HTTP: the service has no WebSocket route"}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("No supported WebSocket library detected"):
            return False
        if record.name.startswith(("python_multipart", "multipart")):
            message = f"a multipart body: {message}"
        if message in self.SAID:  # said in full: h11's own exception adds nothing for the operator
            message, record.exc_info, record.exc_text = self.SAID[message], None, None
        record.msg, record.args = message, None
        return True


def uvicorn_log_config() -> dict:
    """logging.config's dictionary for uvicorn: its warnings and python-multipart's on stderr in the
    service's one-line format (:class:`OneLineFormatter`, :class:`LibraryWords`); no access log."""
    handler = {"class": "logging.StreamHandler", "formatter": "line", "stream": "ext://sys.stderr",
               "filters": ["words"]}
    quiet = {"handlers": ["stderr"], "level": "WARNING", "propagate": False}
    return {"version": 1, "disable_existing_loggers": False,
            "filters": {"words": {"()": LibraryWords}}, "formatters": {"line": {"()": OneLineFormatter}},
            "handlers": {"stderr": handler},
            "loggers": {"uvicorn": quiet, "uvicorn.error": {"level": "WARNING"},
                        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                        "python_multipart": quiet, "multipart": quiet}}


def _log_to_stderr() -> None:
    import sys

    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
