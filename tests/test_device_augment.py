"""The batched device augmentation (mlsctl.data.device_augment) against torchvision.transforms.v2 and
against the CPU path of mlsctl.data.multicrop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from PIL import Image

from mlsctl.data.device_augment import (
    PHOTOMETRIC_FIELDS, SOLARIZE_THRESHOLD, blur_kernel_size, crop_resize, draw_photometric, normalize, photometric,
    to_unit_float,
)
from mlsctl.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, photometric_pipeline, sample_crop

FIELD = {name: i for i, name in enumerate(PHOTOMETRIC_FIELDS)}


def smooth_images(n: int, size: int, seed: int, channels: int = 3) -> torch.Tensor:
    """``n`` smooth random float images [n, 3, size, size] in [0, 1]: bilinear upsampling of 4x4 noise."""
    low = torch.rand(n, channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)


def neutral_params(n: int) -> torch.Tensor:
    """Every operation off: jitter 0 with neutral factors, identity order, no grayscale, blur or solarize."""
    params = torch.zeros(n, len(PHOTOMETRIC_FIELDS))
    params[:, [FIELD["brightness"], FIELD["contrast"], FIELD["saturation"]]] = 1.0
    params[:, [FIELD[f"order{i}"] for i in range(4)]] = torch.arange(4, dtype=torch.float32)
    return params


# ---------------------------------------------------------------- draw_photometric

def test_draw_photometric_is_deterministic_and_draws_the_same_count_for_every_kind_and_role():
    states = set()
    for kind in ("dino", "mocov2", "none"):
        for role in ("global1", "global2", "local"):
            a = draw_photometric(kind, role, torch.Generator().manual_seed(11))
            generator = torch.Generator().manual_seed(11)
            b = draw_photometric(kind, role, generator)
            assert a.dtype == torch.float32 and a.shape == (len(PHOTOMETRIC_FIELDS),)
            assert torch.equal(a, b)
            assert sorted(b[[FIELD[f"order{i}"] for i in range(4)]].tolist()) == [0, 1, 2, 3]
            states.add(bytes(generator.get_state().numpy()))
    assert len(states) == 1  # the generator advanced by the same draws for all nine


def test_draw_photometric_rejects_unknown_kind_and_role():
    with pytest.raises(ValueError, match="pipeline"):
        draw_photometric("simclr", "local", torch.Generator())
    with pytest.raises(ValueError, match="role"):
        draw_photometric("dino", "global3", torch.Generator())


@pytest.mark.parametrize("kind, role, jitter, jitter_p, grayscale_p, blur_p, solarize_p", [
    ("dino", "global1", (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 1.0, 0.0),
    ("dino", "global2", (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.1, 0.2),
    ("dino", "local", (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5, 0.0),
    ("mocov2", "global2", (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5, 0.0),
    ("none", "global1", (0.0, 0.0, 0.0, 0.0), 0.0, 0.0, 0.0, 0.0),
])
def test_draw_photometric_rates_and_ranges(kind, role, jitter, jitter_p, grayscale_p, blur_p, solarize_p):
    """Rates within 4.5 binomial standard errors of photometric_pipeline's probabilities, factors within
    ColorJitter's ranges and spread over them, sigma within GaussianBlur's (0.1, 2.0)."""
    n = 3000
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([draw_photometric(kind, role, generator) for _ in range(n)])
    for field, p in (("jitter", jitter_p), ("grayscale", grayscale_p), ("solarize", solarize_p)):
        values = draws[:, FIELD[field]]
        assert set(values.unique().tolist()) <= {0.0, 1.0}
        assert abs(values.mean().item() - p) <= 4.5 * (p * (1 - p) / n) ** 0.5 + 1e-9, field
    sigma = draws[:, FIELD["blur_sigma"]]
    assert abs((sigma > 0).float().mean().item() - blur_p) <= 4.5 * (blur_p * (1 - blur_p) / n) ** 0.5 + 1e-9
    if blur_p > 0:
        assert 0.1 <= sigma[sigma > 0].min() and sigma.max() <= 2.0 and sigma[sigma > 0].std() > 0.5
    for field, strength, centre in zip(("brightness", "contrast", "saturation", "hue"), jitter, (1, 1, 1, 0)):
        values = draws[:, FIELD[field]]
        assert values.min() >= centre - strength - 1e-6 and values.max() <= centre + strength + 1e-6, field
        # U[c - s, c + s] has standard deviation s / sqrt(3)
        assert abs(values.std().item() - strength / 3 ** 0.5) <= 0.02 * strength + 1e-9, field
    orders = draws[:, [FIELD[f"order{i}"] for i in range(4)]]
    # each operation comes first a quarter of the time, as torch.randperm(4) in ColorJitter
    first = torch.bincount(orders[:, 0].long(), minlength=4).float() / n
    assert (first - 0.25).abs().max() <= 4.5 * (0.25 * 0.75 / n) ** 0.5


# ---------------------------------------------------------------- crop_resize

def test_a_box_of_the_output_size_returns_the_pixels():
    images = (torch.rand(3, 3, 40, 50, generator=torch.Generator().manual_seed(1)) * 255).round().to(torch.uint8)
    boxes = torch.tensor([[0, 0, 16, 16], [34, 24, 50, 40], [7, 11, 23, 27]], dtype=torch.float32)
    crops = crop_resize(images, torch.tensor([0, 2, 1]), boxes, torch.tensor([False, False, False]), 16)
    assert crops.dtype == torch.float32 and crops.shape == (3, 3, 16, 16)
    for crop, i, (x0, y0, x1, y1) in zip(crops, (0, 2, 1), boxes.long().tolist()):
        assert torch.equal(crop, to_unit_float(images[i, :, y0:y1, x0:x1]))


def test_to_unit_float_is_v2_to_dtype():
    every_value = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(2, 3, 16, 16)
    assert torch.equal(to_unit_float(every_value), TF.to_dtype(every_value, torch.float32, scale=True))
    floats = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    assert to_unit_float(floats).dtype == torch.float32 and torch.equal(to_unit_float(floats), floats.float())
    with pytest.raises(TypeError):
        to_unit_float(torch.zeros(1, 3, 2, 2, dtype=torch.int32))


def test_upscaling_a_whole_image_is_bilinear_interpolation():
    images = torch.rand(2, 3, 8, 10, generator=torch.Generator().manual_seed(2))
    crops = crop_resize(images, torch.tensor([1]), torch.tensor([[0.0, 0.0, 10.0, 8.0]]), torch.tensor([False]), 24)
    expected = F.interpolate(images[1:], size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(crops, expected, atol=1e-5, rtol=0)


# Measured on such images and boxes (3 seeds): mean |difference| per crop 1.04e-3 (0.27/255) at most, worst
# pixel 0.016 (4/255) — box filter (roi_align) against torchvision's triangle filter.
RESIZE_MEAN_BOUND = 1 / 255


def test_crops_match_torchvision_resized_crop_on_smooth_images():
    """Against TF.resized_crop(bilinear, antialias=True) of the same float image, for downscaling and
    upscaling boxes from sample_crop: the mean |difference| per crop is below 1/255."""
    images = smooth_images(4, 96, seed=3)
    generator = torch.Generator().manual_seed(4)
    index, boxes, flips, expected = [], [], [], []
    size = 24
    for i in range(40):
        scale = (0.4, 1.0) if i % 2 else (0.02, 0.1)  # downscaling and upscaling boxes
        params = sample_crop(96, 96, scale, generator=generator)
        image = images[i % 4]
        crop = TF.resized_crop(image, params.top, params.left, params.height, params.width, [size, size],
                               interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        expected.append(TF.horizontal_flip(crop) if params.flip else crop)
        index.append(i % 4)
        boxes.append(params.box)
        flips.append(params.flip)
    crops = crop_resize(images, torch.tensor(index), torch.tensor(boxes, dtype=torch.float32),
                        torch.tensor(flips), size)
    difference = (crops - torch.stack(expected)).abs()
    assert difference.mean(dim=(1, 2, 3)).max() < RESIZE_MEAN_BOUND
    assert difference.max() < 0.03


def test_corner_pixels_carry_the_box_corners():
    """Independent of the crop code (as tests/test_multicrop.py does for the CPU path): on an image whose
    red channel is x and green is y, a crop's first and last columns and first row carry the box's edges."""
    width, height, size = 200, 100, 32
    xs = torch.linspace(0, 255, width)[None, :].expand(height, width)
    ys = torch.linspace(0, 255, height)[:, None].expand(height, width)
    image = torch.stack([xs, ys, torch.full_like(xs, 128)]).round().to(torch.uint8)[None]
    generator = torch.Generator().manual_seed(5)
    params = [sample_crop(width, height, (0.1, 0.9), generator=generator) for _ in range(20)]
    assert any(p.flip for p in params) and not all(p.flip for p in params)
    crops = crop_resize(image, torch.zeros(20, dtype=torch.long), torch.tensor([p.box for p in params], dtype=torch.float32),
                        torch.tensor([p.flip for p in params]), size) * 255
    for crop, p in zip(crops, params):
        x0, y0, x1, y1 = p.box
        left, right = (crop[0, :, -1], crop[0, :, 0]) if p.flip else (crop[0, :, 0], crop[0, :, -1])
        step_x = 255 / (width - 1) * (x1 - x0) / size  # one output pixel in input coordinates
        assert abs(left.mean() - x0 / (width - 1) * 255) <= step_x + 2
        assert abs(right.mean() - (x1 - 1) / (width - 1) * 255) <= step_x + 2
        assert abs(crop[1, 0, :].mean() - y0 / (height - 1) * 255) <= 255 / (height - 1) * (y1 - y0) / size + 2
        assert abs(crop[1, -1, :].mean() - (y1 - 1) / (height - 1) * 255) <= 255 / (height - 1) * (y1 - y0) / size + 2


def test_flips_mirror_the_crop():
    images = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(6))
    boxes = torch.tensor([[2.0, 3.0, 27.0, 21.0]] * 2)
    a = crop_resize(images, torch.tensor([1, 1]), boxes, torch.tensor([False, True]), 12)
    torch.testing.assert_close(a[1], a[0].flip(-1), atol=0, rtol=0)
    assert not torch.allclose(a[0], a[1])


def test_uint8_and_float_images_give_the_same_crops():
    images = (torch.rand(2, 3, 20, 20, generator=torch.Generator().manual_seed(7)) * 255).round().to(torch.uint8)
    boxes = torch.tensor([[1.0, 2.0, 19.0, 17.0], [0.0, 0.0, 5.0, 7.0]])
    args = (torch.tensor([1, 0]), boxes, torch.tensor([True, False]), 9)
    torch.testing.assert_close(crop_resize(images, *args), crop_resize(to_unit_float(images), *args), atol=1e-6, rtol=0)


def test_crop_resize_and_photometric_refuse_tensors_on_another_device():
    images = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match="boxes is on meta"):
        crop_resize(images, torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, device="meta"),
                    torch.zeros(1, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="params is on meta"):
        photometric(images, neutral_params(1).to("meta"), blur_kernel=3)


# ---------------------------------------------------------------- photometric, one operation at a time

def jitter_only(n: int, order: tuple[int, ...], **factors: float) -> torch.Tensor:
    params = neutral_params(n)
    params[:, FIELD["jitter"]] = 1.0
    params[:, [FIELD[f"order{i}"] for i in range(4)]] = torch.tensor(order, dtype=torch.float32)
    for name, value in factors.items():
        params[:, FIELD[name]] = value
    return params


@pytest.mark.parametrize("name, factor, reference, atol", [
    ("brightness", 1.37, TF.adjust_brightness, 1e-5),
    ("brightness", 0.61, TF.adjust_brightness, 1e-5),
    ("contrast", 1.4, TF.adjust_contrast, 1e-5),
    ("contrast", 0.6, TF.adjust_contrast, 1e-5),
    ("saturation", 1.2, TF.adjust_saturation, 1e-5),
    ("saturation", 0.65, TF.adjust_saturation, 1e-5),
    ("hue", 0.1, TF.adjust_hue, 1e-5),
    ("hue", -0.07, TF.adjust_hue, 1e-5),
])
def test_each_jitter_operation_matches_torchvision(name, factor, reference, atol):
    images = smooth_images(3, 12, seed=8)
    order = {"brightness": (0, 1, 2, 3), "contrast": (1, 0, 2, 3), "saturation": (2, 3, 0, 1), "hue": (3, 2, 1, 0)}[name]
    out = photometric(images, jitter_only(3, order, **{name: factor}), blur_kernel=3)
    expected = torch.stack([reference(image, factor) for image in images])
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("shift", [0.1, -0.1, 0.05, -0.0333])
def test_hue_matches_torchvision_on_every_kind_of_colour(shift):
    """Greys, black, white, primaries and ties between the largest channels (where torchvision's hue formula
    switches branch): a lattice of 6^3 = 216 colours, and the same colours with the channels reversed."""
    levels = torch.linspace(0, 1, 6)
    lattice = torch.cartesian_prod(levels, levels, levels).T.reshape(1, 3, 12, 18)
    images = torch.cat([lattice, lattice.flip(1)])
    out = photometric(images, jitter_only(2, (3, 0, 1, 2), hue=shift), blur_kernel=3)
    torch.testing.assert_close(out, torch.stack([TF.adjust_hue(image, shift) for image in images]), atol=1e-5, rtol=0)


def test_jitter_runs_in_each_samples_own_order():
    """Six samples, each with all four factors and its own order, against ColorJitter's loop over fn_idx."""
    images = smooth_images(6, 12, seed=9)
    orders = [(0, 1, 2, 3), (3, 2, 1, 0), (1, 3, 0, 2), (2, 0, 3, 1), (3, 0, 1, 2), (1, 2, 3, 0)]
    factors = torch.tensor([[1.3, 0.7, 1.15, 0.08], [0.65, 1.35, 0.85, -0.09], [1.1, 1.3, 0.9, 0.05],
                            [0.8, 0.62, 1.2, -0.1], [1.4, 0.9, 0.8, 0.1], [0.7, 1.25, 1.05, -0.03]])
    params = neutral_params(6)
    params[:, FIELD["jitter"]] = 1.0
    params[:, [FIELD["brightness"], FIELD["contrast"], FIELD["saturation"], FIELD["hue"]]] = factors
    params[:, [FIELD[f"order{i}"] for i in range(4)]] = torch.tensor(orders, dtype=torch.float32)
    out = photometric(images, params, blur_kernel=3)
    operations = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for image, order, factor, got in zip(images, orders, factors.tolist(), out):
        for op in order:
            image = operations[op](image, factor[op])
        torch.testing.assert_close(got, image, atol=2e-5, rtol=0)


