"""The run directory, one of mlsctl's three contracts (with recipes and feature shards)::

    RUN/config.yaml                     the resolved recipe (start a new run from it to reproduce)
    RUN/metrics.jsonl                   one JSON object per logged step
    RUN/train.log                       what the console showed, with timestamps
    RUN/summary.json                    written when training completes: steps, time, speed, final loss,
                                        and when (finished), on what (device, precision, processes) and
                                        with what (mlsctl_version, commit, torch_version) it was trained
    RUN/start.json                      what the weights started from: {"init_from": path or null}
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
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from mlsctl.errors import UserError

RUN_FORMAT_VERSION = 1

# What mlsctl pretrain writes in a run folder; `--overwrite` removes these and nothing else.
RUN_ENTRIES = ("config.yaml", "start.json", "metrics.jsonl", "train.log", "summary.json", "images.txt",
               "teacher.safetensors", "teacher_adapters", "checkpoints", "trackers", "report.html")


class Checkpoint:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.step = int(self.path.name.split("-")[1])

    model_path = property(lambda self: self.path / "model.safetensors")
    banks_path = property(lambda self: self.path / "banks.safetensors")
    optimizer_path = property(lambda self: self.path / "optimizer.pt")
    rng_path = property(lambda self: self.path / "rng.pt")
    state_path = property(lambda self: self.path / "state.json")

    def state(self) -> dict:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"checkpoint {self.path} is damaged ({exc}); delete it to fall back to an earlier one") from None
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("format_version"), int)):
            raise UserError(f"checkpoint {self.path} is damaged (its state.json lacks an integer step or format_version); "
                            f"delete it to fall back to an earlier one")
        if state.get("format_version", 0) > RUN_FORMAT_VERSION:
            raise UserError(f"checkpoint {self.path} was written by a newer mlsctl (format {state['format_version']}); upgrade mlsctl")
        return state

    def __repr__(self) -> str:
        return f"Checkpoint({self.path})"


def checkpoint_dirname(step: int) -> str:
    return f"step-{step:08d}"


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

    def init_from(self) -> Optional[str]:
        """The --init-from of the run's start (absolute), or None (also for runs before start.json)."""
        if not self.start_path.is_file():
            return None
        try:
            value = json.loads(self.start_path.read_text()).get("init_from")
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{self.start_path} is damaged; it says what the run's weights started from") from None
        return value if isinstance(value, str) else None

    def is_run(self) -> bool:
        """Whether the folder holds an mlsctl run: a config.yaml that reads as a recipe."""
        if not self.config_path.is_file():
            return False
        from mlsctl import config as config_lib

        try:
            config_lib.load_recipe(str(self.config_path))
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

    def remove_own_entries(self) -> list[str]:
        """Delete what :meth:`own_entries` lists; returns the names of the other entries, which stay."""
        from mlsctl.locks import LOCK_NAME

        for entry in self.own_entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return sorted(p.name for p in self.root.iterdir() if p.name != LOCK_NAME)

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
                 if p.is_dir() and (p / "state.json").is_file() and p.name.split("-")[1].isdigit()]
        return sorted(found, key=lambda c: c.step)

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
