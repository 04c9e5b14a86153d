"""Host and device without a synchronisation where none is needed.

On CUDA the host queues kernels and runs ahead; whatever makes it wait for the device's queue (a
synchronisation) stalls that pipeline. In a training step that is: reading a device value on the
host (``float``/``int``/``bool``/``.item()`` of a tensor, ``nonzero``, boolean-mask indexing,
``bincount``), ``torch.cuda.synchronize``, and a copy from ordinary (pageable) host memory to the
device, which ``tensor.to("cuda")``, ``torch.tensor(..., device="cuda")`` and ``new_tensor`` make
(docs/gpu.md). These helpers avoid the last two where the step needs them.
"""

from __future__ import annotations

import contextlib

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


@contextlib.contextmanager
def full_float32(device_type: str):
    """A block in full float32 whatever training set: autocast off, and on CUDA TF32 matrix products
    off too (the loop turns them on for speed; their 10 mantissa bits put a cosine ~5e-4 off, enough
    to reorder near ties), both as before on exit. For a step's choices and sharp logits — nearest
    neighbours, top-k pseudo-labels, cluster assignments, mined pairs, judges' scores at τ = 0.04 —
    not for the large products where TF32 is the point (a review of the CUDA paths, 2026-12-06:
    "float32" blocks ran in TF32, and CrIBo's clustering and bank search in bf16)."""
    with torch.autocast(device_type, enabled=False):
        if device_type != "cuda":
            yield
            return
        saved = matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            restore_matmul_precision(saved)


def matmul_precision() -> tuple:
    """torch's float32 matrix-product precision as set now ("highest", "high", "medium"; None where
    a caller mixed torch's two APIs for it, which torch then refuses to read) and the older switch
    ``torch.backends.cuda.matmul.allow_tf32``: what :func:`restore_matmul_precision` puts back. Read
    and set through ``torch.set_float32_matmul_precision``, so that a caller's "medium" survives (a
    review, 2026-12-06: setting the older switch alone left torch unable to say its precision)."""
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:
        precision = None
    return precision, torch.backends.cuda.matmul.allow_tf32


def restore_matmul_precision(saved: tuple) -> None:
    precision, allow_tf32 = saved
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    else:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
