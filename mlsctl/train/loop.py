"""The one training loop, for every method.

Read top to bottom, :func:`pretrain` does: set up Accelerate (:mod:`~mlsctl.train.setup`) → build
the data and the method → optimiser (AdamW, Adam or SGD) with parameter groups
(:mod:`~mlsctl.train.optim`) → lock and check the run directory (:mod:`~mlsctl.train.run_dir`) →
restore a checkpoint (``--resume``) or initial weights (``--init-from``,
:mod:`~mlsctl.train.checkpoint`) → :func:`_train`: for each step, :func:`_train_one_step` sets the
scheduled learning rate and weight decay, runs the method's ``training_step`` and back-propagates
for each of the step's micro-batches (``optim.accumulate_steps``, 1 by default; the banks' writes
held until the last one), ends the method's step, clips, freezes the last layer early on, steps the
optimiser and updates the EMA teachers; then the step is recorded (:mod:`~mlsctl.train.metrics`)
and, every ``train.checkpoint_every`` steps, checkpointed.

The loop knows no method by name: what differs between methods is declared by the method
(:class:`~mlsctl.methods.base.Method`).

A step is an optimiser step: schedules, the steps of an epoch, the logged ``step`` and
checkpoints count them, and checkpoints are written only between steps, never in the middle of an
accumulation (docs/accumulation.md).

Exact resume: everything that decides the next step is in the checkpoint or is a pure function of
the step (see :mod:`mlsctl.data.loader` and :mod:`mlsctl.schedules`): weights and buffers, banks,
optimizer and grad-scaler state, every process's RNG states. ``metrics.jsonl`` is cut back to the
checkpoint's step before continuing, so a run killed at any moment and resumed writes the same
loss sequence as an uninterrupted one (``tests/test_train.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from mlsctl import __version__, atomic, config as config_lib, dist, methods, provenance, restore
from mlsctl.data.images import ImageFolder, SkipLog
from mlsctl.data.loader import make_loader
from mlsctl.device import synchronize
from mlsctl.console import counted
from mlsctl.errors import Interrupted, TooLittleData, UserError, annotate
from mlsctl.locks import FolderLock
from mlsctl.runs import Checkpoint, Run
from mlsctl.schedules import Schedule
from mlsctl.train import checkpoint, metrics, optim, run_dir, setup
from mlsctl.train.stopping import StepBoundaryStop, StoppedTogether

log = logging.getLogger("mlsctl")


@dataclass
class RunSummary:
    run: Path
    steps: int
    images_per_s: float
    final_loss: Optional[float]
    seconds: float
    already_complete: bool = False


def pretrain(recipe, out: str | Path, *, resume: bool = False, init_from: Optional[str] = None,
             overwrite: bool = False, recipe_source: str = "recipe", overridden: Sequence[str] = (),
             resume_command: Optional[str] = None) -> RunSummary:
    """``mlsctl pretrain``: train ``recipe`` into the run folder ``out`` (``--resume`` continues it
    exactly, ``--init-from`` starts from weights, ``--overwrite`` replaces an earlier run).
    ``overridden``: the keys set on the command line, which a refusal of their values names instead of
    the recipe file. ``resume_command``: the words after ``mlsctl`` that continue the run, said when it
    stops (default ``pretrain RUN/config.yaml --out RUN --resume``). Training seeds Python's, NumPy's
    and torch's global generators from the recipe; the caller's states are put back when it returns (a
    notebook's draws go on as they would have)."""
    with setup.caller_random_states(), setup.caller_matmul_precision():
        return _pretrain(recipe, out, resume=resume, init_from=init_from, overwrite=overwrite,
                         recipe_source=recipe_source, overridden=overridden, resume_command=resume_command)


def _pretrain(recipe, out: str | Path, *, resume: bool, init_from: Optional[str], overwrite: bool,
              recipe_source: str, overridden: Sequence[str], resume_command: Optional[str]) -> RunSummary:
    run = Run(out)
    config_lib.check_paths_beside_recipe(recipe, recipe_source, overridden)  # while its paths are as written
    recipe = config_lib.absolute_paths(recipe)  # config.yaml is read from any working directory
    method_cls = methods.method_class(recipe.method.name)
    _check_options(recipe, run, method_cls, resume, init_from, overwrite, recipe_source, overridden)

    # Everything is validated before --out is touched: data, model, weights.
    accelerator = setup.make_accelerator(recipe, run.root.absolute())
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    for key, message in method_cls.check_training(recipe, world, accelerator.device.type):
        raise UserError(f"{setup.source_of(key, recipe_source, overridden)}: '{key}' {message}")
    # what is said while the data and the model are built (the notes of labels_of, a monitor's) waits for
    # train.log: process 0 says it there and on the console once the run's logging is set up
    with setup.held_notes(is_main) as held:
        built = _build(recipe, run, method_cls, accelerator, resume, init_from, overwrite, overridden)
    try:
        setup.setup_logging(run, is_main, accelerator.process_index, sys.stderr.isatty())
        held.replay()
        if is_main:
            elements = built.schedule.total_steps * recipe.optim.batch_size * recipe.optim.accumulate_steps * world
            for line in [*built.folder.scan.notes("data.root"), *method_cls.recipe_notes(recipe), *built.data_notes,
                         *built.method.run_notes(elements)]:
                log.warning(line)
        if built.initialised:
            log.info(f"initialised {built.initialised}")
        summary = _train(run, recipe, accelerator, built.folder, built.dataset, built.collate_fn, built.schedule,
                         built.method, built.optimizer, built.groups,
                         Checkpoint(Path(built.resume_from)) if built.resume_from else None, built.monitor)
    except KeyboardInterrupt as stop:
        raise _stopped(stop, run, built.resume_from, is_main, world, resume_command) from None
    except BaseException as exc:
        held.say_unsaid()  # train.log could not be opened: the notes said while the run was built, on stderr
        raised = _failed(exc, run, built.resume_from, is_main, world, resume_command)
        if raised is exc:
            raise
        raise raised from exc
    finally:
        setup.close_logging()
        if is_main:
            built.lock.release()
    return summary


def _check_options(recipe, run: Run, method_cls, resume: bool, init_from: Optional[str], overwrite: bool,
                   recipe_source: str, overridden: Sequence[str]) -> None:
    """What ``pretrain`` refuses before anything is built: the recipe, the options together, and ``--out``."""
    setup.check_recipe(recipe, method_cls, recipe_source, overridden)
    if init_from is not None and not str(init_from).strip():  # an unset shell variable: "--init-from $PREV"
        raise UserError("--init-from is empty; give a run, a checkpoint folder or a weights file, or leave it out")
    if resume and init_from:
        raise UserError("--resume continues a run exactly and --init-from starts a new one from weights; use one")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; use one")
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"--out {run.root} is a file; choose a folder")
    if overwrite:
        run_dir.check_nothing_precious_inside(run.root, recipe, method_cls, recipe_source, init_from)
    if not resume:
        run_dir.check_out_outside_data(run.root, recipe)


