"""mlsctl.train.stopping: a run stops between two steps (on all its processes), and saves that step.

The collective is a maximum over one process here (a gloo group of one); two real processes are
tested in tests/test_hardening.py (a stop that reaches one of two processes)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed

from mlsctl.train.stopping import StepBoundaryStop, StoppedTogether


@pytest.fixture
def restored_signals():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under `make test &`
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.fixture
def one_process_group(restored_signals):
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_a_step_stops_at_the_next_check_and_later_ones_are_ignored(one_process_group, signum):
    with pytest.raises(StoppedTogether) as stopped:
        with StepBoundaryStop(world=2) as stop:
            assert not stop.asked()  # nothing asked yet
            os.kill(os.getpid(), signum)  # in the middle of a step: marked, nothing raised here
            os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwards the stop again
            assert stop.signum == signum
            assert stop.asked() and stop.saves_its_step
            stop.stop(saved_step=2)
    assert stopped.value.signum == signum and isinstance(stopped.value, KeyboardInterrupt)
    assert stopped.value.saved_step == 2
    # the shutdown under way is not broken by the launchers' repeated signals
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_stop_after_the_last_check_is_marked_and_never_raised(one_process_group):
    # the last step and the run's end (the teacher's export, the final barrier) run on every process
    with StepBoundaryStop(world=2) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def test_a_process_that_could_not_install_handlers_still_takes_part(one_process_group):
    import threading

    calls = []
    real = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *args, **kwargs: (calls.append(1), real(*args, **kwargs))[1]
    try:
        def steps():  # not the main thread: signal.signal raises ValueError there
            with StepBoundaryStop(world=2) as stop:
                stop.asked()
        thread = threading.Thread(target=steps)
        thread.start()
        thread.join()
    finally:
        torch.distributed.all_reduce = real
    assert calls == [1]  # the other processes' check would otherwise wait for it for ever


def test_without_a_stop_the_previous_handlers_come_back(one_process_group):
    def mine(signum, frame):
        raise AssertionError("not during the steps")

    signal.signal(signal.SIGTERM, mine)
    with StepBoundaryStop(world=2) as stop:
        assert signal.getsignal(signal.SIGTERM) is not mine
        assert not stop.asked()
    assert signal.getsignal(signal.SIGTERM) is mine


def test_an_ignored_sigint_stays_ignored(one_process_group):
    # a job started in the background (`cmd &`) ignores SIGINT: it is not turned into a stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StepBoundaryStop(world=2) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert not stop.asked()
        assert stop.signum == 0
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_stop_in_the_first_step_of_one_process_raises_at_once(restored_signals):
    # nothing to save yet: a start stopped at once leaves --out as it found it, as before
    with StepBoundaryStop(world=1):
        with pytest.raises(KeyboardInterrupt):
            _raised_by_a_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _raised_by_a_signal(signum):
    os.kill(os.getpid(), signum)
    signal.sigtimedwait([], 0.01) if hasattr(signal, "sigtimedwait") else None


class Terminated(KeyboardInterrupt):
    pass


def one_shot_as_the_cli(signum, frame):  # mlsctl.cli: SIGTERM raises once, then is ignored
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_one_process_stops_after_the_step_under_way_with_the_commands_own_stop(restored_signals, capfd, signum):
    signal.signal(signal.SIGTERM, one_shot_as_the_cli)
    with pytest.raises(KeyboardInterrupt) as stopped:
        with StepBoundaryStop(world=1, start_step=10, total_steps=20) as stop:
            assert not stop.asked()  # step 11, the session's first, is done: a stop now waits for step 12
            os.kill(os.getpid(), signum)  # marked, said at once, nothing raised
            os.kill(os.getpid(), signal.SIGTERM)  # a launcher's copy (accelerate launch's terminate): ignored, said
            assert stop.signum == signum
            said = capfd.readouterr().err
            assert "stopping after step 12, which will be saved as a checkpoint" in said
            assert "a stop within 2 s of the first is taken for a copy of it" in said
            assert stop.asked() and stop.saves_its_step
            stop.stop(saved_step=12)
    # the command's own handler raised, as where the signal landed before: Terminated for SIGTERM
    assert type(stopped.value) is (Terminated if signum == signal.SIGTERM else KeyboardInterrupt)
    assert stopped.value.saved_step == 12
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # the one-shot handler that ran left SIGTERM ignored for the shutdown under way; one that did not, in place
    assert signal.getsignal(signal.SIGTERM) is (signal.SIG_IGN if signum == signal.SIGTERM else one_shot_as_the_cli)


def test_a_second_stop_of_one_process_stops_at_once(restored_signals, monkeypatch):
    from mlsctl.train import stopping

    with StepBoundaryStop(world=1) as stop:
        stop.asked()
        os.kill(os.getpid(), signal.SIGINT)
        monkeypatch.setattr(stopping, "REPEAT_WINDOW_S", 0.0)  # not a launcher's copy: Ctrl-C again
        with pytest.raises(KeyboardInterrupt):
            _raised_by_a_signal(signal.SIGINT)


def test_what_one_process_says_at_the_last_step_and_without_saving(restored_signals, capfd):
    with StepBoundaryStop(world=1, total_steps=3) as stop:
        stop.asked(), stop.asked()
        os.kill(os.getpid(), signal.SIGINT)
        assert "the run is at its last step (3): it finishes and writes its teacher" in capfd.readouterr().err
    with StepBoundaryStop(world=1) as stop:
        stop.saving = False  # an --overwrite start with no checkpoint yet: the replaced run comes back
        stop.asked(), stop.asked()
        os.kill(os.getpid(), signal.SIGINT)
        said = capfd.readouterr().err
        assert "stopping after step 3; Ctrl-C again, 2 s or more from now, stops at once" in said and "saved" not in said
        assert stop.asked() and not stop.saves_its_step


def test_an_applications_handler_gets_the_stop_at_the_step_boundary(restored_signals):
    seen = []
    signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # notes it, does not raise
    try:
        with StepBoundaryStop(world=1) as stop:
            stop.asked()
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == [] and stop.asked()
            stop.stop(saved_step=2)  # handed over: the application goes on
            assert seen == [signal.SIGTERM] and stop.signum == 0 and not stop.asked()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_one_process_leaves_a_default_sigterm_alone(restored_signals):
    # a library's caller that kept SIGTERM's default: the process ends on it, as it would without mlsctl
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with StepBoundaryStop(world=1):
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler


def test_a_stop_agreed_after_the_first_step_of_a_session_is_not_saved(one_process_group, capfd):
    with StepBoundaryStop(world=2) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        said = capfd.readouterr().err  # and is not promised as saved (a final read of the change, 2026-12-07)
        assert "stopping after step 1; another SIGTERM stops at once" in said and "saved" not in said
        assert stop.asked() and not stop.saves_its_step


def test_the_elastic_agent_acts_on_the_first_stop_signal_and_ignores_the_ones_forwarded_after_it(monkeypatch):
    # CI, before: a whole-job SIGTERM reached torch.distributed.run's agent twice (from the test and again
    # from accelerate launch); the second was raised inside the agent's logging call during its shutdown and
    # printed the logging module's "--- Logging error ---" traceback. The fake agent below does what the
    # real one does: registers the handler, is stopped, and shuts down while a second stop arrives.
    import inspect
    import time

    import torch.distributed.run as distributed_run
    from torch.distributed.elastic.multiprocessing import api as elastic_api

    from mlsctl.launch import run_torchrun

    # the patch works because torch looks the module global up when it registers the handler
    assert "signal.signal(sig, _terminate_process_handler)" in inspect.getsource(elastic_api.PContext.start)
    stop_signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    previous = {s: signal.getsignal(s) for s in stop_signals}
    monkeypatch.setattr(elastic_api, "_terminate_process_handler", elastic_api._terminate_process_handler)
    shutdown = []

    def agent(argv):
        for signum in stop_signals:
            signal.signal(signum, elastic_api._terminate_process_handler)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("the first stop was not raised")
        except elastic_api.SignalException:
            os.kill(os.getpid(), signal.SIGTERM)  # forwarded again by the launcher above
            os.kill(os.getpid(), signal.SIGINT)  # and a Ctrl-C
            time.sleep(0.05)
            shutdown.append("finished")
            raise

    monkeypatch.setattr(distributed_run, "main", agent)
    try:
        with pytest.raises(SystemExit) as exited:
            run_torchrun([])
        assert exited.value.code == 128 + signal.SIGTERM and shutdown == ["finished"]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("codes, exit_code, said", [
    ({0: 2, 1: 130}, 2, ""),  # the processes' own one-sentence error (a bad recipe), the other stopped
    ({0: 1}, 1, ""),
    ({1: -signal.SIGKILL}, 1, "error: training process 1 of 2 was killed by SIGKILL (the kernel's out-of-memory"),
    ({0: 139}, 1, "error: training process 0 of 2 exited with code 139; the others were stopped"),
    ({0: 1, 1: -signal.SIGKILL}, 1, "error: training process 1 of 2 was killed by SIGKILL"),  # 0 failed after it
    # 0 refused (a resume with another number of processes), torchrun stopped 1: no "killed by SIGTERM"
    ({0: 2, 1: -signal.SIGTERM}, 2, ""),
    ({1: -signal.SIGTERM}, 1, "error: training process 1 of 2 was killed by SIGTERM; the others were stopped"),
    ({0: -signal.SIGTERM, 1: 139}, 1, "error: training process 1 of 2 exited with code 139; the others were stopped"),
])
def test_a_failed_process_is_one_line_not_the_agents_traceback(monkeypatch, capsys, codes, exit_code, said):
    """A probe (2026-12-05): `accelerate launch --num_processes 2 -m mlsctl pretrain missing.yaml` on a CPU
    machine printed torchrun's ChildFailedError traceback and report after the processes' one-line error."""
    import torch.distributed.run as distributed_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from mlsctl.launch import run_torchrun

    def agent(argv):
        raise ChildFailedError("mlsctl", {rank: ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code,
                                                               error_file="/nonexistent")
                                          for rank, code in codes.items()})

    monkeypatch.setattr(distributed_run, "main", agent)
    with pytest.raises(SystemExit) as exited:
        run_torchrun(["--standalone", "--nproc_per_node=2", "-m", "mlsctl"])
    err = capsys.readouterr().err
    assert exited.value.code == exit_code and "Traceback" not in err
    assert err.startswith(said) if said else err == "", err


def test_a_stop_after_the_agents_shutdown_window_raises_again():
    # an agent whose first stop was lost (swallowed where it was raised) can still be stopped
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from mlsctl.launch import REPEATED_STOP_WINDOW_S, ignoring_repeated_stops

    def raise_stop(signum, frame):
        raise SignalException("stop", sigval=signal.Signals(signum))

    now = [100.0]
    handler = ignoring_repeated_stops(raise_stop, clock=lambda: now[0])
    with pytest.raises(SignalException):
        handler(signal.SIGTERM, None)
    now[0] += REPEATED_STOP_WINDOW_S - 1
    handler(signal.SIGINT, None)  # a copy of the stop under way: ignored
    now[0] += 2
    with pytest.raises(SignalException):
        handler(signal.SIGTERM, None)
