"""Training batches: a deterministic step-indexed sampler and a multi-crop dataset.

Exact resume and process-count independence come from two rules:

* :class:`StepBatchSampler` derives the images of step ``s`` from ``(seed, epoch)`` only: epoch
  ``e`` is one seeded permutation of the dataset, cut into global batches of ``batch × world``
  images; process ``r`` takes slice ``r`` of each global batch. Resuming at step ``s`` starts the
  sampler at ``s`` (no batch is loaded and thrown away). Two processes with batch B see, together,
  exactly the images one process with batch 2B sees. With gradient accumulation
  (``optim.accumulate_steps`` A) a step's global batch is ``batch × A × world`` images, process
  ``r`` takes slice ``r`` of ``batch × A`` and yields it as A micro-batches of ``batch`` in order
  (:func:`micro_batches`): batch B with A = 2 sees the images batch 2B with A = 1 sees.
* :class:`MultiCropDataset` seeds the augmentation of image ``i`` in epoch ``e`` from
  ``(seed, epoch, i)``, so a crop never depends on which worker or process drew it. A sampler that
  may draw an image more than once in an epoch (:class:`~mlsctl.data.mperclass.MPerClassStepSampler`)
  gives each draw its position ``p`` in the epoch's order as well, its items being ``(epoch, index, p)``:
  the crop's seed is then ``(seed, epoch, DRAW_STREAM + p)``, so every draw is a view of its own (a repeat
  of an image is another crop of it, as with a fresh ``RandomResizedCrop`` per draw), still a function of
  the seed and the step only.

An image that cannot be decoded is replaced by the next readable one (keeping batch shapes fixed)
and reported in ``Batch.skipped``; the training loop prints one line per file and a count.

Batches leave the workers as uint8 and become float crops on the training device, in
:meth:`MultiCropDataset.on_device` (the loop calls it after the copy): with ``data.augment: cpu``
the workers' crops are normalised there; with ``gpu`` the workers send each image resized to
``data.decode_size`` plus the drawn crop and colour parameters, and the crops are cut there
(:meth:`mlsctl.data.multicrop.MultiCrop.render`). Both draw every parameter from the image's own
seed, so exact resume and "two processes equal one" hold on either path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mlsctl.data.images import BadImage, ImageFolder
from mlsctl.data.multicrop import MultiCrop, normalize_on_device
from mlsctl.errors import TooLittleData, UserError, killed_loader_worker, shared_memory_message, worker_killed_message


PERMUTATION_STREAM = 2**32  # an "index" no image has: the seed of an epoch's permutation
DRAW_STREAM = 2**35  # "index" DRAW_STREAM + p: the crop's seed of the draw at position p of an epoch's order


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def micro_batches(order, position: int, batch_size: int, accumulate_steps: int, world_size: int,
                  rank: int) -> Iterator[list]:
    """Process ``rank``'s micro-batches of the global batch at ``position`` (in steps) of ``order``:
    its slice ``[rank × batch × A, (rank + 1) × batch × A)`` of the global batch, cut into A
    consecutive micro-batches of ``batch`` items."""
    share = batch_size * accumulate_steps
    start = position * share * world_size + rank * share
    for micro in range(accumulate_steps):
        yield order[start + micro * batch_size:start + (micro + 1) * batch_size]


def global_batch_text(batch_size: int, world_size: int, accumulate_steps: int) -> str:
    """How a global batch is made, for messages: "4 per process x 2 processes [x 2 accumulation steps]"."""
    text = f"{batch_size} per process x {world_size} processes"
    return text + (f" x {accumulate_steps} accumulation steps" if accumulate_steps > 1 else "")


def lower_batch_text(accumulate_steps: int) -> str:
    return "lower optim.batch_size" + (" or optim.accumulate_steps" if accumulate_steps > 1 else "")


class StepBatchSampler(Sampler):
    """Yields, for steps ``start_step .. total_steps-1``, this process's ``accumulate_steps``
    micro-batches, each a list of ``(epoch, index)``."""

    def __init__(self, n_items: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0,
                 start_step: int = 0, total_steps: int | None = None, accumulate_steps: int = 1,
                 elements=lambda n: f"{n} images"):
        self.n_items, self.batch_size, self.world_size, self.rank, self.seed = n_items, batch_size, world_size, rank, seed
        self.accumulate_steps = accumulate_steps
        self.global_batch = batch_size * accumulate_steps * world_size  # the images of one optimiser step
        self.steps_per_epoch = n_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise TooLittleData(f"the data has {elements(n_items)}, fewer than one global batch of {self.global_batch} "
                                f"({global_batch_text(batch_size, world_size, accumulate_steps)}); "
                                f"{lower_batch_text(accumulate_steps)}")
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
            for micro in micro_batches(perm, position, self.batch_size, self.accumulate_steps, self.world_size,
                                       self.rank):
                yield [(epoch, int(i)) for i in micro]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.accumulate_steps


@dataclass
class Batch:
    crops: list[torch.Tensor]  # per crop position: [B, 3, S, S]; global crops first
    boxes: torch.Tensor  # [B, n_crops, 4] (x0, y0, x1, y1) in original pixels
    flips: torch.Tensor  # [B, n_crops] bool
    image_ids: torch.Tensor  # [B] row index of the image in the folder
    image_sizes: torch.Tensor  # [B, 2] (width, height)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    masks: Optional[torch.Tensor] = None  # [B, n_global, h, w] bool: masked patches (masked image modelling)
    images: Optional[torch.Tensor] = None  # augment gpu: [B, 3, R, R] uint8, each image resized to R x R
    photometric: Optional[torch.Tensor] = None  # augment gpu: [B, n_crops, P] colour parameters of every crop

    def __len__(self) -> int:
        return self.image_ids.shape[0]

    def to(self, device: torch.device | str) -> "Batch":
        return map_tensors(self, lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (``pin_memory=True`` on CUDA), so the copy to
        the device is asynchronous."""
        return map_tensors(self, lambda t: t.pin_memory())