@dataclass
class _Built:
    """What :func:`_build` made for the loop."""
    folder: ImageFolder
    dataset: object
    collate_fn: object
    data_notes: list
    schedule: Schedule
    method: object
    groups: list
    optimizer: torch.optim.Optimizer
    monitor: object
    initialised: Optional[str]
    lock: FolderLock
    resume_from: Optional[str]


def _build(recipe, run: Run, method_cls, accelerator, resume: bool, init_from: Optional[str], overwrite: bool,
           overridden: Sequence[str]) -> _Built:
    """The data, the method (its banks on the device), the optimiser, the monitor and the initial weights, then the
    run folder locked and opened (process 0; the checkpoint to resume from, if any, for every process)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    setup.seed_everything(recipe.seed + rank)
    # data.root is listed once, by process 0, and every process gets that listing: the same images in
    # the same rows even while files come and go, and one walk of a large folder (on NFS) instead of W
    folder = dist.on_main(lambda: method_cls.open_data(recipe))
    dataset, collate_fn = method_cls.build_dataset(recipe, folder)
    data_notes = method_cls.data_notes(recipe, dataset)
    try:
        probe = method_cls.batch_sampler(recipe, dataset, world_size=world, rank=rank)
    except TooLittleData as exc:  # too few objects for a batch: the note may say why (a data set's root given)
        if not data_notes:
            raise
        raise TooLittleData(f"{exc.message}; note: {data_notes[0]}", exit_code=exc.exit_code) from None
    schedule = Schedule(probe.steps_per_epoch, recipe.optim.epochs)
    torch.manual_seed(recipe.seed)  # identical initial weights on every process
    method = method_cls(recipe, schedule).to(accelerator.device)
    for name, bank in method.banks().items():
        bank.to(accelerator.device)
        bank.name = name
    optim.check_ema_pairs(method.ema_pairs())
    setup.speed_up(method, recipe, accelerator.device)
    groups = optim.param_groups(method, recipe.optim.decay_biases_and_norms)
    optimizer = optim.build_optimizer(recipe.optim, groups, fused=accelerator.device.type == "cuda")
    monitor = None
    if recipe.train.monitor.every and accelerator.is_main_process:  # its images are read before --out is touched
        from mlsctl.monitor import Monitor

        monitor = Monitor(recipe.train.monitor, recipe.model.img_size, recipe.model.patch_size)
    initialised = restore.initial_weights(method, init_from) if init_from and not resume else None

    lock = FolderLock(run.root, "run")
    resume_from = dist.on_main(lambda: run_dir.open_run_dir(run, recipe, folder, lock, resume=resume,
                                                            overwrite=overwrite, init_from=init_from,
                                                            method_cls=method_cls, dataset=dataset,
                                                            overridden=overridden))
    return _Built(folder, dataset, collate_fn, data_notes, schedule, method, groups, optimizer, monitor, initialised,
                  lock, resume_from)


def _stopped(stop: KeyboardInterrupt, run: Run, resume_from: Optional[str], is_main: bool, world: int,
             resume_command: Optional[str]) -> Interrupted:
    """A Ctrl-C or a stop signal: what to raise, saying what was saved and how to resume (and in train.log)."""
    undone = resume_from is None and _latest(run) is None  # then the folder is put back as it was
    message = run_dir.interrupted(run, resume_from is None, is_main, world, resume_command,
                                  saved_at_stop=getattr(stop, "saved_step", None))
    if isinstance(stop, StoppedTogether):  # no process is inside a collective: the groups end cleanly
        dist.close()  # (left to the interpreter's exit, gloo's threads could abort the process)
    stopped = Interrupted(message if is_main else "")
    if not undone:
        _say_in_run_log(stopped, run, is_main)
    return stopped


def _failed(exc: BaseException, run: Run, resume_from: Optional[str], is_main: bool, world: int,
            resume_command: Optional[str]) -> BaseException:
    """A failure while training: an --overwrite or a new run undone where nothing was saved, else the error to raise,
    with the hint that --resume continues where the machine stopped the run (and said in train.log)."""
    latest = _latest(run)  # before an undone --overwrite puts the old run (and its checkpoints) back
    undone = resume_from is None and latest is None
    if is_main and undone:
        run_dir.undo_start(run)
    raised = exc
    if isinstance(exc, OSError) and exc.filename is None:  # a write to an open file (metrics.jsonl, train.log)
        raised = OSError(exc.errno, exc.strerror, str(run.root))
    # The machine stopped the run (a full disk, a killed worker): say that --resume continues it. Not for a
    # UserError, whose sentence names its own fix (a damaged checkpoint to delete), unless it is the machine's.
    machine = isinstance(exc, Exception) and (not isinstance(exc, UserError) or getattr(exc, "resumable", False))
    if is_main and machine and latest is not None and not undone:
        annotate(raised, resume_hint=run_dir.interrupted(run, False, is_main, world, resume_command))
    if not undone:
        _say_in_run_log(raised, run, is_main)
    return raised


def _latest(run: Run):
    """The run's newest checkpoint, None when there is none or it cannot be read now (the unmount
    that stopped the run, perhaps: its own error is the one to report)."""
    try:
        return run.latest()
    except (OSError, UserError):
        return None


def _say_in_run_log(exc: BaseException, run: Run, is_main: bool) -> None:
    """The run's train.log gets the line that ends the command (not after an undone start: the folder
    is as it was before, every byte, an --overwrite's old run included)."""
    if is_main and run.log_path.is_file():
        annotate(exc, run_log=str(run.log_path))


