"""Where status lines go: stderr, so that stdout holds only a command's result (its table, or its
``--json``) and a library call's progress never mixes into what a script prints."""

from __future__ import annotations

import contextlib
import sys
from typing import Optional


def to_stderr(line: str) -> None:
    """One status line on stderr, flushed (the default ``say`` of the library's long calls)."""
    print(line, file=sys.stderr, flush=True)


class LogProgress:
    """Progress for a stderr that is no terminal (a log file, a job's output): where tqdm draws a bar on a
    terminal, one line at most every ``every`` seconds (``embed: 1,536 of 5,000 images, 120/s, about 29 s
    left``), so a long job's log shows it is moving (a new user's probe, 2026-12-06: 69 s of ``embed``
    without a line). The same ``update``/``close`` as a tqdm bar."""

    def __init__(self, total: int, what: str, unit: str = "images", every: float = 30.0, say=to_stderr,
                 clock=None):
        import time

        self.total, self.what, self.unit, self.every, self.say = total, what, unit, every, say
        self.clock = clock or time.monotonic
        self.done, self.started = 0, self.clock()
        self.last = self.started
        self.first: Optional[tuple[float, int]] = None  # (time, count) of the first update

    def update(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.first is None:
            self.first = (now, self.done)
        # the rate from the first update on: the time before it is start-up (a model, a search index), and a first
        # estimate from the start said a knn-seg of minutes would take far longer (a new user's run-through);
        # a single update says its count only, once two intervals have passed
        since, counted_before = self.first
        steady = self.done > counted_before and now > since
        if now - self.last >= self.every and self.done < self.total and (steady or now - self.started >= 2 * self.every):
            self.last = now
            if not steady:  # one update so far: its rate would count the start-up too, so no estimate yet
                self.say(f"{self.what}: {self.done:,} of {self.total:,} {self.unit} so far")
                return
            rate = (self.done - counted_before) / (now - since)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            shown = f"{rate:.0f}/s" if rate >= 10 else f"{rate:.2g}/s"
            self.say(f"{self.what}: {self.done:,} of {self.total:,} {self.unit}, {shown}, about {_duration(left)} left")

    def close(self) -> None:
        pass


def progress_bar(total: int, what: str, log_unit: str, progress):
    """Progress of a long library call: a tqdm bar (``progress`` True), nothing (False), or as the CLI
    wants it (None: a bar on a terminal, a :class:`LogProgress` line every 30 s in a log)."""
    if progress is None and not sys.stderr.isatty():
        return LogProgress(total, what, unit=log_unit)
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=what, disable=progress is False, dynamic_ncols=True)


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "an unknown time"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def percent(share, digits: int = 1, missing: str = "-") -> str:
    """A share in percent (0.131 → ``13.1``), or ``missing`` where there is none (None or NaN): how the console,
    the report and the comparison write scores."""
    return missing if share is None or share != share else f"{100 * share:.{digits}f}"


def counted(n: int, word: str, plural: str = "") -> str:
    """``1 epoch``, ``2 epochs``, ``1,204 photos``: a count with its noun in the right number."""
    return f"{n:,} {word if n == 1 else (plural or word + 's')}"


@contextlib.contextmanager
def stops_deferred():
    """Ctrl-C and SIGTERM held back while the block runs, and delivered when it ends: a record printed
    and marked printed is never cut in two nor printed twice (``search --sets``: a stop landing between
    the two dropped one record). Held at Python's level: the block's handlers only note the signal, and
    the previous handlers get it afterwards (a signal mask would hold it for this thread alone, and the
    kernel gives a process's signal to any other: torch's, a loader's). Outside the main thread (where
    no handler runs) nothing is held."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous: dict = {}

    def restore() -> None:
        while previous:
            signum, handler = previous.popitem()
            signal.signal(signum, handler)

    def note(signum, frame) -> None:
        if noted:  # a second stop is not held: a print blocked on a full pipe would hold stops for ever
            restore()
            noted.clear()
            signal.raise_signal(signum)
            return
        noted.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not None:  # None: a handler Python did not install, which it cannot put back
            previous[signum] = signal.signal(signum, note)
    try:
        yield
    finally:
        restore()
        for signum in sorted(set(noted), key=lambda s: s != signal.SIGTERM):  # a SIGTERM is said as one, first
            signal.raise_signal(signum)
