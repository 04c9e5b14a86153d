"""Stopping a run between two steps, and saving the step it stopped after.

A stop (Ctrl-C, a scheduler's SIGTERM) in the middle of a step would leave the steps since the last
checkpoint to run again (the GPU recipes write one every 2,500 steps: an hour of a job's time limit
lost). So while the steps run, :class:`StepBoundaryStop` turns SIGINT and SIGTERM into a mark; the
step under way ends, the loop writes a checkpoint of it (:func:`mlsctl.train.loop._run_steps`) and
:class:`StoppedTogether` (a ``KeyboardInterrupt``, as any stop is) ends the run: ``--resume`` goes on
from that very step. Only a stop during a session's first step is not saved (a start stopped at once,
perhaps a wrong ``--overwrite``, leaves ``--out`` as it found it; a resume loses one step at most).

One process: a stop during the first step of the session raises at once, as does a second stop
(Ctrl-C twice, or a scheduler's grace period running out): where it lands, the steps since the
last checkpoint are lost, as before. The first stop of a later step says in the log that the run
is stopping after this step.

Several processes cannot stop where the signal lands: a process that stops in the middle of a step
leaves the others inside that step's collective (the gradients' all-reduce), waiting for a peer that
is gone — with gloo until the peer's sockets close as it exits, with NCCL possibly for ever. A
scheduler does not stop the processes of a job at the same instant either (Slurm signals every task;
a launcher forwards the stop to its workers one after the other). So after each step every process
says whether it was marked (a maximum over one integer on the host, through
:func:`mlsctl.dist.host_group`: no device synchronisation), and when any was, all of them stop after
that same step. A stop that reaches only one process stops them all; repeated stops are the
launchers' forwarded copies, ignored (torch.distributed.run's agent waits 30 s before it kills).

A stop during the last step, or after it, is marked and never raised: the run completes, its last
collectives on every process. The loader's workers ignore both signals and end with their parent
(:func:`mlsctl.data.loader.make_loader`): a worker that stopped on the job's signal would leave its
parent without the batch it waits for. docs/commands.md, "Interrupting", says what a stop keeps.
"""

from __future__ import annotations

import logging
import signal

import torch

from mlsctl import dist

_STOPS = (signal.SIGINT, signal.SIGTERM)
log = logging.getLogger("mlsctl")


class StoppedTogether(KeyboardInterrupt):
    """Every process of the run stopped after the same step: none is inside a collective, so the
    process groups can be destroyed before exiting. ``signum``: the signal that was agreed on;
    ``saved_step``: the step it stopped after, where a checkpoint of it was written."""

    def __init__(self, signum: int, saved_step: int | None = None):
        super().__init__()
        self.signum = signum
        self.saved_step = saved_step


class StepBoundaryStop:
    """A context for the steps of a run on ``world`` processes: :meth:`asked` after each step says
    whether to stop there; :attr:`saves_its_step` whether that stop writes a checkpoint first.

    On leaving it, the signals' previous handlers come back; on several processes, once a stop was
    marked, both stay ignored instead, so that the launchers' repeated signals (torch.distributed.run
    and Accelerate each forward the stop again) cannot break the shutdown under way (the checkpoint,
    what was saved, how to resume)."""

    def __init__(self, world: int):
        self.world = world
        self.signum = 0  # the first stop signal received, 0 for none
        self.steps_done = 0  # the steps this session has finished (asked() after each)
        self._previous: dict = {}

    def __enter__(self) -> "StepBoundaryStop":
        try:
            for signum in _STOPS:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN:  # SIGINT of a job started in the background (`cmd &`)
                    continue
                if self.world == 1 and not callable(previous):  # SIG_DFL (a library's caller): left to it
                    continue
                self._previous[signum] = previous
                signal.signal(signum, self._mark)
        except ValueError:  # not the main thread (an application embedding the loop): nothing installed
            self._previous = {}
        return self

    def _mark(self, signum, frame) -> None:
        if self.world == 1 and (self.signum or not self.steps_done):
            self._previous[signum](signum, frame)  # a second stop, or one in the first step: at once
            return
        if not self.signum and self.world == 1:
            again = "Ctrl-C" if signum == signal.SIGINT else "a second SIGTERM"
            log.warning(f"stopping after step {self.steps_done + 1}, which will be saved as a checkpoint; "
                        f"{again} stops at once and loses the steps since the last checkpoint")
        self.signum = self.signum or signum

    def asked(self) -> bool:
        """After each step, on every process: whether any process was asked to stop. Every process
        of a run on several takes part, whether or not it could install its handlers (a process that
        could not simply never asks)."""
        self.steps_done += 1
        if self.world == 1:
            return bool(self.signum)
        flag = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist.host_group())
        self.signum = self.signum or int(flag)
        return bool(self.signum)

    @property
    def saves_its_step(self) -> bool:
        """A stop after a session's first step writes a checkpoint of it; one during that step does not."""
        return self.steps_done > 1

    def stop(self, saved_step: int | None) -> None:
        raise StoppedTogether(self.signum, saved_step)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if self.signum and self.world > 1 else previous)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