class Sessions:
    """The training sessions of a run (one per start or ``--resume``): each its first and last step,
    start time, seconds, commit and device, kept in every checkpoint's state.json and in summary.json,
    so a resumed run's provenance is not its last session's alone (a new user, 2026-12-06). A session
    counts up to the checkpoint it left: work lost after it (a kill) is not in the seconds. A checkpoint
    written before sessions were kept gives one earlier session of unknown seconds."""

    def __init__(self, resumed: Optional[dict], start_step: int, device, is_main: bool = True):
        earlier = (resumed or {}).get("sessions")
        if resumed is not None and not isinstance(earlier, list):
            earlier = [{"from_step": None, "to_step": start_step, "seconds": None, "commit": resumed.get("commit"),
                        "device": resumed.get("device")}]
        self.earlier: list = list(earlier or [])
        self.current = {"from_step": start_step, "started": provenance.now(),  # git runs on process 0 alone
                        "commit": provenance.commit() if is_main else None, "device": provenance.device_name(device)}
        self.started = time.perf_counter()

    def upto(self, step: int) -> list[dict]:
        """Every session, this one up to ``step``."""
        seconds = round(time.perf_counter() - self.started, 1)
        return [*self.earlier, dict(self.current, to_step=step, seconds=seconds)]

    @staticmethod
    def seconds(sessions: list[dict]) -> Optional[float]:
        """Their training seconds in all, None where one of them is not known."""
        known = [s.get("seconds") for s in sessions]
        return None if any(not isinstance(v, (int, float)) for v in known) else round(sum(known), 1)


