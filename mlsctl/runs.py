"""The run directory, one of mlsctl's three contracts (with recipes and feature shards)::

    RUN/config.yaml                     the resolved recipe (start a new run from it to reproduce)
    RUN/metrics.jsonl                   one JSON object per logged step
    RUN/train.log                       what the console showed, with timestamps
    RUN/summary.json                    written when training completes: steps, time, speed, final loss,
                                        and when (finished), on what (device, precision, processes) and
                                        with what (mlsctl_version, commit, torch_version) it was trained
    RUN/start.json                      what the weights started from: {"init_from": path or null}, and the
                                        recipe keys set on the command line ("overridden", since 2026-12-07)
                                        (with the recipe's model.weights and seed, the start is rebuilt
                                        exactly: mlsctl.restore.from_run_start)
    RUN/images.txt                      the training images, one path per line relative to data.root:
                                        line i is the image a bank's ``image_id`` i refers to
    RUN/teacher.safetensors             the final teacher backbone in timm's key layout (LoRA merged)
    RUN/teacher_adapters/               with LoRA: the teacher's adapters alone (peft format)
    RUN/checkpoints/step-NNNNNNNN/      one folder per checkpoint, renamed into place when complete:
        state.json                      format_version, step, epoch, method, world size, versions,
                                        commit and device
        model.safetensors               every weight and buffer of the method (student, teacher, heads, centers)
        banks.safetensors               every memory bank (see mlsctl.bank.save_banks)
        optimizer.pt                    optimizer (and grad-scaler) state, read with weights_only=True
        rng.pt                          the RNG states of every process
    RUN/.replaced/                      while a run started with --overwrite has no checkpoint yet: the
                                        entries of the run it replaces, put back if the start fails or is
                                        stopped, deleted at its first checkpoint (:meth:`Run.set_aside`)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional, Union

from mlsctl.errors import UserError, first_line

RUN_FORMAT_VERSION = 1

# A replaced run's entries (`--overwrite`) until the new run's first checkpoint; the two names of its moves in
# progress (being set aside, being put back) and of the new run's entries being cleared away for the put-back.
REPLACED, REPLACING, RESTORING, DISCARDED = ".replaced", ".replacing", ".restoring", ".discarded"
HIDDEN_ENTRIES = (REPLACED, REPLACING, RESTORING, DISCARDED)

# What mlsctl pretrain writes in a run folder; `--overwrite` replaces these and nothing else.
RUN_ENTRIES = ("config.yaml", "start.json", "metrics.jsonl", "train.log", "summary.json", "images.txt",
               "teacher.safetensors", "teacher_adapters", "checkpoints", "trackers", "report.html", "cache")


class Checkpoint:
    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.is_folder_name(self.path.name):
            raise UserError(f"{self.path} is not a checkpoint folder (step-NNNNNNNN)")
        self.step = int(self.path.name.partition("-")[2])

    @staticmethod
    def is_folder_name(name: str) -> bool:
        """Whether ``name`` is a checkpoint folder's: ``step-`` and a step number."""
        prefix, _, number = name.partition("-")
        return prefix == "step" and number.isdigit()

    model_path = property(lambda self: self.path / "model.safetensors")
    banks_path = property(lambda self: self.path / "banks.safetensors")
    optimizer_path = property(lambda self: self.path / "optimizer.pt")
    rng_path = property(lambda self: self.path / "rng.pt")
    state_path = property(lambda self: self.path / "state.json")
    recipe_path = property(lambda self: self.path / "recipe.yaml")  # the recipe it was trained with (since 2026-12-05)

    def state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.state_path} is damaged ({exc}); delete {self.path} to resume from the checkpoint "
                            f"before it, or start a new run", exit_code=1) from None
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("format_version"), int)):
            raise UserError(f"{self.state_path} is damaged (it lacks an integer step or format_version); delete "
                            f"{self.path} to resume from the checkpoint before it, or start a new run", exit_code=1)
        if state.get("format_version", 0) > RUN_FORMAT_VERSION:
            raise UserError(f"checkpoint {self.path} was written by a newer mlsctl (format {state['format_version']}); upgrade mlsctl")
        return state

    def __repr__(self) -> str:
        return f"Checkpoint({self.path})"


PRETRAIN_HINT = "give a folder written by mlsctl pretrain"


