"""m-per-class batches for metric learning, step-indexed for exact resume.

:class:`MPerClassStepSampler` draws its batches with pytorch-metric-learning's ``MPerClassSampler``
(every batch: ``batch / m`` classes, ``m`` samples of each, drawn with replacement only when a class
has fewer than ``m``). That sampler takes its randomness from the module-level
``pytorch_metric_learning.utils.common_functions.NUMPY_RANDOM`` and shuffles its own list of classes
in place, so an epoch depends on every epoch before it. Here it is made deterministic per epoch:
epoch ``e`` builds a *fresh* ``MPerClassSampler`` and iterates it while ``NUMPY_RANDOM`` is a
``RandomState`` seeded from ``(seed, e)`` (the module attribute is restored afterwards). Step ``s``
is then a pure function of ``(seed, s)``, as with :class:`~mlsctl.data.loader.StepBatchSampler`:
resuming at step ``s`` starts there without drawing the skipped batches, and process ``r`` of ``W``
takes slice ``r`` of each global batch of ``batch × W`` (with ``batch`` a multiple of ``m``, every
process's slice is m-per-class too). An epoch is ``len(labels) // (batch × W)`` steps, as for the
plain sampler. Items are ``(epoch, index, position)``: ``position`` is the draw's place in the epoch's
order (global batch after global batch), which seeds the draw's crops
(:class:`~mlsctl.data.loader.MultiCropDataset`): the sampler draws an image again within an epoch (a
class of fewer than ``m`` images in one batch, and across the epoch's batches, which do not partition
the data: ~36 % of the draws of a CUB-like epoch), and each draw is a crop of its own, as in the MS
authors' code (a fresh ``RandomResizedCrop`` and flip per draw), not a copy of the first draw's. The
position, like the index, is the same for any number of processes and accumulation steps. With gradient accumulation
(A micro-batches per step) the global batch is ``batch × A × W`` and each process yields its slice
as A micro-batches (:func:`~mlsctl.data.loader.micro_batches`), each m-per-class too.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from mlsctl.data.loader import global_batch_text, lower_batch_text, micro_batches, sample_seed
from mlsctl.errors import TooLittleData, UserError

M_PER_CLASS_STREAM = 2**32 + 1  # an "index" no item has: the seed of an epoch's m-per-class draw


class MPerClassStepSampler(Sampler):
    def __init__(self, labels: Sequence[int], m: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
                 seed: int = 0, start_step: int = 0, total_steps: int | None = None, what: str = "the data",
                 accumulate_steps: int = 1):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.m, self.batch_size, self.world_size, self.rank, self.seed = m, batch_size, world_size, rank, seed
        self.accumulate_steps = accumulate_steps
        self.global_batch = batch_size * accumulate_steps * world_size
        n_classes = len(np.unique(self.labels))
        lower = lower_batch_text(accumulate_steps)
        if batch_size % m:
            raise UserError(f"optim.batch_size {batch_size} is not a multiple of {m} samples per class; choose a "
                            f"multiple of {m}")
        if n_classes * m < self.global_batch:
            made = f" ({global_batch_text(batch_size, world_size, accumulate_steps)})" if accumulate_steps > 1 else ""
            raise TooLittleData(f"{what} has {n_classes} classes, too few for batches of {self.global_batch}{made} "
                                f"with {m} samples per class (at least {-(-self.global_batch // m)} classes); {lower}")
        self.steps_per_epoch = len(self.labels) // self.global_batch
        if self.steps_per_epoch == 0:
            raise TooLittleData(f"{what} has {len(self.labels)} items, fewer than one global batch of "
                                f"{self.global_batch}; {lower}")
        self.start_step = start_step
        self.total_steps = total_steps if total_steps is not None else self.steps_per_epoch

    @classmethod
    def of_recipe(cls, recipe, labels: Sequence[int], m: int, *, world_size: int = 1, rank: int = 0,
                  start_step: int = 0, total_steps: int | None = None) -> "MPerClassStepSampler":
        """The sampler of a labelled run (``Method.batch_sampler``): ``m`` items per class, the
        recipe's batch, seed and accumulation, errors naming its ``data.root``."""
        return cls(labels, m, recipe.optim.batch_size, world_size=world_size, rank=rank, seed=recipe.seed,
                   start_step=start_step, total_steps=total_steps, what=f"data.root {recipe.data.root}",
                   accumulate_steps=recipe.optim.accumulate_steps)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item indices of epoch ``epoch``, global batch after global batch."""
        from pytorch_metric_learning.samplers import MPerClassSampler
        from pytorch_metric_learning.utils import common_functions

        sampler = MPerClassSampler(self.labels, self.m, batch_size=self.global_batch,
                                   length_before_new_iter=self.steps_per_epoch * self.global_batch)
        saved = common_functions.NUMPY_RANDOM
        common_functions.NUMPY_RANDOM = np.random.RandomState(
            sample_seed(self.seed, epoch, M_PER_CLASS_STREAM) % 2**32)
        try:
            order = np.fromiter(iter(sampler), dtype=np.int64)
        finally:
            common_functions.NUMPY_RANDOM = saved
        return order

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        cached_epoch, order = -1, None
        positions = np.arange(self.steps_per_epoch * self.global_batch)
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, self.steps_per_epoch)
            if epoch != cached_epoch:
                cached_epoch, order = epoch, self.epoch_order(epoch)
            for micro in micro_batches(positions, position, self.batch_size, self.accumulate_steps, self.world_size,
                                       self.rank):
                yield [(epoch, int(order[p]), int(p)) for p in micro]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accumulate_steps
