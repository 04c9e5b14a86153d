"""The memory bank: a fixed-shape FIFO queue of detached vectors with payload columns.

One module for every method's queues (DINO's monitor bank, CrIBo's object bank, SOVE's memories,
MLS's two queues...). A bank holds

* ``vectors`` [size, dim]: detached copies of what was enqueued;
* payload columns [size, ...]: anything recorded with each entry (image id, crop boxes, cluster
  id, label...). The column ``step`` (training step of the write, -1 for never written) is always
  present, so every bank knows the age of its entries;
* ``ptr``: the slot the next entry goes to, and ``n_written``: entries enqueued since creation.

Valid and written entries. A bank created with ``init="random_unit"`` (SOVE's memories, MLS's and
MoCo's queues) starts full of random unit vectors: they are *valid* (queries see them, so
:attr:`MemoryBank.filled` counts them and such a bank :attr:`~MemoryBank.is_full` from the start)
but were never *written* by training. :attr:`MemoryBank.written` counts the slots that hold an
entry written by training, from the ``step`` column (>= 0 once written, which :meth:`enqueue`
enforces), and :attr:`MemoryBank.fill` is that count over the size; both therefore survive
save/load and resume, and checkpoints written before they existed read the same (the ``step``
column has always been saved).

Semantics (pinned by ``tests/test_bank.py``):

* FIFO: entries are written at ``ptr`` and wrap around; a batch larger than the bank keeps its
  newest ``size`` rows. Sizes need not be a multiple of the batch size.
* Query before enqueue: a method scores a batch against the bank *before* writing the batch, so
  a query never sees its own batch. :meth:`query` also takes ``exclude_step`` to make that
  guarantee explicit: entries written at that step are never returned.
* Empty slots are never returned by :meth:`query` (:attr:`filled` < size until the first wrap).
* Held writes (gradient accumulation): between :meth:`hold` and :meth:`release` enqueued rows wait
  on their process; :meth:`release` gathers and writes them all at once, in the order they were
  enqueued. The training loop holds every bank during an optimiser step, so each micro-batch sees
  the bank as it was at the start of the step and the bank after the step equals what one batch of
  all micro-batches writes (on any number of processes).

Distributed trade-off: :meth:`enqueue` gathers the batch from every process (in rank order)
before writing, so every rank holds the same bank. This costs one all-gather of
``world × batch × dim`` values per step and a bank that fills ``world`` times faster, but the
bank is then independent of how the batch is split over processes (2 processes with batch B
write exactly what 1 process with batch 2B writes), a checkpoint written by rank 0 is the bank of
every rank, resume is exact, and neighbours come from the whole global batch's history. Per-rank
banks would save the communication at the price of banks that differ between ranks and depend on
the number of processes. :meth:`assert_synchronized` checks the invariant cheaply.

Banks are saved with :func:`save_banks` / :func:`load_banks` as one safetensors file; a bank can
be rebuilt from its saved tensors alone (:meth:`MemoryBank.from_state_dict`), which is what the
``mlsctl bank`` commands use.

What ``mlsctl bank`` needs to know about a bank is part of the bank, not of its method:

* payload columns with these names mean the same in every bank: ``image_id`` (row of the run's
  ``images.txt``), ``box`` (x0, y0, x1, y1 in pixels of the original image: the crop the entry
  was computed from), ``region`` (a sub-box of the original image, e.g. an object inside the
  crop; outlined in neighbour grids) and ``label`` (an integer class, counted per label);
* :class:`QueryFeature` says how to embed a new image with the run's teacher so that it can be
  compared with the bank's vectors (saved with the bank in the file's metadata).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from mlsctl import atomic, dist
from mlsctl.errors import UserError, first_line

BANKS_FORMAT_VERSION = 1


class NonFiniteVectors(UserError):
    """NaN or inf on their way into a bank: training stops (exit code 1), the bank stays clean."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)


