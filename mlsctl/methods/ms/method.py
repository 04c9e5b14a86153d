"""Multi-Similarity (Wang et al., 2019): the supervised metric-learning baseline whose embeddings
context refinement starts from (the base embeddings e⁰; docs/methods.md#multi-similarity).

* the model: a timm ViT and a linear embedding layer, ``model.embedding_dim`` wide (512 in the
  paper), returned and stored by ``mlsctl embed`` as it is, not L2-normalised: the loss normalises it, as
  every consumer of stored embeddings does (:class:`~mlsctl.models.backbone.Backbone` with
  ``embedding_dim``: the layer is timm's own ``head``, so an export loads in timm);
* the labels: the class of an image is its folder (``data.root/<class>/...``), or its row of
  ``method.labels_file`` (CSV/JSONL of path,label, as ``mlsctl eval knn`` reads them);
* the batches: ``method.m_per_class`` images of each of ``batch / m`` classes
  (:class:`~mlsctl.data.mperclass.MPerClassStepSampler`, pytorch-metric-learning's sampler made
  deterministic per epoch), one random resized crop each (``data.global_crops``, count 1), a crop of its
  own for every draw of an image (a repeat within an epoch is another crop);
* the loss: :func:`~mlsctl.methods.multi_similarity.ms_loss` (the miner's pairs, then the loss,
  with α = 2, β = 40, λ = 0.5, ε = 0.1), which context refinement trains with as well.

There is no teacher: the trained network itself is what ``teacher_backbone`` returns, and no EMA.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mlsctl.data.labels import SPLIT_NAMES, class_ids, labels_of
from mlsctl.data.loader import Batch, MultiCropDataset, collate
from mlsctl.methods.base import Method, StepOutput
from mlsctl.methods.ms.config import MSConfig
from mlsctl.methods.multi_similarity import MiningCount, labelled_data, ms_loss_over_processes, short_classes_note
from mlsctl.models.backbone import build_backbone


# ------------------------------------------------------------------------------------------ data


@dataclass
class LabelledBatch(Batch):
    labels: Optional[torch.Tensor] = None  # [B] class index


TRAINING_SPLITS = ("train", "training")


class LabelledCrops(MultiCropDataset):
    """Random resized crops of a labelled image folder; ``labels`` [n] class indices."""

    def __init__(self, folder, transform, seed: int, labels: torch.Tensor, classes: list[str], **data_path):
        super().__init__(folder, transform, seed, **data_path)
        self.labels, self.classes = labels, classes


def labelled_collate(dataset: LabelledCrops):
    def collate_fn(samples: list[dict]) -> LabelledBatch:
        batch = collate(samples)
        # a skipped (undecodable) image is replaced by the next readable one: its label follows it
        labels = dataset.labels[batch.image_ids]
        return LabelledBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}, labels=labels)
    return collate_fn


# ------------------------------------------------------------------------------------------ method


class MS(Method):
    Config = MSConfig

    def __init__(self, recipe, schedule):
        super().__init__(recipe, schedule)
        self.backbone = build_backbone(recipe.model)
        self.mining = MiningCount()

    @classmethod
    def check_recipe(cls, recipe):
        if recipe.model.embedding_dim < 1:
            return [("model.embedding_dim", "must be set for ms: the width of the linear embedding layer (512 in the "
                                            "paper)")]
        if recipe.data.global_crops.count != 1 or recipe.data.local_crops.count != 0:
            return [("data.global_crops.count", "must be 1 and data.local_crops.count 0 for ms (one crop per image)")]
        if recipe.optim.batch_size % recipe.method.m_per_class:
            return [("optim.batch_size", f"must be a multiple of method.m_per_class ({recipe.method.m_per_class})")]
        return []

    @classmethod
    def build_dataset(cls, recipe, folder):
        labels_file = recipe.method.labels_file
        names = labels_of(folder.relpaths(), Path(folder.root), Path(labels_file) if labels_file else None,
                          f"data.root {folder.root}", "method.labels_file=FILE")
        labels, classes = class_ids(names, f"data.root {folder.root}")
        dataset = LabelledCrops(folder, cls.multicrop(recipe), recipe.seed, labels, classes, **cls.data_path(recipe))
        return dataset, labelled_collate(dataset)

    @classmethod
    def batch_sampler(cls, recipe, dataset, *, world_size=1, rank=0, start_step=0, total_steps=None):
        from mlsctl.data.mperclass import MPerClassStepSampler

        return MPerClassStepSampler.of_recipe(recipe, dataset.labels, recipe.method.m_per_class, world_size=world_size,
                                              rank=rank, start_step=start_step, total_steps=total_steps)

    @classmethod
    def data_notes(cls, recipe, dataset):
        """Class folders under several splits of a data set (``train/``, ``test/``): its root was given, and
        the test classes are trained on (a new user's probe, 2026-12-06); classes of fewer images than
        ``method.m_per_class`` (:func:`~mlsctl.methods.multi_similarity.short_classes_note`)."""
        short = short_classes_note(dataset.labels, recipe.method.m_per_class, recipe.optim.batch_size, crops=True)
        return [*cls._splits_notes(recipe, dataset), *([f"{labelled_data(recipe)}: {short}"] if short else [])]

    @classmethod
    def _splits_notes(cls, recipe, dataset):
        if recipe.method.labels_file:
            return []
        splits = sorted({Path(p).parts[0] for p in dataset.folder.relpaths() if len(Path(p).parts) > 2})
        if len(splits) < 2 or not {name.casefold() for name in splits} <= SPLIT_NAMES:
            return []
        root = Path(dataset.folder.root)
        training = next((name for name in splits if name.casefold() in TRAINING_SPLITS), None)
        held_out = [name for name in splits if name != training]
        give = f"; give data.root={root / training} instead" if training else "; give the training split's folder"
        return [f"data.root {root} holds the splits {', '.join(splits)}: the class folders of all of them are trained "
                f"on, those of {' and '.join(held_out)} included{give}"]

    def end_notes(self) -> list[str]:
        return self.mining.notes()

    def ema_momentum(self, step: int) -> float:
        return 0.0  # no EMA teacher

    def teacher_backbone(self):
        return self.backbone

    def training_step(self, batch, step):
        cfg = self.cfg
        embeddings = self.backbone(batch.crops[0]).cls
        loss, mined = ms_loss_over_processes(embeddings, batch.labels, cfg.alpha, cfg.beta, cfg.base, cfg.epsilon)
        self.mining.add(step, mined)
        return StepOutput(loss, terms={"ms": loss.detach()}, metrics=mined)
