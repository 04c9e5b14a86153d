"""Stopping a run of several processes between two steps, on every process at once.

One process stops the moment Ctrl-C or SIGTERM arrives (:func:`mlsctl.cli._stop_on_sigterm`):
nothing waits for it. Several processes cannot: a process that stops in the middle of a step
leaves the others inside that step's collective (the gradients' all-reduce), waiting for a peer
that is gone — with gloo until the peer's sockets close as it exits (1-2 s on an idle machine,
more under load; Accelerate's launcher kills what is still alive 5 s after the stop, and once
killed process 0 before it had said what was saved and how to resume), with NCCL possibly for
ever. A scheduler does not stop the processes of a job at the same instant either (Slurm signals
every task; a launcher forwards the stop to its workers one after the other).

So while the steps run, :class:`StepBoundaryStop` turns SIGINT and SIGTERM into a mark; after each
step every process says whether it was marked (a maximum over one integer on the host, through
:func:`mlsctl.dist.host_group`: no device synchronisation), and when any was, all of them stop
after that same step, raising :class:`StoppedTogether` (a ``KeyboardInterrupt``, as one process's
stop is). A stop that reaches only one process stops them all. A stop during the last step, or
after it, is marked and never raised: the run completes, its last collectives on every process.
The loader's workers of such a run ignore both signals and end with their parent
(:func:`mlsctl.data.loader.make_loader`): a worker that stopped on the job's signal would leave
its parent without the batch it waits for. The stop costs one step at most (docs/commands.md,
"Several processes").
"""

from __future__ import annotations

import signal

import torch

from mlsctl import dist

_STOPS = (signal.SIGINT, signal.SIGTERM)


class StoppedTogether(KeyboardInterrupt):
    """Every process of the run stopped after the same step: none is inside a collective, so the
    process groups can be destroyed before exiting. ``signum``: the signal that was agreed on."""

    def __init__(self, signum: int):
        super().__init__()
        self.signum = signum


class StepBoundaryStop:
    """A context for the steps of a run on ``world`` processes; :meth:`check` after each step.

    With one process it changes nothing. On leaving it, the signals' previous handlers come back,
    unless a stop was marked: then both stay ignored, so that the launchers' repeated signals
    (torch.distributed.run and Accelerate each forward the stop again) cannot break the shutdown
    under way (what was saved, how to resume)."""

    def __init__(self, world: int):
        self.world = world
        self.signum = 0  # the first stop signal received, 0 for none
        self._previous: dict = {}

    def __enter__(self) -> "StepBoundaryStop":
        if self.world > 1:
            try:
                for signum in _STOPS:
                    previous = signal.getsignal(signum)
                    if previous is signal.SIG_IGN:  # SIGINT of a job started in the background (`cmd &`)
                        continue
                    self._previous[signum] = previous
                    signal.signal(signum, self._mark)
            except ValueError:  # not the main thread (an application embedding the loop): nothing installed
                self._previous = {}
        return self

    def _mark(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def check(self) -> None:
        """After a step, on every process: stop all of them (:class:`StoppedTogether`) if any was
        asked to. Every process of a run on several takes part, whether or not it could install
        its handlers (a process that could not simply never asks)."""
        if self.world == 1:
            return
        flag = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist.host_group())
        agreed = int(flag)
        if agreed:
            self.signum = self.signum or agreed
            raise StoppedTogether(agreed)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.signum else previous)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
