"""What a method declares; the training loop (:mod:`mlsctl.train`) does the rest.

A method is an ``nn.Module`` holding every network it trains or keeps (student, teacher, heads,
centers) and declares:

* ``Config``: its dataclass of hyper-parameters (the recipe's ``method`` section);
* :meth:`training_step` (also its ``forward``, so DDP sees it): one batch → :class:`StepOutput`;
  with gradient accumulation (``optim.accumulate_steps`` A > 1) the loop calls it once per
  micro-batch, all A with the same optimiser ``step``, and sets :attr:`micro_batch` to
  ``(index, A)`` before each call; before each step it sets :attr:`logged`, True where the step's
  metrics are logged: the only steps whose ``time/...`` metrics are measured (:meth:`timer`), and a
  method may skip what only feeds its metrics on the others;
* :meth:`end_step`: called once per optimiser step, after the backward pass of its last
  micro-batch and before the optimiser step: where a method applies what it gathered over the
  micro-batches (DINO's centre from the mean over the whole step's batch);
* :meth:`ema_pairs`: (student, teacher) modules the loop updates by EMA after each step, with
  momentum :meth:`ema_momentum`;
* :meth:`banks`: its memory banks, saved with every checkpoint; the loop holds their writes during
  an optimiser step (:meth:`~mlsctl.bank.MemoryBank.hold`) and writes them after its last
  micro-batch, so every micro-batch reads the banks as they were at the start of the step;
* :meth:`last_layer_parameters`: parameters frozen for ``optim.freeze_last_layer_epochs``;
* :meth:`teacher_backbone`: the backbone features are extracted from;
* :meth:`open_data`: what ``data.root`` holds (an :class:`~mlsctl.data.images.ImageFolder` by
  default; a method may train on something else, such as a feature folder);
* :meth:`build_dataset`: the training dataset and its collate function (multi-crop image folder
  by default); a dataset with an ``on_device(batch)`` method finishes each batch on the training
  device (normalisation, or the whole multi-crop with ``data.augment: gpu``);
* :meth:`batch_sampler`: the step-indexed batch sampler (:class:`~mlsctl.data.loader.StepBatchSampler`
  by default; it yields ``optim.accumulate_steps`` micro-batches per step and must derive step
  ``s``'s from the seed and ``s`` alone, for exact resume);
* :meth:`check_recipe`: recipe constraints of the method, reported as config errors, and
  :meth:`check_training`: those that depend on the number of processes or the device;
* :meth:`input_paths`: the files it reads besides ``data.root`` and ``model.weights`` (such as a
  list of objects), which ``pretrain --overwrite`` never deletes;
* :attr:`has_backbone`: False for a method that trains no backbone (one on features): the loop
  then exports no teacher at the end of the run;
* optionally :meth:`query_projection` (the module a bank's ``QueryFeature.projection`` names) and
  :meth:`bank_views` (method-specific rows ``mlsctl bank inspect`` adds to a bank's table).

Trainable parameters are those with ``requires_grad``; a teacher freezes its own.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from mlsctl.bank import MemoryBank
from mlsctl.config import MethodConfig, Recipe
from mlsctl.data.images import ImageFolder
from mlsctl.data.loader import MultiCropDataset, StepBatchSampler, collate
from mlsctl.data.multicrop import MultiCrop
from mlsctl.device import synchronize
from mlsctl.models.backbone import Backbone
from mlsctl.schedules import Schedule, cosine


@dataclass
class StepOutput:
    loss: torch.Tensor  # the scalar to back-propagate
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # detached loss terms, logged as loss/NAME
    # anything else worth a curve: numbers, or 0-d tensors that the loop reads only where it logs (no
    # float()/int()/bool() of a device tensor in the step: each stalls a GPU; metric_value, metric_ratio)
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


def metric_value(value: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor as a metric kept on the device (read only where metrics are logged): a float64
    copy, which holds exactly the Python float ``float(value)`` would give and sums and averages
    over micro-batches as Python floats do (:class:`~mlsctl.train.metrics.StepOutputs`)."""
    return value.detach().to(torch.float64, copy=True)


