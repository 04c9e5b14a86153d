"""Multi-crop augmentation as batched tensor operations, for the training device (``data.augment: gpu``).

Loader workers decode and resize each image to a fixed size (uint8) and draw every crop's
parameters on the CPU from the step's seeded generator: the box and flip with
:func:`mlsctl.data.multicrop.sample_crop`, the photometric parameters with
:func:`draw_photometric`. The device then runs, for a whole batch of crops at once:

* :func:`crop_resize` — torchvision's ``resized_crop`` + ``horizontal_flip`` (the crop of
  :func:`mlsctl.data.multicrop.apply_crop`), as one ``torchvision.ops.roi_align`` call;
* :func:`photometric` — the DINO/BYOL or MoCo-v2 photometric pipeline of
  :func:`mlsctl.data.multicrop.photometric_pipeline` with per-sample parameters: ColorJitter in
  each sample's own order, RandomGrayscale, GaussianBlur, RandomSolarize (torchvision.transforms.v2);
* :func:`normalize` — ImageNet mean/std (``v2.Normalize``).

Departures from the CPU path:

* the resize is bilinear with box-filter antialiasing (the CPU path: bicubic with antialiasing). On
  smooth images a crop differs from torchvision's bilinear antialiased one by 0.27/255 on average at
  most (``tests/test_device_augment.py`` bounds it at 1/255) and from the bicubic one by 0.17/255. On
  white noise, the worst case, crops at about 1:1 (224 px from a 256 px frame at scale 0.25–1, 96 px
  at 0.05–0.25) have about a quarter less mean |horizontal gradient| than bicubic ones, as torchvision's
  bilinear has; downscaled crops (96 px from boxes of 128–256 px) are as sharp.
* the photometric operations run on float images instead of uint8 ones (no rounding between
  operations); the distribution test compares the colour statistics of both paths.

For one crop size, on the device (``images`` uint8 [B, 3, H, W]; per crop: ``image_index``, ``boxes``
scaled into ``images``, ``flips``, and ``params`` stacked from :func:`draw_photometric`)::

    crops = crop_resize(images, image_index, boxes, flips, size)
    crops = normalize(photometric(crops, params, blur_kernel_size(size)))

Everything runs in float32, also inside an autocast region.

No host-device synchronisation: :func:`crop_resize`, :func:`photometric` and :func:`normalize`
never read a tensor's value on the host (no ``.item()``, no ``bool(tensor)``, no Python branch on
tensor values, no boolean-mask indexing, no tensor built from a Python list on the device); per-sample
choices are ``torch.where`` selections and arithmetic blends, so a call only queues kernels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.ops  # noqa: F401  (registers torch.ops.torchvision.roi_align)

from mlsctl.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size  # noqa: F401 - re-exported
from mlsctl.data.multicrop import BLUR_P as _BLUR_P, BLUR_SIGMA, GRAYSCALE_P as _GRAYSCALE_P, JITTER as _JITTER
from mlsctl.data.multicrop import JITTER_P as _JITTER_P, SOLARIZE_P as _SOLARIZE_P

PHOTOMETRIC_FIELDS = ("jitter", "brightness", "contrast", "saturation", "hue", "order0", "order1", "order2", "order3",
                      "grayscale", "blur_sigma", "solarize")
_FIELD = {name: i for i, name in enumerate(PHOTOMETRIC_FIELDS)}
ROLES = ("global1", "global2", "local")

# The probabilities and strengths of the photometric pipelines are the CPU path's own tables
# (mlsctl.data.multicrop: JITTER, JITTER_P, GRAYSCALE_P, BLUR_P, BLUR_SIGMA, SOLARIZE_P).
# RandomSolarize(threshold=128) on uint8 images inverts values >= 128; on [0, 1] floats that is 128 / 255.
SOLARIZE_THRESHOLD = 128 / 255
# rgb_to_grayscale's ITU-R 601-2 luma weights, as torchvision.
LUMA = (0.2989, 0.587, 0.114)


def draw_photometric(kind: str, role: str, generator: torch.Generator) -> torch.Tensor:
    """The photometric parameters of one crop, float32 [12] in the layout of :data:`PHOTOMETRIC_FIELDS`,
    drawn on the CPU from ``generator`` with the distributions of ``photometric_pipeline(kind, role, size)``.

    * ``jitter`` is 1 with ColorJitter's RandomApply probability (0.8 for 'dino' and 'mocov2'), else 0;
      ``brightness``, ``contrast``, ``saturation`` are factors U[1 - s, 1 + s], ``hue`` is U[-h, h], and
      ``order0..3`` is ``torch.randperm(4)`` — the order ColorJitter applies them in (0 brightness,
      1 contrast, 2 saturation, 3 hue). The factors and the order are drawn and stored also when
      ``jitter`` is 0 (then :func:`photometric` does not apply them); with kind 'none' the factors are
      the neutral 1, 1, 1, 0.
    * ``grayscale`` is 1 with RandomGrayscale's p (0.2), else 0.
    * ``blur_sigma`` is U[0.1, 2.0] with GaussianBlur's RandomApply p ('dino': 1.0 global1, 0.1 global2,
      0.5 local; 'mocov2': 0.5), else 0 (no blur).
    * ``solarize`` is 1 with RandomSolarize's p ('dino' global2: 0.2; otherwise never), else 0.

    Every call draws the same numbers from ``generator`` whatever ``kind`` and ``role`` are (one
    ``randperm(4)`` and nine uniforms), so a seed gives the same parameters every time.
    """
    if kind not in _JITTER:
        raise ValueError(f"unknown photometric pipeline {kind!r}; expected one of {sorted(_JITTER)}")
    if role not in ROLES:
        raise ValueError(f"unknown crop role {role!r}; expected one of {ROLES}")
    order = torch.randperm(4, generator=generator)
    u = torch.rand(9, generator=generator, dtype=torch.float64).tolist()
    brightness, contrast, saturation, hue = _JITTER[kind]
    params = [
        float(u[0] < _JITTER_P[kind]),
        1 - brightness + 2 * brightness * u[1],
        1 - contrast + 2 * contrast * u[2],
        1 - saturation + 2 * saturation * u[3],
        -hue + 2 * hue * u[4],
        *order.tolist(),
        float(u[5] < _GRAYSCALE_P[kind]),
        (BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[7]) if u[6] < _BLUR_P[kind][role] else 0.0,
        float(u[8] < _SOLARIZE_P[kind][role]),
    ]
    return torch.tensor(params, dtype=torch.float32)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float32 [0, 1] (``v2.ToDtype(torch.float32, scale=True)``); float images pass as they are
    (taken to be in [0, 1] already)."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255)  # as torchvision, to the last bit
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {images.dtype}")
    return images.to(torch.float32)


def crop_resize(images: torch.Tensor, image_index: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
                size: int) -> torch.Tensor:
    """Crops ``boxes`` out of ``images``, resizes them to ``size`` x ``size`` and flips those with ``flips``
    (``TF.resized_crop`` + ``TF.horizontal_flip`` of :func:`mlsctl.data.multicrop.apply_crop`, batched).

    ``images``: uint8 [0, 255] or float [0, 1], [B, 3, H, W]; ``image_index``: long [N], the image of each
    crop; ``boxes``: float [N, 4] ``(x0, y0, x1, y1)`` in pixels of ``images``, x1 and y1 exclusive
    (``CropParams.box`` scaled into this image); ``flips``: bool [N]; all on the device of ``images``.
    Returns float32 [N, 3, size, size] in [0, 1].

    One ``torchvision.ops.roi_align`` call with ``aligned=True`` (pixel i covers [i, i + 1)) and an
    adaptive sampling ratio (``ceil(box side / size)`` samples per output pixel and axis): when
    downscaling, each output pixel is the mean of bilinear samples spread over its footprint (a box
    filter, torchvision's antialias uses a triangle filter); when upscaling, one bilinear sample at the
    output pixel's centre (``F.interpolate(mode='bilinear', align_corners=False)``). No host-device
    synchronisation.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
    _same_device(images, image_index=image_index, boxes=boxes, flips=flips)
    rois = torch.cat([image_index.to(torch.float32)[:, None], boxes.to(torch.float32)], dim=1)
    values = images if images.dtype == torch.float32 else images.to(torch.float32)
    # The op itself, not torchvision.ops.roi_align: under torch.use_deterministic_algorithms(True) that wrapper
    # switches CUDA inputs to a pure-PyTorch version which, with an adaptive sampling ratio, materialises
    # H x W samples per output pixel. The kernel's forward is deterministic (only its backward is not).
    crops = torch.ops.torchvision.roi_align(values, rois, 1.0, size, size, -1, True)
    if images.dtype == torch.uint8:
        crops = crops.mul_(1.0 / 255)  # as to_unit_float
    return torch.where(flips[:, None, None, None], crops.flip(-1), crops)


def _same_device(reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Refuses tensors on another device than ``reference`` (moving them here would synchronise)."""
    for name, tensor in tensors.items():
        if tensor.device != reference.device:
            raise ValueError(f"{name} is on {tensor.device}, expected {reference.device} (move it with the batch)")


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``rgb_to_grayscale`` on float images: [N, 3, S, S] → [N, 1, S, S]."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``adjust_hue`` on float images with a per-sample ``shift`` [N]: RGB → HSV (torchvision's
    ``_rgb_to_hsv``), hue + shift modulo 1, HSV → RGB. The way back is the closed form
    ``c = v - (v - min) * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h) mod 6``, n = 5, 3, 1 for
    R, G, B — the same function as torchvision's sector table ``_hsv_to_rgb``, without its gather."""
    r, g, b = x.unbind(dim=1)
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    grey = chroma == 0
    divisor = torch.where(grey, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (h * (1.0 / 6.0) + 1.0).fmod(1.0)
    h6 = (h + shift[:, None, None]).remainder(1.0) * 6.0
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder(6.0)
        channels.append(maxc - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1).clamp_(0.0, 1.0)


def _gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's ``_get_gaussian_kernel1d`` for every sigma: [N] → [N, kernel_size]."""
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax((x[None, :] / sigma[:, None]).pow(2).neg(), dim=1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``gaussian_blur(kernel_size, [sigma, sigma])`` with a per-sample sigma [N] (> 0): reflect padding, then
    the separable kernel as two grouped convolutions (one group per sample and channel)."""
    n, c, height, width = x.shape
    half = kernel_size // 2
    kernels = _gaussian_kernels(sigma, kernel_size).repeat_interleave(c, dim=0)  # [N * C, k]
    padded = F.pad(x, [half, half, half, half], mode="reflect").reshape(1, n * c, height + 2 * half, width + 2 * half)
    with torch.autocast(device_type=x.device.type, enabled=False):  # float32 also inside the loop's autocast
        rows = F.conv2d(padded, kernels[:, None, None, :], groups=n * c)
        return F.conv2d(rows, kernels[:, None, :, None], groups=n * c).reshape(n, c, height, width)


def _jitter_blend(x: torch.Tensor, op: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                  saturation: torch.Tensor) -> torch.Tensor:
    """One ColorJitter operation per sample, ``op`` [N]: 0 ``adjust_brightness`` (x f), 1 ``adjust_contrast``
    (x f + mean(grey) (1 - f)), 2 ``adjust_saturation`` (x f + grey (1 - f)), anything else the identity;
    as one blend ``clamp(x a + grey b + mean(grey) c, 0, 1)`` with per-sample weights (a = 1, b = c = 0 is
    exactly x)."""
    one, zero = torch.ones_like(brightness), torch.zeros_like(brightness)
    is_brightness, is_contrast, is_saturation = op == 0, op == 1, op == 2
    a = torch.where(is_brightness, brightness,
                    torch.where(is_contrast, contrast, torch.where(is_saturation, saturation, one)))
    b = torch.where(is_saturation, 1.0 - saturation, zero)
    c = torch.where(is_contrast, 1.0 - contrast, zero)
    grey = _luma(x)
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    return (x * a[:, None, None, None] + grey * b[:, None, None, None] + mean * c[:, None, None, None]).clamp_(0, 1)


def photometric(crops: torch.Tensor, params: torch.Tensor, blur_kernel: int) -> torch.Tensor:
    """The photometric pipeline of :func:`mlsctl.data.multicrop.photometric_pipeline` on float crops
    [N, 3, S, S] in [0, 1], with each sample's parameters ``params`` [N, 12] from :func:`draw_photometric`
    (on the crops' device). In the order of the pipeline, each step as torchvision.transforms.v2.functional
    does it on float images:

    1. where ``jitter``: ColorJitter's four operations in the sample's order ``order0..3`` —
       ``adjust_brightness`` (x f), ``adjust_contrast`` (blend with the mean of the grayscale image),
       ``adjust_saturation`` (blend with the grayscale image), ``adjust_hue`` (shift in HSV), each
       clamped to [0, 1];
    2. where ``grayscale``: ``rgb_to_grayscale`` to three channels;
    3. where ``blur_sigma`` > 0: ``gaussian_blur`` with kernel ``blur_kernel`` (:func:`blur_kernel_size` of
       the crop size) and that sigma;
    4. where ``solarize``: ``solarize`` at 128 / 255 (RandomSolarize(128) on uint8).

    Fully vectorised over N; no host-device synchronisation. Batched, every sample passes the same
    sequence of slots — three cheap blend slots, the hue, three blend slots: a sample's operations before
    its hue go to the first three (in its order), those after to the last three, and its unused slots are
    the identity — so the costly hue runs once, not once per position.
    """
    if crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected crops [N, 3, S, S], got {tuple(crops.shape)}")
    if params.shape != (crops.shape[0], len(PHOTOMETRIC_FIELDS)):
        raise ValueError(f"expected params [{crops.shape[0]}, {len(PHOTOMETRIC_FIELDS)}], got {tuple(params.shape)}")
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"blur_kernel must be odd and positive, got {blur_kernel}")
    _same_device(crops, params=params)

    def column(name: str) -> torch.Tensor:
        return params[:, _FIELD[name]]

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return values[:, None, None, None]

    x = crops.to(torch.float32)
    jitter = column("jitter") > 0.5
    factors = column("brightness"), column("contrast"), column("saturation")
    order = params[:, _FIELD["order0"]:_FIELD["order3"] + 1]  # [N, 4], operation ids as floats
    hue_at = (order == 3).to(torch.float32).argmax(dim=1)  # [N], the position of adjust_hue
    none = torch.full_like(order[:, 0], -1.0)
    # The three cheap operations before the hue, in the sample's order (identity once the hue is reached) ...
    for slot in range(3):
        x = _jitter_blend(x, torch.where(jitter & (slot < hue_at), order[:, slot], none), *factors)
    # ... the hue, once for the whole batch ...
    x = torch.where(per_sample(jitter), _adjust_hue(x, column("hue")), x)
    # ... and the ones after it.
    for slot in range(3):
        position = hue_at + 1 + slot
        op = order.gather(1, position.clamp(max=3)[:, None])[:, 0]
        x = _jitter_blend(x, torch.where(jitter & (position <= 3), op, none), *factors)

    x = torch.where(per_sample(column("grayscale") > 0.5), _luma(x).expand_as(x), x)

    sigma = column("blur_sigma")
    blurred = _gaussian_blur(x, torch.where(sigma > 0, sigma, torch.ones_like(sigma)), blur_kernel)
    x = torch.where(per_sample(sigma > 0), blurred, x)

    solarized = torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)
    return torch.where(per_sample(column("solarize") > 0.5), solarized, x)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """``v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)`` on float [N, 3, S, S]; per channel with Python scalars, so
    no tensor is copied to the device and nothing synchronises."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected [N, 3, S, S], got {tuple(x.shape)}")
    out = x.to(torch.float32, copy=True)
    for c in range(3):
        out[:, c].sub_(IMAGENET_MEAN[c]).div_(IMAGENET_STD[c])
    return out
