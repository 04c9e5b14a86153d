"""Multi-crop augmentation that remembers where every crop came from.

For each image, :class:`MultiCrop` draws ``n_global`` large and ``n_local`` small random resized
crops (each flipped horizontally with probability 0.5) and applies the DINO/BYOL photometric
pipeline (torchvision.transforms.v2):

* colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with p=0.8, grayscale
  with p=0.2;
* Gaussian blur (sigma 0.1–2.0 px) with p=1.0 on global view 1, p=0.1 on global view 2 and p=0.5
  on local views; solarisation with p=0.2 on global view 2;
* ImageNet mean/std normalisation.

Every crop comes with its box ``(x0, y0, x1, y1)`` in pixels of the original image (after EXIF
orientation) and its flip flag: re-cropping the original with the box, resizing and flipping
reproduces the crop (``tests/test_multicrop.py``). CrIBo maps patch centres through these boxes to
place the patches of both views in one frame.

Randomness comes from the ``seed`` given per call (see :mod:`mlsctl.data.loader`), never from
the process's RNG, so crops do not depend on worker assignment and a resumed run draws the same
crops.

Two paths (``data.augment``, see ``docs/gpu.md``):

* ``cpu``: :meth:`MultiCrop.__call__` crops and colours each image with PIL/torchvision in the
  loader workers. For training the crops stay ``uint8`` (``to_float=False``) and are normalised
  on the training device (:func:`normalize_on_device`): a quarter of the bytes to copy.
* ``gpu``: :meth:`MultiCrop.plan` draws the same crop boxes (from the same generator, in the
  same order) and every crop's photometric parameters in the worker, and resizes the image to a
  fixed square (``data.decode_size``); :meth:`MultiCrop.render` then crops, colours and
  normalises the whole batch on the device (:mod:`mlsctl.data.device_augment`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    import torchvision.transforms.v2 as v2

# torchvision is imported where a crop or a pipeline is made, not here: importing it imports
# torch._dynamo (seconds on a small CPU), which commands that only read a method's config or its
# banks (bank inspect) never need.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class CropParams:
    top: int
    left: int
    height: int
    width: int
    flip: bool

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.left, self.top, self.left + self.width, self.top + self.height)


@dataclass
class Views:
    crops: list[torch.Tensor]  # n_global + n_local tensors [3, S, S]
    boxes: torch.Tensor  # [n_crops, 4] float (x0, y0, x1, y1) in original pixels
    flips: torch.Tensor  # [n_crops] bool
    image_size: tuple[int, int]  # (width, height) of the original


def sample_crop(width: int, height: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3), generator=None) -> CropParams:
    """RandomResizedCrop's sampling (10 tries of area and log-ratio, then a centre crop), plus a
    fair coin for the horizontal flip. Mirrors ``torchvision.transforms.RandomResizedCrop.get_params``
    but draws from ``generator``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def uniform(low: float, high: float) -> float:
        return float(torch.empty(1).uniform_(low, high, generator=generator))

    params = None
    for _ in range(10):
        target_area = area * uniform(scale[0], scale[1])
        aspect = math.exp(uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            params = (top, left, h, w)
            break
    if params is None:  # fall back to a centre crop with the ratio clamped
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        params = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(torch.rand(1, generator=generator) < 0.5)
    return CropParams(*params, flip=flip)


def apply_crop(img: Image.Image, params: CropParams, size: int) -> Image.Image:
    import torchvision.transforms.v2 as v2
    import torchvision.transforms.v2.functional as TF

    out = TF.resized_crop(img, params.top, params.left, params.height, params.width, [size, size],
                          interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return TF.horizontal_flip(out) if params.flip else out


# The photometric pipelines' strengths and probabilities, by pipeline (``kind``) and crop role: what
# photometric_pipeline builds with torchvision, and what mlsctl.data.device_augment draws on the device
# (one table for both, so the two paths cannot drift apart). ColorJitter's (brightness, contrast,
# saturation, hue) and its p, RandomGrayscale's p, GaussianBlur's p and sigma range, RandomSolarize's p.
JITTER = {"dino": (0.4, 0.4, 0.2, 0.1), "mocov2": (0.4, 0.4, 0.4, 0.1), "none": (0.0, 0.0, 0.0, 0.0)}
JITTER_P = {"dino": 0.8, "mocov2": 0.8, "none": 0.0}
GRAYSCALE_P = {"dino": 0.2, "mocov2": 0.2, "none": 0.0}
BLUR_P = {"dino": {"global1": 1.0, "global2": 0.1, "local": 0.5},
          "mocov2": {"global1": 0.5, "global2": 0.5, "local": 0.5},
          "none": {"global1": 0.0, "global2": 0.0, "local": 0.0}}
SOLARIZE_P = {"dino": {"global1": 0.0, "global2": 0.2, "local": 0.0},
              "mocov2": {"global1": 0.0, "global2": 0.0, "local": 0.0},
              "none": {"global1": 0.0, "global2": 0.0, "local": 0.0}}
BLUR_SIGMA = (0.1, 2.0)


def _blur(p: float, size: int) -> v2.Transform:
    import torchvision.transforms.v2 as v2

    return v2.RandomApply([v2.GaussianBlur(kernel_size=blur_kernel_size(size), sigma=BLUR_SIGMA)], p=p)


def normalize_on_device(crops: torch.Tensor) -> torch.Tensor:
    """uint8 crops [B, 3, S, S] → float32, scaled to [0, 1] and normalised with ImageNet's mean/std
    (what ``ToDtype(scale=True)`` + ``Normalize`` do in the workers when ``to_float``)."""
    from mlsctl.data.device_augment import normalize, to_unit_float

    return normalize(to_unit_float(crops))


def blur_kernel_size(size: int) -> int:
    """The Gaussian blur's kernel side for crops of ``size`` px: 23 at 224 px as in BYOL, odd, >= 3."""
    return max(3, min(23, 2 * (size // 10) + 1))


def photometric_pipeline(kind: str, role: str, size: int, to_float: bool = True) -> v2.Transform:
    """``role`` is 'global1', 'global2' or 'local'; ``kind`` is 'dino', 'mocov2' or 'none'.

    'mocov2' is MoCo-v2's augmentation (Chen et al., 2020), the same for both views: colour jitter
    (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur σ∈[0.1, 2] with p=0.5 (the flip
    is part of the crop). Two small departures, shared with every pipeline here: crops are resized
    bicubically (MoCo: bilinear) and the blur is torchvision's kernel (MoCo: PIL's GaussianBlur)."""
    import torchvision.transforms.v2 as v2

    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if to_float else []
    if kind not in JITTER:
        raise ValueError(f"unknown photometric pipeline {kind!r}; expected one of {sorted(JITTER)}")
    if kind == "none":
        return v2.Compose([v2.ToImage(), *to_float])
    brightness, contrast, saturation, hue = JITTER[kind]
    steps = [v2.RandomApply([v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)],
                            p=JITTER_P[kind]),
             v2.RandomGrayscale(p=GRAYSCALE_P[kind]), _blur(BLUR_P[kind][role], size)]
    if SOLARIZE_P[kind][role]:
        steps.append(v2.RandomSolarize(threshold=128, p=SOLARIZE_P[kind][role]))
    return v2.Compose([v2.ToImage(), *steps, *to_float])


class MultiCrop:
    def __init__(
        self,
        global_size: int,
        global_scale: tuple[float, float],
        n_local: int = 0,
        local_size: int = 96,
        local_scale: tuple[float, float] = (0.05, 0.25),
        n_global: int = 2,
        photometric: str = "dino",
        to_float: bool = True,
    ):
        """``to_float=False``: crops stay uint8 [3, S, S] (normalised later by :func:`normalize_on_device`)."""
        self.n_global, self.n_local = n_global, n_local
        self.kind = photometric
        self.specs = [(global_size, tuple(global_scale))] * n_global + [(local_size, tuple(local_scale))] * n_local
        self.roles = (["global1", "global2"] + ["global2"] * max(0, n_global - 2))[:n_global] + ["local"] * n_local
        self.pipelines = [photometric_pipeline(photometric, self.roles[i], global_size, to_float) for i in range(n_global)]
        self.pipelines += [photometric_pipeline(photometric, "local", local_size, to_float)] * n_local

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local

    def sample(self, width: int, height: int, generator: torch.Generator) -> list[CropParams]:
        return [sample_crop(width, height, scale, generator=generator) for _, scale in self.specs]

    def __call__(self, img: Image.Image, seed: int) -> Views:
        width, height = img.size
        generator = torch.Generator().manual_seed(seed)
        params = self.sample(width, height, generator)
        crops = []
        # v2 transforms draw from torch's global RNG: seed it for this image only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            for p, (size, _), pipeline in zip(params, self.specs, self.pipelines):
                crops.append(pipeline(apply_crop(img, p, size)))
        boxes = torch.tensor([p.box for p in params], dtype=torch.float32)
        flips = torch.tensor([p.flip for p in params], dtype=torch.bool)
        return Views(crops, boxes, flips, (width, height))

    # ------------------------------------------------------------------ augment: gpu

    def plan(self, width: int, height: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The crops of :meth:`__call__` for ``seed`` without pixels: boxes [n, 4] in original pixels
        and flips [n] (the same draws, in the same order, as :meth:`__call__`), then every crop's
        photometric parameters [n, P] (:func:`mlsctl.data.device_augment.draw_photometric`)."""
        from mlsctl.data.device_augment import draw_photometric

        generator = torch.Generator().manual_seed(seed)
        params = self.sample(width, height, generator)
        photometric = torch.stack([draw_photometric(self.kind, role, generator) for role in self.roles])
        boxes = torch.tensor([p.box for p in params], dtype=torch.float32)
        flips = torch.tensor([p.flip for p in params], dtype=torch.bool)
        return boxes, flips, photometric

    def render(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, photometric: torch.Tensor,
               image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """The batch's crops on ``images``' device: ``images`` [B, 3, R, R] uint8 (each original
        resized to R x R), ``boxes`` [B, n, 4] in original pixels, ``image_sizes`` [B, 2] (width,
        height). Crops of one size are cut, coloured and normalised in one batched call each;
        returns one float tensor [B, 3, S, S] per crop position, global crops first."""
        from mlsctl.data import device_augment as ops

        b, n = boxes.shape[:2]
        side_h, side_w = images.shape[-2:]
        sizes = image_sizes.to(boxes.device, torch.float32)
        scale = torch.stack([side_w / sizes[:, 0], side_h / sizes[:, 1]] * 2, dim=-1)  # [B, 4]
        boxes = boxes.float() * scale[:, None, :]
        crops: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        for size in sorted({s for s, _ in self.specs}, reverse=True):
            positions = [c for c, (s, _) in enumerate(self.specs) if s == size]
            # a slice where the positions run on (always: global crops first, then local): indexing a device
            # tensor with a Python list copies the list to the device, a wait for the device each time
            take = (slice(positions[0], positions[-1] + 1) if positions == list(range(positions[0], positions[-1] + 1))
                    else positions)
            index = torch.arange(b, device=images.device).repeat_interleave(len(positions))
            cut = ops.crop_resize(images, index, boxes[:, take].reshape(-1, 4), flips[:, take].reshape(-1), size)
            coloured = ops.photometric(cut, photometric[:, take].reshape(b * len(positions), -1).to(cut.device),
                                       blur_kernel_size(size))
            out = ops.normalize(coloured).view(b, len(positions), *coloured.shape[1:])
            for j, c in enumerate(positions):
                crops[c] = out[:, j].contiguous()
        return crops
