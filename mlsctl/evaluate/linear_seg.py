"""Linear segmentation on frozen dense features (CrIBo's Table 2 protocol, linear variant;
docs/methods.md#eval-linear-seg).

A linear layer (a 1×1 convolution) maps every patch feature to class logits. It is trained on
the training images' patches against their *soft labels* — the class histogram of the mask pixels
under each patch (:func:`~mlsctl.evaluate.knn_seg.patch_soft_labels`; patches whose pixels are all
ignored are left out) — with SGD (momentum 0.9, cosine schedule), the features standardised by
the training patches' mean and std, and the training images streamed from the memory-mapped
feature folder a batch of consecutive images at a time, the batches in a fresh random order every
epoch (no copy of the split's patches is held). Training on patch-level
soft labels instead of upsampled logits against full-resolution masks is the one simplification;
it gives the same optimum for a per-patch linear map up to the bilinear blur at patch borders.

Scoring is knn-seg's: the class-probability map of every validation image is upsampled bilinearly
to its mask size, its argmax is the prediction, counted in a streaming confusion matrix
(:mod:`mlsctl.evaluate.segmentation`).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from mlsctl.errors import UserError
from mlsctl.evaluate.linear import diverged, finite_or_none
from mlsctl.evaluate.knn_seg import FeatureMasks, no_labelled_pixels, patch_soft_labels, segmentation_classes
from mlsctl.evaluate.segmentation import (CONSTANT_RULE, confusion_update, constant_rule, foreground_scores,
                                          iou_per_class, mean_iou, pixel_accuracy)


def _patch_stats(train: FeatureMasks, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    total = total_sq = None
    count = 0
    for _, dense in train.features.iter_dense(batch=batch):
        flat = dense.reshape(-1, dense.shape[-1]).double()
        total = flat.sum(0) if total is None else total + flat.sum(0)
        total_sq = (flat ** 2).sum(0) if total_sq is None else total_sq + (flat ** 2).sum(0)
        count += len(flat)
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp_min(1e-12).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


class SoftLabelCache:
    """:func:`~mlsctl.evaluate.knn_seg.patch_soft_labels` of each training image, computed on first
    use and kept for the next epochs as its non-zero entries only (int32 position + float32 value,
    8 bytes each): a patch holds one or a few of the classes, so this is a small share of the dense
    [h·w, C] rows (ADE20K at 512 px: about 12 GiB dense for its 20,210 images, 150 classes and
    1,024 patches each). :meth:`get` gives back exactly the dense rows."""

    def __init__(self, num_classes: int, ignore_index: int):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}

    def get(self, row: int, mask, grid: tuple[int, int]) -> torch.Tensor:
        """The soft labels [h·w, C] of training image ``row`` (``mask`` is read only the first time)."""
        if row not in self.rows:
            soft = patch_soft_labels(mask(), grid, self.num_classes, self.ignore_index)
            flat = soft.reshape(-1)
            where = flat.nonzero().squeeze(1)
            self.rows[row] = (where.to(torch.int32), flat[where], tuple(soft.shape))
        where, values, shape = self.rows[row]
        dense = torch.zeros(shape[0] * shape[1])
        dense[where.long()] = values
        return dense.view(shape)

    def nbytes(self) -> int:
        return sum(where.nbytes + values.nbytes for where, values, _ in self.rows.values())

    def class_mass(self) -> torch.Tensor:
        """[C] the soft labels of every patch read so far, summed (float64): after one epoch, of the whole
        training set; its argmax is the constant rule's class (:func:`~mlsctl.evaluate.segmentation.constant_rule`)."""
        mass = torch.zeros(self.num_classes, dtype=torch.float64)
        for where, values, _ in self.rows.values():
            mass.index_add_(0, where.long() % self.num_classes, values.double())
        return mass