def metric_ratio(numerator: torch.Tensor, denominator: "torch.Tensor | int | float") -> torch.Tensor:
    """``numerator / denominator`` as a metric kept on the device: a 0-d float64 tensor holding what
    ``float(numerator) / float(denominator)`` would (the division on the device too, by a tensor:
    CUDA multiplies by the reciprocal of a Python number, which may differ in the last bit)."""
    numerator = metric_value(numerator)
    if not isinstance(denominator, torch.Tensor):
        denominator = torch.full((), denominator, dtype=torch.float64, device=numerator.device)
    return numerator / metric_value(denominator)


class StepTimer:
    """The seconds of a method's own operations in one training step, its ``time/NAME`` metrics:
    ``with timer("time/NAME"): ...`` adds the block's seconds to ``timer.seconds[name]``.

    CUDA runs kernels asynchronously, so each timed block is bracketed by a synchronisation
    (:func:`~mlsctl.device.synchronize`), which stalls the device's queue: it happens only when
    ``on`` (:attr:`Method.logged`: the step's metrics are logged). Otherwise nothing is timed or
    synchronised and :attr:`seconds` stays empty: no ``time/...`` metric that step."""

    def __init__(self, on: bool, device: torch.device):
        self.on, self.device = on, device
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.on:
            yield
            return
        synchronize(self.device)
        started = time.perf_counter()
        yield
        synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