def test_no_operation_is_the_identity():
    images = smooth_images(4, 10, seed=10)
    params = neutral_params(4)
    factors = [FIELD["brightness"], FIELD["contrast"], FIELD["saturation"], FIELD["hue"]]
    params[:, factors] = torch.tensor([1.3, 0.7, 1.1, 0.1])
    assert torch.equal(photometric(images, params, blur_kernel=3), images)  # factors without jitter do nothing


def test_grayscale_matches_rgb_to_grayscale():
    images = smooth_images(4, 10, seed=11)
    params = neutral_params(4)
    params[:, FIELD["grayscale"]] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    out = photometric(images, params, blur_kernel=3)
    for image, got, grey in zip(images, out, (True, False, True, False)):
        expected = TF.rgb_to_grayscale(image, num_output_channels=3) if grey else image
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", [3, 9, 23])
def test_blur_matches_gaussian_blur_per_sample_sigma(kernel):
    images = torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(12))
    sigmas = [0.1, 0.0, 1.3, 2.0]
    params = neutral_params(4)
    params[:, FIELD["blur_sigma"]] = torch.tensor(sigmas)
    out = photometric(images, params, blur_kernel=kernel)
    for image, got, sigma in zip(images, out, sigmas):
        expected = TF.gaussian_blur(image, [kernel, kernel], [sigma, sigma]) if sigma > 0 else image
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_solarize_matches_torchvision_on_float_and_uint8_images():
    images = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(13))
    params = neutral_params(3)
    params[:, FIELD["solarize"]] = torch.tensor([1.0, 0.0, 1.0])
    out = photometric(images, params, blur_kernel=3)
    for image, got, on in zip(images, out, (True, False, True)):
        torch.testing.assert_close(got, TF.solarize(image, SOLARIZE_THRESHOLD) if on else image, atol=0, rtol=0)
    # the threshold is RandomSolarize(threshold=128)'s on uint8: 127 stays, 128 is inverted
    every_value = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    params = neutral_params(1)
    params[:, FIELD["solarize"]] = 1.0
    got = photometric(to_unit_float(every_value), params, blur_kernel=3)
    torch.testing.assert_close(got, to_unit_float(TF.solarize(every_value, 128)), atol=1e-7, rtol=0)