def train_linear_seg(train: FeatureMasks, num_classes: int, *, epochs: int = 10, lr: float = 0.1,
                     weight_decay: float = 0.0, image_batch: int = 32, ignore_index: int = 255, seed: int = 0,
                     progress=None, labels: Optional[SoftLabelCache] = None, start: Optional[list] = None
                     ) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, list[float]]:
    """The linear layer, the standardisation (mean, std) and the mean loss of every epoch. ``labels``: the
    cache of the training patches' soft labels to fill (a new one by default), for the caller to read after;
    ``start``: a list the first batch's loss, before any step, is appended to."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = _patch_stats(train, image_batch)
    layer = torch.nn.Linear(len(mean), num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = len(train)
    steps_per_epoch = math.ceil(n / image_batch)
    total, step, losses, labelled = epochs * steps_per_epoch, 0, [], 0
    labels = SoftLabelCache(num_classes, ignore_index) if labels is None else labels
    for _ in range(epochs):
        # blocks of consecutive images in a fresh random order: each batch is one contiguous read
        blocks = torch.randperm(steps_per_epoch, generator=generator).tolist()
        epoch_loss, epoch_batches = 0.0, 0
        for block in blocks:
            rows = list(range(block * image_batch, min((block + 1) * image_batch, n)))
            (_, dense_block), = train.features.iter_dense(rows, batch=len(rows))
            x, y = [], []
            for row, dense in zip(rows, dense_block):
                soft = labels.get(row, lambda: train.mask(row), tuple(dense.shape[:2]))
                keep = soft.sum(1) > 0
                x.append(dense.reshape(-1, dense.shape[-1])[keep])
                y.append(soft[keep])
            x = (torch.cat(x).float() - mean) / std
            y = torch.cat(y)
            labelled += len(y)
            if not len(y):  # a batch whose masks label nothing: its mean loss is NaN, and so would be the layer
                step += 1
                if progress is not None:
                    progress(len(rows))
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = -(y * F.log_softmax(layer(x), dim=1)).sum(1).mean()
            if start is not None and step == 0:
                start.append(float(loss.detach()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            epoch_loss += float(loss.detach())
            epoch_batches += 1
            if progress is not None:
                progress(len(rows))
        if not labelled:  # the first epoch has read every mask (a review, 2026-12-06: "mIoU 25.0%", loss nan)
            raise UserError("the training masks label no patch (every pixel is ignored); check --train-masks and "
                            "--ignore-index")
        losses.append(epoch_loss / max(epoch_batches, 1))
    return layer, mean, std, losses


def evaluate_linear_seg(train: FeatureMasks, val: FeatureMasks, *, epochs: int = 10, lr: float = 0.1,
                        weight_decay: float = 0.0, image_batch: int = 32, ignore_index: int = 255, seed: int = 0,
                        names: Optional[list[str]] = None, progress: Optional[bool] = False) -> dict:
    """Train on ``train``, score on ``val`` → a JSON-ready result (mIoU, IoU per class, confusion).
    ``progress``: a bar (True), nothing (False), or as the CLI wants it (None: a bar on a terminal, a
    line every 30 s in a log, as knn-seg)."""
    from mlsctl.console import progress_bar

    train.features.check_same_model(val.features)
    num_classes = segmentation_classes(train, val, names, ignore_index)
    bar = progress_bar(epochs * len(train) + len(val), "linear-seg", "images (training epochs, then val)", progress)
    started = time.perf_counter()
    labels, start = SoftLabelCache(num_classes, ignore_index), []
    layer, mean, std, losses = train_linear_seg(train, num_classes, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                                image_batch=image_batch, ignore_index=ignore_index, seed=seed,
                                                progress=bar.update, labels=labels, start=start)
    trained = time.perf_counter()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for row_batch, dense in val.features.iter_dense(batch=image_batch):
            b, h, w, d = dense.shape
            probabilities = torch.softmax(layer((dense.reshape(-1, d).float() - mean) / std), dim=1)
            maps = probabilities.reshape(b, h, w, -1).permute(0, 3, 1, 2)
            for i, row in enumerate(row_batch.tolist()):
                mask = val.mask(row)
                prediction = F.interpolate(maps[i:i + 1], size=mask.shape, mode="bilinear", align_corners=False)
                confusion = confusion_update(confusion, mask, prediction[0].argmax(0).numpy(), ignore_index)
            bar.update(b)
    bar.close()
    if not confusion.sum():
        raise UserError(no_labelled_pixels(val, ignore_index))
    classes = list(names or []) + [str(c) for c in range(len(names or []), num_classes)]
    majority = int(torch.argmax(labels.class_mass()))
    chance = {"rule": CONSTANT_RULE,
              **constant_rule(confusion, majority, names), "majority_class": classes[majority]}
    return {"classes": classes, "num_classes": num_classes, "miou": mean_iou(confusion),
            "pixel_accuracy": pixel_accuracy(confusion),
            "iou_per_class": [None if np.isnan(v) else float(v) for v in iou_per_class(confusion)],
            **foreground_scores(confusion, names),  # foreground = every class but 0, where 0 is a background
            "predicted_classes": [classes[c] for c in np.flatnonzero(confusion.sum(0))],
            "chance": chance,
            "train_loss_per_epoch": losses,
            # the first batch's loss, before any step, and whether the final epoch's is non-finite or far above it
            "train_loss_initial": finite_or_none(start[0]) if start else None,
            "diverged": bool(start) and diverged(start[0], losses[-1]),
            "settings": {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "image_batch": image_batch,
                         "ignore_index": ignore_index, "seed": seed,
                         "protocol": "1x1 linear layer on standardised frozen patch features, trained on per-patch "
                                     "soft labels (SGD momentum 0.9, cosine); bilinear upsampling, argmax"},
            "seconds": {"train": trained - started, "total": time.perf_counter() - started},
            "confusion": confusion.tolist()}


def one_class_note(result: dict) -> str:
    """The note on a probe that predicts one class for every val pixel (``predicted_classes``, recorded since
    2026-12-07), or "": its mIoU is that class's IoU over the classes present, and says nothing of the features
    but that no class is linearly separable from it patch by patch at these settings (a new user's probe: such a
    probe of a DINO teacher at 496 steps was shown as any other result)."""
    predicted = result.get("predicted_classes")
    if not isinstance(predicted, list) or len(predicted) != 1:
        return ""
    return (f"note: the probe predicts {predicted[0]} for every val pixel: no other class is linearly separable from "
            f"it at these settings (more epochs, another --lr, or features of a longer-trained model); eval knn-seg "
            f"measures the same features without training a probe")
