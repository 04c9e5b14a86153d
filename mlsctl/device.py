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
from typing import Optional

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
        saved = precision_switches()
        set_tf32(matmul=False)
        try:
            yield
        finally:
            restore_precision_switches(saved)


def _switch(owner, legacy) -> Optional[tuple[object, str, object]]:
    """Where torch keeps one float32 precision: ``owner``'s per-backend string of newer torch
    (``fp32_precision``: "none", "ieee", "tf32"), else ``legacy``'s older boolean (``allow_tf32``); with
    ``legacy``, which :func:`_write` writes. Only the newer string is read where it exists: reading the
    older ones after a caller set the newer ones raises in torch 2.14 (a review, 2026-12-06)."""
    if owner is not None and hasattr(owner, "fp32_precision"):
        return owner, "fp32_precision", legacy
    return (legacy, "allow_tf32", None) if legacy is not None else None


def _write(switch: tuple[object, str, object], value) -> None:
    """Set one switch. A newer string's "tf32" or "ieee" goes through the older boolean where torch has
    one, and torch sets the string to match (cuDNN's sets its RNNs' too, and its "ieee" reads "none"):
    "tf32" written to the string alone leaves the older switches and ``torch.get_float32_matmul_precision()``
    raising ("a mix of the legacy and new APIs"), which torch.compile's inductor reads before torch 2.13 (a
    review of the CUDA paths, 2026-12-07: ``train.compile: true`` on CUDA would have failed in its lowering)."""
    owner, name, legacy = switch
    if name == "fp32_precision" and legacy is not None and value in ("tf32", "ieee"):
        legacy.allow_tf32 = value == "tf32"
    else:
        setattr(owner, name, value)


def _cuda_switches() -> tuple:
    """CUDA's switches: (cuBLAS matrix products, cuDNN convolutions)."""
    return (_switch(torch.backends.cuda.matmul, torch.backends.cuda.matmul),
            _switch(getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn))


def precision_switches() -> list[tuple[tuple[object, str, object], object]]:
    """The values of CUDA's switches, cuDNN's RNNs' (which cuDNN's older switch sets with its
    convolutions') and the CPU's (oneDNN) matrix products, for :func:`restore_precision_switches`."""
    rnn = _switch(getattr(torch.backends.cudnn, "rnn", None), None)
    cpu = _switch(getattr(getattr(torch.backends, "mkldnn", None), "matmul", None), None)
    return [(switch, getattr(switch[0], switch[1])) for switch in filter(None, (*_cuda_switches(), rnn, cpu))]


def restore_precision_switches(saved: list[tuple[tuple[object, str, object], object]]) -> None:
    """Put back what :func:`precision_switches` read; a switch that did not change is not written (a
    "none" that defers to torch's global setting stays "none")."""
    for switch, value in saved:
        if getattr(switch[0], switch[1]) != value:
            _write(switch, value)
        if getattr(switch[0], switch[1]) != value:  # a caller's own per-backend state, which no older switch
            setattr(switch[0], switch[1], value)  # says (cuDNN's conv "ieee" beside RNN "tf32"): as it was


def set_tf32(*, matmul: Optional[bool] = None, conv: Optional[bool] = None) -> None:
    """TF32 on or off for CUDA's float32 matrix products (cuBLAS) and cuDNN convolutions, through
    whichever switches this torch has (:func:`_switch`); the CPU's (oneDNN) are left alone."""
    for flag, switch in zip((matmul, conv), _cuda_switches()):
        if flag is not None and switch is not None:
            _write(switch, ("tf32" if flag else "ieee") if switch[1] == "fp32_precision" else flag)
