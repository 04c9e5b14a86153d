"""Checkpoints: written atomically between optimiser steps, loaded for ``--resume`` (every file
checked, a damaged one named in one sentence), initial weights for ``--init-from``, and the
teacher exported at the end of a run.

A checkpoint holds everything that decides the next step: weights and buffers
(``model.safetensors``), banks (``banks.safetensors``), optimizer and grad-scaler state
(``optimizer.pt``), every process's RNG states (``rng.pt``), ``state.json`` and the recipe it was
trained with (``recipe.yaml``: ``--resume`` refuses a ``RUN/config.yaml`` edited since).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from mlsctl import __version__, atomic, config, dist, provenance
from mlsctl.bank import save_banks
from mlsctl.errors import UserError, first_line
from mlsctl.models.weights import load_weights_only
from mlsctl.restore import read_checkpoint_weights
from mlsctl.runs import RUN_FORMAT_VERSION, Checkpoint, Run, checkpoint_dirname


def rng_state() -> dict:
    """Every RNG of this process as plain Python values (bytes, lists), which gather across
    processes and load with ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state().numpy().tobytes(),
             "numpy": (kind, keys.tolist(), int(position), int(has_gauss), float(gauss)),
             "python": random.getstate()}
    if torch.cuda.is_available():  # only this process's device: a resume may see fewer GPUs per process
        state["cuda_device"] = torch.cuda.get_rng_state(torch.cuda.current_device()).numpy().tobytes()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(state["torch"]), dtype=torch.uint8))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if not torch.cuda.is_available():
        return
    device = torch.cuda.current_device()
    cuda = state.get("cuda_device")
    if cuda is None and len(state.get("cuda", ())) > device:
        cuda = state["cuda"][device]  # a checkpoint of before 2026-12-05 holds every visible GPU's state
    if cuda is not None:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(cuda), dtype=torch.uint8), device)


def _write_file(path: Path, writer) -> None:
    """``writer(path)``; a library's opaque failure is raised as the OSError behind it (full disk,
    file-size limit) with the path. The file gets the usual permissions (safetensors creates its
    files 0600: another user could read every file of a checkpoint but its weights)."""
    try:
        writer(path)
    except OSError:
        raise
    except Exception as exc:
        atomic.explain_write_failure(exc, path, path)
        raise
    atomic.usual_permissions(path)


