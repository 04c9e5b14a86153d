"""Set-up of a run's processes: the recipe's own checks, Accelerate (precision, DDP, trackers),
logging to the console and train.log, seeding, and the device habits of the backbones."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from mlsctl import config as config_lib, methods
from mlsctl.errors import UserError
from mlsctl.runs import Run

log = logging.getLogger("mlsctl")
progress_log = logging.getLogger("mlsctl.progress")

TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim"}


def source_of(key: str, recipe_source: str, overridden: Sequence[str] = ()) -> str:
    """Where a refused value came from: the command line (an override of ``key``), or the recipe file
    — with the overrides named, when there are some: a value of the recipe may be refused because of
    another key the command line changed (method.k of the recipe against an overridden queue_size)."""
    if key in overridden:
        return "command-line override"
    if overridden:
        return f"{recipe_source} with the command-line override{'s' if len(overridden) > 1 else ''} of {', '.join(overridden)}"
    return recipe_source


def check_recipe(recipe, method_cls, source: str, overridden: Sequence[str] = ()) -> None:
    """What the recipe must hold to train, and the method's own constraints, as one sentence each.
    The schema's own checks (types, bounds) run again: a recipe built or edited in Python
    (``dataclasses.replace``) has not been through :func:`mlsctl.config.from_dict`, and a run of a value
    it refuses would train, then be refused by every command that reads its config.yaml."""
    config_lib.from_dict(config_lib.to_dict(recipe), source)
    if recipe.data.root is None:
        raise UserError(f"{source}: data.root is not set; {method_cls.data_root_hint}")
    for key, message in method_cls.check_recipe(recipe):
        raise UserError(f"{source_of(key, source, overridden)}: '{key}' {message}")


def check_trackers(names) -> None:
    """Every tracker of ``train.log_with`` must be installed: one sentence naming the extra."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise UserError(f"train.log_with asks for {name}, which is not installed; pip install 'mlsctl[{name}]' "
                            f"(or pip install {TRACKER_MODULES[name]}), or drop it from train.log_with")


def make_accelerator(recipe, run_root: Optional[Path] = None):
    """The Accelerator of ``train.precision`` (TF32 on CUDA), DDP as the method needs it, and the
    trackers of ``train.log_with`` writing under ``RUN/trackers``."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    method_cls = methods.method_class(recipe.method.name)
    cuda = torch.cuda.is_available()
    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16", "auto": "bf16" if cuda else "no",
                 "fp16_or_bf16": "fp16" if cuda else "bf16"}[recipe.train.precision]
    if cuda:  # TF32 matrix products and convolutions for what runs in float32 (Ampere and newer)
        from mlsctl.device import set_tf32

        set_tf32(matmul=True, conv=True)
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision=fp16 needs a CUDA GPU; use train.precision=bf16 or fp32 on a CPU")
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False, find_unused_parameters=method_cls.find_unused_parameters)
    # Several processes without CUDA: gloo on the CPU (Accelerate would otherwise fall back to
    # one independent process each when ACCELERATE_USE_CPU is unset or false).
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    trackers = list(recipe.train.log_with)
    check_trackers(trackers)
    project = ProjectConfiguration(project_dir=str(run_root), logging_dir=str(run_root / "trackers")) if run_root else None
    return Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], cpu=multi_cpu, log_with=trackers or None,
                       project_config=project)


def prepare(accelerator, model, optimizer):
    """``accelerator.prepare``, without torch's FutureWarning that ``broadcast_buffers`` is deprecated:
    that warning itself says to keep ``broadcast_buffers=False`` where buffers must not be synced at
    wrap time, and ``forward_sync_buffers=False`` would broadcast every bank and centre once."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return accelerator.prepare(model, optimizer)


class _RunLogHandler(logging.FileHandler):
    """train.log. A write that fails (a full disk) is dropped quietly: the next checkpoint or
    metrics line meets the same cause and reports it in one sentence, without a logging traceback.
    Anything else (a message that cannot be formatted: our bug) goes to logging's own report."""

    def handleError(self, record) -> None:  # noqa: N802 - logging's name
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


