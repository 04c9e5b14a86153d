"""Atomic output: write to a temporary sibling, flush to disk, then rename over the target.

A reader (or a run resumed after SIGKILL) therefore sees either the old file or the complete new
one, never a torn write; whole folders (an export, a data build, refined features, a checkpoint)
are put in place by :func:`swap_folder`, in one step where the system can exchange two paths. When a library writer fails without saying why (torch's C++ stream says
``basic_ios::clear: iostream error``, safetensors its own error), :func:`explain_write_failure`
finds the cause — a full disk or the process's file-size limit — and raises it as the
:class:`OSError` it is, with the target's path, so the CLI can say it in one sentence.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional


def fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a file system that cannot is let be."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def usual_permissions(path: str | os.PathLike) -> None:
    """The mode a file created by ``open`` gets (0666 less the umask): outputs written through a
    temporary file (mkstemp: 0600) or by a library that makes its own 0600 (safetensors)."""
    os.chmod(path, 0o666 & ~_UMASK)


def _about(exc: OSError, target: Path) -> OSError:
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(target))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``target`` on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:  # a read-only or full folder: the user's path, not the temporary name
        raise _about(exc, target) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
        except OSError as exc:
            # a writer's own error names no file, or the temporary one: name the target (a probe, 2026-12-06)
            if exc.errno is not None and exc.filename in (None, str(tmp_path), tmp_path):
                raise _about(exc, target) from exc
            raise
        except Exception as exc:
            explain_write_failure(exc, tmp_path, target)
            raise
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        usual_permissions(tmp_path)  # mkstemp makes 0600
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


# Below this many free bytes a failed write is blamed on a full disk.
_NEARLY_FULL = 4 * 2**20


def explain_write_failure(exc: BaseException, written: str | os.PathLike, target: str | os.PathLike) -> None:
    """Raise the :class:`OSError` behind a writer's opaque failure to write ``written`` (destined
    for ``target``): a full disk or the file-size limit (``ulimit -f``). Returns when neither
    explains it (the caller re-raises the original error)."""
    if isinstance(exc, OSError):
        return
    written, target = Path(written), Path(target)
    quoted = re.search(r"\(os error (\d+)\)", str(exc))  # a Rust library's io::Error (safetensors)
    if quoted and int(quoted.group(1)) in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        number = int(quoted.group(1))
        raise OSError(number, os.strerror(number), str(target)) from exc
    try:
        size = written.stat().st_size if written.exists() else 0
    except OSError:
        size = 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size >= limit - 65536:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), str(target)) from exc
    try:
        stats = os.statvfs(written.parent if written.parent.exists() else target.parent)
    except OSError:
        return
    if stats.f_bavail * stats.f_frsize < _NEARLY_FULL:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(target: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomic output for libraries that write to a path themselves (safetensors, torch.save, PIL)."""
    with atomic_path(target) as tmp:
        writer(tmp)


# ------------------------------------------------------------------------------------------ whole folders
def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def followed(out: str | os.PathLike, flag: str = "--out") -> Path:
    """``out``, or the folder it links to where it is a symbolic link (a folder written in place of a
    link is written where the link points, and the link kept); a link that cannot be followed (a loop)
    is one sentence."""
    from mlsctl.errors import UserError

    out = Path(out)
    if not out.is_symlink():
        return out
    try:
        return out.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError
        raise UserError(f"{flag} {out} is a symbolic link that cannot be followed ({type(exc).__name__}: a loop?); "
                        f"give a folder") from None


#: What a tool writes in a folder it replaces whole, for :func:`refuse_others`: each key a regular expression
#: a whole name matches, its value ``None`` for a regular file or the layout of a folder (checked in turn).
Layout = Mapping[str, Optional["Layout"]]