def save_checkpoint(run: Run, step: int, method, optimizer, accelerator, recipe, keep: int,
                    sessions: Optional[Sequence[dict]] = None) -> Optional[Path]:
    """Write checkpoint ``step`` atomically (a temporary folder renamed into place); ``sessions``: the
    training sessions up to it (:class:`mlsctl.train.loop.Sessions`), kept in its state.json."""
    from safetensors.torch import save_file

    rng_states = dist.all_gather_object(rng_state())
    for name, bank in method.banks().items():
        bank.assert_synchronized(name)
    if not accelerator.is_main_process:
        dist.barrier()
        return None
    final = run.checkpoints_dir / checkpoint_dirname(step)
    atomic.recover_swap(final)  # a replacement of this step cut short (two renames where no exchange exists)
    tmp = run.checkpoints_dir / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        state_dict = {k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}
        _write_file(tmp / "model.safetensors", lambda path: save_file(
            state_dict, str(path), metadata={"format_version": str(RUN_FORMAT_VERSION)}))
        save_banks(method.banks(), tmp / "banks.safetensors")
        optimizer_state = {"optimizer": optimizer.state_dict()}
        if accelerator.scaler is not None:
            optimizer_state["scaler"] = accelerator.scaler.state_dict()
        _write_file(tmp / "optimizer.pt", lambda path: torch.save(optimizer_state, path))
        _write_file(tmp / "rng.pt", lambda path: torch.save(rng_states, path))
        state = {"format_version": RUN_FORMAT_VERSION, "step": step, "epoch": method.schedule.epoch(step),
                 "total_steps": method.schedule.total_steps, "method": recipe.method.name,
                 "world_size": accelerator.num_processes, "mlsctl_version": __version__, "torch_version": torch.__version__,
                 "commit": provenance.commit(), "device": provenance.device_name(accelerator.device),
                 **({"sessions": list(sessions)} if sessions is not None else {})}  # none given: none claimed
        atomic.write_json(tmp / "state.json", state)
        config.save_recipe(recipe, tmp / "recipe.yaml")  # what --resume compares with (not config.yaml: not a run)
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write (full disk) leaves no half checkpoint behind
        raise
    atomic.swap_folder(tmp, final)  # a step saved again (a resumed run) replaces its checkpoint in one step
    run.discard_replaced()  # the run that --overwrite set aside, kept until this first checkpoint
    for old in run.checkpoints()[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    dist.barrier()
    return final


def _damaged(checkpoint: Checkpoint, name: str, why: str) -> UserError:
    return UserError(f"{checkpoint.path / name} {why}; delete {checkpoint.path} to resume from the checkpoint before it, "
                     f"or start a new run", exit_code=1)


def _load_weights_only(checkpoint: Checkpoint, path: Path):
    """``torch.load(weights_only=True)`` of a checkpoint file; a damaged or foreign file (one
    holding objects other than tensors and plain values) is one sentence."""
    import pickle

    try:
        return load_weights_only(path)
    except FileNotFoundError:
        raise _damaged(checkpoint, path.name, "is missing") from None
    except pickle.UnpicklingError:
        # torch's message suggests weights_only=False, which would run the file's code: never
        raise _damaged(checkpoint, path.name, "holds objects other than tensors and plain values (it was not "
                                              "written by mlsctl, or was tampered with), so it is not loaded") from None
    except Exception as exc:  # truncated zip, not a torch file
        raise _damaged(checkpoint, path.name, f"is damaged ({first_line(exc)})") from None


def load_checkpoint(checkpoint: Checkpoint, method, optimizer, accelerator) -> dict:
    from mlsctl.bank import read_bank_states

    state = checkpoint.state()
    if state.get("world_size") != accelerator.num_processes:
        world = state.get("world_size")
        how = ("one process (mlsctl pretrain ..., without accelerate launch)" if world == 1 else
               f"the same number (accelerate launch --num_processes {world} -m mlsctl pretrain ...)")
        raise UserError(f"{checkpoint.path} was written by {world} process{'' if world == 1 else 'es'} and this resume "
                        f"runs {accelerator.num_processes}; resume with {how}")
    weights = read_checkpoint_weights(checkpoint.model_path)  # damaged: one sentence saying to delete it
    try:
        method.load_state_dict(weights, strict=True)
    except RuntimeError as exc:  # readable, but not this network's: deleting it would lose a good checkpoint
        raise UserError(f"{checkpoint.model_path} holds weights of another network than config.yaml builds "
                        f"({first_line(exc, 160)}): was the recipe edited, or the run written by another mlsctl "
                        f"version? Resume with the recipe and version it was trained with, or start a new run with "
                        f"--init-from {checkpoint.path.parent.parent}", exit_code=1) from None
    try:
        bank_states = read_bank_states(checkpoint.banks_path)
    except Exception as exc:
        raise _damaged(checkpoint, checkpoint.banks_path.name, f"cannot be read ({first_line(exc)})") from None
    banks = method.banks()
    if set(bank_states) != set(banks):
        raise UserError(f"{checkpoint.banks_path} holds banks {sorted(bank_states)}, the method has {sorted(banks)}")
    for name, bank in banks.items():
        try:
            bank.load_state_dict(bank_states[name])
        except ValueError as exc:
            raise _damaged(checkpoint, checkpoint.banks_path.name, f"does not fit bank '{name}' ({exc})") from None
    optimizer_state = _load_weights_only(checkpoint, checkpoint.optimizer_path)
    try:
        optimizer.load_state_dict(optimizer_state["optimizer"])
        if "scaler" in optimizer_state and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(optimizer_state["scaler"])
    except Exception as exc:
        raise _damaged(checkpoint, checkpoint.optimizer_path.name, f"does not fit the optimizer ({first_line(exc)})") from None
    rng_states = _load_weights_only(checkpoint, checkpoint.rng_path)
    if not isinstance(rng_states, list) or len(rng_states) <= accelerator.process_index:
        raise _damaged(checkpoint, checkpoint.rng_path.name, "does not hold the random states of every process")
    state["rng"] = rng_states[accelerator.process_index]
    return state


def export_teacher(method, run: Run) -> None:
    """The teacher backbone in timm's key layout (LoRA merged), loadable by timm or --weights;
    with LoRA, its adapters alone as well (peft format, in RUN/teacher_adapters/)."""
    from safetensors.torch import save_file

    from mlsctl.models import lora

    if not method.has_backbone:
        return
    backbone = method.teacher_backbone().model
    vit = lora.merged_vit(backbone)
    state = {k: v.detach().cpu().contiguous() for k, v in vit.state_dict().items()}
    model = method.recipe.model
    spec = {"arch": model.arch, "img_size": model.img_size, "patch_size": model.patch_size,
            "timm_kwargs": dict(model.timm_kwargs or {})}
    if model.embedding_dim:
        spec["embedding_dim"] = model.embedding_dim
    metadata = {"arch": model.arch, "format": "timm", "model": json.dumps(spec, sort_keys=True)}
    atomic.write_with(run.teacher_weights_path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    if lora.is_lora(backbone):
        tmp = run.root / ".teacher_adapters.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lora.save_adapters(backbone, tmp)
        shutil.rmtree(run.teacher_adapters_path, ignore_errors=True)
        os.replace(tmp, run.teacher_adapters_path)
