"""Training batches: a deterministic step-indexed sampler and a multi-crop dataset.

Exact resume and process-count independence come from two rules:

* :class:`StepBatchSampler` derives the images of step ``s`` from ``(seed, epoch)`` only: epoch
  ``e`` is one seeded permutation of the dataset, cut into global batches of ``batch × world``
  images; process ``r`` takes slice ``r`` of each global batch. Resuming at step ``s`` starts the
  sampler at ``s`` (no batch is loaded and thrown away). Two processes with batch B see, together,
  exactly the images one process with batch 2B sees.
* :class:`MultiCropDataset` seeds the augmentation of image ``i`` in epoch ``e`` from
  ``(seed, epoch, i)``, so a crop never depends on which worker or process drew it.

An image that cannot be decoded is replaced by the next readable one (keeping batch shapes fixed)
and reported in ``Batch.skipped``; the training loop prints one line per file and a count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mlsctl.data.images import BadImage, ImageFolder
from mlsctl.data.multicrop import MultiCrop
from mlsctl.errors import UserError


PERMUTATION_STREAM = 2**32  # an "index" no image has: the seed of an epoch's permutation


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] % (2**63))


class StepBatchSampler(Sampler):
    """Yields, for steps ``start_step .. total_steps-1``, this process's list of ``(epoch, index)``."""

    def __init__(self, n_items: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 start_step: int = 0, total_steps: int | None = None):
        self.n_items, self.batch_size, self.world_size, self.rank, self.seed = n_items, batch_size, world_size, rank, seed
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = n_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(f"the data has {n_items} images, fewer than one global batch of {self.global_batch} "
                            f"({batch_size} per process x {world_size} processes); lower optim.batch_size")
        self.start_step = start_step
        self.total_steps = total_steps if total_steps is not None else self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, PERMUTATION_STREAM))
        return torch.randperm(self.n_items, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached_epoch, perm = -1, None
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self.permutation(epoch)
            start = position * self.global_batch + self.rank * self.batch_size
            yield [(epoch, int(i)) for i in perm[start:start + self.batch_size]]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


@dataclass
class Batch:
    crops: list[torch.Tensor]  # per crop position: [B, 3, S, S]; global crops first
    boxes: torch.Tensor  # [B, n_crops, 4] (x0, y0, x1, y1) in original pixels
    flips: torch.Tensor  # [B, n_crops] bool
    image_ids: torch.Tensor  # [B] row index of the image in the folder
    image_sizes: torch.Tensor  # [B, 2] (width, height)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    masks: Optional[torch.Tensor] = None  # [B, n_global, h, w] bool: masked patches (masked image modelling)

    def __len__(self) -> int:
        return self.image_ids.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch([c.to(device, non_blocking=True) for c in self.crops], self.boxes.to(device), self.flips.to(device),
                     self.image_ids.to(device), self.image_sizes.to(device), self.skipped,
                     self.masks.to(device) if self.masks is not None else None)


class MultiCropDataset(Dataset):
    def __init__(self, folder: ImageFolder, transform: MultiCrop, seed: int):
        self.folder, self.transform, self.seed = folder, transform, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        skipped = []
        n = len(self.folder)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image = self.folder.load(i)
                break
            except BadImage as exc:
                skipped.append((self.folder.relpath(i), str(exc)))
        else:
            raise UserError(f"none of the {n} files in {self.folder.root} could be decoded as an image")
        views = self.transform(image, sample_seed(self.seed, epoch, i))
        return {"crops": views.crops, "boxes": views.boxes, "flips": views.flips, "image_id": i,
                "image_size": views.image_size, "skipped": skipped}


def collate(samples: list[dict]) -> Batch:
    n_crops = len(samples[0]["crops"])
    return Batch(
        crops=[torch.stack([s["crops"][c] for s in samples]) for c in range(n_crops)],
        boxes=torch.stack([s["boxes"] for s in samples]),
        flips=torch.stack([s["flips"] for s in samples]),
        image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
        image_sizes=torch.tensor([s["image_size"] for s in samples], dtype=torch.long),
        skipped=[item for s in samples for item in s["skipped"]],
    )


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, sampler: StepBatchSampler, workers: int, pin_memory: bool = False,
                collate_fn=collate) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