def test_a_mixed_batch_equals_the_pipeline_one_sample_at_a_time():
    """Drawn parameters for twelve crops (DINO global2 and local: jitter, grayscale, blur, solarize mixed)
    against the v2.functional steps of photometric_pipeline applied to each crop alone."""
    images = smooth_images(12, 16, seed=14)
    generator = torch.Generator().manual_seed(15)
    params = torch.stack([draw_photometric("dino", "global2" if i % 2 else "local", generator) for i in range(12)])
    params[::3, FIELD["solarize"]] = 1.0
    before = images.clone()
    out = photometric(images, params, blur_kernel=3)
    normalize(images)
    assert torch.equal(images, before)  # photometric and normalize leave their input as it is
    operations = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for image, p, got in zip(images, params.tolist(), out):
        if p[FIELD["jitter"]]:
            for op in p[FIELD["order0"]:FIELD["order3"] + 1]:
                image = operations[int(op)](image, p[FIELD["brightness"] + int(op)])
        if p[FIELD["grayscale"]]:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if p[FIELD["blur_sigma"]] > 0:
            image = TF.gaussian_blur(image, [3, 3], [p[FIELD["blur_sigma"]]] * 2)
        if p[FIELD["solarize"]]:
            image = TF.solarize(image, SOLARIZE_THRESHOLD)
        torch.testing.assert_close(got, image, atol=2e-5, rtol=0)