@dataclass(frozen=True)
class Column:
    """A payload column: the shape of one entry's value and its dtype."""

    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.long


IMAGE_COLUMN, BOX_COLUMN, REGION_COLUMN, LABEL_COLUMN = "image_id", "box", "region", "label"


@dataclass(frozen=True)
class QueryFeature:
    """How an image becomes comparable with a bank's vectors: the teacher backbone's ``"cls"``
    token or the mean of its patch tokens (``"patch_mean"``), passed through the method's module
    ``projection`` when one is named (SOVE's memories hold head outputs: ``projection="head"``,
    resolved by the method's ``query_projection``), compared with the columns ``[start, stop)`` of
    the stored vectors (``stop=None``: to the end)."""

    feature: str = "cls"
    start: int = 0
    stop: Optional[int] = None
    projection: Optional[str] = None

    def __post_init__(self):
        if self.feature not in ("cls", "patch_mean"):
            raise ValueError(f"QueryFeature.feature must be 'cls' or 'patch_mean', got {self.feature!r}")

    def columns(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors[:, self.start:self.stop]


class MemoryBank:
    """A FIFO ring of ``size`` vectors of width ``dim`` (detached copies of what is enqueued), each
    slot with its payload columns (image id, step, label, ...): :meth:`enqueue` a batch (gathered
    across processes), :meth:`query` the nearest slots of a batch of queries by cosine, ``ages`` and
    the payload to see what it holds. The module docstring and docs/banks.md give the semantics the tests pin."""

    def __init__(
        self,
        size: int,
        dim: int,
        payload: Optional[Mapping[str, Column]] = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        init: str = "zeros",
        generator: Optional[torch.Generator] = None,
        query_feature: Optional[QueryFeature] = None,
    ):
        """``init="zeros"`` starts empty; ``init="random_unit"`` starts full of random unit
        vectors (as SOVE's memories do), seeded by ``generator``. ``query_feature`` tells
        ``mlsctl bank neighbors`` how to embed a query image (None: the bank cannot be queried
        with images)."""
        self.query_feature = query_feature
        self.name = "bank"  # set by the training loop to the method's name for it, for messages
        if size < 1 or dim < 1:
            raise ValueError(f"a memory bank needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        columns = dict(payload or {})
        if "step" in columns:
            raise ValueError("the payload column 'step' is reserved (every bank records it)")
        self.columns: dict[str, Column] = {"step": Column((), torch.long), **columns}
        self.vectors = torch.zeros(size, dim, dtype=dtype, device=device)
        self.payload: dict[str, torch.Tensor] = {
            name: torch.zeros((size, *col.shape), dtype=col.dtype, device=device) for name, col in self.columns.items()
        }
        self.payload["step"].fill_(-1)
        self.ptr = 0
        self.n_written = 0
        self._first_bad_step: Optional[torch.Tensor] = None  # CUDA: the deferred finite check (see enqueue)
        self.defer_finite_check = False  # defer it on any device (always on CUDA)
        self._prefilled = False
        self._held: Optional[list[tuple[torch.Tensor, dict[str, torch.Tensor], int, bool]]] = None  # see hold()
        if init == "random_unit":
            # on the CPU whatever the default device (a method built on the meta device still gets its banks)
            noise = torch.randn(size, dim, generator=generator, dtype=torch.float32, device="cpu")
            self.vectors.copy_(F.normalize(noise, dim=1).to(dtype))
            self._prefilled = True
        elif init != "zeros":
            raise ValueError(f"init must be 'zeros' or 'random_unit', got {init!r}")

    # ----------------------------------------------------------------------------- shape and fill
    @property
    def size(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def filled(self) -> int:
        """Number of valid entries (prefilled random entries count as valid)."""
        return self.size if self._prefilled else min(self.n_written, self.size)

    @property
    def is_full(self) -> bool:
        return self.filled == self.size

    @property
    def prefilled(self) -> bool:
        """Whether the bank started full of random entries (``init="random_unit"``)."""
        return self._prefilled

    def written_mask(self) -> torch.Tensor:
        """[size] bool: the slots holding an entry written by training (a prefilled bank's random start
        entries have step -1: they belong to no image and no step)."""
        return self.payload["step"] >= 0

    @property
    def written(self) -> int:
        """Number of slots holding an entry written by training (random start entries excluded)."""
        return int(self.written_mask().sum())

    @property
    def fill(self) -> float:
        """:attr:`written` over :attr:`size`: how much of the bank training has written."""
        return self.written / self.size

    def to(self, device: torch.device | str) -> "MemoryBank":
        """The bank on ``device``; its dtypes stay (the vectors' is fixed at construction, the payload's
        are the columns'): a dtype here would turn the long ids and steps into floats that round."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"MemoryBank.to takes a device, not the dtype {device}: a bank's vector dtype is set "
                            f"when it is built (MemoryBank(..., dtype=...))")
        self.vectors = self.vectors.to(device)
        self.payload = {k: v.to(device) for k, v in self.payload.items()}
        return self

    def order(self) -> torch.Tensor:
        """Slot indices of the valid entries, oldest first."""
        device = self.vectors.device
        if self.filled < self.size:
            return torch.arange(self.filled, device=device)
        return (self.ptr + torch.arange(self.size, device=device)) % self.size

    def written_order(self) -> torch.Tensor:
        """Slot indices of the entries written by training, oldest first (:meth:`order` without the
        random start entries of a prefilled bank)."""
        order = self.order()
        return order[self.written_mask()[order]]

    def ages(self, step: int) -> torch.Tensor:
        """Age in steps of every valid entry (oldest first); prefilled entries have no age (-1)."""
        written = self.payload["step"][self.order()]
        return torch.where(written >= 0, step - written, torch.full_like(written, -1))

    # ----------------------------------------------------------------------------- writing
    @torch.no_grad()
    def enqueue(self, vectors: torch.Tensor, *, step: int, gather: bool = True, **payload: torch.Tensor) -> None:
        """Append a batch (gathered from every process first, unless ``gather=False``).

        Every declared payload column except ``step`` must be given, with one row per vector.
        """
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"enqueue expects vectors of shape [n, {self.dim}], got {list(vectors.shape)}")
        if int(step) < 0:  # -1 in the step column means "never written" (see :attr:`written`)
            raise ValueError(f"enqueue expects a training step >= 0, got {step}")
        expected = set(self.columns) - {"step"}
        if set(payload) != expected:
            missing, extra = sorted(expected - set(payload)), sorted(set(payload) - expected)
            raise ValueError(f"payload columns mismatch: missing {missing}, unexpected {extra}")
        n = vectors.shape[0]
        rows = {"step": torch.full((n,), int(step), dtype=torch.long, device=vectors.device)}
        for name, value in payload.items():
            value = torch.as_tensor(value, device=vectors.device)
            col = self.columns[name]
            if tuple(value.shape) != (n, *col.shape):
                raise ValueError(f"payload '{name}' must have shape {[n, *col.shape]}, got {list(value.shape)}")
            if value.is_floating_point() and not col.dtype.is_floating_point:
                raise ValueError(f"payload '{name}' is a {col.dtype} column and got {value.dtype} values, which it "
                                 f"would truncate; declare it Column(..., torch.float32) or pass whole numbers")
            rows[name] = value
        vectors = vectors.detach()
        if self._held is not None:  # copies: the caller may reuse its tensors before release()
            self._held.append((vectors.clone(), {k: v.clone() for k, v in rows.items()}, int(step), gather))
            return
        self._append(vectors, rows, step, gather)

    def hold(self) -> None:
        """Keep the rows of every :meth:`enqueue` from now on, unwritten, until :meth:`release`."""
        if self._held is not None:
            raise RuntimeError(f"memory bank '{self.name}' is already holding its writes")
        self._held = []

    @torch.no_grad()
    def release(self) -> None:
        """Write what was enqueued since :meth:`hold`, as one batch in the order it was enqueued
        (gathered from every process once, as one enqueue of all of it would be). Every process
        must call it, as it would call :meth:`enqueue`."""
        held = self._held
        if held and len({(step, gather) for _, _, step, gather in held}) > 1:  # still held: nothing is lost
            raise RuntimeError(f"memory bank '{self.name}': held writes of different steps or gather modes")
        self._held = None
        if not held:
            return
        _, _, step, gather = held[0]
        vectors = torch.cat([v for v, _, _, _ in held]) if len(held) > 1 else held[0][0]
        rows = {name: torch.cat([r[name] for _, r, _, _ in held]) if len(held) > 1 else held[0][1][name]
                for name in held[0][1]}
        self._append(vectors, rows, step, gather)

    def _append(self, vectors: torch.Tensor, rows: dict[str, torch.Tensor], step: int, gather: bool) -> None:
        if gather:
            vectors = dist.gather_cat(vectors)
            rows = {name: dist.gather_cat(value) for name, value in rows.items()}
        vectors = vectors.to(self.vectors.dtype)  # before the check: 70,000 is finite in fp32, inf in an fp16 bank
        finite = torch.isfinite(vectors).all()  # checked after the gather: every process stops alike
        if not (self.defer_finite_check or vectors.device.type == "cuda"):
            if not bool(finite):
                raise NonFiniteVectors(self._non_finite_message(step))
            self._write(vectors, rows)
            return
        # On a GPU the check does not synchronise with the host: a batch with NaN or inf leaves the
        # slots it would have taken as they were, and :meth:`raise_if_nonfinite` (the loop calls it
        # where it logs and before each checkpoint) stops training, naming the first such step.
        bad = self._first_bad_step if self._first_bad_step is not None else torch.full((), -1, device=vectors.device)
        self._first_bad_step = torch.where((bad < 0) & ~finite, step, bad)
        self._write(vectors, rows, keep_old=~finite)

    def _non_finite_message(self, step: int) -> str:
        return (f"step {step}: the vectors to enqueue into memory bank '{self.name}' are not all finite (NaN or inf), "
                f"so training stopped before they entered it; lower optim.lr, raise optim.warmup_epochs or use "
                f"train.precision=fp32")

    def raise_if_nonfinite(self) -> None:
        """The deferred finite check of CUDA enqueues (a no-op elsewhere: those raise at once)."""
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            raise NonFiniteVectors(self._non_finite_message(int(self._first_bad_step)))

    def _write(self, vectors: torch.Tensor, rows: dict[str, torch.Tensor], keep_old: Optional[torch.Tensor] = None) -> None:
        """Write the rows at the pointer; ``keep_old`` (a 0-d bool tensor) leaves the slots as they were."""
        n = vectors.shape[0]
        skip = max(0, n - self.size)  # a batch larger than the bank keeps its newest rows
        self.ptr = (self.ptr + skip) % self.size
        vectors = vectors[skip:]
        m = vectors.shape[0]
        slots = (self.ptr + torch.arange(m, device=self.vectors.device)) % self.size

        def guarded(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return new if keep_old is None else torch.where(keep_old, old, new)

        self.vectors[slots] = guarded(vectors.to(self.vectors.dtype), self.vectors[slots])
        for name, value in rows.items():
            self.payload[name][slots] = guarded(value[skip:].to(self.payload[name].dtype), self.payload[name][slots])
        self.ptr = (self.ptr + m) % self.size
        self.n_written += n

    # ----------------------------------------------------------------------------- reading
    def valid_mask(self, exclude_step: Optional[int] = None) -> torch.Tensor:
        mask = torch.zeros(self.size, dtype=torch.bool, device=self.vectors.device)
        mask[self.order()] = True
        if exclude_step is not None:
            mask &= self.payload["step"] != exclude_step
        return mask

    @torch.no_grad()
    def query(
        self, queries: torch.Tensor, k: int, *, exclude_step: Optional[int] = None, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` entries by cosine (or inner product with ``normalize=False``).

        Returns ``(scores, slots)`` of shape [n_queries, k'] where k' = min(k, valid entries);
        ``slots`` index :attr:`vectors` and every payload column. Empty slots and entries written
        at ``exclude_step`` are never returned.
        """
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query expects queries of shape [n, {self.dim}], got {list(queries.shape)}")
        if k < 1:
            raise ValueError(f"query needs k of 1 or more, got {k}")
        mask = self.valid_mask(exclude_step)
        n_valid = int(mask.sum())
        if n_valid == 0:
            raise RuntimeError("query on a memory bank with no valid entries")
        keys = self.vectors.to(queries.dtype)
        q = queries
        if normalize:
            keys, q = F.normalize(keys, dim=1), F.normalize(q, dim=1)
        scores = q @ keys.T
        scores = scores.masked_fill(~mask, float("-inf"))
        top = scores.topk(min(k, n_valid), dim=1)
        return top.values, top.indices

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"vectors": self.vectors, "ptr": torch.tensor(self.ptr), "n_written": torch.tensor(self.n_written),
                 "prefilled": torch.tensor(int(self._prefilled))}
        for name, value in self.payload.items():
            state[f"payload.{name}"] = value
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"bank state keys differ: missing {sorted(expected - set(state))}, "
                             f"unexpected {sorted(set(state) - expected)}")
        if tuple(state["vectors"].shape) != tuple(self.vectors.shape):
            raise ValueError(f"bank shape differs: saved {list(state['vectors'].shape)}, "
                             f"expected {list(self.vectors.shape)}")
        device = self.vectors.device
        if not bool(torch.isfinite(state["vectors"].float()).all()):
            raise ValueError("bank vectors are not all finite (NaN or inf): the file is damaged")
        self.vectors = state["vectors"].to(device=device, dtype=self.vectors.dtype).clone()
        for name in self.payload:
            saved = state[f"payload.{name}"]
            if tuple(saved.shape) != tuple(self.payload[name].shape):
                raise ValueError(f"bank payload '{name}' shape differs: saved {list(saved.shape)}, "
                                 f"expected {list(self.payload[name].shape)}")
            self.payload[name] = saved.to(device=device, dtype=self.payload[name].dtype).clone()
        ptr, n_written = int(state["ptr"]), int(state["n_written"])
        if not (0 <= ptr < max(self.size, 1) and n_written >= 0):  # a probe, 2026-12-06: an internal error later
            raise ValueError(f"bank pointer {ptr} or count {n_written} is impossible for a bank of {self.size} rows: "
                             f"the file is damaged")
        self.ptr, self.n_written = ptr, n_written
        self._prefilled = bool(int(state["prefilled"]))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "MemoryBank":
        vectors = state["vectors"]
        columns = {
            key[len("payload."):]: Column(tuple(value.shape[1:]), value.dtype)
            for key, value in state.items()
            if key.startswith("payload.") and key != "payload.step"
        }
        bank = cls(vectors.shape[0], vectors.shape[1], columns, dtype=vectors.dtype)
        bank.load_state_dict(state)
        return bank

    def checksum(self) -> torch.Tensor:
        """A cheap fingerprint of the whole state (float64), equal on ranks holding equal banks: sums of
        the vectors and payload weighted by slot (and the vectors by column too), so rows swapped between
        slots or values moved within a row change it as different values do."""
        vectors = self.vectors.detach().double()
        by_slot = torch.arange(1, self.size + 1, dtype=torch.float64, device=vectors.device)
        by_column = torch.arange(1, self.dim + 1, dtype=torch.float64, device=vectors.device)
        parts = [vectors.sum(), vectors.abs().sum(), by_slot @ vectors.sum(1), vectors.sum(0) @ by_column,
                 torch.tensor(float(self.ptr)), torch.tensor(float(self.n_written))]
        for column in self.payload.values():
            rows = column.detach().double().reshape(self.size, -1).sum(1)
            parts += [rows.sum(), by_slot.to(rows.device) @ rows]
        return torch.stack([p.cpu() for p in parts])

    def assert_synchronized(self, name: str = "bank") -> None:
        """Raise if any process holds a different bank (a no-op with one process)."""
        sums = dist.all_gather_object(self.checksum().tolist())
        if any(s != sums[0] for s in sums[1:]):
            raise RuntimeError(f"memory bank '{name}' differs between processes: {sums}")

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}{list(c.shape)}" for k, c in self.columns.items())
        return (f"MemoryBank(size={self.size}, dim={self.dim}, filled={self.filled}, written={self.written}, "
                f"ptr={self.ptr}, payload=[{cols}])")


