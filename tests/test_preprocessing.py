"""Evaluation-time preprocessing (mlsctl.data.preprocessing): ``--resize center-crop`` is DINO's k-NN
protocol, so it must give torchvision's ``Resize(short) + CenterCrop(R)`` pixel for pixel, rounding
of sizes and offsets included (the authors' eval_knn.py builds its inputs that way)."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mlsctl.data.preprocessing import Preprocessing


def _torchvision_center_crop(img: Image.Image, resolution: int) -> torch.Tensor:
    return T.Compose([T.Resize(round(resolution * 256 / 224), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(resolution), T.PILToTensor()])(img)


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height,resolution", [
    (500, 375, 224), (500, 375, 96), (333, 500, 64), (300, 300, 48), (97, 96, 96), (640, 427, 224), (257, 1000, 48)])
def test_center_crop_equals_torchvision(width, height, resolution):
    img = _noise(width, height)
    assert torch.equal(Preprocessing(resolution, "center-crop").pixels(img), _torchvision_center_crop(img, resolution))


@settings(max_examples=40, deadline=None)
@given(width=st.integers(16, 400), height=st.integers(16, 400), resolution=st.sampled_from([16, 32, 48, 64, 96]))
def test_center_crop_equals_torchvision_for_any_size(width, height, resolution):
    img = _noise(width, height, seed=width * 1000 + height)
    assert torch.equal(Preprocessing(resolution, "center-crop").pixels(img), _torchvision_center_crop(img, resolution))


def test_square_is_the_whole_image_resized():
    img = _noise(90, 60)
    expected = torch.from_numpy(np.asarray(img.resize((32, 32), Image.BICUBIC)).copy()).permute(2, 0, 1)
    assert torch.equal(Preprocessing(32, "square").pixels(img), expected)


def test_center_crop_records_its_rounding_so_older_caches_are_made_again():
    """Features embedded before the rounding matched torchvision's (up to 1 px apart) carry no
    ``rounding`` entry, so their plan differs and a cache of them is embedded again."""
    assert Preprocessing(64, "center-crop").to_dict()["rounding"] == "torchvision"
    assert "rounding" not in Preprocessing(64, "square").to_dict()