def test_autocast_does_not_lower_the_precision():
    """The training loop runs under autocast; the blur's convolution must stay float32 (bfloat16 would be off by
    about 1/255)."""
    images = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(17))
    generator = torch.Generator().manual_seed(18)
    params = torch.stack([draw_photometric("dino", "global1", generator) for _ in range(4)])
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [2.0, 1.0, 17.0, 19.0]] * 2)
    index, flips = torch.tensor([0, 1, 2, 3]), torch.tensor([False, True, False, True])
    expected = normalize(photometric(crop_resize(images, index, boxes, flips, 16), params, blur_kernel=5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = normalize(photometric(crop_resize(images, index, boxes, flips, 16), params, blur_kernel=5))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_photometric_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="params"):
        photometric(torch.rand(2, 3, 8, 8), torch.zeros(3, len(PHOTOMETRIC_FIELDS)), blur_kernel=3)
    with pytest.raises(ValueError, match="odd"):
        photometric(torch.rand(2, 3, 8, 8), neutral_params(2), blur_kernel=4)


def test_normalize_matches_v2_normalize():
    x = torch.rand(5, 3, 7, 7, generator=torch.Generator().manual_seed(16))
    torch.testing.assert_close(normalize(x), TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)), atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks that no call synchronises")
def test_no_host_device_synchronisation_on_cuda():
    device = torch.device("cuda")
    images = (torch.rand(4, 3, 64, 64, device=device) * 255).to(torch.uint8)
    generator = torch.Generator().manual_seed(0)
    params = torch.stack([draw_photometric("dino", "global2", generator) for _ in range(8)]).to(device)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [3.0, 5.0, 40.0, 33.0]] * 4, device=device)
    index = torch.arange(8, device=device) % 4
    flips = torch.arange(8, device=device) % 3 == 0
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = normalize(photometric(crop_resize(images, index, boxes, flips, 32), params, blur_kernel=5))
        # as a run with exact resume would: deterministic algorithms on (roi_align must not fall back to its
        # pure-PyTorch version), the same result
        torch.use_deterministic_algorithms(True)
        again = normalize(photometric(crop_resize(images, index, boxes, flips, 32), params, blur_kernel=5))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(again, out, atol=1e-6, rtol=0)
    assert out.shape == (8, 3, 32, 32) and out.device.type == "cuda"
    cpu = normalize(photometric(crop_resize(images.cpu(), index.cpu(), boxes.cpu(), flips.cpu(), 32), params.cpu(), 5))
    # the same as on the CPU, but for the odd pixel within rounding of the solarisation threshold
    assert ((out.cpu() - cpu).abs() > 1e-4).float().mean() < 1e-3


