"""Stopping a run between two steps, and saving the step it stopped after.

A stop (Ctrl-C, a scheduler's SIGTERM) in the middle of a step would leave the steps since the last
checkpoint to run again (the GPU recipes write one every 2,500 steps: an hour of a job's time limit
lost). So while the steps run, :class:`StepBoundaryStop` turns SIGINT and SIGTERM into a mark and
says at once (on stderr) that the run stops after the step under way; that step ends, the loop
writes a checkpoint of it (:func:`mlsctl.train.loop._run_steps`) and the run stops: ``--resume``
goes on from that very step. Not saved: a stop during a session's first step (a start stopped at
once leaves ``--out`` as it found it; a resume loses one step at most), and a stop of a start with
``--overwrite`` before its first checkpoint, which puts the replaced run back as before. A stop
during the last step, or after it (the teacher's export), is marked and not acted on: the run
completes, its last collectives on every process.

One process: the stop is handed to the handler that was there before (the command's: Ctrl-C's
``KeyboardInterrupt``, SIGTERM's :class:`~mlsctl.errors.Terminated`; an application's own) at the
step boundary, or at once for a stop during the first step and for a second stop — Ctrl-C again, a
scheduler's second word — which loses the steps since the last checkpoint, as before. A second
stop within :data:`REPEAT_WINDOW_S` of the first is the copy a launcher forwards (``accelerate
launch`` with one process terminates its child after the terminal's Ctrl-C reached it), ignored.

Several processes cannot stop where the signal lands: a process that stops in the middle of a step
leaves the others inside that step's collective (the gradients' all-reduce), waiting for a peer that
is gone — with gloo until the peer's sockets close as it exits, with NCCL possibly for ever. A
scheduler does not stop the processes of a job at the same instant either (Slurm signals every task;
a launcher forwards the stop to its workers one after the other). So after each step every process
says whether it was marked (a maximum over one integer on the host, through
:func:`mlsctl.dist.host_group`: no device synchronisation), and when any was, all of them stop after
that same step. A stop that reaches only one process stops them all; repeated stops are the
launchers' forwarded copies, ignored (torch.distributed.run's agent waits 30 s before it kills).

The loader's workers ignore both signals and end with their parent
(:func:`mlsctl.data.loader.make_loader`): a worker that stopped on the job's signal would leave its
parent without the batch it waits for. docs/commands.md, "Interrupting", says what a stop keeps.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from mlsctl import dist

_STOPS = (signal.SIGINT, signal.SIGTERM)
REPEAT_WINDOW_S = 2.0  # one process: a second stop this soon after the first is a launcher's copy of it


class StoppedTogether(KeyboardInterrupt):
    """Every process of the run stopped after the same step: none is inside a collective, so the
    process groups can be destroyed before exiting. ``signum``: the signal that was agreed on;
    ``saved_step``: the step it stopped after, where a checkpoint of it was written."""

    def __init__(self, signum: int, saved_step: int | None = None):
        super().__init__()
        self.signum = signum
        self.saved_step = saved_step


class StepBoundaryStop:
    """A context for the steps ``start_step`` to ``total_steps`` of a run on ``world`` processes:
    :meth:`asked` after each step but the last says whether to stop there, :meth:`stop` stops.

    ``announce``: this process says on stderr, the moment a stop arrives, what it will do (process 0
    of several). On leaving, the signals' previous handlers come back where this context's handler
    is still in place (a command's one-shot handler that ran and set SIG_IGN stays so); on several
    processes, once a stop was marked, both stay ignored instead, so that the launchers' repeated
    signals cannot break the shutdown under way (what was saved, how to resume)."""

    def __init__(self, world: int, start_step: int = 0, total_steps: int | None = None, announce: bool = True,
                 saving: bool = True):
        self.world, self.start_step, self.total_steps, self.announce = world, start_step, total_steps, announce
        self.signum = 0  # the first stop signal received, 0 for none
        self.steps_done = 0  # the steps this session has finished before the last (asked() after each)
        self.saving = saving  # False: a stop now writes no checkpoint (an --overwrite start with none yet)
        self._marked_at = 0.0
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
        now = time.monotonic()
        if self.signum:
            if self.world == 1 and now - self._marked_at >= REPEAT_WINDOW_S:
                self._previous[signum](signum, frame)  # a second stop: at once, where it lands
            elif self.world == 1 and self.announce:  # a launcher's forwarded copy, or a quick second Ctrl-C: said
                self._write(f"a stop within {REPEAT_WINDOW_S:.0f} s of the first is taken for a copy of it (launchers "
                            f"forward the stop): stop again to stop at once")
            return
        if self.world == 1 and not self.steps_done:
            self._previous[signum](signum, frame)  # the first step: nothing to save yet
            return
        self.signum, self._marked_at = signum, now
        if self.announce:
            self._say(signum)

    def _say(self, signum: int) -> None:
        """One line on stderr, written from the signal handler without the logging module (which
        may be in the middle of a write it cannot re-enter); train.log gets the command's last line."""
        step = self.start_step + self.steps_done + 1
        again = (("Ctrl-C again" if signum == signal.SIGINT else "another SIGTERM")
                 + (f", {REPEAT_WINDOW_S:.0f} s or more from now," if self.world == 1 else "") + " stops at once")
        if self.total_steps is not None and step >= self.total_steps:
            line = f"the run is at its last step ({step}): it finishes and writes its teacher; {again}"
        elif self.saving and self.steps_done:  # several processes: one in the first step is not saved
            line = (f"stopping after step {step}, which will be saved as a checkpoint; {again} and loses "
                    f"the steps since the last checkpoint")
        else:
            line = f"stopping after step {step}; {again}"
        self._write(line)

    @staticmethod
    def _write(line: str) -> None:
        try:
            os.write(2, f"{line}\n".encode())
        except OSError:  # stderr closed (a daemon's `2>&-`)
            pass

    def asked(self) -> bool:
        """After each step but the last, on every process: whether any process was asked to stop.
        Every process of a run on several takes part, whether or not it could install its handlers
        (a process that could not simply never asks)."""
        self.steps_done += 1
        if self.world == 1:
            return bool(self.signum)
        flag = torch.tensor([self.signum], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=dist.host_group())
        self.signum = self.signum or int(flag)
        return bool(self.signum)

    @property
    def saves_its_step(self) -> bool:
        """A stop agreed after a session's first step writes a checkpoint of it (unless :attr:`saving`
        was turned off); one during that step does not."""
        return self.saving and self.steps_done > 1

    def stop(self, saved_step: int | None) -> None:
        """Stop after the step just done (``saved_step``: its number where it was written). One
        process hands the stop to the handler that was there before, which raises as it would have
        (Ctrl-C's ``KeyboardInterrupt``, SIGTERM's ``Terminated``, with ``saved_step`` set on it); an
        application's handler that does not raise lets the run go on. Several raise
        :class:`StoppedTogether`."""
        handler = self._previous.get(self.signum) if self.world == 1 else None
        if handler is not None:
            try:
                handler(self.signum, None)
            except KeyboardInterrupt as raised:
                raised.saved_step = saved_step
                raise
            self.signum = 0  # the application took it and did not stop
            return
        raise StoppedTogether(self.signum, saved_step)

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) != self._mark:  # a one-shot handler that ran set its own (SIG_IGN)
                continue
            signal.signal(signum, signal.SIG_IGN if self.signum and self.world > 1 else previous)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
