"""Batch statistics for contrastive learning with a momentum encoder (MoCo, MLS).

A BatchNorm layer normalises a sample with statistics of the samples it is batched with. In MoCo
the query ``q`` and its positive key ``k+`` come from two views of one image; if both are
normalised with statistics of the same set of images, the encoders can "cheat": the batch mean
leaks which samples are together, and the InfoNCE loss drops without better features (He et al.,
2020, §3.3). Two remedies, both here:

* **shuffle BN** (MoCo's own): statistics are computed over *groups* of ``group_size`` images
  (MoCo: the 32 images of one GPU) and the key encoder sees the global batch in a shuffled order,
  so a query and its key are normalised within different groups. :class:`GroupBatchNorm2d`
  computes the group statistics in one process (what MoCo's single-GPU demo calls SplitBatchNorm),
  so the defence does not depend on the number of processes: with one process the batch is split
  into ``batch / group_size`` groups; with several, each process's batch is split the same way
  and the shuffle runs over the *global* batch (the images are gathered, permuted, and every
  process encodes its slice), as MoCo's ``_batch_shuffle_ddp`` does.
* **SyncBN** (SimCLR's, BYOL's): statistics over the whole global batch
  (:class:`torch.nn.SyncBatchNorm`, through timm's converter). Needs CUDA processes to
  synchronise; in one process it is ordinary BatchNorm over the batch.

:class:`GroupBatchNorm2d` subclasses :class:`torch.nn.BatchNorm2d` with the same parameters and
buffers, so checkpoints, exported weights and evaluation (which uses the running statistics) see
an ordinary BatchNorm layer. Backbones know nothing of this: a method converts its encoders.

Running statistics with several processes: as in MoCo, each process keeps those of its own groups
(they serve only evaluation) and the checkpoint holds rank 0's; the weights, the queues and the
losses do not depend on the number of processes (``tests/test_mls.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlsctl.errors import UserError


class GroupBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over consecutive groups of ``group_size`` samples in training (each group its own
    mean and variance, like one GPU of MoCo's 8); the running statistics move towards the mean of
    the groups' statistics. A batch of at most ``group_size`` samples is one group. In evaluation
    it is :class:`torch.nn.BatchNorm2d`."""

    def __init__(self, num_features: int, group_size: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.group_size = group_size

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, group_size: int) -> "GroupBatchNorm2d":
        out = cls(bn.num_features, group_size, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  track_running_stats=bn.track_running_stats)
        out.load_state_dict(bn.state_dict())
        return out.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self.training or n <= self.group_size:
            return super().forward(x)
        if n % self.group_size:
            raise ValueError(f"a batch of {n} samples does not split into groups of {self.group_size}")
        groups = n // self.group_size
        c = self.num_features
        # [n, C, H, W] -> [n/G, G*C, H, W]: group j's samples become channels j*C .. (j+1)*C-1
        folded = x.reshape(groups, self.group_size, c, *x.shape[2:]).transpose(0, 1).reshape(self.group_size, groups * c,
                                                                                                 *x.shape[2:])
        factor = 0.0
        running_mean = running_var = None
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            running_mean = self.running_mean.repeat(groups)
            running_var = self.running_var.repeat(groups)
        weight = self.weight.repeat(groups) if self.affine else None
        bias = self.bias.repeat(groups) if self.affine else None
        out = F.batch_norm(folded, running_mean, running_var, weight, bias, True, factor, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(groups, c).mean(0))
                self.running_var.copy_(running_var.view(groups, c).mean(0))
        out = out.reshape(self.group_size, groups, c, *x.shape[2:]).transpose(0, 1).reshape(x.shape)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # a channels-last network (the loop's speed-up for CNNs on CUDA) gets its layout back, so the next
            # convolution does not convert it again (a review of the CUDA paths, 2026-12-06)
            out = out.contiguous(memory_format=torch.channels_last)
        return out


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def convert_to_group_batchnorm(module: nn.Module, group_size: int, where: str) -> nn.Module:
    """Every ``nn.BatchNorm2d`` of ``module`` (in place where possible) → :class:`GroupBatchNorm2d`.
    Other BatchNorm variants (timm's ``BatchNormAct2d``, 1-D BatchNorm) cannot be grouped here:
    one sentence naming ``where`` and the alternative."""
    if type(module) is nn.BatchNorm2d:
        return GroupBatchNorm2d.from_batchnorm(module, group_size)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            setattr(module, name, GroupBatchNorm2d.from_batchnorm(child, group_size))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GroupBatchNorm2d):
            raise UserError(f"{where} has a {type(child).__name__} layer, which shuffle BN cannot group; use "
                            f"method.key_bn=sync")
        else:
            convert_to_group_batchnorm(child, group_size, where)
    return module


def convert_to_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer → :class:`torch.nn.SyncBatchNorm` (timm's converter keeps its
    BatchNorm-with-activation layers whole)."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(module)