@dataclass
class _Training:
    """What every step of a run works with."""
    accelerator: object
    model: torch.nn.Module  # the method as Accelerate prepared it (DDP with several processes)
    method: object
    optimizer: object
    plan: optim.Plan
    trainable: list[torch.nn.Parameter]
    last_layer: list[torch.nn.Parameter]
    banks: list  # the method's memory banks
    batches: Iterator  # micro-batches: plan.accumulate per step (StepBatchSampler)
    on_device: Optional[object]  # the dataset's last stage, on the training device
    skips: SkipLog
    watch: metrics.LossWatch


def _train(run: Run, recipe, accelerator, folder: ImageFolder, dataset, collate_fn, schedule: Schedule, method,
           optimizer, groups, resume_from: Optional[Checkpoint], monitor=None) -> RunSummary:
    """Continue from ``resume_from`` (or start), run the steps left, record and checkpoint them."""
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    trainable = [p for g in groups for p in g["params"]]
    last_layer = method.last_layer_parameters()
    if is_main:
        run_dir.record_images(run, folder)
    start_step, rng_state, state = 0, None, None
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, method, optimizer, accelerator)
        start_step, rng_state = state["step"], state["rng"]
        if is_main:
            metrics.truncate_metrics(run.metrics_path, start_step)

    model, optimizer = setup.prepare(accelerator, method, optimizer)
    plan = optim.Plan.of(recipe, schedule, world)
    if is_main:
        _log_start(run, recipe, accelerator, folder, schedule, plan, trainable, method, fresh=resume_from is None)
    if start_step >= plan.total_steps:
        return _already_complete(run, recipe, method, start_step, is_main)
    if start_step:
        log.info(f"resuming {run.root} from step {start_step}")

    type(method).prepare_dataset(dataset, run.cache_dir)  # once the folder is locked: work kept for --resume
    sampler = type(method).batch_sampler(recipe, dataset, world_size=world, rank=accelerator.process_index,
                                         start_step=start_step, total_steps=plan.total_steps)
    loader = make_loader(dataset, sampler, recipe.data.workers, pin_memory=accelerator.device.type == "cuda",
                         collate_fn=collate_fn)
    # The iterator draws its base seed from torch's global RNG: make it before the checkpoint's RNG
    # state is restored, as the uninterrupted run made it before its first step, or the resumed run's
    # global draws (drop path) are one behind.
    batches = iter(loader)
    if rng_state is not None:
        checkpoint.set_rng_state(rng_state)
    records = metrics.Records(run, recipe, accelerator, method, start_step, interactive=sys.stderr.isatty())
    sessions = Sessions(state, start_step, accelerator.device, is_main)
    started = time.perf_counter()
    # a stop ends the step under way (every process's) and saves it, unless the run replaces another
    # and has no checkpoint yet: then the replaced run comes back, as after a stop in the first step
    replacing = dist.on_main(lambda: run.replacing_another)
    with StepBoundaryStop(world, start_step, plan.total_steps, announce=is_main, saving=not replacing) as stop:
        try:
            model.train()
            training = _Training(accelerator, model, method, optimizer, plan, trainable, last_layer,
                                 list(method.banks().values()), batches, getattr(dataset, "on_device", None),
                                 SkipLog(folder.root), metrics.LossWatch(accelerator.device))
            _run_steps(training, records, run, recipe, start_step, monitor, stop, sessions)
        finally:
            records.close()
            _end_loader(batches)
        # A stop that arrives from here on is only marked: the run is complete, and its last
        # collectives (the teacher's export, the final barrier) run on every process.
        return _finish(run, accelerator, method, folder, plan, training.skips, start_step, records,
                       time.perf_counter() - started, sessions)


