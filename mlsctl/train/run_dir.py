"""The run folder (``--out``): its lock, the checks of ``--resume`` (which recipe keys may change),
the preparation of a new run (``--overwrite``), and the undoing of a start that failed before its
first checkpoint."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from mlsctl import atomic, config as config_lib
from mlsctl.data.images import ImageFolder
from mlsctl.data.shards import is_feature_folder
from mlsctl.errors import UserError
from mlsctl.locks import LOCK_NAME, FolderLock
from mlsctl.runs import HIDDEN_ENTRIES, REPLACED, Run
from mlsctl.train.setup import close_logging

# Keys that may change between a run and its resumption without changing what it computes (so may
# every train.monitor.* key: see open_run_dir).
RESUME_SAFE_KEYS = {"data.workers", "data.cache", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
                    "train.bank_health_every", "train.log_with",
                    "description", "data.root"}


def check_nothing_precious_inside(out: Path, recipe, method_cls, recipe_source: str, init_from: Optional[str]) -> None:
    """--overwrite never deletes a folder holding the data, the recipe, the weights of this start or
    a file the method reads (:meth:`~mlsctl.methods.base.Method.input_paths`)."""
    inputs = [("data.root", recipe.data.root), ("the recipe", recipe_source), ("model.weights", recipe.model.weights),
              ("--init-from", init_from), *method_cls.input_paths(recipe)]
    out_real = os.path.realpath(out)
    for name, path in inputs:
        if path and os.path.commonpath([out_real, os.path.realpath(path)]) == out_real:
            raise UserError(f"--out {out} contains {name} ({path}), which --overwrite would delete; choose another "
                            f"--out, or move {name} out of it")


def check_out_outside_data(out: Path, recipe) -> None:
    """A new run never goes inside data.root: a picture drawn into it would become a training image,
    and the run could no longer be resumed (its images.txt would no longer match)."""
    data_root = os.path.realpath(recipe.data.root) if recipe.data.root else None
    if data_root and os.path.commonpath([os.path.realpath(out), data_root]) == data_root:
        inside = ("a picture drawn into the run would become a training image" if not is_feature_folder(data_root)
                  else "the run's files would sit among the features it trains on")
        raise UserError(f"--out {out} is inside data.root ({recipe.data.root}): {inside}, and the run could no longer "
                        f"be resumed; choose an --out outside it")


def _same_images(run: Run, saved, recipe, folder: ImageFolder) -> None:
    """--resume: data.root (moved or not) must hold the images the run was trained on."""
    recorded = run.image_list()
    listed = folder.relpaths()
    if recorded is None:
        if saved.data.root == recipe.data.root:
            return  # a run written before images.txt existed: nothing to compare with
        raise UserError(f"{run.root} has no images.txt to check the new data.root {recipe.data.root} against; resume "
                        f"with data.root={saved.data.root}, or start a new run")
    if recorded != listed:
        differs = next((i for i, (a, b) in enumerate(zip(recorded, listed)) if a != b), min(len(recorded), len(listed)))
        if differs < min(len(recorded), len(listed)):
            example = f"image {differs} is {listed[differs]!r}, was {recorded[differs]!r}"
        elif len(listed) > len(recorded):
            example = f"{listed[differs]!r} and any after it are new"
        else:
            example = f"{recorded[differs]!r} and any after it are gone"
        raise UserError(f"data.root {recipe.data.root} holds {len(listed)} images, but the run was trained on the "
                        f"{len(recorded)} listed in {run.images_path} ({example}); resume with the same images, or "
                        f"start a new run with another --out")


def _unsafe_changes(before, after) -> list[str]:
    return [k for k in config_lib.differences(before, after)
            if k not in RESUME_SAFE_KEYS and not k.startswith("train.monitor.")]


def _named(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _trained_recipe(latest):
    """The recipe checkpoint ``latest`` was trained with (its ``recipe.yaml``), or None where it has
    none (written before 2026-12-05's ninth session)."""
    if latest is None or not latest.recipe_path.is_file():
        return None
    try:
        return config_lib.absolute_paths(config_lib.load_run_recipe(latest.recipe_path))
    except UserError as exc:
        raise UserError(f"{latest.recipe_path} is damaged ({exc.message}); delete {latest.path} to resume from the "
                        f"checkpoint before it, or start a new run", exit_code=1) from None


def _values(recipe, keys: list[str]) -> str:
    flat = config_lib.to_dict(recipe)

    def value(key: str):
        node = flat
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    return _named([f"{k} back to {value(k)}" for k in keys])


def check_resumable(run: Run, saved, latest, recipe) -> None:
    """--resume: the recipe given must compute what the run was trained with: the newest
    checkpoint's own recipe, else (older checkpoints) RUN/config.yaml (``saved``). A RUN/config.yaml
    edited by hand since (a learning rate, a schedule, a batch) would change the run mid-way."""
    trained = _trained_recipe(latest)
    reference, where = (trained, latest.recipe_path) if trained is not None else (saved, run.config_path)
    changed = _unsafe_changes(reference, recipe)
    if not changed:
        return
    if reference.method.name != recipe.method.name:
        what = f"{run.root} is a run of method {reference.method.name}, and the recipe trains {recipe.method.name}"
    elif trained is not None and not _unsafe_changes(saved, recipe):  # the recipe says what RUN/config.yaml says
        raise UserError(f"{run.config_path} was edited after {latest.path.name} was trained: set {_values(trained, changed)} "
                        f"(as {latest.recipe_path} has it) to resume, or start a new run with another --out "
                        f"(with --init-from {run.root} to start from its weights)")
    else:
        what = f"the recipe differs from {where} at {_named(changed)}"
    raise UserError(f"{what}; resume continues the saved run as it was: drop those changes, or start a new run with "
                    f"another --out (with --init-from {run.root} to start from its weights)")


def replaced_run(run: Run) -> str:
    """The run ``--overwrite`` replaces, as the line that says so names it: its method and its last
    checkpoint ("the dino run (last checkpoint: step 200)"). A new user's probe (2026-12-07): ``refine train
    --overwrite`` of a DINO run's folder said "replacing the run", where other commands name what they replace."""
    method = config_lib.load_run_recipe(run.config_path).method.name  # it reads: Run.is_run said so
    latest = run.latest()
    return f"the {method} run (" + (f"last checkpoint: step {latest.step})" if latest is not None else "no checkpoint)")


def open_run_dir(run: Run, recipe, folder: ImageFolder, lock: FolderLock, *, resume: bool,
                  overwrite: bool, init_from: Optional[str], method_cls, dataset,
                  overridden: Sequence[str] = ()) -> Optional[str]:
    """Process 0, after every input has been validated: lock the run folder, then either check it
    for --resume (returns the checkpoint to continue from: :func:`_checkpoint_to_resume`) or prepare it for a new
    run (:func:`_prepare_new_run`). A start stopped or failed in between puts back the run it was replacing and
    releases the lock."""
    lock.acquire()
    try:
        recovered = run.recover_replacement() if run.root.is_dir() else None
        run.recover_checkpoint_swaps()
        if recovered and resume:  # the run to resume was the killed new one: it has no checkpoint
            raise UserError(f"{recovered}: that new run left nothing to resume. Run the same --resume again to continue "
                            f"the run it replaced, or start the new one again with --overwrite")
        if recovered:
            print(f"mlsctl: {recovered}", file=sys.stderr)
        if resume:
            return _checkpoint_to_resume(run, recipe, folder, method_cls, dataset)
        _prepare_new_run(run, recipe, overwrite=overwrite, init_from=init_from, overridden=overridden)
        return None
    except BaseException:
        if run.root.is_dir():  # stopped or failed while setting the old run aside or writing the new recipe
            run.recover_replacement()
        lock.release()
        raise


def _check_has_config(run: Run) -> None:
    """--resume needs RUN/config.yaml; without it, one sentence on where a copy of the recipe is."""
    if run.has_config():
        return
    if run.own_entries():
        latest = run.latest()
        source = (f"copy {latest.recipe_path}, the recipe its newest checkpoint was trained with"
                  if latest is not None and latest.recipe_path.is_file()
                  else "a copy of the recipe it was started with")
        raise UserError(f"{run.root} holds a run's files but no config.yaml, so it cannot be resumed: "
                        f"restore config.yaml ({source}), or start a new run with another --out")
    raise UserError(f"nothing to resume in {run.root} (no config.yaml); drop --resume to start a new run")


def _checkpoint_to_resume(run: Run, recipe, folder: ImageFolder, method_cls, dataset) -> str:
    """--resume, under the run's lock: the newest complete checkpoint, once the recipe, the images and the
    method's data (``method_cls`` checks ``dataset`` against what the run was trained on,
    :meth:`~mlsctl.methods.base.Method.check_resumed_data`) are those the run was trained with."""
    _check_has_config(run)
    saved = config_lib.absolute_paths(config_lib.load_run_recipe(run.config_path))
    latest = run.latest()
    check_resumable(run, saved, latest, recipe)
    if latest is None and run.teacher_weights_path.is_file():  # finished, its checkpoints removed since
        raise UserError(f"{run.root} has no checkpoint left to resume from, but its finished teacher is in "
                        f"{run.teacher_weights_path}: start a new run from it with --out NEW --init-from "
                        f"{run.teacher_weights_path} (--overwrite here would replace it)")
    if latest is None:
        raise UserError(f"nothing to resume in {run.root} (no complete checkpoint); drop --resume and add "
                        f"--overwrite to start again")
    _same_images(run, saved, recipe, folder)
    method_cls.check_resumed_data(dataset, run, recipe.data.root, (_trained_recipe(latest) or saved).data.root)
    for stale in run.checkpoints_dir.glob(".step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    if run.config_path.read_text() != config_lib.dump_recipe(recipe):
        config_lib.save_recipe(recipe, run.config_path)  # data.root moved, logging settings, an edit undone
    return str(latest.path)


def _set_aside_earlier_run(run: Run, others: list[str], overwrite: bool) -> None:
    """A new run in a folder that is not empty: refused unless --overwrite replaces a run there, whose own files
    are set aside (:meth:`~mlsctl.runs.Run.set_aside`) until the new run's first checkpoint."""
    shown = ", ".join(sorted(others)[:4]) + (", ..." if len(others) > 4 else "")
    if not overwrite and not run.has_config():  # no run there: --resume and --overwrite would fail too
        raise UserError(f"--out {run.root} is not empty and holds no run ({shown}): choose another --out, "
                        f"or empty it")
    if not overwrite:
        raise UserError(f"--out {run.root} is not empty: add --resume to continue it, --overwrite to replace "
                        f"it, or choose another --out")
    if not run.is_run():
        if run.own_entries():  # a run's files without a readable config.yaml: neither resumed nor replaced
            raise UserError(f"--out {run.root} holds a run's files ({shown}) but no readable config.yaml, so it "
                            f"can be neither resumed nor replaced safely: move out what you need, delete the "
                            f"folder, or choose another --out")
        raise UserError(f"--out {run.root} is not an mlsctl run (it holds {shown}); --overwrite only replaces "
                        f"runs: choose another --out")
    replaced = replaced_run(run)  # before it is set aside
    kept = run.set_aside()
    print(f"mlsctl: replacing {replaced} in {run.root}: it stays in {run.root / REPLACED} until the new run's "
          f"first checkpoint, and comes back if this start fails or is stopped before it"
          + (f"; kept {len(kept)} entr{'ies' if len(kept) > 1 else 'y'} that are not the run's files "
             f"({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})" if kept else ""), file=sys.stderr)


def _prepare_new_run(run: Run, recipe, *, overwrite: bool, init_from: Optional[str],
                     overridden: Sequence[str]) -> None:
    """A new run, under the run's lock: an earlier run in the folder is replaced only with --overwrite, and only its
    own files (:func:`_set_aside_earlier_run`); then the recipe and how the run was started are written."""
    others = [p.name for p in run.root.iterdir()  # a file browser's litter alone: empty (a helper, 2026-12-07)
              if p.name != LOCK_NAME and p.name not in HIDDEN_ENTRIES and not atomic.is_litter_file(p)]
    if others:
        _set_aside_earlier_run(run, others, overwrite)
    config_lib.save_recipe(recipe, run.config_path)
    # the keys set on the command line: the recipe's description may no longer say what the run is (the report
    # marks it: a new user's probe, 2026-12-07)
    atomic.write_json(run.start_path, {"init_from": os.path.abspath(init_from) if init_from else None,
                                       "overridden": list(overridden)})


def undo_start(run: Run) -> None:
    """A new run that failed before its first checkpoint leaves --out as it found it: its files are
    removed, and the run it replaced (--overwrite) is put back."""
    close_logging()
    if run.put_back():
        return
    for entry in run.own_entries():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def interrupted(run: Run, fresh: bool, is_main: bool, processes: int = 1, resume_command: str | None = None,
                saved_at_stop: int | None = None) -> str:
    """What Ctrl-C leaves behind, and the command that continues (with as many processes: a
    checkpoint resumes with the number that wrote it). ``resume_command``: the words after ``mlsctl``
    that continue the run when its own command is not ``pretrain RUN/config.yaml`` (``refine train``);
    ``saved_at_stop``: the step the run stopped after, when its checkpoint was written then."""
    latest = run.latest()
    if latest is None:
        if is_main and fresh:
            undo_start(run)
        return f"nothing was saved (no checkpoint yet) and {run.root} is as it was before this start"
    import shlex

    launch = f"accelerate launch --num_processes {processes} -m mlsctl" if processes > 1 else "mlsctl"
    # quoted: a path with a space, pasted as printed, named another recipe (a new user's probe, 2026-12-06)
    if resume_command is None:
        resume_command = f"pretrain {shlex.quote(str(run.config_path))} --out {shlex.quote(str(run.root))} --resume"
    at_stop = ", written at the stop" if saved_at_stop == latest.step else ""
    return (f"the last checkpoint is step {latest.step}{at_stop} ({latest.path}); "
            f"continue with: {launch} {resume_command}")


def record_images(run: Run, folder: ImageFolder) -> None:
    """images.txt: the files the run trains on, in row order (the image ids of its banks); written
    once, by process 0, and kept by a resumed run (:func:`_same_images` checks it)."""
    if not run.images_path.is_file():
        atomic.write_text(run.images_path, "".join(f"{path}\n" for path in folder.relpaths()))
