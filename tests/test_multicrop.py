from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings, strategies as st
from PIL import Image

from mlsctl.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, apply_crop, sample_crop


def coordinate_image(width: int, height: int) -> Image.Image:
    """Red encodes x, green encodes y (scaled to 0..255), blue is constant."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8))


def unnormalise(crop: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((crop * std + mean) * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_recropping_with_the_box_reproduces_the_crop():
    image = coordinate_image(120, 90)
    transform = MultiCrop(48, (0.2, 1.0), n_local=3, local_size=24, local_scale=(0.05, 0.3), photometric="none")
    views = transform(image, seed=123)
    assert len(views.crops) == 5 and views.boxes.shape == (5, 4) and views.flips.shape == (5,)
    for crop, box, flip in zip(views.crops, views.boxes.tolist(), views.flips.tolist()):
        x0, y0, x1, y1 = (int(v) for v in box)
        size = crop.shape[-1]
        again = TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [size, size],
                                interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        if flip:
            again = TF.horizontal_flip(again)
        assert np.abs(unnormalise(crop).astype(int) - np.asarray(again).astype(int)).max() <= 1


def test_box_points_at_the_right_pixels():
    """Independent of the crop code: the corner pixels of a crop carry the box corners' coordinates."""
    width, height = 200, 100
    image = coordinate_image(width, height)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        params = sample_crop(width, height, (0.1, 0.9), generator=generator)
        crop = np.asarray(apply_crop(image, params, 32)).astype(float)
        x0, y0, x1, y1 = params.box
        left_col, right_col = (crop[:, -1], crop[:, 0]) if params.flip else (crop[:, 0], crop[:, -1])
        expected_left = x0 / (width - 1) * 255
        expected_right = (x1 - 1) / (width - 1) * 255
        step = 255 / (width - 1) * (x1 - x0) / 32  # one output pixel in input coordinates
        assert abs(left_col[:, 0].mean() - expected_left) <= step + 2
        assert abs(right_col[:, 0].mean() - expected_right) <= step + 2
        assert abs(crop[0, :, 1].mean() - y0 / (height - 1) * 255) <= 255 / (height - 1) * (y1 - y0) / 32 + 2


def test_same_seed_same_views_different_seed_different_views():
    image = coordinate_image(64, 64)
    transform = MultiCrop(32, (0.3, 1.0), n_local=2, local_size=16)
    a, b, c = transform(image, 7), transform(image, 7), transform(image, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.crops, b.crops))
    assert torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.boxes, c.boxes)


def test_views_do_not_touch_the_global_rng():
    state = torch.get_rng_state()
    MultiCrop(32, (0.3, 1.0), n_local=2, local_size=16)(coordinate_image(50, 40), 3)
    assert torch.equal(state, torch.get_rng_state())


@settings(max_examples=60, deadline=None)
@given(width=st.integers(8, 400), height=st.integers(8, 400), low=st.floats(0.01, 1.0), seed=st.integers(0, 2**31))
def test_boxes_stay_inside_the_image(width, height, low, seed):
    params = sample_crop(width, height, (low, 1.0), generator=torch.Generator().manual_seed(seed))
    x0, y0, x1, y1 = params.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
