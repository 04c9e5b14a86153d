"""Quality monitored during training (``train.monitor``): k-NN on the teacher, as solo-learn's
online k-NN, and dense k-NN segmentation where masks are given.

Every ``train.monitor.every`` steps, process 0 embeds the monitor's labelled train and val images
with the current teacher backbone (eval mode, no gradient; the first ``max_images`` images of each
folder are decoded once, at the start, resized square to the model's img_size) and computes

* ``monitor/knn_top1``: weighted k-NN top-1 of the val images against the train images (the
  ``eval knn`` functions: cosine, votes ``exp(cos/0.07)``, k = ``train.monitor.k``);
* ``monitor/knn_seg_miou`` (with ``train_masks`` and ``val_masks``): dense k-NN segmentation of the
  val images with every train patch as memory (the ``eval knn-seg`` label transfer: soft patch
  labels, 30 neighbours by default, softmax(cos/0.02), bilinear upsampling, streaming mIoU).

Labels are each image's own folder (however deep) or label files, as for ``eval knn``. The monitor never draws from the
training's random streams (it runs inside ``torch.random.fork_rng`` and touches no data loader),
so a run with and without it has identical losses; its seconds are logged as ``time/monitor``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from mlsctl.errors import UserError


class _Split:
    """Decoded images of one monitor folder (uint8 [n, 3, R, R]) with their labels and masks."""

    def __init__(self, root: str, labels_file: Optional[str], masks: Optional[str], resolution: int, what: str,
                 max_images: int = 0):
        from mlsctl.data.images import ImageFolder
        from mlsctl.data.labels import labels_of
        from mlsctl.evaluate.knn_seg import match_masks, read_mask
        from mlsctl.features import Preprocessing

        folder = ImageFolder(root, what)
        count = min(len(folder), max_images) if max_images else len(folder)
        self.files = folder.relpaths()[:count]
        self.preprocessing = Preprocessing(resolution, "square")
        self.pixels = torch.stack([self.preprocessing.pixels(folder.load(i)) for i in range(count)])
        self.names = labels_of(self.files, Path(root), Path(labels_file) if labels_file else None, f"{what} ({root})",
                               f"{what}_labels")
        self.masks = [read_mask(p) for p in match_masks(self.files, Path(masks), what)] if masks else None


class Monitor:
    def __init__(self, cfg, resolution: int, patch_size: int):
        resolution -= resolution % patch_size
        self.cfg = cfg
        self.train = _Split(cfg.train, cfg.train_labels, cfg.train_masks, resolution, "train.monitor.train",
                            cfg.max_images)
        self.val = _Split(cfg.val, cfg.val_labels, cfg.val_masks, resolution, "train.monitor.val", cfg.max_images)
        classes = sorted(set(self.train.names))
        lookup = {c: i for i, c in enumerate(classes)}
        self.train_y = torch.tensor([lookup[c] for c in self.train.names])
        self.val_y = torch.tensor([lookup.get(c, -1) for c in self.val.names])
        self.num_classes = len(classes)
        self.seg_classes = None
        if self.train.masks is not None or self.val.masks is not None:
            if self.train.masks is None or self.val.masks is None:
                raise UserError("train.monitor needs both train_masks and val_masks for knn-seg, or neither")
            top = max(int(m[m != cfg.ignore_index].max(initial=0)) for m in self.train.masks + self.val.masks)
            self.seg_classes = top + 1

    @torch.no_grad()
    def _embed(self, backbone, split: _Split, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """CLS [n, D] of a split and, when knn-seg runs (masks given), its patch tokens (None without:
        10,000 images of ViT-B/16 at 224 px are 6 GB of them)."""
        cls, dense = [], []
        for start in range(0, len(split.pixels), self.cfg.batch_size):
            x = split.preprocessing.normalize(split.pixels[start:start + self.cfg.batch_size].to(device))
            out = backbone(x)
            cls.append(out.cls.float().cpu())
            if self.seg_classes is not None:
                dense.append(out.patches.float().cpu())
        return torch.cat(cls), (torch.cat(dense) if dense else None)

    def __call__(self, backbone, device) -> dict[str, float]:
        from mlsctl.evaluate.knn import accuracy, knn_classify

        started = time.perf_counter()
        was_training = backbone.training
        backbone.eval()
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            train_cls, train_dense = self._embed(backbone, self.train, device)
            val_cls, val_dense = self._embed(backbone, self.val, device)
        backbone.train(was_training)
        k = self.cfg.k
        scores = knn_classify(train_cls, self.train_y, val_cls, [k], num_classes=self.num_classes)[k]
        record = {"monitor/knn_top1": accuracy(scores, self.val_y, 1)}
        if self.seg_classes is not None:
            record["monitor/knn_seg_miou"] = self._knn_seg(train_dense, val_dense)
        record["time/monitor"] = time.perf_counter() - started
        return record

    def _knn_seg(self, train_dense: torch.Tensor, val_dense: torch.Tensor) -> float:
        """Dense k-NN segmentation (all labelled training patches as memory) by the code of ``eval
        knn-seg`` (:func:`~mlsctl.evaluate.knn_seg.segment_batches`), at its default temperature."""
        from mlsctl.evaluate.knn_seg import Settings, build_memory, build_search, segment_batches
        from mlsctl.evaluate.segmentation import mean_iou

        # on the CPU, as the monitor always searched: the training GPU's memory stays the training's
        settings = Settings(k=self.cfg.seg_k, ignore_index=self.cfg.ignore_index, device="cpu")
        memory = build_memory(((i, train_dense[i], mask) for i, mask in enumerate(self.train.masks)), self.seg_classes,
                              per_image=None, ignore_index=settings.ignore_index, generator=torch.Generator())
        batch = settings.query_batch
        batches = ((val_dense[start:start + batch], self.val.masks[start:start + batch])
                   for start in range(0, len(self.val.masks), batch))
        confusion, _ = segment_batches(memory, build_search(memory.features, settings), batches, self.seg_classes,
                                       settings)
        return mean_iou(confusion)