def open_run(path: Union[str, Path], *, hint: str = PRETRAIN_HINT, flag: str = "") -> Run:
    """The run at ``path``, or the one "not a run folder" error: ``{flag} {path} is not a run
    folder (no config.yaml); {hint}`` (``flag``: the option that named it, such as ``--run``). Here, beneath
    every heavy import, so that a command refuses a path that is no run before it imports torch (a new user's
    probe, 2026-12-07: ``report FEATURES`` took 4 s to say it)."""
    run = Run(path)
    if not run.has_config():
        named = f"{flag} {path}" if flag else f"{path}"
        path = Path(path)
        # what it is instead, where that says the fix (a new user, 2026-12-06)
        if os.path.islink(path) and not path.exists():  # a link that loops, or leads nowhere (a review)
            raise UserError(f"{named} is a symbolic link that loops or leads nowhere; {hint}")
        if not path.exists():
            raise UserError(f"{named} does not exist; {hint}")
        if run_of_config(path) is not None or (path.name == "config.yaml" and (path.parent / "checkpoints").is_dir()):
            raise UserError(f"{named} is the run's config.yaml; give its folder {path.parent}")
        if path.is_file():
            raise UserError(f"{named} is a file, not a run folder; {hint}")
        step = re.fullmatch(r"step-0*(\d+)", path.name)
        if step and path.parent.name == "checkpoints" and Run(path.parent.parent).has_config():
            raise UserError(f"{named} is a checkpoint of the run {path.parent.parent}; give the run (with --step "
                            f"{step.group(1)} where the command takes one)")
        raise UserError(f"{named} is not a run folder (no config.yaml); {hint}")
    return run


def check_distinct(runs) -> None:
    """Each run folder given once (``plot``, ``compare``): a probe (2026-12-06) found ``plot run ./run run/`` drew
    one run three times under one name."""
    import os

    seen: dict[str, Path] = {}
    for run in runs:
        first = seen.setdefault(os.path.realpath(run), run)
        if first is not run:
            again = "given twice" if str(first) == str(run) else f"{first} again"
            raise UserError(f"{run} is {again}; give each run once")


def checkpoint_dirname(step: int) -> str:
    return f"step-{step:08d}"