def _already_complete(run: Run, recipe, method, start_step: int, is_main: bool) -> RunSummary:
    """A run resumed at its last step: nothing to train; its teacher written if it is missing."""
    lora = recipe.model.lora.enabled
    exported = run.teacher_weights_path.is_file() and (not lora or run.teacher_adapters_path.is_dir())
    if is_main and method.has_backbone and not exported:
        # stopped between its last checkpoint and the teacher's export, or the file was removed
        checkpoint.export_teacher(method, run)
        log.info(f"{run.root} is complete ({counted(start_step, 'step')}) but had no {run.teacher_weights_path.name}"
                 f"{' (or adapters)' if lora else ''}: written from its last checkpoint")
    elif is_main:
        log.info(f"{run.root} is already complete ({counted(start_step, 'step')}); nothing to do")
    dist.barrier()
    return RunSummary(run.root, start_step, 0.0, None, 0.0, already_complete=True)


def _run_steps(t: _Training, records: metrics.Records, run: Run, recipe, start_step: int, monitor,
               stop: StepBoundaryStop, sessions: Sessions) -> None:
    """The steps left: each trained, recorded and checkpointed on schedule; after each but the
    last, the processes agree whether to stop, and a stop writes the checkpoint of the step it
    stops after (:mod:`mlsctl.train.stopping`)."""
    total = t.plan.total_steps
    for step in range(start_step, total):
        done = step + 1
        logged = done % recipe.train.log_every == 0 or done == total
        t.method.logged = logged  # the method times its own operations (time/...) on these steps only
        stepped = _train_one_step(t, step)
        records.stepped(t.plan.batch_global, stepped.waited)
        stopping = done < total and stop.asked()
        saved = done % recipe.train.checkpoint_every == 0 or done == total or (stopping and stop.saves_its_step)
        if logged or saved:
            t.watch.check(t.method.banks())
        health = records.health(done, monitor, stepped)
        if health and not logged:
            records.write_health(done, stepped, health)
        if logged:
            records.write_step(done, stepped, health)
        if saved:
            records.sync()
            checkpoint.save_checkpoint(run, done, t.method, t.optimizer, t.accelerator, recipe,
                                       recipe.train.keep_checkpoints, sessions.upto(done))
            stop.saving = True  # the replaced run, if any, is gone with this first checkpoint
        if stopping:
            stop.stop(done if saved else None)


def _end_loader(batches) -> None:
    """Shut the loader's workers down now (PyTorch's end-of-data message to each, bounded joins),
    not whenever the iterator is collected: a traceback kept for ``--debug`` keeps it alive, and the
    workers of a run on several processes ignore SIGTERM (:mod:`mlsctl.train.stopping`), so the
    interpreter's last terminate-and-join of its children could wait on them."""
    shutdown = getattr(batches, "shutdown", None)  # only a loader with workers has it (WatchedWorkers)
    if shutdown is not None:
        shutdown()