def map_tensors(batch, fn):
    """The same batch (same dataclass) with ``fn`` applied to every tensor field and to the
    tensors of every list field."""
    def apply(value):
        if isinstance(value, torch.Tensor):
            return fn(value)
        if isinstance(value, list):
            return [fn(v) if isinstance(v, torch.Tensor) else v for v in value]
        return value
    return dataclasses.replace(batch, **{f.name: apply(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def _local_processes() -> int:
    """The training processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``), each with its own
    cache and batches in flight."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def _check_cache_fits(need: int, n_images: int, side: int) -> None:
    """``data.cache: memory`` keeps one copy per process, in shared memory (``/dev/shm``): refuse a
    cache that, for every process of this machine, passes half the free memory or the free shared
    memory (a container's is 64 MB unless it was started with a larger ``--shm-size``)."""
    processes = _local_processes()
    what = (f"data.cache=memory needs {need / 2**30:.1f} GiB for {n_images} images of {side}x{side} px"
            + (f" in each of the {processes} processes on this machine" if processes > 1 else ""))
    available, shared = _free_memory()
    if available is not None and need * processes > available // 2:
        raise UserError(f"{what}, more than half the free memory ({available / 2**30:.1f} GiB); set data.cache=none "
                        f"or a smaller data.decode_size")
    if shared is not None and need * processes > shared:
        raise UserError(f"{what}, more than the free shared memory in /dev/shm ({shared / 2**30:.2f} GiB; a container "
                        f"has 64 MB unless started with a larger --shm-size); set data.cache=none, a smaller "
                        f"data.decode_size, or enlarge /dev/shm")


class ResizedImages:
    """``data.augment: gpu``: what a worker sends of an image, the image resized (squashed) to
    ``side`` x ``side`` (uint8 [3, side, side], bicubic with antialiasing) and its original size.
    With ``cache`` (``data.cache: memory``) every image is decoded once, into shared memory that the
    loader workers (forked after it is made) fill and read; its size is checked here."""

    def __init__(self, n_images: int, side: int, cache: bool):
        self.side = side
        self.images = self.sizes = self.filled = None
        if cache:
            _check_cache_fits(n_images * 3 * side * side, n_images, side)
            self.images = torch.zeros(n_images, 3, side, side, dtype=torch.uint8).share_memory_()
            self.sizes = torch.zeros(n_images, 2, dtype=torch.long).share_memory_()
            self.filled = torch.zeros(n_images, dtype=torch.bool).share_memory_()

    def cached(self, i: int) -> bool:
        return self.filled is not None and bool(self.filled[i])

    def get(self, i: int, image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image ``i`` (``image``: its decoded PIL image, or None when :meth:`cached`)."""
        if image is None:
            return self.images[i], (int(self.sizes[i, 0]), int(self.sizes[i, 1]))
        from PIL import Image

        resized = image.resize((self.side, self.side), Image.BICUBIC) if image.size != (self.side,) * 2 else image
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        if self.filled is not None:
            self.images[i].copy_(pixels)
            self.sizes[i] = torch.tensor(image.size)
            self.filled[i] = True
        return pixels, image.size


def load_or_next(folder: ImageFolder, rows: list[int], position: int, resized: Optional[ResizedImages], what: str):
    """The image at ``rows[position]``, or the next readable one of ``rows``: (its row, the image
    or None when cached, the files skipped)."""
    skipped = []
    for attempt in range(len(rows)):
        i = rows[(position + attempt) % len(rows)]
        if resized is not None and resized.cached(i):
            return i, None, skipped
        try:
            return i, folder.load(i), skipped
        except BadImage as exc:
            skipped.append((folder.relpath(i), str(exc)))
    first = f" (the first, {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
    raise UserError(f"none of the {what} could be decoded as an image{first}")


class MultiCropDataset(Dataset):
    """Multi-crop views of an image folder. ``augment`` 'cpu': the crops are made here (uint8);
    'gpu': only the resized image and the crop/colour parameters are (see the module's docstring)."""

    def __init__(self, folder: ImageFolder, transform: MultiCrop, seed: int, augment: str = "cpu",
                 decode_size: int = 0, cache: str = "none"):
        self.folder, self.transform, self.seed = folder, transform, seed
        self.resized = ResizedImages(len(folder), decode_size, cache == "memory") if augment == "gpu" else None

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, ...]) -> dict:
        """``key``: ``(epoch, index)``, the crop seeded by the image; or ``(epoch, index, position)``, a draw of
        a sampler that repeats images within an epoch, the crop seeded by the draw (the module's docstring)."""
        epoch, index, *draw = key
        n = len(self.folder)
        i, image, skipped = load_or_next(self.folder, range(n), index, self.resized, f"{n} files in {self.folder.root}")
        seed = sample_seed(self.seed, epoch, DRAW_STREAM + draw[0] if draw else i)
        if self.resized is not None:
            pixels, size = self.resized.get(i, image)
            boxes, flips, photometric = self.transform.plan(*size, seed)
            return {"image": pixels, "photometric": photometric, "boxes": boxes, "flips": flips, "image_id": i,
                    "image_size": size, "skipped": skipped}
        views = self.transform(image, seed)
        return {"crops": views.crops, "boxes": views.boxes, "flips": views.flips, "image_id": i,
                "image_size": views.image_size, "skipped": skipped}

    def on_device(self, batch: Batch) -> Batch:
        """The batch's float crops on its device (after ``batch.to(device)``)."""
        if batch.images is not None:
            crops = self.transform.render(batch.images, batch.boxes, batch.flips, batch.photometric, batch.image_sizes)
            return dataclasses.replace(batch, crops=crops, images=None, photometric=None)
        return dataclasses.replace(batch, crops=[normalize_on_device(c) for c in batch.crops])


def collate(samples: list[dict]) -> Batch:
    device_side = "image" in samples[0]
    n_crops = 0 if device_side else len(samples[0]["crops"])
    return Batch(
        crops=[torch.stack([s["crops"][c] for s in samples]) for c in range(n_crops)],
        boxes=torch.stack([s["boxes"] for s in samples]),
        flips=torch.stack([s["flips"] for s in samples]),
        image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
        image_sizes=torch.tensor([s["image_size"] for s in samples], dtype=torch.long),
        skipped=[item for s in samples for item in s["skipped"]],
        images=torch.stack([s["image"] for s in samples]) if device_side else None,
        photometric=torch.stack([s["photometric"] for s in samples]) if device_side else None,
    )


def _stop_as_on_ctrl_c(signum, frame) -> None:
    """The first SIGINT or SIGTERM ends the worker's loop (PyTorch's worker returns quietly on
    KeyboardInterrupt); later ones are ignored, as a launcher sends both (torch.distributed.run
    follows SIGINT with SIGTERM) and a second KeyboardInterrupt would land outside that loop, in a
    traceback and a failed worker."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def _quiet_when_the_parent_hangs_up(default):
    """An excepthook that drops one report: a broken connection (a broken pipe, a reset, an end of
    file) in multiprocessing's resource sharer, the worker's thread that hands tensors' file
    descriptors to the parent and reports through ``sys.excepthook``. It happens when the parent
    stops in the middle of receiving a batch (Ctrl-C, SIGTERM), which is no error."""
    def hook(exc_type, exc, traceback) -> None:
        if (traceback is not None and issubclass(exc_type, (ConnectionError, EOFError))
                and traceback.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py"))):
            return
        default(exc_type, exc, traceback)
    return hook


def worker_init(_: int) -> None:
    """Each data-loading worker, as it starts: one thread, none of the parent's locks, and SIGTERM
    taken as Ctrl-C.

    A scheduler's stop (Slurm's ``scancel`` and time limit, systemd's default ``KillMode``,
    ``kill -- -PGID``) signals every process of the job at once. A worker killed by it made the
    training process fail with PyTorch's "DataLoader worker ... is killed by signal: Terminated"
    instead of stopping as it does on Ctrl-C (what was saved, how to resume). PyTorch's worker ends
    quietly on KeyboardInterrupt, leaving the stop to its parent; SIGTERM now does the same, a
    second signal is ignored (:func:`_stop_as_on_ctrl_c`), and a parent that stops while receiving
    a batch no longer makes the worker print a traceback."""
    import signal
    import sys

    from mlsctl.locks import close_inherited_locks

    torch.set_num_threads(1)
    close_inherited_locks()  # the run's lock ends with the training process, even under SIGKILL
    signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (`cmd &`)
        signal.signal(signal.SIGINT, _stop_as_on_ctrl_c)
    sys.excepthook = _quiet_when_the_parent_hangs_up(sys.excepthook)


def worker_init_leaving_stops_to_the_parent(worker_id: int) -> None:
    """:func:`worker_init` for a training loader: the worker ignores SIGINT and SIGTERM, and ends
    when its parent shuts the loader down (or dies). That parent stops only after the step under way
    (with the other processes of a run on several: :mod:`mlsctl.train.stopping`); a worker that
    stopped on the job's signal would leave it waiting for a batch that never comes (PyTorch's
    "DataLoader worker ... exited unexpectedly")."""
    import signal

    worker_init(worker_id)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _free_memory() -> tuple[Optional[int], Optional[int]]:
    """Free memory and free shared memory (``/dev/shm``) in bytes, None where unknown."""
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        available = None
    try:
        shm = os.statvfs("/dev/shm")
        shared = shm.f_bavail * shm.f_frsize
    except OSError:
        shared = None
    return available, shared


def check_batches_fit(dataset: Dataset, sampler, workers: int) -> None:
    """``data.augment: gpu`` sends whole decoded images (``data.decode_size`` squared, uint8): refuse,
    in one sentence, batches that in flight (4 prefetched per worker, and the one in use) pass half
    the free memory, or the free ``/dev/shm`` they travel through from the workers, for every process
    of this machine. A decode size of 100,000 px was ended by the kernel's OOM killer; a container's
    64 MB ``/dev/shm``, by PyTorch's "unable to allocate shared memory" or a hang."""
    resized, batch = getattr(dataset, "resized", None), getattr(sampler, "batch_size", None)
    if resized is None or not batch:
        return
    processes = _local_processes()
    per_item = getattr(dataset, "images_per_item", 1)  # MILE's sets: method.set_length photos each
    one = batch * per_item * 3 * resized.side ** 2
    prefetched = 4 * workers
    available, shared = _free_memory()
    items = f"{batch} sets of {per_item} images" if per_item > 1 else f"{batch} images"
    what = (f"data.decode_size {resized.side} makes a batch of {items} {one / 2**30:.2f} GiB, with "
            f"{prefetched + 1} in flight ({workers} workers x 4 prefetched and the one in use)"
            + (f" in each of the {processes} processes on this machine" if processes > 1 else ""))
    if available is not None and one * (prefetched + 1) * processes > available // 2:
        raise UserError(f"{what}: more than half the free memory ({available / 2**30:.1f} GiB); lower "
                        f"data.decode_size, optim.batch_size or data.workers")
    if workers and shared is not None and one * prefetched * processes > shared:
        raise UserError(f"{what}: more than the free shared memory in /dev/shm ({shared / 2**30:.2f} GiB; a "
                        f"container has 64 MB unless started with a larger --shm-size); lower data.decode_size, "
                        f"optim.batch_size or data.workers, or enlarge /dev/shm")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity: a Slurm or container limit), as torch counts them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# Loader workers are forked on Linux, whatever Python's default start method: fork was that default until Python
# 3.14 made it forkserver, whose workers are children of the forkserver, not of the command: their watchdog then
# follows the forkserver, which the workers keep alive, so a command killed with SIGKILL left its workers running
# (~700 MB each; found when tests forked commands from a forkserver, 2026-12-07). Forked, they die with it, and
# close_inherited_locks sees the run's lock they inherit.
WORKER_START_METHOD = "fork"


class Loader(DataLoader):
    """torch's DataLoader whose warning about more workers than cores is one line naming the
    option to lower (``workers_key``), once per process and setting, in the ``mlsctl`` log, and
    whose worker killed by a signal ends the command with one sentence (:class:`WatchedWorkers`)."""

    warned: set = set()

    def __init__(self, *args, workers_key: str = "data.workers", **kwargs):
        self.workers_key = workers_key
        if kwargs.get("num_workers") and kwargs.get("collate_fn") is not None:
            kwargs["collate_fn"] = InSharedMemory(kwargs["collate_fn"])
        if kwargs.get("num_workers") and sys.platform.startswith("linux"):
            kwargs.setdefault("multiprocessing_context", WORKER_START_METHOD)
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers:
            # Imported before the workers fork, which seed it at once: numpy 2 imports numpy.random on first use,
            # and a forked child's first import can fail on Python 3.11's import locks ("KeyError: <thread id>" in
            # importlib's acquire, python/cpython#87712): the worker died and the command with "worker exited
            # unexpectedly" (two runs in three of a test's worker, numpy 2.4.6, 2026-12-06)
            import importlib

            importlib.import_module("numpy.random")
        batches = super().__iter__()
        return WatchedWorkers(batches, self.workers_key) if self.num_workers else batches

    def check_worker_number_rationality(self) -> None:  # noqa: D102 - torch's hook, called by __init__ and iter()
        cores, workers = usable_cores(), self.num_workers
        if workers > cores and (self.workers_key, workers) not in Loader.warned:
            Loader.warned.add((self.workers_key, workers))
            logging.getLogger("mlsctl").warning(
                f"{self.workers_key}={workers} is more than the {cores} CPU core{'s' if cores != 1 else ''} this process "
                f"may use: loading can slow down or stall; lower {self.workers_key} to {cores} or less")


def make_loader(dataset: Dataset, sampler: StepBatchSampler, workers: int, pin_memory: bool = False,
                collate_fn=collate) -> DataLoader:
    """The training loader. Its workers ignore Ctrl-C and SIGTERM: a run stops between two steps
    (:func:`worker_init_leaving_stops_to_the_parent`)."""
    check_batches_fit(dataset, sampler, workers)
    return Loader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn, pin_memory=pin_memory,
                  worker_init_fn=worker_init_leaving_stops_to_the_parent if workers else None,
                  prefetch_factor=4 if workers else None, persistent_workers=workers > 0)


