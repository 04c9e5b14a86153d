"""How ``python -m mlsctl`` starts under ``accelerate launch`` on a machine without GPUs.

Imports nothing heavy at module level: ``python -m mlsctl --help`` must not wait for torch.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path


def _requested_processes(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg in ("--num_processes", "--num-processes") and i + 1 < len(argv):
            return int(argv[i + 1])
        for prefix in ("--num_processes=", "--num-processes="):
            if arg.startswith(prefix):
                return int(arg[len(prefix):])
    return 1


RELAUNCH_ARGV = "MLSCTL_RELAUNCH_ARGV"

# The process that started this one, read as ``python -m mlsctl`` begins (this module is its first
# import): a launcher that dies during the seconds of imports that follow still counts as gone
# (:func:`mlsctl.cli._stop_when_orphaned`).
PARENT_AT_START = os.getppid()


def relaunched_argv() -> list[str] | None:
    """The command-line arguments :func:`relaunch_for_accelerate_on_cpu` passed on, if any."""
    value = os.environ.pop(RELAUNCH_ARGV, None)
    return json.loads(value) if value is not None else None


def relaunch_for_accelerate_on_cpu() -> None:
    """Make ``accelerate launch --num_processes N -m mlsctl ...`` start N processes without GPUs.

    On a machine without accelerators, and without an Accelerate config file, ``accelerate
    launch --num_processes 2`` runs its single-process launcher: one process starts and trains
    alone. When this module finds itself started that way (its parent is ``accelerate launch``
    asking for N > 1 processes and no distributed environment is set), it replaces itself with
    ``torch.distributed.run --nproc_per_node N`` (what ``accelerate launch --multi_gpu`` does),
    and says so on stderr. Everything else is left untouched.
    """
    if "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" not in os.environ:
        return
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return
    if not any(Path(a).name == "accelerate" or a.endswith("accelerate") for a in parent[:3]) or "launch" not in parent:
        return
    try:
        wanted = _requested_processes(parent)
    except ValueError:
        return
    if wanted <= 1:
        return
    import torch

    if torch.cuda.is_available():
        return
    options = ["--standalone", f"--nproc_per_node={wanted}", "-m", "mlsctl"]
    print(f"mlsctl: accelerate launch runs a single process on a machine without GPUs; starting {wanted} "
          f"processes with torch.distributed.run (as `accelerate launch --multi_gpu` would): "
          f"{shlex.join(['-m', 'torch.distributed.run', *options, *sys.argv[1:]])}", file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "mlsctl.launch", *options]  # torch.distributed.run, stopped quietly
    # torch.distributed.run's parser would take options such as --run for abbreviations of its own,
    # so the arguments travel in the environment (see relaunched_argv).
    os.environ[RELAUNCH_ARGV] = json.dumps(sys.argv[1:])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or wanted) // wanted)))
    os.environ["ACCELERATE_USE_CPU"] = "true"
    _stop_with_parent()
    os.execv(sys.executable, command)


def _stop_with_parent() -> None:
    """The agent this process becomes (``torch.distributed.run``) gets SIGTERM when ``accelerate
    launch``, its parent, dies — killed outright, say — and stops its processes as on any stop
    (they say how to resume) instead of training on without a launcher. Linux's parent-death signal
    outlives ``execv``; elsewhere nothing changes."""
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)


REPEATED_STOP_WINDOW_S = 60.0  # the agent's shutdown: SIGTERM, 30 s, SIGKILL; and a margin


def ignoring_repeated_stops(raise_stop, clock=None):
    """Wrap the elastic agent's signal handler (``raise_stop`` raises ``SignalException``) so that a
    stop signal arriving within ``REPEATED_STOP_WINDOW_S`` seconds of the one it acted on is ignored.

    A stop sent to a whole job reaches the agent more than once: from the scheduler (or the
    terminal) and again from ``accelerate launch``, which forwards it to its child. The agent
    handles the first by stopping its processes (SIGTERM, then SIGKILL after its shutdown timeout,
    30 s); a second, raised while it logs or shuts down, broke off its shutdown with the logging
    module's ``--- Logging error ---`` traceback. A stop after the window raises again, so an agent
    whose first stop was lost (swallowed where it was raised) can still be stopped; SIGKILL always
    can. The wrapper handles whichever signals the agent registers it for
    (``TORCHELASTIC_SIGNALS_TO_HANDLE``)."""
    import time

    clock = clock or time.monotonic
    acted_at = -float("inf")

    def raise_unless_repeated(signum, frame):
        nonlocal acted_at
        now = clock()
        if now - acted_at < REPEATED_STOP_WINDOW_S:
            return  # a forwarded copy of the stop under way
        acted_at = now
        raise_stop(signum, frame)

    return raise_unless_repeated


def run_torchrun(argv: list[str]) -> None:
    """``torch.distributed.run`` with ``argv``; stopped by a signal (a scheduler's SIGTERM, which
    Accelerate's launcher also forwards), it exits with 128 + the signal's number instead of
    printing the elastic agent's tracebacks, as ``accelerate launch --multi_gpu`` does. The
    training processes, stopped by the same signal, say what was saved and how to continue. When
    every failed process was interrupted (exit code 130: the stop reached the training processes
    and not the agent, as when one process is signalled), it exits with 130 instead of torchrun's
    ``ChildFailedError`` report, for the same reason. The agent ignores the copies of a stop it
    is acting on (:func:`ignoring_repeated_stops`)."""
    import torch.distributed.run as distributed_run
    from torch.distributed.elastic.multiprocessing import api as elastic_api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # the agent registers this module global for its stop signals when it starts the processes
    # (PContext.start: signal.signal(sig, _terminate_process_handler); checked in tests/test_stopping.py)
    elastic_api._terminate_process_handler = ignoring_repeated_stops(elastic_api._terminate_process_handler)
    # the agent's own lines about a failed process ("failed (exitcode: 2) ...", "Sending process ... closing
    # signal"): the processes say what went wrong, and _failed_exit what they could not say
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        distributed_run.main(argv)
    except SignalException as stop:
        sys.exit(128 + int(stop.sigval))
    except ChildFailedError as failed:
        world = next((a.split("=", 1)[1] for a in argv if a.startswith("--nproc_per_node=")), "?")
        sys.exit(_failed_exit(failed, world=world))


def _failed_exit(failed, world: str) -> int:
    """The exit code for torchrun's ``ChildFailedError``, after one line on stderr where the processes
    could not say why themselves: 130 when every failed process was interrupted; a failed process's
    own 1 or 2 (an mlsctl error, said in one sentence above); else "process R was killed by SIGKILL"."""
    import signal

    codes = {rank: failure.exitcode for rank, failure in failed.failures.items()}
    if codes and all(code == 130 for code in codes.values()):
        return 130
    # SIGTERM is what torchrun sends the others once one has failed: it is the cause only where every failure is one
    failures = {rank: f for rank, f in failed.failures.items() if f.exitcode != -signal.SIGTERM} or failed.failures
    # a process killed from outside (the out-of-memory killer) first: the others then fail in a collective
    killed = sorted((rank, f) for rank, f in failures.items() if f.exitcode < 0)
    rank, first = killed[0] if killed else min(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    if first.exitcode in (1, 2):
        return first.exitcode
    if first.exitcode < 0:
        try:
            name = signal.Signals(-first.exitcode).name
        except ValueError:
            name = f"signal {-first.exitcode}"
        what = f"was killed by {name}" + (" (the kernel's out-of-memory killer sends it: lower optim.batch_size or "
                                          "data.workers)" if name == "SIGKILL" else "")
    else:
        what = f"exited with code {first.exitcode}"
    print(f"error: training process {rank} of {world} {what}; the others were stopped", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    run_torchrun(sys.argv[1:])