# ---------------------------------------------------------------- the device path draws from the CPU path's distributions
# Two-sample Kolmogorov-Smirnov tests on a few thousand draws (issue 22, item 2); each passes at p > 0.001.

P_MIN = 1e-3


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test, two-sided: the statistic D = max |F_a - F_b| (ties allowed) and the
    asymptotic p-value Q_KS((sqrt(n_e) + 0.12 + 0.11 / sqrt(n_e)) D), n_e = n m / (n + m) (Stephens' correction,
    Numerical Recipes' kstwo). Within a few percent of scipy.stats.ks_2samp's p-value at these sample sizes."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    pooled = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, pooled, side="right") / len(a) - np.searchsorted(b, pooled, side="right") / len(b)).max()
    en = np.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    k = np.arange(1, 101)
    return float(d), float(np.clip(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k ** 2 * lam ** 2)), 0.0, 1.0))


def test_ks_2samp_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n, m, shift in ((2000, 2000, 0.0), (2000, 2000, 0.1), (1500, 1000, 0.1), (300, 400, 0.2), (2000, 2000, 0.3)):
        a, b = rng.normal(size=n), rng.normal(size=m) + shift
        d, p = ks_2samp(a, b)
        reference = stats.ks_2samp(a, b)
        assert d == pytest.approx(reference.statistic, abs=1e-12)
        assert p == pytest.approx(reference.pvalue, rel=0.15)
    assert ks_2samp(rng.normal(size=2000), rng.normal(size=2000) + 0.3)[1] < 1e-6


