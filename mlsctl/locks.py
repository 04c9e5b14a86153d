"""One writer per folder: an exclusive lock on the run, feature or gallery folder a command writes.

:class:`FolderLock` takes ``flock`` on ``FOLDER/.mlsctl.lock`` and writes who holds it (process id,
host, command, start time) into the file. A second writer is refused with one sentence naming the
holder. The kernel releases the lock when its process ends however it ends (even SIGKILL), so a
lock left by a dead process is simply taken over by the next command: there is no stale lock to
delete by hand. The lock file is removed when the lock is released; a folder the lock had to create
is removed again if it is still empty (a refused or failed command leaves no trace).

A folder that is replaced whole (a data build swaps a new folder in) is locked from beside it:
``FolderLock(folder, beside=True)`` takes ``.NAME.mlsctl.lock`` next to the folder. A folder written
in place by one command and replaced whole by another (``embed`` resumes a feature folder part by
part, ``refine apply`` swaps one in) is locked in both places by the first (``also_beside``), so the
two exclude each other.

Readers (``bank inspect``, ``embed --run`` of a running run, ``search``) take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mlsctl.errors import UserError

LOCK_NAME = ".mlsctl.lock"
_HELD_FDS: set[int] = set()  # the lock files this process holds open


def close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close its copies of the parent's lock files. An
    ``flock`` lasts while any copy of its file is open, so without this the workers of a run killed
    with SIGKILL would hold the run's lock until they notice their parent is gone."""
    for fd in list(_HELD_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_FDS.clear()


class FolderLock:
    """``beside``: the lock file is ``.NAME.mlsctl.lock`` next to the folder, not in it, for a folder
    that is replaced whole (a data build swaps a new folder in: a lock inside would go with the old)."""

    def __init__(self, folder: str | os.PathLike, what: str = "folder", *, beside: bool = False,
                 doing: str = "being written", also_beside: bool = False, advice: str | None = None):
        self.folder = Path(folder)
        #: the lock beside the folder, taken first, of a lock inside it that also excludes the commands
        #: that replace the folder whole (a review, 2026-12-07: embed and refine apply into one --out)
        self._beside = FolderLock(folder, what, beside=True, doing=doing) if also_beside and not beside else None
        self.what = what
        self.doing = doing  # what another command is told the holder does ("being served read-only")
        #: what another command is told to do instead of waiting for the holder to finish (a server never does)
        self.advice = advice
        if beside:  # beside where the folder really is: "--out ." (no name) and a link to it lock one file (a review)
            real = Path(os.path.realpath(self.folder))
            self.path = real.parent / f".{real.name}{LOCK_NAME}"
        else:
            self.path = self.folder / LOCK_NAME
        self.created_folder = False
        self._created: list[Path] = []  # the folders acquire made, innermost first
        self._fd: int | None = None

    def acquire(self) -> "FolderLock":
        if self._beside is None:
            return self._acquire()
        try:
            self._beside.acquire()
        except OSError as exc:  # a parent this user cannot write (a bind mount's /): nothing can swap a folder in
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):  # there either, so the lock inside is
                raise  # the whole story (a review, 2026-12-07)
            self._beside = None
            return self._acquire()
        try:
            return self._acquire()
        except BaseException:
            self._beside.release()
            raise

    def _acquire(self) -> "FolderLock":
        home = self.path.parent
        if not home.exists():
            missing = [home, *(p for p in home.parents if not p.exists())]
            home.mkdir(parents=True)
            self.created_folder, self._created = True, missing
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder, doing, advice = self._holder(fd)
                os.close(fd)
                self._remove_created_folder()
                raise UserError(f"{self.what} {self.folder} is {doing} by {holder}; "
                                f"{advice or 'wait for it to finish or stop it, then run this command again'}",
                                exit_code=1) from None
            # The holder before us may have removed the file after we opened it: lock the file that is there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        program = "mlsctl" if Path(sys.argv[0]).name in ("mlsctl", "__main__.py") else sys.argv[0]
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join([program, *sys.argv[1:]]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "doing": self.doing}
        if self.advice:
            record["advice"] = self.advice
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(record) + "\n").encode())
        except OSError as exc:  # a full disk: leave no lock file, and no folder this call made (a probe, 2026-12-06)
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(fd)
            self._remove_created_folder()
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._fd = fd
        _HELD_FDS.add(fd)
        return self

    @staticmethod
    def _holder(fd: int) -> tuple[str, str, str | None]:
        """(who holds the lock, what it does: "being written" unless its record says otherwise, what to do
        about it where its record says: None for "wait for it to finish or stop it")."""
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            record = json.loads(os.read(fd, 65536).decode() or "{}")
            doing = record.get("doing") if isinstance(record.get("doing"), str) else "being written"
            advice = record.get("advice") if isinstance(record.get("advice"), str) else None
            return (f"process {record['pid']} on {record['host']} (`{record['command']}`, started "
                    f"{record['started']})"), doing, advice
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return "another process", "being written", None

    def release(self) -> None:
        self._release()
        if self._beside is not None:
            self._beside.release()

    def _release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self._fd)
        _HELD_FDS.discard(self._fd)
        self._fd = None
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        """The folders acquire made (--out and parents it had to make), each only when empty."""
        if self.created_folder:
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:
                    break

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def process_alive(pid: int) -> bool:
    """A process of this id runs on this machine (one of another user's counts too): whether a
    temporary folder named after it (``.NAME.building-PID``, ``.NAME.export-tmp-PID``) may be removed."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (a number no process id can be)
        return False
    except PermissionError:
        return True
    return True


def abandoned_temporary(name: str, prefix: str) -> bool:
    """A temporary folder ``PREFIX-HOST-PID`` (or an older ``PREFIX-PID`` or ``PREFIX``) was made on this
    machine by a process that is gone: it may be removed. Another machine's (a shared file system) is
    never taken for abandoned."""
    rest = name[len(prefix):].lstrip("-")
    host, _, pid = rest.rpartition("-")
    if not pid.isdigit():
        return True  # an older mlsctl's shared name: nobody's now
    if host and host != socket.gethostname():
        return False
    return not process_alive(int(pid))