def save_banks(banks: Mapping[str, MemoryBank], path: str | Path) -> None:
    """All banks of a run in one safetensors file: ``NAME/vectors``, ``NAME/payload.COL`` ...;
    the metadata key ``query_features`` holds each bank's :class:`QueryFeature` as JSON."""
    from safetensors.torch import save_file

    if not isinstance(banks, Mapping):
        raise TypeError(f"save_banks takes the banks by name, such as {{'cls': bank}}, not a {type(banks).__name__}")
    tensors = {}
    for name, bank in banks.items():
        if "/" in name:
            raise ValueError(f"bank names cannot contain '/': {name!r}")
        for key, value in bank.state_dict().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    query_features = {name: vars(bank.query_feature) for name, bank in banks.items() if bank.query_feature}
    metadata = {"format_version": str(BANKS_FORMAT_VERSION), "banks": ",".join(banks),
                "query_features": json.dumps(query_features)}
    atomic.write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _read(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    from safetensors import safe_open

    states: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            version = int(metadata.get("format_version", "0"))
            if version > BANKS_FORMAT_VERSION:
                raise ValueError(f"it holds banks of format {version}, newer than this mlsctl reads; upgrade mlsctl")
            for key in f.keys():
                name, _, sub = key.partition("/")
                states.setdefault(name, {})[sub] = f.get_tensor(key)
    except ValueError:
        raise
    except Exception as exc:  # safetensors' own error for a truncated or foreign file, OSError
        raise ValueError(f"it is not a complete safetensors file ({first_line(exc)})") from None
    return states, metadata


def read_bank_states(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    return _read(path)[0]


def load_banks(path: str | Path) -> dict[str, MemoryBank]:
    """Rebuild every bank of a file (``RUN/checkpoints/step-N/banks.safetensors``, or one
    :func:`save_banks` wrote) from its tensors (and query features) alone, by name. A missing file
    is a FileNotFoundError, a damaged one a ValueError; both name the file."""
    if not Path(path).is_file():
        what = "is not a file" if Path(path).exists() else "does not exist"
        raise FileNotFoundError(f"{path} {what}; give a banks file such as RUN/checkpoints/step-N/banks.safetensors")
    try:
        return _load_banks(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _load_banks(path: str | Path) -> dict[str, MemoryBank]:
    states, metadata = _read(path)
    banks = {}
    try:
        query_features = json.loads(metadata.get("query_features", "{}"))
        for name, state in states.items():
            bank = MemoryBank.from_state_dict(state)
            bank.name = name
            if name in query_features:
                bank.query_feature = QueryFeature(**query_features[name])
            banks[name] = bank
    except ValueError:
        raise
    except (KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise ValueError(f"its banks are not complete ({type(exc).__name__}: {exc})") from None
    return banks