class Method(nn.Module):
    Config: ClassVar[type] = MethodConfig
    find_unused_parameters: ClassVar[bool] = False
    #: False for a method that trains no backbone (one on features): no teacher to export
    has_backbone: ClassVar[bool] = True
    #: what one batch element is (``optim.batch_size`` counts them, and so does ``images_per_s`` in
    #: metrics.jsonl and summary.json); :meth:`elements` and :meth:`speed_unit` word it
    batch_element: ClassVar[str] = "image"
    # what data.root names, for the sentence of a recipe that sets none
    data_root_hint: ClassVar[str] = "add data.root=/path/to/images"

    def __init__(self, recipe: Recipe, schedule: Schedule):
        super().__init__()
        self.recipe = recipe
        self.cfg = recipe.method
        self.schedule = schedule
        #: (index, count) of the micro-batch the next training_step sees within its optimiser step
        self.micro_batch: tuple[int, int] = (0, 1)
        #: whether the next step's metrics are logged: the loop sets it before each step (outside the
        #: loop it stays True). Only then are the method's own operations timed (:meth:`timer`), and a
        #: method may skip work that only feeds its metrics on the other steps
        self.logged: bool = True

    # ------------------------------------------------------------------ declared by each method
    def training_step(self, batch, step: int) -> StepOutput:
        raise NotImplementedError

    def end_step(self, step: int) -> None:
        """The end of optimiser step ``step``: its last micro-batch's backward is done, the optimiser
        step and the EMA update are next."""

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return []

    def ema_momentum(self, step: int) -> float:
        """Teacher momentum: cosine from ``cfg.momentum_teacher`` to ``cfg.momentum_teacher_end``."""
        return cosine(step, self.schedule.total_steps, self.cfg.momentum_teacher, self.cfg.momentum_teacher_end)

    def banks(self) -> dict[str, MemoryBank]:
        return {}

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return []

    def teacher_backbone(self) -> Backbone:
        raise NotImplementedError

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> list[tuple[str, str]]:
        return []

    @classmethod
    def data_notes(cls, recipe: Recipe, dataset) -> list[str]:
        """What the data as built (:meth:`build_dataset`) suggests is not what was meant: one sentence
        each, logged when the run starts, and added to the sentence of a refusal of the data's size."""
        return []

    @classmethod
    def trained_images(cls, recipe: Recipe, relpaths: Sequence[str]) -> Optional[tuple[int, str]]:
        """Where the method trains on a part of the images under data.root (``relpaths``, a run's
        images.txt): how many of them, and what chose them; None where it trains on all. The run's first
        line and the report's summary count these, not data.root's (a new user's probe, 2026-12-07)."""
        return None

    def end_notes(self) -> list[str]:
        """What the run's own metrics say went wrong, one sentence each, logged as warnings when it
        finishes (before ``done:``)."""
        return []

    def run_notes(self, elements: int) -> list[str]:
        """What this run, of ``elements`` batch elements (images, sets) in all, will not do that its
        recipe asks for: one sentence each, logged as warnings when it starts (:meth:`recipe_notes`
        for what the recipe alone shows)."""
        return []

    @classmethod
    def check_training(cls, recipe: Recipe, world_size: int, device_type: str) -> list[tuple[str, str]]:
        """Constraints that depend on how the run trains (processes, device), checked by
        ``pretrain`` only: a method rebuilt in one process to read a run's checkpoint skips them."""
        return []

    @classmethod
    def input_paths(cls, recipe: Recipe) -> list[tuple[str, Optional[str]]]:
        """Files or folders the method reads besides ``data.root`` and ``model.weights``, as (recipe
        key, path or None when unset): ``pretrain --overwrite`` refuses an ``--out`` holding one."""
        return []

    @classmethod
    def elements(cls, count: int) -> str:
        """``count`` batch elements in words: "256 images", "16 sets"."""
        return f"{count} {cls.batch_element}{'' if count == 1 else 's'}"

    @classmethod
    def speed_unit(cls, short: bool = False) -> str:
        """The unit of the run's speed: "images/s" ("img/s" on the progress lines), "sets/s"."""
        return ("img" if short and cls.batch_element == "image" else cls.batch_element + "s") + "/s"

    @classmethod
    def throughput_units(cls, recipe: Recipe) -> dict[str, int]:
        """Throughputs metrics.jsonl records besides ``images_per_s`` (batch elements per second),
        when a batch element is not one image: record name → how many units one element holds
        (MILE: ``{"sets_per_s": 1, "photos_per_s": set_length}``)."""
        return {}

    def query_projection(self, name: str) -> nn.Module:
        """The teacher module a bank's query feature names (``QueryFeature.projection``)."""
        raise KeyError(name)

    @classmethod
    def bank_views(cls, recipe: Recipe, banks: dict[str, MemoryBank],
                   image_paths: Optional[list[Path]] = None) -> dict[str, list[tuple[str, str, object]]]:
        """Extra rows of ``mlsctl bank inspect`` per bank: (label, text, JSON value).
        ``image_paths[image_id]`` is the file of a payload ``image_id`` (the run's images.txt)."""
        return {}

    @staticmethod
    def multicrop(recipe: Recipe) -> MultiCrop:
        """The recipe's multi-crop augmentation (``data.global_crops``, ``data.local_crops``)."""
        data = recipe.data
        return MultiCrop(
            global_size=data.global_crops.size, global_scale=data.global_crops.scale, n_global=data.global_crops.count,
            n_local=data.local_crops.count, local_size=data.local_crops.size, local_scale=data.local_crops.scale,
            photometric=data.photometric, to_float=False,
        )

    @staticmethod
    def data_path(recipe: Recipe) -> dict:
        """Where the multi-crop runs (``data.augment``, ``decode_size``, ``cache``), as the
        datasets' keyword arguments."""
        data = recipe.data
        return {"augment": data.augment, "decode_size": data.device_decode_size, "cache": data.cache}

    @classmethod
    def recipe_notes(cls, recipe: Recipe) -> list[str]:
        """Settings that are valid but do nothing, or less than asked, with this recipe: one
        sentence each, logged as warnings when the run starts."""
        data, notes = recipe.data, []
        if data.augment == "cpu" and data.decode_size:
            notes.append(f"data.decode_size={data.decode_size} has no effect with data.augment=cpu (the loader workers "
                         f"crop the full images); remove it or set data.augment=gpu")
        if data.augment == "gpu" and data.device_decode_size < data.global_crops.size:
            notes.append(f"data.decode_size={data.device_decode_size} is smaller than data.global_crops.size="
                         f"{data.global_crops.size}: every global crop is enlarged from fewer pixels; set data.decode_size "
                         f">= {data.global_crops.size} (0 = twice the crop size)")
        return notes

    @classmethod
    def describe_data(cls, recipe: Recipe, device: torch.device) -> str:
        """Where the crops are made, for the run's first lines."""
        data = recipe.data
        workers = f"{data.workers} loader worker{'s' if data.workers != 1 else ''}" if data.workers else "the main process"
        if data.augment == "cpu":
            return f"crops made by {workers} (data.augment=cpu)"
        cached = ", kept in memory" if data.cache == "memory" else ""
        return (f"images decoded to {data.device_decode_size} px by {workers}{cached}; crops made on {device} "
                f"(data.augment=gpu)")

    @classmethod
    def open_data(cls, recipe: Recipe) -> ImageFolder:
        return ImageFolder(recipe.data.root, "data.root", recipe.data.max_image_pixels)

    @classmethod
    def build_dataset(cls, recipe: Recipe, folder: ImageFolder):
        return MultiCropDataset(folder, cls.multicrop(recipe), recipe.seed, **cls.data_path(recipe)), collate

    @classmethod
    def prepare_dataset(cls, dataset, cache_dir: Path) -> None:
        """Work on the data that a run does once, after every input is validated and the run folder is
        locked; every process calls it. What it derives may be kept in ``cache_dir`` (the run's
        ``cache/``, created on demand, replaced and removed with the run) and read back by ``--resume``.
        Refinement keeps its neighbour search there; the image methods have nothing to prepare."""

    @classmethod
    def check_resumed_data(cls, dataset, run, given: str, trained_on: str) -> None:
        """--resume, before anything else is said of the run (a finished one is "already complete"): refuse
        data that differ from what ``run`` (a :class:`~mlsctl.runs.Run`) was trained on in a way the listing of
        data.root cannot show (``given``: the data.root of this resume, ``trained_on``: the run's). The image
        methods have nothing to check beyond the listing (RUN/images.txt); refinement compares the features
        with those its neighbour search recorded."""

    @classmethod
    def batch_sampler(cls, recipe: Recipe, dataset, *, world_size: int = 1, rank: int = 0, start_step: int = 0,
                      total_steps: int | None = None) -> StepBatchSampler:
        return StepBatchSampler(len(dataset), recipe.optim.batch_size, world_size=world_size, rank=rank,
                                seed=recipe.seed, start_step=start_step, total_steps=total_steps,
                                accumulate_steps=recipe.optim.accumulate_steps, elements=cls.elements)

    # ------------------------------------------------------------------ shared plumbing
    def global_rows(self, batch_size: int) -> range:
        """The places in its step's global batch of the rows of the micro-batch the next
        :meth:`training_step` sees: process r's micro-batch m of A holds rows ``(r·A + m)·b ...`` (the
        order of :func:`~mlsctl.data.loader.micro_batches`). Randomness drawn per row from them is the
        same however the global batch is split over processes and micro-batches."""
        from mlsctl import dist

        micro, accumulate = self.micro_batch
        first = (dist.rank() * accumulate + micro) * batch_size
        return range(first, first + batch_size)

    def timer(self, device: torch.device) -> StepTimer:
        """A :class:`StepTimer` for this training step: it times (and synchronises the device) only
        when the step is :attr:`logged`."""
        return StepTimer(self.logged, device)

    def forward(self, batch, step: int) -> StepOutput:
        return self.training_step(batch, step)

    def backbones(self) -> list[Backbone]:
        return [m for m in self.modules() if isinstance(m, Backbone)]
