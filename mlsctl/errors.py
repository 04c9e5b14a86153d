"""Errors a user sees: one sentence each, never a traceback (unless ``--debug``).

* :class:`UserError` carries one sentence that names the file or key at fault and the fix. The
  CLI prints it and exits with ``exit_code`` (2 for usage errors, 1 for failures of a well-formed
  request).
* :class:`Interrupted` is what a command raises after Ctrl-C once it has said what was saved and
  how to continue; the CLI prints it and exits with 130.
* :func:`describe_environment_error` turns what the machine throws at a command — a full disk, a
  read-only or forbidden folder, a file too large for the process's limit, exhausted memory —
  into one sentence naming the path and the cause (``None`` for anything else).
  :func:`environment_exit_code` is its exit code: 2 where the path given is the mistake (a file where
  a folder must be), 1 for the machine's failures.
* :func:`first_line` is what such a sentence quotes from a library's exception.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Optional


class UserError(Exception):
    """``resumable``: the machine's failure, not the request's (a killed loader worker, a full
    ``/dev/shm``), after which a run continues with ``--resume`` once it is fixed."""

    def __init__(self, message: str, exit_code: int = 2, resumable: bool = False):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.resumable = resumable

    def __str__(self) -> str:
        return self.message


class TooLittleData(UserError):
    """The data hold too few items (or classes) for one batch: where a method has a note on its data
    (a data set's root given as ``data.root``), the note may say why, and goes with this error only."""


class UnreadableWeights(UserError):
    """A weights file that exists but cannot be read (truncated, foreign): ``path`` and the reader's
    ``reason``, so a caller who knows where the file came from can say the way round it (a run's
    damaged teacher: the checkpoint it was copied from) instead of trimming this sentence."""

    def __init__(self, path, reason: str, expected: str = ".safetensors/.pth"):
        super().__init__(f"cannot read weights from {path} ({reason}); is it a complete {expected} file?")
        self.path, self.reason = path, reason


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, a scheduler, ``kill``): stops a command as Ctrl-C does; a server,
    for which it is the ordinary way to stop, ends normally on it (exit code 0)."""


class Interrupted(UserError):
    """Ctrl-C, after the command has said what it saved and how to continue (exit code 130)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=130)