class InSharedMemory:
    """A collate function whose batch, made in a loader worker, is moved to shared memory
    (``/dev/shm``) there, as PyTorch's own ``default_collate`` allocates it. Otherwise the move
    happens in the worker's queue-feeding thread, where a full ``/dev/shm`` (a container's 64 MB)
    is a traceback printed by that thread and a batch that never arrives: training waited for ever.
    Here it fails in the worker's loop, which sends the error to the parent
    (:class:`WatchedWorkers` says it in one sentence). The copy is the one the queue made anyway."""

    def __init__(self, collate_fn):
        self.collate_fn = collate_fn

    def __call__(self, samples):
        batch = self.collate_fn(samples)
        if torch.utils.data.get_worker_info() is not None:
            _share_tensors(batch)
        return batch


def _share_tensors(value) -> None:
    if isinstance(value, torch.Tensor):
        value.share_memory_()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            _share_tensors(getattr(value, item.name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            _share_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            _share_tensors(item)


class WatchedWorkers:
    """The batches of a loader with workers, whose failures reach the user as one sentence:

    * A worker the kernel kills (out of shared memory in ``/dev/shm``: SIGBUS; out of memory:
      SIGKILL) reaches the parent as a lost connection, an end of file or PyTorch's "DataLoader
      worker ... exited unexpectedly", whichever comes first: each becomes a sentence naming the
      signal, the likely cause and the fix, after the other workers are shut down (so no second
      error follows from PyTorch's SIGCHLD handler).
    * PyTorch re-raises a worker's exception as a new one of its type whose message is the
      worker's whole traceback ("Caught UserError in DataLoader worker process 0. Original
      Traceback ..."): a :class:`~mlsctl.errors.UserError` or an ``OSError`` (a missing folder, an
      I/O error) is rebuilt from its last line, so the CLI says it as it would in the main process.

    :meth:`shutdown` ends the workers now instead of when the iterator is collected."""

    def __init__(self, batches, workers_key: str):
        self.batches, self.workers_key = batches, workers_key

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.batches)
        except StopIteration:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised as it is unless a worker was killed or failed
            try:
                killed = killed_loader_worker(exc) or self._killed_worker(
                    wait=isinstance(exc, (ConnectionError, EOFError, RuntimeError)))
            except RuntimeError as late:  # PyTorch's SIGCHLD handler, raising while the workers are looked at
                killed = killed_loader_worker(late)
                if killed is None:
                    raise
            if killed is not None:
                self.shutdown()
                raise UserError(worker_killed_message(killed, self.workers_key), exit_code=1, resumable=True) from exc
            if "unable to allocate shared memory" in str(exc):  # a worker's batch did not fit in /dev/shm
                self.shutdown()
                raise UserError(shared_memory_message(self.workers_key), exit_code=1, resumable=True) from None
            original = worker_exception(exc)
            if original is not None:
                raise original from None
            raise

    def _killed_worker(self, wait: bool) -> Optional[str]:
        """The name of the signal that ended one of the workers (SIGBUS), None when they are all
        alive or exited on their own. ``wait``: the error may have come before the worker's exit
        code did (its connection closes as it dies), so look again for up to a second."""
        import signal
        import time

        workers = getattr(self.batches, "_workers", ())  # PyTorch's multiprocessing iterator keeps them here
        deadline = time.monotonic() + (1.0 if wait else 0.0)
        while True:
            for worker in workers:
                code = worker.exitcode
                if code is not None and code < 0:
                    try:
                        return signal.Signals(-code).name
                    except ValueError:
                        return f"signal {-code}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def shutdown(self) -> None:
        shutdown = getattr(self.batches, "_shutdown_workers", None)
        if shutdown is not None:
            try:
                shutdown()
            except RuntimeError as late:  # the SIGCHLD handler of a worker that died, already said
                if killed_loader_worker(late) is None:
                    raise


def worker_exception(exc: BaseException) -> Optional[BaseException]:
    """The :class:`~mlsctl.errors.UserError` or ``OSError`` a loader worker raised, rebuilt from the
    last line of the traceback PyTorch puts in the message of its copy (None for anything else)."""
    import re

    text = str(exc)
    if not re.match(r"Caught \w+ in DataLoader worker process \d+", text):
        return None
    last = text.rstrip().splitlines()[-1]
    if isinstance(exc, UserError):
        found = re.match(r"(?:[\w.]+\.)?\w+: (.*)$", last)  # "mlsctl.errors.UserError: the sentence"
        return UserError(found.group(1), exc.exit_code) if found else None
    if isinstance(exc, OSError):
        found = re.match(r"\w+: \[Errno (\d+)\] ([^:]+)(?:: '(.*)')?$", last)
        return type(exc)(int(found.group(1)), found.group(2), found.group(3)) if found else None
    return None
