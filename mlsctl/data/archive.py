"""A folder or an archive read in place: one read-only tree of files for the dataset readers.

:func:`open_tree` takes a folder, a ``.tar`` (also ``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``)
or a ``.zip``; a :class:`Tree` lists its files as POSIX paths relative to its top and reads a
file's bytes without extracting anything to disk. An archive's member names are taken as stored
(a leading ``./`` dropped), so a folder and the archive made from it with
``tar -cf data.tar -C folder .`` (or ``-C parent folder``) list the same paths, give the same
bytes, and so the same features and scores.

The archive's table of contents is read once per process (a tree travels to DataLoader workers as
its path and reopens there). Uncompressed ``.tar`` and ``.zip`` members are read by seeking to
them; a compressed tar is readable but every read decompresses from the start of the stream, so
use plain ``.tar`` for anything large.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

from mlsctl.errors import UserError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.strip("/")


class Tree:
    """Files under a folder or inside an archive, addressed by relative POSIX path."""

    kind = "folder"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def files(self, under: str = "") -> list[str]:
        """Every file below ``under`` (relative to the top), sorted."""
        base = self.path / under if under else self.path
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.path).as_posix() for p in base.rglob("*") if p.is_file())

    def is_file(self, relpath: str) -> bool:
        return (self.path / relpath).is_file()

    def is_dir(self, relpath: str) -> bool:
        return (self.path / relpath).is_dir() if relpath else self.path.is_dir()

    def top(self) -> tuple[list[str], list[str]]:
        """(folders, files) at the top of the tree, sorted."""
        entries = sorted(self.path.iterdir()) if self.path.is_dir() else []
        return [e.name for e in entries if e.is_dir()], [e.name for e in entries if not e.is_dir()]

    def read_bytes(self, relpath: str) -> bytes:
        try:
            return (self.path / relpath).read_bytes()
        except FileNotFoundError:
            raise UserError(f"{self.path / relpath} does not exist") from None

    def location(self, relpath: str) -> str:
        """How a message names one file of the tree."""
        return str(self.path / relpath)

    def load_rgb(self, relpath: str, max_pixels: Optional[int] = None, raise_with: str = ""):
        """One image of the tree decoded to 8-bit RGB (:func:`mlsctl.data.images.load_rgb`), refused
        above ``max_pixels`` (None: the default limit); a file that is not a decodable image raises
        :class:`~mlsctl.data.images.BadImage` (naming ``raise_with`` for a larger one, if given)."""
        from mlsctl.data.images import DEFAULT_MAX_IMAGE_PIXELS, decode_rgb, load_rgb

        limit = DEFAULT_MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
        if self.kind == "folder":
            return load_rgb(self.path / relpath, limit, raise_with)
        return decode_rgb(self.read_bytes(relpath), limit, raise_with=raise_with)

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class _ArchiveTree(Tree):
    """The common part of tar and zip trees: an index of member names, built on first use."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._handle = None
        self._handle_pid: Optional[int] = None
        self._members: Optional[dict[str, object]] = None
        self._dirs: Optional[set[str]] = None

    def _own_handle(self) -> bool:
        """Whether this process opened the open handle. A data-loading worker forked after the
        parent read the index inherits the parent's handle, whose file offset every process shares:
        one worker's seek between another's seek and read made 252 of 2,000 reads of a tar return
        another member's bytes (4 workers, measured 2026-12-05). Each process opens its own."""
        return self._handle is not None and self._handle_pid == os.getpid()

    def _index(self) -> dict[str, object]:
        if self._members is None:
            self._members = self._read_index()
            dirs = {""}
            for name in self._members:
                parent = PurePosixPath(name).parent
                while str(parent) not in dirs and str(parent) != ".":
                    dirs.add(str(parent))
                    parent = parent.parent
            self._dirs = dirs
        return self._members

    def _read_index(self) -> dict[str, object]:
        raise NotImplementedError

    def files(self, under: str = "") -> list[str]:
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        return sorted(n for n in self._index() if n.startswith(prefix))

    def is_file(self, relpath: str) -> bool:
        return _member_name(relpath) in self._index()

    def is_dir(self, relpath: str) -> bool:
        self._index()
        return _member_name(relpath) in self._dirs

    def location(self, relpath: str) -> str:
        return f"{self.path}:{relpath}"

    def top(self) -> tuple[list[str], list[str]]:
        members = self._index()
        return sorted(d for d in self._dirs if d and "/" not in d), sorted(n for n in members if "/" not in n)

    def _member(self, relpath: str):
        member = self._index().get(_member_name(relpath))
        if member is None:
            raise UserError(f"{self.path} holds no file {relpath}")
        return member


class TarTree(_ArchiveTree):
    kind = "tar"

    def _open(self) -> tarfile.TarFile:
        if not self._own_handle():
            try:
                self._handle, self._handle_pid = tarfile.open(self.path, "r:*"), os.getpid()
            except (tarfile.TarError, OSError) as exc:
                raise UserError(f"cannot read the archive {self.path} ({exc}); give an intact .tar or .zip, "
                                f"or the extracted folder") from None
        return self._handle

    def _read_index(self) -> dict[str, object]:
        try:
            return {_member_name(m.name): m for m in self._open().getmembers() if m.isfile()}
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"cannot list the archive {self.path} ({exc}); it is damaged or truncated") from None

    def read_bytes(self, relpath: str) -> bytes:
        member = self._member(relpath)
        try:
            return self._open().extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise UserError(f"cannot read {relpath} from {self.path} ({exc}); the archive is damaged") from None


class ZipTree(_ArchiveTree):
    kind = "zip"

    def _open(self) -> zipfile.ZipFile:
        if not self._own_handle():
            try:
                self._handle, self._handle_pid = zipfile.ZipFile(self.path), os.getpid()
            except (zipfile.BadZipFile, OSError) as exc:
                raise UserError(f"cannot read the archive {self.path} ({exc}); give an intact .zip or .tar, "
                                f"or the extracted folder") from None
        return self._handle

    def _read_index(self) -> dict[str, object]:
        return {_member_name(info.filename): info for info in self._open().infolist() if not info.is_dir()}

    def read_bytes(self, relpath: str) -> bytes:
        member = self._member(relpath)
        try:
            return self._open().read(member)
        except (zipfile.BadZipFile, OSError) as exc:
            raise UserError(f"cannot read {relpath} from {self.path} ({exc}); the archive is damaged") from None


def open_tree(path: str | os.PathLike, what: str = "--root") -> Tree:
    """The tree of a folder or of a .tar/.zip archive; anything else is one sentence."""
    path = Path(path)
    if path.is_dir():
        return Tree(path)
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    name = path.name.lower()
    if name.endswith(".zip"):
        return ZipTree(path)
    if any(name.endswith(s) for s in TAR_SUFFIXES):
        return TarTree(path)
    raise UserError(f"{what} {path} is a file but not a .tar or .zip archive; give the dataset folder or its archive")