def annotate(exc: BaseException, *, resume_hint: Optional[str] = None, run_log: Optional[str] = None) -> None:
    """What the CLI adds to the last line it prints for ``exc``: ``resume_hint`` (a run stopped by
    the machine after a checkpoint: the command that continues it), and ``run_log`` (a run's
    ``train.log``, which gets the same line: a launcher killed outright takes the terminal's copy
    with it)."""
    for name, value in (("mlsctl_resume_hint", resume_hint), ("mlsctl_run_log", run_log)):
        if value is not None:
            try:
                setattr(exc, name, value)
            except (AttributeError, TypeError):  # an exception type without attributes of its own
                pass


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters: its type's name where the message
    is empty (for the "(…)" that our one-sentence errors quote from a library's exception). A longer line
    ends with the last whole sentence that fits, or is cut at a word with "…" (a new user's probe,
    2026-12-06: torch's "... there is a high likelihood that your checkpoint file is" ended mid-sentence)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if len(line) <= limit:
        return line
    cut = line[:limit]
    sentence = cut.rfind(". ")
    if sentence >= limit // 2:  # a sentence that keeps most of the line ("e.g. " early on is no sentence's end)
        return cut[:sentence + 1]
    return cut[:cut.rfind(" ")].rstrip(" ,;:") + "…" if " " in cut else cut


# errno → (what happened, what to do)
CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free some space or write somewhere else"),
    errno.EDQUOT: ("the disk quota is exhausted", "free some space or write somewhere else"),
    errno.EROFS: ("the file system is read-only", "write somewhere else"),
    errno.EACCES: ("permission denied", "check the permissions or write somewhere else"),
    errno.EPERM: ("operation not permitted", "check the permissions or write somewhere else"),
    errno.EFBIG: ("the file is larger than this process may write (ulimit -f)", "raise the limit or write somewhere else"),
    errno.ENOMEM: ("out of memory", "free memory or lower the batch size"),
    errno.EIO: ("an input/output error of the device", "check the disk"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n) or lower data.workers"),
    errno.ENAMETOOLONG: ("the file name is too long", "choose a shorter path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "check the path"),
    errno.EISDIR: ("it is a folder, not a file", "check the path"),
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the link loop"),
}


def is_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def killed_loader_worker(exc: BaseException) -> Optional[str]:
    """The signal's name (SIGBUS) in PyTorch's "DataLoader worker (pid N) is killed by signal: NAME", raised
    from its SIGCHLD handler wherever the parent happens to be (so :class:`~mlsctl.data.loader.WatchedWorkers`
    cannot always catch it), along ``exc``'s chain; None for any other error."""
    import re
    import signal

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        found = re.match(r"DataLoader worker \(pid \d+\) is killed by signal: ([^.]+)\.", str(exc))
        if isinstance(exc, RuntimeError) and found:
            names = {signal.strsignal(number): number.name for number in signal.valid_signals()
                     if isinstance(number, signal.Signals)}
            return names.get(found.group(1).strip(), found.group(1).strip())
        exc = exc.__cause__ or exc.__context__
    return None


def shared_memory_message(workers_key: str, said: str = "the data loader workers ran out of shared memory") -> str:
    """One sentence for batches that do not fit in ``/dev/shm`` on their way from the loader's workers."""
    return (f"{said}: /dev/shm is full, which a container has 64 MB of unless started with a larger --shm-size; "
            f"enlarge /dev/shm, or lower {workers_key} (0 loads in the main process, without shared memory) or the "
            f"batch size")


def worker_killed_message(signal_name: str, workers_key: str) -> str:
    """One sentence for a data loader worker ended by a signal (``SIGBUS``, ``SIGKILL``, ...)."""
    said = f"a data loader worker was killed by {signal_name}"
    if signal_name == "SIGBUS":
        return shared_memory_message(workers_key, said)
    if signal_name == "SIGKILL":
        return (f"{said}, most likely by the kernel for lack of memory (or by a scheduler's time limit); lower "
                f"{workers_key}, the batch size or the image size, or free memory")
    return f"{said}; run again with {workers_key} 0 to see the error in the main process"


def environment_exit_code(exc: BaseException) -> int:
    """2 (a usage error) where the path given cannot be made because a file stands where a folder must
    (``--out notes.txt/run``); 1 for everything else, a file vanishing under a running command included."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOTDIR, errno.EEXIST) and exc.filename is not None:
        return 2 if file_in_the_way(exc.filename) is not None else 1
    return 1


def file_in_the_way(path: "os.PathLike | str") -> "Optional[str]":
    """The nearest existing ancestor of ``path`` (or ``path`` itself) when it is not a folder: the file
    that makes creating ``path`` as a folder, or anything inside it, fail (None when there is none)."""
    current = os.path.abspath(os.fsdecode(path))
    while True:
        if os.path.lexists(current):
            return None if os.path.isdir(current) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


# what a writer's quoted "(os error N)" may be taken for: the machine refusing a write (any other errno
# in a library's text, "(os error 2)" say, may be a bug or a read of something else, and keeps its text)
_WRITE_ERRNOS = (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def describe_environment_error(exc: BaseException) -> Optional[str]:
    """One sentence for an error of the environment, or None when ``exc`` is something else."""
    if is_memory_error(exc):
        gpu = "cuda" in str(exc).lower()
        where = "the GPU" if gpu else "this machine"
        return (f"out of memory on {where}; lower optim.batch_size / --batch-size, use smaller images or a smaller "
                f"model, or free memory")
    killed = killed_loader_worker(exc)
    if killed is not None:
        return worker_killed_message(killed, "the workers (data.workers, --workers)")
    if isinstance(exc, RuntimeError) and "unable to allocate shared memory" in str(exc):
        return shared_memory_message("the workers (data.workers, --workers)")
    if isinstance(exc, RuntimeError) and re.search(r"gloo.*Connection (closed|reset) by peer", str(exc), re.S):
        return ("another process of this run stopped or failed (its own message says why), and this one stopped "
                "with it")
    looped = re.fullmatch(r"Symlink loop from '(.*)'", str(exc)) if isinstance(exc, RuntimeError) else None
    if looped:  # Path.resolve() before Python 3.13 says a link loop as a RuntimeError
        return _loop_message(looped.group(1))
    quoted = re.search(r"\(os error (\d+)\)", str(exc)) if not isinstance(exc, OSError) else None
    if quoted and int(quoted.group(1)) in _WRITE_ERRNOS:  # a Rust library's io::Error (safetensors): no path in it
        cause, fix = CAUSES[int(quoted.group(1))]
        return f"{cause}; {fix}"
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    cause, fix = CAUSES.get(exc.errno, (exc.strerror or os.strerror(exc.errno), "check the path"))
    path = exc.filename if exc.filename is not None else None
    if path is None:
        return f"{cause}; {fix}"
    path = os.fsdecode(path) if isinstance(path, bytes) else str(path)
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):  # mkdir or open under a file: name the file
        blocking = file_in_the_way(path)
        if blocking is not None:
            if os.path.abspath(blocking) == os.path.abspath(path):
                return f"cannot use {path}: it is a file, not a folder; choose another path"
            # the file, not the path under it: that may be a temporary folder beside --out the user never gave
            return f"cannot use a path under {blocking}: it is a file, not a folder; choose another path"
    second = f" → {exc.filename2}" if getattr(exc, "filename2", None) else ""
    if exc.errno == errno.ELOOP and not second:
        loop = _looping_link(path)
        if loop is not None:  # name the link, not a temporary folder beside --out (a new user, 2026-12-06)
            return _loop_message(loop)
    if exc.errno == errno.ENOENT and not second:
        gone = _missing_folder(path)
        if gone is not None:  # a file the command listed, under a folder that went away (unmounted, renamed)
            return f"cannot use {path}: the folder {gone} does not exist (renamed, moved or unmounted?); check the path"
    return f"cannot use {path}{second}: {cause}; {fix}"


def _loop_message(link: str) -> str:
    return f"cannot use {link}: it is a symbolic link that loops (too many levels of links); fix or remove the link"


def _looping_link(path: str) -> Optional[str]:
    """The first part of ``path``, as given, that cannot be followed for a link loop; None if none does."""
    parts = Path(path).parts
    for end in range(1, len(parts) + 1):
        prefix = Path(*parts[:end])
        try:
            os.stat(prefix)
        except OSError as exc:
            return str(prefix) if exc.errno == errno.ELOOP else None
    return None


def _missing_folder(path: str) -> Optional[str]:
    """The highest missing folder above ``path`` whose own parent exists, None when ``path``'s folder exists."""
    try:
        folder = os.path.dirname(os.path.abspath(path))  # (raises where the working folder itself is gone)
        if os.path.isdir(folder):
            return None
        while not os.path.isdir(os.path.dirname(folder)) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
        return folder
    except OSError:
        return None