def _train_one_step(t: _Training, step: int) -> metrics.Step:
    """One optimiser step: the schedules' values, forward and backward of each micro-batch, the
    method's end of step, clipping, the frozen last layer, the optimiser step and the EMA update."""
    timed = t.method.logged  # a logged step: on CUDA its time/step is its own (the device idle at its start)
    if timed:
        synchronize(t.accelerator.device)
    lr, weight_decay = t.plan.lr(step), t.plan.weight_decay(step)
    optim.set_lr_and_weight_decay(t.optimizer, lr, weight_decay)

    t.optimizer.zero_grad(set_to_none=True)
    held = t.banks if t.plan.accumulate > 1 else []  # one batch a step writes as it goes: nothing to hold
    for bank in held:
        bank.hold()  # every micro-batch reads the banks as they were at the start of the step
    outputs, seconds, waited = _forward_backward(t, step)

    started = time.perf_counter()
    t.method.end_step(step)
    for bank in held:
        bank.release()  # the step's writes, after its last micro-batch
    if t.accelerator.scaler is not None:
        t.accelerator.unscale_gradients()
    grad_norm = optim.gradients_to_apply(t.trainable, t.last_layer, step, t.plan, t.accelerator)
    t.optimizer.step()
    pairs = t.method.ema_pairs()
    momentum = t.method.ema_momentum(step) if pairs else None  # a method without a teacher logs none
    if pairs:
        optim.ema_update(pairs, momentum)
    if timed:  # ... and ends when the device is done with it
        synchronize(t.accelerator.device)
    seconds += time.perf_counter() - started
    return metrics.Step(step, outputs, lr, weight_decay, momentum, grad_norm, seconds, waited)


def _forward_backward(t: _Training, step: int) -> tuple[metrics.StepOutputs, float, float]:
    """The forward and backward pass of each micro-batch of ``step``: gradients add up (each loss
    divided by their count: their mean), DDP synchronises them on the last one only. Returns the
    outputs, the seconds of compute and the seconds spent waiting for the loader's batches."""
    accumulate, accelerator = t.plan.accumulate, t.accelerator
    outputs, seconds, waited = metrics.StepOutputs(accumulate), 0.0, 0.0
    for micro in range(accumulate):
        asked = time.perf_counter()
        batch = next(t.batches)
        started = time.perf_counter()
        waited += started - asked
        t.skips.extend(batch.skipped)
        batch = batch.to(accelerator.device)
        if t.on_device is not None:
            batch = t.on_device(batch)
        t.method.micro_batch = (micro, accumulate)
        with accelerator.no_sync(t.model) if micro < accumulate - 1 else contextlib.nullcontext():
            out = t.model(batch, step)
            t.watch.see(out.loss.detach(), step)
            accelerator.backward(out.loss / accumulate if accumulate > 1 else out.loss)
        outputs.add(out)
        del out, batch
        seconds += time.perf_counter() - started
    t.method.micro_batch = (0, 1)
    return outputs, seconds, waited


def _log_start(run: Run, recipe, accelerator, folder: ImageFolder, schedule: Schedule, plan: optim.Plan,
               trainable: list, method, fresh: bool = True) -> None:
    """The lines a run starts with: what trains on what, and its steps; where its backbone's weights come from and a
    warm-up as long as the run only when it starts (``fresh``): a resumed run's weights are its checkpoint's."""
    world, accumulate = accelerator.num_processes, plan.accumulate
    n_params = sum(p.numel() for p in trainable)
    precision = "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision
    rows = "images" if method.has_backbone else "embeddings"  # a method on features reads feature rows
    part = type(method).trained_images(recipe, folder.relpaths())
    count = f"{part[0]} of the {len(folder)}" if part is not None else f"{len(folder)}"
    log.info(f"mlsctl {__version__} | {recipe.method.name} on {count} {rows} from {folder.root} | "
             f"{world} process{'es' if world > 1 else ''} on {accelerator.device} ({precision}) | "
             f"{n_params / 1e6:.2f}M trainable parameters")
    made = (f" ({recipe.optim.batch_size} x {world} process{'es' if world > 1 else ''} x {accumulate} "
            f"accumulated micro-batches)" if accumulate > 1 else "")
    log.info(f"{schedule.steps_per_epoch} step{'s' if schedule.steps_per_epoch != 1 else ''}/epoch x "
             f"{counted(recipe.optim.epochs, 'epoch')} = {counted(plan.total_steps, 'step')} of "
             f"{type(method).elements(plan.batch_global)}{made} | peak lr {plan.peak_lr:.3g} | run: {run.root}")
    log.info(type(method).describe_data(recipe, accelerator.device))
    if not fresh:
        return
    if method.has_backbone:
        log.info(f"backbone: {_backbone_start(recipe)}")
    if plan.total_steps > 1 and plan.warmup_steps >= plan.total_steps:  # a new user's probe (2026-12-07)
        log.warning(f"note: the learning-rate warm-up (optim.warmup_epochs={recipe.optim.warmup_epochs:g}) lasts the "
                    f"whole run of {counted(plan.total_steps, 'step')}: the learning rate only rises, to "
                    f"{plan.lr(plan.total_steps - 1):.3g} at the last step, and never decays; give a shorter "
                    f"optim.warmup_epochs for a short run")