# logger → (propagate, level) as the caller had them before setup_logging, for close_logging to give back: a program
# calling train() stopped receiving mlsctl's warnings on its own root handlers after the run (a review, 2026-12-07)
_CALLERS_LOGGING: dict[str, tuple[bool, int]] = {}


def setup_logging(run: Run, is_main: bool, rank: int, interactive: bool) -> None:
    """``mlsctl`` logger: console (warnings only on other ranks) + train.log. The per-step
    ``mlsctl.progress`` lines go to train.log, and to the console only when there is no progress bar."""
    for logger in (log, progress_log):
        _CALLERS_LOGGING.setdefault(logger.name, (logger.propagate, logger.level))
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s" if is_main else f"[rank {rank}] %(message)s"))
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    log.addHandler(console)
    if is_main:
        file_handler = _RunLogHandler(run.log_path, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(file_handler)
        progress_log.addHandler(file_handler)
        if not interactive:
            progress_log.addHandler(console)


class _HeldNotes(logging.Handler):
    """The warnings of the ``mlsctl`` logger said while a run is built (:func:`held_notes`), kept."""

    def __init__(self, is_main: bool):
        super().__init__(logging.WARNING)
        self.is_main, self.records = is_main, []

    def emit(self, record) -> None:
        self.records.append(record)

    def replay(self) -> None:
        """Process 0 says the notes held through the run's handlers (console and train.log, with the time each
        was said); the other processes drop theirs: they say what process 0 says."""
        if self.is_main:
            for record in self.records:
                log.handle(record)
        self.records = []

    def say_unsaid(self) -> None:
        """A start that fails before :meth:`replay` (refused while the run is built, or train.log not opened):
        process 0 says the notes still held on stderr, before its error, so none is lost."""
        if self.is_main:
            for record in self.records:
                print(record.getMessage(), file=sys.stderr)
        self.records = []


@contextlib.contextmanager
def held_notes(is_main: bool):
    """The warnings said through the ``mlsctl`` logger inside the block (``labels_of``'s notes of class folders
    inside class folders, for ``method.labels_file`` and ``train.monitor``; a backbone's), held for
    :meth:`_HeldNotes.replay` once :func:`setup_logging` has opened train.log: said before it, they reached
    stderr only, and once from every process (a new user's probe, 2026-12-07). A start refused inside the block
    says them on stderr (process 0) before its error, as before."""
    held, propagate = _HeldNotes(is_main), log.propagate
    log.addHandler(held)
    log.propagate = False  # said once, when replayed: not also by a handler of the root logger
    try:
        yield held
    except BaseException:
        held.say_unsaid()
        raise
    finally:
        log.removeHandler(held)
        log.propagate = propagate


def close_logging() -> None:
    """The run's handlers closed and removed; the loggers' propagation and level as before :func:`setup_logging`."""
    for logger in (log, progress_log):
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
        if logger.name in _CALLERS_LOGGING:
            logger.propagate, level = _CALLERS_LOGGING.pop(logger.name)
            logger.setLevel(level)


@contextlib.contextmanager
def caller_random_states():
    """Python's, NumPy's and torch's global generator states (CUDA's too, once initialised) as they
    were on entry, put back on exit: training seeds them all."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved[3] is not None:
            torch.cuda.set_rng_state_all(saved[3])


@contextlib.contextmanager
def caller_matmul_precision():
    """CUDA's TF32 switches (matrix products, cuDNN) as they were on entry, put back on exit: the
    Accelerator of a run turns them on (:func:`make_accelerator`), and an ``embed`` or evaluation in
    the same process (a notebook) should not inherit that."""
    from mlsctl.device import precision_switches, restore_precision_switches

    saved = precision_switches()
    try:
        yield
    finally:
        restore_precision_switches(saved)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def speed_up(method, recipe, device: torch.device) -> None:
    """The device habits that change no result's meaning: CNNs in channels-last memory on CUDA, and
    ``train.compile`` (each backbone compiled in place, so state-dict keys stay the same)."""
    for backbone in method.backbones():
        if device.type == "cuda" and backbone.kind != "vit":
            backbone.net.to(memory_format=torch.channels_last)
        if recipe.train.compile:
            backbone.compile()