# atomic_path's temporary name (mkstemp: 8 characters of [a-z0-9_]) of a file the layout names: the
# leftover of a write killed there, the tool's own
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
_UNKNOWN = object()
# What file browsers leave in a folder they showed: macOS Finder's .DS_Store, Windows Explorer's Thumbs.db and
# desktop.ini, KDE Dolphin's .directory
_LITTER = re.compile(r"\.DS_Store|Thumbs\.db|desktop\.ini|\.directory")
# and the AppleDouble files macOS writes on disks that are not Apple's: ``._`` and the name of the file each
# describes, which may be anything (``._`` + ``_x`` is ``.__x``), so the name cannot tell one from a user's hidden
# file: its header does, the magic number 0x00051607 and version 2 (RFC 1740)
APPLE_DOUBLE_HEADER = b"\x00\x05\x16\x07\x00\x02\x00\x00"


def open_regular(path: str | os.PathLike) -> Optional[BinaryIO]:
    """``path`` opened for reading where it is a regular file, None where it is a FIFO or a device: opened without
    waiting (a FIFO named like a photo or a result hung a plain open for good: probes, 2026-12-08), then checked on
    the file opened, so a FIFO swapped in after a check cannot hang it (a device is never read, having no end). A
    folder raises :class:`IsADirectoryError`, as ``open`` does; the file system's refusals are raised as they are."""
    handle = os.fdopen(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    mode = os.fstat(handle.fileno()).st_mode
    if stat.S_ISREG(mode):
        return handle
    handle.close()
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
    return None


def is_litter_file(entry: Path) -> bool:
    """Whether ``entry`` is a file browser's litter, which goes with a folder its tool replaces as if the tool
    had written it (a folder looked at in Finder was refused by every --overwrite: a user cannot see a
    .DS_Store to move it out, and nothing of theirs is in it): a regular file (not a link) named exactly
    .DS_Store, Thumbs.db, desktop.ini or .directory, or ``._NAME`` beginning with AppleDouble's header
    (:data:`APPLE_DOUBLE_HEADER`; a user's ``.__x`` or ``._notes`` was litter by its name: a helper's
    finding, 2026-12-07). Anything else may be the user's and is refused."""
    name = entry.name
    apple_double = name.startswith("._") and len(name) > 2
    if not (apple_double or _LITTER.fullmatch(name)) or entry.is_symlink() or not entry.is_file():
        return False
    return not apple_double or _begins_with(entry, APPLE_DOUBLE_HEADER)


def _begins_with(path: Path, header: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(header)) == header
    except OSError:  # unreadable: what it holds cannot be vouched for
        return False


def holds_anything(folder: Path, besides: tuple[str, ...] = ()) -> bool:
    """Whether ``folder`` holds an entry other than the names ``besides`` and a file browser's litter
    (:func:`is_litter_file`): a folder looked at in Finder, with only its .DS_Store, counts as empty where a
    command wants a new or an empty one (a helper's finding, 2026-12-07)."""
    return any(entry.name not in besides and not is_litter_file(entry) for entry in folder.iterdir())


def _rule(layout: Layout, name: str):
    for pattern, inner in layout.items():
        if re.fullmatch(pattern, name):
            return inner
    return _UNKNOWN


def foreign_entries(out: Path, layout: Layout, limit: int = 4) -> list[str]:
    """The first ``limit`` entries anywhere under ``out`` (in name order, paths relative to ``out``, a
    folder's with a trailing ``/``) that ``layout`` does not describe: other names, hidden ones
    included, a folder where a file belongs or the reverse, links and other special files, and a
    folder that cannot be read (what is in it cannot be vouched for). The tools' own names are not
    foreign: ``.mlsctl.lock`` at the top (a lock taken inside), the temporary file of an atomic write
    of a file the layout names, and a file browser's litter anywhere (:func:`is_litter_file`: deleted with
    the folder). Only names are read (``scandir``), not contents (but the first 8 bytes of a ``._NAME``
    file, which tell AppleDouble litter from a user's hidden file): cheap for large folders; a foreign
    folder is named, not entered."""
    from mlsctl.locks import LOCK_NAME

    found: list[str] = []

    def walk(folder: Path, rules: Layout, prefix: str) -> None:
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError:  # what is in it cannot be vouched for
            found.append(f"{prefix or './'} (unreadable)")
            return
        for entry in entries:
            if len(found) >= limit:
                return
            name = entry.name
            try:
                kind = ("link" if entry.is_symlink() else "dir" if entry.is_dir(follow_symlinks=False)
                        else "file" if entry.is_file(follow_symlinks=False) else "other")
            except OSError:
                kind = "other"
            shown = prefix + name + ("/" if kind == "dir" else "")
            inner = _rule(rules, name)
            if inner is _UNKNOWN:
                temporary = _TEMPORARY.fullmatch(name)
                own = (kind == "file" and ((not prefix and name == LOCK_NAME) or is_litter_file(Path(entry.path)) or (
                    temporary is not None and _rule(rules, temporary["target"]) is None)))
                if not own:
                    found.append(shown)
            elif inner is None:
                if kind != "file":
                    found.append(shown)
            elif kind != "dir":
                found.append(shown)
            else:
                walk(Path(entry.path), inner, shown)

    walk(out, layout, "")
    return found


def refuse_others(out: Path, layout: Layout, named: str, besides: str) -> None:
    """Before ``--overwrite`` swaps a whole new folder in for ``out``: one sentence naming the first
    entries anywhere under ``out`` that ``layout`` (what its owner writes) does not describe
    (:func:`foreign_entries`: hidden ones too), which would go with it (a new user, 2026-12-06: a
    features/ folder and notes kept in a data build were deleted; a new user's probe, 2026-12-07: so
    were a hidden ``.git/``, a folder inside a split and a stray image among the images).
    ``named``: how the message names ``out``; ``besides``: what the entries are besides, as a clause."""
    from mlsctl.errors import UserError

    others = foreign_entries(out, layout)
    if others:
        shown = (f"{', '.join(others[:3])} and more" if len(others) > 3
                 else others[0] if len(others) == 1 else f"{', '.join(others[:-1])} and {others[-1]}")
        raise UserError(f"{named} holds {shown}{besides}; "
                        f"--overwrite replaces the whole folder, so move {'them' if len(others) > 1 else 'it'} out first")


def aside_of(out: Path) -> Path:
    """Where :func:`swap_folder` puts ``out`` for a moment where the system cannot exchange two paths."""
    return out.parent / f".{out.name}.swap-old"


def swap_folder(new: str | os.PathLike, out: str | os.PathLike) -> None:
    """Put the finished folder ``new`` where ``out`` is, in one step: the two are exchanged atomically
    and the old one (now at ``new``) removed, so a reader of ``out`` sees the old folder or the new
    one, and a kill at any moment loses neither. Where an exchange is impossible (not Linux), ``out``
    is renamed aside first; a kill between the two renames is undone by :func:`recover_swap`, which
    whoever writes ``out`` calls before it starts."""
    new, out = Path(new), Path(out)
    if out.is_symlink():  # exchanged, the link would move aside and the new folder land beside its target
        raise ValueError(f"{out} is a symbolic link: swap into the folder it points to")
    if not out.exists():
        os.replace(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)
    else:
        os.replace(out, aside_of(out))
        os.replace(new, out)
        shutil.rmtree(aside_of(out), ignore_errors=True)
    fsync_dir(out.parent)


def recover_swap(out: str | os.PathLike) -> None:
    """Undo what an interrupted :func:`swap_folder` left: the old folder renamed aside goes back to
    ``out`` when ``out`` is missing, and is removed otherwise."""
    out = Path(out)
    aside = aside_of(out)
    if aside.is_dir() and not aside.is_symlink():
        if not out.exists():
            os.replace(aside, out)
        else:
            shutil.rmtree(aside, ignore_errors=True)
