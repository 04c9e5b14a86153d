"""Context refinement: embeddings attend to their nearest neighbours (docs/methods.md#context-refinement;
reconstructed from the paper's supplement, the only part of the paper that survives).

Symbols and their names here:

* e⁰ = ``x``: a frozen, L2-normalised embedding of width d1 (any embedding: the Multi-Similarity
  baseline of :mod:`mlsctl.methods.ms`, or a self-supervised run's features), read from a feature
  folder (``data.root``);
* its context: the k (``method.neighbours``, 8) nearest neighbours of e⁰ by cosine among the
  training embeddings, itself excluded (:func:`mlsctl.methods.refine.neighbours.nearest_neighbours`, an
  exact faiss index). The embeddings are frozen, so every row's neighbours are searched once,
  before the first step, and kept in the run's ``cache/neighbours.safetensors`` for ``--resume``
  (with k and the SHA-256 of the stored features: a resume onto other features is refused); at
  inference the reference is the gallery
  (``mlsctl refine apply``);
* a block t (:class:`~mlsctl.methods.refine.model.CrossAttentionBlock`, T = ``method.blocks`` = 8 of
  them, single head, as the Perceiver): the query is the running embedding x, keys and values the
  neighbours n (the original e⁰ of the neighbours in every block)::

      q = x + SiLU(W_q x)                 skip connection around the query projection
      k = SiLU(W_k n),  v = SiLU(W_v n)   SiLU in the projections
      a = softmax(q kᵀ / √d) v
      h = x + W_o a                       skip connection around the block
      h = h + W_2 SiLU(W_1 LN(h))
      x = normalize(h)                    L2 normalisation after every block

  so e^t is x after block t; the optional final linear layer d1 → d2 (``method.out_dim``) is
  followed by a normalisation too;
* the loss: Multi-Similarity on the refined embeddings e^T (:func:`mlsctl.methods.multi_similarity.ms_loss`,
  α = 2, β = 40, λ = 0.5, ε = 0.1), batches of ``method.positives_per_class`` = 2 embeddings of
  each class (m-per-class sampler); the recipe's optimiser is Adam, lr 1e-4, batch 128, constant
  learning rate (no scheduler), as the supplement says.

Where the supplement is silent, our choices
(docs/methods.md#context-refinement-choices-where-the-supplement-is-silent): the MLP is
d → ``mlp_ratio``·d → d with SiLU (the supplement names SiLU for the projections only); the
LayerNorm before the MLP is the only norm; with ``zero_init`` (default) W_o and W_2 start at zero,
so every block starts as the identity and refinement starts from the baseline's retrieval
(``tests/test_refine.py`` checks that identity blocks return their input); the other layers use
PyTorch's default initialisation. A block works on the unit vectors x and n themselves
(``input_scale: none``, the default, as the supplement writes it). ``input_scale: sqrt_d``, our
default until 2026-12-06 and the ablation row of ``benchmarks/refine_fidelity.py``, works on √d·x
and √d·n (unit variance per coordinate), the scale the LayerNorm, the attention's 1/√d and Adam's
steps assume (on unit-norm rows the LayerNorm's output, the MLP's input, is √d ≈ 23 times the
residual). It was dropped as the default because it is not the paper's. Where both were measured
(3 seeds, T = k = 8) they disagree: on warm-started MS features R@1 4.27 ± 0.63 with it against
4.75 ± 0.27 without (``benchmarks/results/refine/backbone``); on MS from scratch 11.40 ± 1.00 with it
against 10.33 ± 0.59 without (baseline 12.29), where the refined training loss of blocks on unit
vectors stays above the unrefined one for the whole 124 steps (docs/methods.md#context-refinement).
Runs saved without the key load with ``sqrt_d``, the computation they were trained with
(``RefineConfig.SAVED_DEFAULTS``).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from mlsctl import dist
from mlsctl.data.loader import map_tensors
from mlsctl.errors import UserError, first_line
from mlsctl.methods.base import Method, StepOutput, metric_value
from mlsctl.methods.multi_similarity import MiningCount, labelled_data, ms_loss_over_processes, short_classes_note
from mlsctl.methods.refine.config import RefineConfig
from mlsctl.methods.refine.model import INPUT_SCALES, CrossAttentionBlock, Refiner  # noqa: F401 - re-exported


# ------------------------------------------------------------------------------------------ the data


class FeatureData:
    """A feature folder as the training loop's data source (what an image folder is to the others):
    ``root``, ``relpaths()`` (the rows' files, checked again on ``--resume``), ``len``."""

    def __init__(self, path: str, what: str = "data.root"):
        from mlsctl.data.shards import Features

        self.features = Features(path, f"{what} (a feature folder)")
        self.root = Path(path)
        self.scan = _NoNotes()
        self.what = what

    def __reduce__(self):  # sent to another process as its path: the folder is opened there
        return FeatureData, (str(self.root), self.what)

    def relpaths(self) -> list[str]:
        return list(self.features.files)

    def __len__(self) -> int:
        return len(self.features)


class _NoNotes:
    def notes(self, what: str) -> list[str]:
        return []


@dataclass
class FeatureBatch:
    embeddings: torch.Tensor  # [B, d] e⁰
    neighbours: torch.Tensor  # [B, k, d] the context
    labels: torch.Tensor  # [B]
    rows: torch.Tensor  # [B] feature rows
    neighbour_rows: torch.Tensor  # [B, k]
    skipped: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device) -> "FeatureBatch":
        return map_tensors(self, lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "FeatureBatch":
        """Called by the DataLoader's pinning thread on CUDA, so the copies to the device do not wait
        for its queue (without it the batch stayed in pageable memory: a review, 2026-12-06)."""
        return map_tensors(self, lambda t: t.pin_memory())


NEIGHBOURS_FILE = "neighbours.safetensors"  # in the run's cache/ (mlsctl.runs.Run.cache_dir)


class ContextDataset(torch.utils.data.Dataset):
    """Every training embedding with its k neighbours among the others, searched once per run:
    ``search=False`` leaves :attr:`neighbour_rows` to :meth:`find_neighbours`, which the training loop
    calls once the run folder is locked (:meth:`Refine.prepare_dataset`) and which keeps them there."""

    def __init__(self, embeddings: torch.Tensor, labels: torch.Tensor, k: int, classes: list[str], what: str,
                 search: bool = True):
        from mlsctl.methods.refine.neighbours import check_reference_size

        check_reference_size(len(embeddings), k, True, what,
                             "lower method.neighbours (refine train --k) or give more embeddings")
        # the features as stored identify them: their normalisation's last bits depend on the CPU's kernels
        # (AVX512 and the default kernel gave two hashes of the same rows: a review, 2026-12-06)
        self.features_sha256 = _digest(embeddings.float())
        self.embeddings = F.normalize(embeddings.float(), dim=-1)
        self.labels, self.classes, self.k = labels, classes, k
        self.neighbour_rows: Optional[torch.Tensor] = None
        if search:
            self.find_neighbours()

    def find_neighbours(self, kept: Optional[Path] = None) -> torch.Tensor:
        """:attr:`neighbour_rows` [n, k], searched by process 0 and sent to the others (the same rows
        everywhere, one search instead of W). With ``kept`` (a file), they are read from it when it
        holds the neighbours of these embeddings for this k, and otherwise searched and written there:
        a resumed run does not search 1 M embeddings again (an exact search of that size takes hours
        on a CPU)."""
        self.neighbour_rows = dist.on_main(lambda: self._kept_or_searched(kept))
        return self.neighbour_rows

    def _kept_or_searched(self, kept: Optional[Path]) -> torch.Tensor:
        from mlsctl.methods.refine.neighbours import nearest_neighbours

        if kept is None:
            return self._search(nearest_neighbours)
        about = {"k": str(self.k), "embeddings_sha256": self.features_sha256}
        rows = _read_kept(kept, about, len(self.embeddings))
        if rows is None:
            rows = self._search(nearest_neighbours)
            _keep(kept, rows, about)
        return rows

    def _search(self, nearest_neighbours) -> torch.Tensor:
        rows = torch.arange(len(self.embeddings))
        return nearest_neighbours(self.embeddings, self.embeddings, self.k, exclude=rows,
                                  progress=sys.stderr.isatty())[0]

    def __len__(self) -> int:
        return len(self.embeddings)

    def __getitem__(self, key: tuple[int, int]) -> int:
        return key[1]

    def collate(self, rows: list[int]) -> FeatureBatch:
        rows = torch.tensor(rows, dtype=torch.long)
        neighbour_rows = self.neighbour_rows[rows]
        return FeatureBatch(self.embeddings[rows], self.embeddings[neighbour_rows], self.labels[rows], rows,
                            neighbour_rows)


def _digest(embeddings: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(memoryview(embeddings.contiguous().numpy()).cast("B")).hexdigest()  # no copy of them


def _read_kept(path: Path, about: dict, rows: int) -> Optional[torch.Tensor]:
    """The neighbour rows kept in ``path`` when its metadata is ``about`` and its shape fits, else None
    (no file, a damaged one, or one searched for other embeddings or another k: searched again)."""
    from safetensors import SafetensorError, safe_open

    log = logging.getLogger("mlsctl")
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("k") == about["k"] and metadata.get("embeddings_sha256") != about["embeddings_sha256"]:
                # the file is this run's own (k is a key --resume keeps): data.root holds other features now
                raise UserError(f"the features in data.root changed since this run started (their SHA-256 is not the "
                                f"one its neighbour search recorded in {path}): a resumed run would go on training "
                                f"on other features. Put back the features it started with, or start a new run "
                                f"(another --out, or --overwrite)")
            if metadata != about:
                log.info(f"{path} was searched for another k: searching again")
                return None
            kept = f.get_tensor("neighbour_rows")
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        log.warning(f"cannot read {path} ({first_line(exc)}): searching the neighbours again")
        return None
    if kept.dtype != torch.int64 or tuple(kept.shape) != (rows, int(about["k"])) or not (
            (kept >= 0) & (kept < rows)).all():
        log.warning(f"{path} holds neighbour rows of another shape or range: searching the neighbours again")
        return None
    log.info(f"neighbours read from {path} (searched when the run started)")
    return kept


def recorded_digest(path: Path) -> Optional[str]:
    """The SHA-256 of the features whose neighbours ``path`` keeps, None where it is missing or unreadable
    (then a resume searches them again, and checks nothing here)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("embeddings_sha256")
    except (SafetensorError, OSError, ValueError):
        return None


def _keep(path: Path, rows: torch.Tensor, about: dict) -> None:
    """Keep the search for ``--resume``; one that cannot be written (a full disk) costs a search then."""
    from safetensors.torch import save_file

    from mlsctl import atomic
    from mlsctl.errors import describe_environment_error

    try:
        atomic.write_with(path, lambda tmp: save_file({"neighbour_rows": rows.contiguous()}, str(tmp), metadata=about))
    except OSError as exc:
        logging.getLogger("mlsctl").warning(f"the neighbour search is not kept for --resume "
                                            f"({describe_environment_error(exc) or exc}); a resume searches again")


# ------------------------------------------------------------------------------------------ the method


def refine_dataset(recipe, data: FeatureData) -> ContextDataset:
    from mlsctl.data.labels import class_ids, labels_of

    cfg = recipe.method
    what = f"data.root {data.root}"
    names = labels_of(data.features.files, Path(data.features.input_root),
                      Path(cfg.labels_file) if cfg.labels_file else None, what, "method.labels_file=FILE (refine train: --labels FILE)")
    labels, classes = class_ids(names, what)
    return ContextDataset(data.features.global_features(), labels, cfg.neighbours, classes, what, search=False)


class Refine(Method):
    Config = RefineConfig
    has_backbone = False  # it refines features: no backbone to export
    batch_element = "embedding"
    data_root_hint = ("add data.root=FEATURES, a feature folder of mlsctl embed (or run mlsctl refine train "
                      "FEATURES)")

    def __init__(self, recipe, schedule, dim: Optional[int] = None):
        super().__init__(recipe, schedule)
        cfg = self.cfg
        if dim is None:
            dim = FeatureData(recipe.data.root).features.dim
        self.refiner = Refiner.of_config(dim, cfg)
        self.logged_losses: list[tuple[float, float]] = []  # (refined, unrefined) MS loss of this session's logged steps
        self.mining = MiningCount()

    @classmethod
    def check_recipe(cls, recipe):
        if recipe.optim.batch_size % recipe.method.positives_per_class:
            return [("optim.batch_size", f"must be a multiple of method.positives_per_class "
                                         f"({recipe.method.positives_per_class})")]
        return []

    @classmethod
    def recipe_notes(cls, recipe) -> list[str]:
        data = recipe.data
        crop_keys = [key for key, value, default in (("data.augment", data.augment, "cpu"),
                                                     ("data.decode_size", data.decode_size, 0),
                                                     ("data.cache", data.cache, "none")) if value != default]
        if not crop_keys:
            return []
        return [f"{', '.join(crop_keys)} {'has' if len(crop_keys) == 1 else 'have'} no effect on refinement: it trains "
                f"on the feature vectors in data.root, not on images; remove {'it' if len(crop_keys) == 1 else 'them'}"]

    @classmethod
    def describe_data(cls, recipe, device) -> str:
        return "feature vectors from data.root (no images, no crops)"

    @classmethod
    def open_data(cls, recipe) -> FeatureData:
        return FeatureData(recipe.data.root)

    @classmethod
    def build_dataset(cls, recipe, data: FeatureData):
        dataset = refine_dataset(recipe, data)
        return dataset, dataset.collate

    @classmethod
    def prepare_dataset(cls, dataset: ContextDataset, cache_dir: Path) -> None:
        dataset.find_neighbours(cache_dir / NEIGHBOURS_FILE)

    @classmethod
    def check_resumed_data(cls, dataset: ContextDataset, run, given: str, trained_on: str) -> None:
        """Features of the same files with other values (another model's) pass the listing's check: their
        SHA-256 against the one the run's neighbour search recorded (a new user's probe, 2026-12-07: a finished
        run resumed on them said "already complete")."""
        kept = run.cache_dir / NEIGHBOURS_FILE
        recorded = recorded_digest(kept) if kept.is_file() else None
        if recorded is None or recorded == dataset.features_sha256:
            return
        if os.path.abspath(given) == os.path.abspath(trained_on):
            raise UserError(f"the features in {given} changed since run {run.root} was trained on them (their SHA-256 "
                            f"is not the one its neighbour search recorded in {kept}): put back the features it was "
                            f"trained on, or start a new run (another --out, or --overwrite)")
        raise UserError(f"the features {given} are not the features run {run.root} was trained on ({trained_on}): "
                        f"their SHA-256 is not the one its neighbour search recorded in {kept}; resume with "
                        f"{trained_on}, or start a new run on {given} (another --out, or --overwrite)")

    @classmethod
    def batch_sampler(cls, recipe, dataset, *, world_size=1, rank=0, start_step=0, total_steps=None):
        from mlsctl.data.mperclass import MPerClassStepSampler

        return MPerClassStepSampler.of_recipe(recipe, dataset.labels, recipe.method.positives_per_class,
                                              world_size=world_size, rank=rank, start_step=start_step,
                                              total_steps=total_steps)

    def ema_momentum(self, step: int) -> float:
        return 0.0  # no EMA teacher

    def teacher_backbone(self):
        raise UserError(f"a refine run has no backbone (it refines the features of {self.recipe.data.root}); use "
                        f"mlsctl refine apply RUN FEATS")

    def training_step(self, batch: FeatureBatch, step: int) -> StepOutput:
        cfg = self.cfg
        refined = self.refiner(batch.embeddings, batch.neighbours)
        loss, mined = ms_loss_over_processes(refined, batch.labels, cfg.alpha, cfg.beta, cfg.base, cfg.epsilon)
        self.mining.add(step, mined)
        metrics = dict(mined)
        if self.logged:  # the loss of the features as they came, a metric only: where it is logged
            with torch.no_grad():
                before, _ = ms_loss_over_processes(batch.embeddings, batch.labels, cfg.alpha, cfg.beta, cfg.base,
                                                   cfg.epsilon)
            metrics["ms_before"] = metric_value(before)
            if self.micro_batch[0] == 0:  # read where logged, as the loop reads the metrics
                self.logged_losses.append((float(loss.detach()), float(before)))
        return StepOutput(loss, terms={"ms": loss.detach()}, metrics=metrics)

    @classmethod
    def data_notes(cls, recipe, dataset):
        """Classes of fewer embeddings than ``method.positives_per_class``
        (:func:`~mlsctl.methods.multi_similarity.short_classes_note`)."""
        short = short_classes_note(dataset.labels, recipe.method.positives_per_class, recipe.optim.batch_size,
                                   "method.positives_per_class")
        return [f"{labelled_data(recipe)}: {short}"] if short else []

    def end_notes(self) -> list[str]:
        """The steps the miner found too few pairs in (:class:`~mlsctl.methods.multi_similarity.MiningCount`), and
        :meth:`_worse_notes`."""
        return [*self.mining.notes(), *self._worse_notes()]

    def _worse_notes(self) -> list[str]:
        """The refined embeddings' loss above the unrefined ones' on most logged steps: refinement made the
        features worse on their own training batches (a new user's probe, 2026-12-06: at the defaults on
        weak features, 0.736 against 0.722 for 200 steps, with nothing said)."""
        counted = self.logged_losses
        above = sum(refined > unrefined for refined, unrefined in counted)
        if len(counted) < 5 or above <= len(counted) // 2:
            return []
        refined, unrefined = counted[-1]
        return [f"the refined embeddings' Multi-Similarity loss stayed above the unrefined ones' at {above} of the "
                f"{len(counted)} logged steps of this session (last: {refined:.4f} against {unrefined:.4f}, metric "
                f"ms_before): refinement made these features worse on their own training batches; try a lower "
                f"optim.lr or method.input_scale=sqrt_d (docs/reproduction.md)"]