# -- crop scales and aspect ratios
ORIGINAL = (200, 120)  # a landscape image, as decoded
FRAME = 64  # the fixed square size the loader workers resize it to


def crop_shape(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Area fraction of the original and log aspect ratio of boxes (x0, y0, x1, y1) in original pixels."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return {"area": width * height / (ORIGINAL[0] * ORIGINAL[1]), "log_ratio": np.log(width / height)}


def sampled_regions(boxes_in_frame: torch.Tensor) -> np.ndarray:
    """The region of the original that crop_resize actually samples for each box of the frame: crops an image
    whose red/green channels hold the original x/y of each frame pixel's centre (so every output pixel reads
    the original coordinates of its centre), and extrapolates the extent from columns and rows 1 and S - 2
    (away from the border clamping of the first and last)."""
    size = 8
    centres = (torch.arange(FRAME, dtype=torch.float32) + 0.5) / FRAME
    frame = torch.stack([centres[None, :].expand(FRAME, FRAME) * ORIGINAL[0],
                         centres[:, None].expand(FRAME, FRAME) * ORIGINAL[1], torch.zeros(FRAME, FRAME)])
    n = len(boxes_in_frame)  # coordinates / 1000: float images are taken to be in [0, 1]
    crops = crop_resize(frame[None] / 1000, torch.zeros(n, dtype=torch.long), boxes_in_frame,
                        torch.zeros(n, dtype=torch.bool), size).double() * 1000
    x, y = crops[:, 0].mean(dim=1), crops[:, 1].mean(dim=2)  # [n, size] per column, per row
    half_x = (x[:, size - 2] - x[:, 1]) * size / (size - 3) / 2
    half_y = (y[:, size - 2] - y[:, 1]) * size / (size - 3) / 2
    cx, cy = (x[:, 1] + x[:, size - 2]) / 2, (y[:, 1] + y[:, size - 2]) / 2
    return torch.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], dim=1).numpy()