def _backbone_start(recipe) -> str:
    """Where the backbone's weights come from, for the start of train.log: a new user's probe (2026-12-07) found no
    line saying that `model.weights=` had been loaded (``--init-from``, applied after, says its own line)."""
    if recipe.model.weights:
        return f"weights of model.weights {os.path.abspath(recipe.model.weights)}"
    if recipe.model.pretrained:
        return f"timm's pretrained weights of {recipe.model.arch}"
    return f"randomly initialised (seed {recipe.seed})"


def _finish(run: Run, accelerator, method, folder: ImageFolder, plan: optim.Plan, skips: SkipLog, start_step: int,
            records: metrics.Records, elapsed: float, sessions: Sessions) -> RunSummary:
    """The end of a run: skipped files reported, the teacher exported, summary.json. The final loss is the
    last step's (every run logs its last step), with the mean of the last logged steps beside it."""
    is_main, world, total_steps = accelerator.is_main_process, accelerator.num_processes, plan.total_steps
    loss_value, recent = records.loss, records.recent_loss()
    steps_run = total_steps - start_step
    throughput = steps_run * plan.batch_global / max(elapsed, 1e-9)
    all_skips = dist.all_gather_object(skips.reasons)
    if is_main:
        merged = SkipLog(folder.root)
        for reasons in all_skips:
            merged.reasons.update(reasons)
        if merged.summary():
            log.warning(merged.summary())
        checkpoint.export_teacher(method, run)
        for line in method.end_notes():
            log.warning(line)
        if world > 1 and method.banks():
            log.info(f"memory banks identical on all {world} processes (checked at every checkpoint)")
        summary = {"steps": total_steps, "resumed_from": start_step, "seconds": round(elapsed, 2),
                   "images_per_s": round(throughput, 2),
                   **{key: round(per * throughput, 2) for key, per in type(method).throughput_units(method.recipe).items()},
                   "final_loss": loss_value,
                   **({"recent_loss": recent, "recent_loss_steps": len(records.recent)} if recent is not None else {}),
                   "processes": world,
                   "skipped_files": len(merged.reasons), "finished": provenance.now(),
                   "device": provenance.device_name(accelerator.device),
                   "precision": "fp32" if accelerator.mixed_precision == "no" else accelerator.mixed_precision,
                   "mlsctl_version": __version__, "commit": provenance.commit(), "torch_version": torch.__version__}
        every = sessions.upto(total_steps)
        summary.update(sessions=every, seconds_all_sessions=Sessions.seconds(every))
        atomic.write_json(run.summary_path, summary)
        log.info(f"done: {counted(steps_run, 'step')} in {elapsed:.0f}s ({throughput:.1f} {type(method).speed_unit()}), "
                 f"final loss {loss_value:.4f}{_recent_text(records)}; run in {run.root}")
    dist.barrier()
    return RunSummary(run.root, total_steps, throughput, loss_value, elapsed)


def _recent_text(records: metrics.Records) -> str:
    """`` (last step; 0.4321 over the last 10 logged steps)``, or nothing where fewer than two were logged."""
    recent = records.recent_loss()
    return "" if recent is None else f" (last step; {recent:.4f} over the last {len(records.recent)} logged steps)"