def metrics_record(line: str) -> Optional[dict]:
    """One line of ``metrics.jsonl`` as the record it holds (a JSON object with a numeric ``step``),
    or None when it is not one: a torn last line of a killed run, or damage (:mod:`mlsctl.curves`
    refuses a file with such a line anywhere but last; ``--resume`` keeps it, with a warning)."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return record if isinstance(step, (int, float)) and not isinstance(step, bool) else None


def run_of_config(path: str | Path) -> Optional["Run"]:
    """The run whose own resolved recipe ``path`` is (``RUN/config.yaml`` beside the run's
    metrics.jsonl), or None for any other file (a recipe a user named config.yaml)."""
    path = Path(path)
    run = Run(path.parent)
    return run if path.name == run.config_path.name and run.metrics_path.is_file() else None


RUNS_ROOT = "runs"  # under the working folder: pretrain's default --out, where "the newest run" is looked for


def run_of_model(source: object, path: object) -> Optional[Path]:
    """The run folder a model was read from, by the ``source`` and ``path`` a model record keeps
    (:class:`mlsctl.models.source.ModelChoice`'s info, a feature folder's manifest): ``run`` reads
    RUN/teacher.safetensors, ``run-checkpoint`` RUN/checkpoints/step-N; None for any other source."""
    if not isinstance(path, str) or not path:
        return None
    if source == "run":
        return Path(path).parent
    if source == "run-checkpoint":
        return Path(path).parent.parent
    return None


class Run:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    config_path = property(lambda self: self.root / "config.yaml")
    checkpoints_dir = property(lambda self: self.root / "checkpoints")
    metrics_path = property(lambda self: self.root / "metrics.jsonl")
    log_path = property(lambda self: self.root / "train.log")
    summary_path = property(lambda self: self.root / "summary.json")
    teacher_weights_path = property(lambda self: self.root / "teacher.safetensors")
    teacher_adapters_path = property(lambda self: self.root / "teacher_adapters")
    images_path = property(lambda self: self.root / "images.txt")
    start_path = property(lambda self: self.root / "start.json")
    cache_dir = property(lambda self: self.root / "cache")  # what a method derived from the data once (prepare_dataset)

    def summary(self) -> dict:
        """summary.json (written when a run finishes), or {} for a run that has not finished."""
        if not self.summary_path.is_file():
            return {}
        try:
            summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            reason = getattr(exc, "strerror", None) or ("nested too deep" if isinstance(exc, RecursionError) else
                                                        first_line(exc, 100))
            raise UserError(f"{self.summary_path} is damaged ({reason}); mlsctl pretrain writes it when the run ends: "
                            f"remove it and the run counts as unfinished") from None
        if not isinstance(summary, dict):
            raise UserError(f"{self.summary_path} is damaged (a JSON {type(summary).__name__}, not an object); remove "
                            f"it and the run counts as unfinished")
        return summary

    def final_teacher_step(self) -> Optional[int]:
        """The step of the teacher ``--run RUN`` reads (:func:`mlsctl.restore.from_run`): the last step of
        a finished run (summary.json) for teacher.safetensors, else the latest checkpoint's; None with
        neither (also for a teacher whose run kept no checkpoint and wrote no summary)."""
        steps = self.summary().get("steps") if self.teacher_weights_path.is_file() else None
        if isinstance(steps, int) and not isinstance(steps, bool):
            return steps
        latest = self.latest()
        return latest.step if latest is not None else None

    def _start(self) -> dict:
        """start.json, or {} for runs before it."""
        if not self.start_path.is_file():
            return {}
        try:
            start = json.loads(self.start_path.read_text())
            if not isinstance(start, dict):
                raise ValueError
        except (OSError, ValueError):
            raise UserError(f"{self.start_path} is damaged; it says what the run's weights started from") from None
        return start

    def init_from(self) -> Optional[str]:
        """The --init-from of the run's start (absolute), or None (also for runs before start.json)."""
        value = self._start().get("init_from")
        return value if isinstance(value, str) else None

    def overridden(self) -> Optional[list[str]]:
        """The recipe keys set on the command line when the run started (``optim.lr``), or None where
        they were not recorded (runs before 2026-12-07)."""
        keys = self._start().get("overridden")
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else None

    def has_config(self) -> bool:
        """Whether the folder looks like a run: it holds a ``config.yaml`` (read later, with its own
        errors). The one cheap test of "is this a run" (:meth:`is_run` reads the file too)."""
        return self.config_path.is_file()

    def written_by_pretrain(self) -> bool:
        """Whether ``pretrain`` wrote the folder: its ``config.yaml`` with ``start.json`` (written with
        it), ``checkpoints/`` or ``metrics.jsonl`` beside it; no file is read. The test of "a run" where
        a folder of images is expected, which a config.yaml of one's own among images does not pass."""
        return self.has_config() and (self.start_path.is_file() or self.checkpoints_dir.is_dir()
                                      or self.metrics_path.is_file())

    def is_run(self) -> bool:
        """Whether the folder holds an mlsctl run: a config.yaml that reads as a recipe."""
        if not self.has_config():
            return False
        from mlsctl import config as config_lib

        try:
            config_lib.load_run_recipe(self.config_path)
        except UserError:
            return False
        return True

    def own_entries(self) -> list[Path]:
        """The entries of the folder that mlsctl pretrain writes (see :data:`RUN_ENTRIES`), with the
        temporary files of interrupted atomic writes."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir()
                      if p.name in RUN_ENTRIES
                      or (p.name.endswith(".tmp") and any(p.name.startswith("." + e) for e in RUN_ENTRIES)))

    def other_entries(self) -> list[str]:
        """The names of the entries pretrain did not write (a user's own files), which stay."""
        from mlsctl.locks import LOCK_NAME

        own = {p.name for p in self.own_entries()}
        return sorted(p.name for p in self.root.iterdir() if p.name not in own and p.name != LOCK_NAME
                      and p.name not in HIDDEN_ENTRIES)

    # ------------------------------------------------------------------ --overwrite, undone until a checkpoint
    # Every step is a rename or a removal whose state the next start can read back (recover_replacement),
    # so a kill at any moment leaves the replaced run whole: in place, or in .replaced/ to be put back.

    def set_aside(self) -> list[str]:
        """--overwrite: move what :meth:`own_entries` lists into ``.replaced/`` (through
        ``.replacing/``, renamed when every entry is in it); returns :meth:`other_entries`. The new run
        writes its files only after this returns."""
        moving = self.root / REPLACING
        moving.mkdir()
        for entry in self.own_entries():
            entry.rename(moving / entry.name)
        moving.rename(self.root / REPLACED)
        return self.other_entries()

    def put_back(self) -> bool:
        """A new run that failed or was stopped before its first checkpoint: its entries are cleared
        away and the run it replaced is put back as it was. False when nothing was set aside."""
        if not (self.root / REPLACED).is_dir():
            return False
        trash = self.root / DISCARDED
        shutil.rmtree(trash, ignore_errors=True)  # an earlier put-back stopped at this step: the new run's
        trash.mkdir()
        for entry in self.own_entries():  # the new run's
            entry.rename(trash / entry.name)
        (self.root / REPLACED).rename(self.root / RESTORING)
        self._move_back(self.root / RESTORING)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    @property
    def replacing_another(self) -> bool:
        """A start with --overwrite that has no checkpoint yet: the run it replaced waits in ``.replaced/``."""
        return (self.root / REPLACED).is_dir()

    def discard_replaced(self) -> None:
        """The new run has a checkpoint: the run it replaced goes for good. A file that cannot be
        removed now is left for the next start (:meth:`recover_replacement`), not raised: the new
        run's checkpoint is written."""
        if (self.root / REPLACED).exists():
            shutil.rmtree(self.root / REPLACED, ignore_errors=True)

    def recover_replacement(self) -> Optional[str]:
        """At a start, finish what a killed replacement left half done; says what it did, or None."""
        if (self.root / REPLACING).is_dir():  # killed while setting aside: nothing new was written yet
            self._move_back(self.root / REPLACING)
            return f"a replacement of {self.root} that was stopped while it began is undone: the run is as it was"
        if (self.root / RESTORING).is_dir():  # killed while putting back: the new run's entries are cleared
            self._move_back(self.root / RESTORING)
            shutil.rmtree(self.root / DISCARDED, ignore_errors=True)
            return f"the run that --overwrite replaced in {self.root} is back in place (its restore was stopped)"
        if (self.root / REPLACED).is_dir():
            if self.latest() is None:  # killed before the new run's first checkpoint
                self.put_back()
                return (f"{self.root} holds the run it held before an --overwrite start that was killed before its "
                        f"first checkpoint")
            self.discard_replaced()  # killed while deleting the replaced run, after the first checkpoint
        shutil.rmtree(self.root / DISCARDED, ignore_errors=True)
        return None

    def _move_back(self, folder: Path) -> None:
        for entry in folder.iterdir():
            entry.rename(self.root / entry.name)
        folder.rmdir()

    def image_list(self) -> Optional[list[str]]:
        """The lines of images.txt (relative paths, line i = image_id i), or None without one."""
        if not self.images_path.is_file():
            return None
        text = self.images_path.read_text(encoding="utf-8")
        return text.split("\n")[:-1] if text.endswith("\n") else (text.split("\n") if text else [])

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints (their state.json exists), oldest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [Checkpoint(p) for p in self.checkpoints_dir.glob("step-*")
                 if p.is_dir() and (p / "state.json").is_file() and Checkpoint.is_folder_name(p.name)]
        return sorted(found, key=lambda c: c.step)

    def recover_checkpoint_swaps(self) -> None:
        """Undo a checkpoint's replacement cut short (:func:`mlsctl.atomic.swap_folder` where the system cannot
        exchange two folders: a kill between its two renames leaves the old one at ``.step-N.swap-old``).
        For the process that writes the run, under its lock."""
        from mlsctl import atomic

        if self.checkpoints_dir.is_dir():
            for aside in self.checkpoints_dir.glob(".step-*.swap-old"):
                atomic.recover_swap(self.checkpoints_dir / aside.name[1:-len(".swap-old")])

    def other_checkpoint_steps(self, than: Path, holding: str) -> list[int]:
        """The steps of the run's complete checkpoints, but the one at ``than``, that hold the file
        ``holding``, oldest first: what to read instead of a damaged or incomplete checkpoint."""
        return [c.step for c in self.checkpoints() if c.path != Path(than) and (c.path / holding).is_file()]

    def latest(self) -> Optional[Checkpoint]:
        found = self.checkpoints()
        return found[-1] if found else None

    def checkpoint(self, step: Optional[int] = None) -> Checkpoint:
        found = self.checkpoints()
        if not found:
            raise UserError(f"run {self.root} has no checkpoint yet")
        if step is None:
            return found[-1]
        for c in found:
            if c.step == step:
                return c
        raise UserError(f"run {self.root} has no checkpoint at step {step}; it has steps {', '.join(str(c.step) for c in found)}")