def into_frame(boxes: np.ndarray) -> torch.Tensor:
    """CropParams.box in original pixels → pixels of the FRAME x FRAME decoded image (each axis scaled)."""
    scale = np.array([FRAME / ORIGINAL[0], FRAME / ORIGINAL[1]] * 2)
    return torch.tensor(boxes * scale, dtype=torch.float32)


def cpu_boxes(scale: tuple[float, float], seeds: range, width: int = ORIGINAL[0], height: int = ORIGINAL[1]) -> np.ndarray:
    return np.array([sample_crop(width, height, scale, generator=torch.Generator().manual_seed(s)).box for s in seeds],
                    dtype=np.float64)


@pytest.mark.parametrize("scale", [(0.25, 1.0), (0.05, 0.25)])
def test_crop_scales_and_aspect_ratios_have_the_cpu_paths_distribution(scale):
    """The CPU path crops sample_crop's box of the original; the device path scales the box of an independent
    draw into the fixed-size frame and crop_resize samples it there. The regions crop_resize samples, read back
    in original pixels, are the boxes, and their area fractions and log aspect ratios have the distribution of
    the CPU path's (2,000 boxes each, independent seeds)."""
    cpu = crop_shape(cpu_boxes(scale, range(2000)))
    device_boxes = cpu_boxes(scale, range(10_000, 12_000))
    regions = sampled_regions(into_frame(device_boxes))
    np.testing.assert_allclose(regions, device_boxes, atol=0.05)
    device = crop_shape(regions)
    for name in ("area", "log_ratio"):
        assert ks_2samp(cpu[name], device[name])[1] > P_MIN, name


def test_the_crop_test_sees_boxes_drawn_in_the_resized_frame():
    """Drawing the boxes in the square frame instead of the original stretches every aspect ratio by the
    resize (200/120): the test above would fail."""
    cpu = crop_shape(cpu_boxes((0.25, 1.0), range(2000)))
    in_frame = torch.tensor(cpu_boxes((0.25, 1.0), range(10_000, 12_000), FRAME, FRAME), dtype=torch.float32)
    assert ks_2samp(cpu["log_ratio"], crop_shape(sampled_regions(in_frame))["log_ratio"])[1] < 1e-6


# -- colour statistics
N_COLOUR, COLOUR_SIZE = 800, 16


def colour_images() -> torch.Tensor:
    """N_COLOUR uint8 [3, 16, 16] images: a smooth random-coloured gradient (bilinear from 3x3) plus pixel noise
    (so that blur shows), the same for both paths."""
    generator = torch.Generator().manual_seed(21)
    low = torch.rand(N_COLOUR, 3, 3, 3, generator=generator)
    smooth = F.interpolate(low, size=(COLOUR_SIZE, COLOUR_SIZE), mode="bilinear", align_corners=True)
    noisy = smooth + 0.08 * torch.randn(N_COLOUR, 3, COLOUR_SIZE, COLOUR_SIZE, generator=generator)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def colour_statistics(out: torch.Tensor, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-image statistics of the augmented (ImageNet-normalised) images, relative to each input image so that
    the spread between images does not drown the augmentation's: mean brightness (difference), saturation
    (mean chroma max - min, ratio), standard deviation (ratio) and sharpness (mean |horizontal gradient|,
    ratio). Rounded to 1e-4 (uint8 steps are 4e-3) so that the ~1e-7 noise of un-normalising does not tell a
    grey image of one path from a grey image of the other."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def measure(x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = {"brightness": x.mean(dim=(1, 2, 3)), "saturation": (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2)),
                  "std": x.std(dim=(1, 2, 3)), "sharpness": (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))}
        return {name: (value * 1e4).round() / 1e4 for name, value in values.items()}

    after, before = measure(out * std + mean), measure(to_unit_float(images))
    return {name: (after[name] - before[name] if name == "brightness" else after[name] / before[name]).numpy()
            for name in after}


