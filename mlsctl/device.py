"""Host and device without a synchronisation where none is needed.

On CUDA the host queues kernels and runs ahead; whatever makes it wait for the device's queue (a
synchronisation) stalls that pipeline. In a training step that is: reading a device value on the
host (``float``/``int``/``bool``/``.item()`` of a tensor, ``nonzero``, boolean-mask indexing,
``bincount``), ``torch.cuda.synchronize``, and a copy from ordinary (pageable) host memory to the
device, which ``tensor.to("cuda")``, ``torch.tensor(..., device="cuda")`` and ``new_tensor`` make
(docs/gpu.md). These helpers avoid the last two where the step needs them.
"""

from __future__ import annotations

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (``torch.cuda.synchronize`` on CUDA; nothing elsewhere).
    The training step synchronises only to time itself, on the steps whose metrics are logged
    (:class:`~mlsctl.methods.base.StepTimer`, the loop's ``time/step``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor.to(device)`` without a synchronisation: a CPU tensor (indices drawn from a CPU
    generator) goes to CUDA through pinned memory, its copy queued like a kernel (PyTorch's caching
    host allocator keeps the pinned buffer until the copy is done); from pageable memory the copy
    would wait for the device's queue. Elsewhere, ``tensor.to(device)``."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