def blur_kernel_of(pipeline) -> int:
    """The GaussianBlur kernel size inside a photometric_pipeline."""
    for step in pipeline.transforms:
        for inner in getattr(step, "transforms", []):
            if isinstance(inner, v2.GaussianBlur):
                return inner.kernel_size[0]
    raise AssertionError("no GaussianBlur in the pipeline")


@pytest.mark.parametrize("kind, role", [("dino", "global1"), ("dino", "local"), ("mocov2", "global2")])
def test_blur_kernel_size_is_the_pipelines(kind, role):
    for size, expected in ((16, 3), (96, 19), (224, 23)):
        assert blur_kernel_size(size) == blur_kernel_of(photometric_pipeline(kind, role, size)) == expected


@pytest.fixture(scope="module")
def colour_runs():
    """The CPU path (photometric_pipeline on uint8 PIL images, global RNG seeded) per (kind, role), computed once."""
    images = colour_images()
    pils = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in images]
    cache = {}

    def cpu(kind: str, role: str) -> tuple[dict[str, np.ndarray], int]:
        if (kind, role) not in cache:
            pipeline = photometric_pipeline(kind, role, COLOUR_SIZE)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(31)
                out = torch.stack([pipeline(pil) for pil in pils])
            cache[kind, role] = colour_statistics(out, images), blur_kernel_size(COLOUR_SIZE)
        return cache[kind, role]

    return images, cpu


def device_colour(images: torch.Tensor, kind: str, role: str, blur_kernel: int, change=None) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(41)
    params = torch.stack([draw_photometric(kind, role, generator) for _ in range(len(images))])
    if change is not None:
        change(params)
    return colour_statistics(normalize(photometric(to_unit_float(images), params, blur_kernel)), images)


@pytest.mark.parametrize("kind, role", [("dino", "global1"), ("dino", "global2"), ("dino", "local"), ("mocov2", "global1")])
def test_colour_statistics_have_the_cpu_paths_distribution(colour_runs, kind, role):
    images, cpu = colour_runs
    cpu_stats, kernel = cpu(kind, role)
    device_stats = device_colour(images, kind, role, kernel)
    for name in cpu_stats:
        assert ks_2samp(cpu_stats[name], device_stats[name])[1] > P_MIN, name


def _set(field: str, value: float):
    def change(params: torch.Tensor) -> None:
        params[:, FIELD[field]] = value
    return change


@pytest.mark.parametrize("kind, role, device_role, change", [
    ("dino", "global2", "global1", None),  # blur always instead of 10 %, never solarised
    ("dino", "global2", "global2", _set("solarize", 0.0)),
    ("dino", "global1", "global1", _set("grayscale", 0.0)),
    ("dino", "global1", "global1", _set("jitter", 0.0)),
    ("dino", "local", "local", _set("blur_sigma", 0.0)),
])
def test_the_colour_test_sees_a_wrong_distribution(colour_runs, kind, role, device_role, change):
    """The test above fails when the device path gets one probability wrong."""
    images, cpu = colour_runs
    cpu_stats, kernel = cpu(kind, role)
    device_stats = device_colour(images, kind, device_role, kernel, change)
    assert min(ks_2samp(cpu_stats[name], device_stats[name])[1] for name in cpu_stats) < 1e-6
