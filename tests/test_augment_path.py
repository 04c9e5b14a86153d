"""``data.augment: gpu``: the same crops as the CPU path, every method trains with it, exact resume
after SIGKILL, two processes equal one, and the shared image cache."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mlsctl import config
from mlsctl.bank import load_banks
from mlsctl.data.images import ImageFolder
from mlsctl.data.loader import MultiCropDataset, StepBatchSampler, collate, make_loader
from mlsctl.data.multicrop import MultiCrop
from mlsctl.errors import UserError
from mlsctl.runs import Run
from mlsctl.train import pretrain

from conftest import (REPO, TWO_PROCESSES, cli_env, in_process, make_images, sigkill_then_resume, tiny_recipe,
                      write_recipe)
from test_mls import MLS_METHOD, SGD
from test_sove import SOVE_METHOD

GPU_PATH = {"augment": "gpu", "decode_size": 48}


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_plan_draws_the_boxes_of_the_cpu_path_and_render_cuts_the_same_pixels(tmp_path):
    """For one seed, the GPU path's boxes and flips are the CPU path's; without colour changes its
    crops are the CPU crops up to the resize filter (bilinear box filter vs PIL bicubic)."""
    xs, ys = np.meshgrid(np.linspace(0, 255, 120), np.linspace(0, 255, 90))
    image = Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8))
    transform = MultiCrop(32, (0.3, 1.0), n_local=3, local_size=16, local_scale=(0.1, 0.4), photometric="none",
                          to_float=False)
    views = transform(image, seed=11)
    boxes, flips, photometric = transform.plan(120, 90, seed=11)
    assert torch.equal(boxes, views.boxes) and torch.equal(flips, views.flips) and photometric.shape == (5, 12)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # R x R = the original here: no squash
    square = torch.nn.functional.interpolate(pixels.float(), size=(96, 96), mode="bilinear", antialias=True)
    crops = transform.render(square.round().clamp(0, 255).byte(), boxes[None], flips[None], photometric[None],
                             torch.tensor([[120, 90]]))
    from mlsctl.data.multicrop import normalize_on_device

    for gpu_crop, cpu_crop in zip(crops, views.crops):
        reference = normalize_on_device(cpu_crop[None])
        assert gpu_crop.shape == reference.shape
        assert (gpu_crop - reference).abs().mean() < 0.08  # ~4/255 in pixel units after the std of ~0.226


def _class_folders(root: Path, classes: int = 4, per_class: int = 4) -> Path:
    for c in range(classes):
        make_images(root / f"c{c}", per_class, size=(40, 36), seed=c)
    return root


def _method_recipe(name: str, images: Path) -> dict:
    raw = tiny_recipe(images, optim__epochs=1)
    raw["data"].update(GPU_PATH)
    raw["train"]["bank_health_every"] = 0
    if name == "cribo":
        raw["data"]["local_crops"] = {"count": 0, "size": 16, "scale": [0.1, 0.4]}
        raw["method"] = {"name": "cribo", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_clusters": 4,
                         "bank_images": 2, "warmup_teacher_temp_epochs": 0}
    elif name == "sove":
        raw["method"] = dict(SOVE_METHOD)
    elif name in ("mls", "mocov2"):
        raw["data"].update(local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]}, photometric="mocov2")
        raw["optim"] = {**SGD, "epochs": 1}
        raw["method"] = {**MLS_METHOD, **({"lambda_ml": 0.0} if name == "mocov2" else {})}
    elif name == "mile":
        raw["data"]["local_crops"] = {"count": 1, "size": 16, "scale": [0.1, 0.4]}
        raw["optim"]["batch_size"] = 2
        raw["method"] = {"name": "mile", "set_length": 2, "cross_heads": 2, "out_dim": 64, "hidden_dim": 64,
                         "bottleneck_dim": 32, "warmup_teacher_temp_epochs": 0}
    elif name == "ms":
        raw["data"].update(global_crops={"count": 1, "size": 32, "scale": [0.5, 1.0]},
                           local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]}, photometric="none")
        raw["model"]["embedding_dim"] = 16
        raw["optim"].update(batch_size=8, weight_decay=0.0, weight_decay_end=0.0, warmup_epochs=0,
                            freeze_last_layer_epochs=0)
        raw["method"] = {"name": "ms", "m_per_class": 2}
    return raw


@pytest.mark.parametrize("name", ["dino", "cribo", "sove", "mls", "mocov2", "mile", "ms"])
def test_every_method_trains_with_the_gpu_path(tmp_path, name):
    images = _class_folders(tmp_path / "images")
    summary = pretrain(config.from_dict(_method_recipe(name, images)), tmp_path / "run")
    assert summary.steps >= 2 and np.isfinite(summary.final_loss)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "crops made on cpu (data.augment=gpu)" in log
    unit = "sets/s" if name == "mile" else "images/s"  # a MILE batch element is a set of photos
    assert re.search(rf"done: \d+ steps in \d+s \([\d.]+ {unit}\)", log), log[-500:]


def test_settings_that_do_nothing_are_named_when_a_run_starts():
    from mlsctl.methods import method_class

    dino, refine = method_class("dino"), method_class("refine")
    cpu = config.from_dict({"data": {"decode_size": 96}})
    assert dino.recipe_notes(cpu) == ["data.decode_size=96 has no effect with data.augment=cpu (the loader workers "
                                      "crop the full images); remove it or set data.augment=gpu"]
    small = config.from_dict({"data": {"augment": "gpu", "decode_size": 128}})  # global crops of 224 px
    assert dino.recipe_notes(small)[0].startswith("data.decode_size=128 is smaller than data.global_crops.size=224")
    assert dino.recipe_notes(config.from_dict({"data": {"augment": "gpu"}})) == []  # 0 = 448 px
    assert "decoded to 448 px by 4 loader workers; crops made on cpu" in dino.describe_data(
        config.from_dict({"data": {"augment": "gpu"}}), torch.device("cpu"))
    features = config.from_dict({"method": {"name": "refine"}, "data": {"augment": "gpu", "cache": "memory"}})
    assert refine.recipe_notes(features) == ["data.augment, data.cache have no effect on refinement: it trains on "
                                             "the feature vectors in data.root, not on images; remove them"]
    assert refine.recipe_notes(config.from_dict({"method": {"name": "refine"}})) == []


def test_the_gpu_path_resumes_exactly_after_sigkill(tmp_path):
    """Two loader workers filling the shared image cache, killed mid-run: the resumed run writes the
    uninterrupted run's losses, teacher and bank."""
    images = make_images(tmp_path / "images", 16)
    recipe = tiny_recipe(images)
    recipe["data"].update(GPU_PATH, cache="memory", workers=2)
    recipe["optim"]["epochs"] = 8  # 32 steps
    recipe["train"]["checkpoint_every"] = 4
    full, killed = sigkill_then_resume(write_recipe(tmp_path / "r.yaml", recipe), tmp_path, 32)
    assert losses(killed) == losses(full)
    a, b = load_file(str(killed / "teacher.safetensors")), load_file(str(full / "teacher.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    bank_a = load_banks(Run(killed).latest().banks_path)["cls"]
    bank_b = load_banks(Run(full).latest().banks_path)["cls"]
    assert torch.equal(bank_a.vectors, bank_b.vectors)


def test_two_processes_agree_with_one_on_the_gpu_path(tmp_path):
    images = make_images(tmp_path / "images", 16)
    recipe = tiny_recipe(images, optim__epochs=1)
    recipe["data"].update(GPU_PATH)
    one = dict(recipe, optim={**recipe["optim"], "batch_size": 4})
    two = dict(recipe, optim={**recipe["optim"], "batch_size": 2})
    in_process("pretrain", str(write_recipe(tmp_path / "one.yaml", one)), "--out", str(tmp_path / "one"), check=True)
    result = subprocess.run([*TWO_PROCESSES, "pretrain", str(write_recipe(tmp_path / "two.yaml", two)), "--out",
                             str(tmp_path / "two")], capture_output=True, text=True, env=cli_env(), timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)


def test_the_cache_is_filled_by_workers_and_read_back(tmp_path):
    images = make_images(tmp_path / "images", 8)
    transform = MultiCrop(16, (0.5, 1.0), n_local=0, photometric="none", to_float=False)
    dataset = MultiCropDataset(ImageFolder(images), transform, seed=0, augment="gpu", decode_size=24, cache="memory")
    sampler = StepBatchSampler(len(dataset), 4, seed=0, total_steps=4)  # two epochs of two steps
    batches = list(make_loader(dataset, sampler, workers=2, collate_fn=collate))
    assert bool(dataset.resized.filled.all())  # filled in the workers, seen here: shared memory
    assert batches[0].images.shape == (4, 3, 24, 24) and batches[0].images.dtype == torch.uint8
    fresh = MultiCropDataset(ImageFolder(images), transform, seed=0, augment="gpu", decode_size=24)
    for key in next(iter(StepBatchSampler(len(dataset), 4, seed=0, start_step=2, total_steps=3))):
        cached, decoded = dataset[key], fresh[key]
        assert torch.equal(cached["image"], decoded["image"]) and cached["image_size"] == decoded["image_size"]
        assert torch.equal(cached["boxes"], decoded["boxes"])


def test_the_cache_must_fit_and_needs_the_gpu_path(tmp_path, monkeypatch):
    images = make_images(tmp_path / "images", 4)
    raw = tiny_recipe(images)
    raw["data"]["cache"] = "memory"
    with pytest.raises(config.ConfigError, match="'data.cache' memory needs data.augment=gpu"):
        config.from_dict(raw)
    import os

    monkeypatch.setattr(os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 100)  # 400 KB free
    transform = MultiCrop(16, (0.5, 1.0), n_local=0, photometric="none", to_float=False)
    with pytest.raises(UserError, match="data.cache=memory needs .* set data.cache=none or a smaller data.decode_size"):
        MultiCropDataset(ImageFolder(images), transform, seed=0, augment="gpu", decode_size=512, cache="memory")


def test_the_cache_must_fit_in_shared_memory_for_every_process_of_the_machine(tmp_path, monkeypatch):
    # the cache lives in /dev/shm, one copy per process: a container's 64 MB /dev/shm ended in PyTorch's "unable to
    # allocate shared memory" (or a hang), and N processes each checked the free memory for one copy
    import os
    from types import SimpleNamespace

    images = make_images(tmp_path / "images", 4)
    transform = MultiCrop(16, (0.5, 1.0), n_local=0, photometric="none", to_float=False)
    monkeypatch.setattr(os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 2**20)  # 4 GiB free
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=1000, f_frsize=4096))  # 4 MB of shm
    with pytest.raises(UserError, match=r"more than the free shared memory in /dev/shm .*--shm-size"):
        MultiCropDataset(ImageFolder(images), transform, seed=0, augment="gpu", decode_size=1024, cache="memory")
    MultiCropDataset(ImageFolder(images), transform, seed=0, augment="gpu", decode_size=512, cache="memory")  # 3.1 MB
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"in each of the 2 processes on this machine, more than the free shared"):
        MultiCropDataset(ImageFolder(images), transform, seed=0, augment="gpu", decode_size=512, cache="memory")


def test_decoded_batches_in_flight_must_fit_in_memory_and_in_shared_memory(tmp_path, monkeypatch):
    # data.augment=gpu with data.decode_size=100000 and no cache was ended by the kernel's OOM killer, and a 64 MB
    # /dev/shm by "unable to allocate shared memory" or a hang: one sentence now, before the loader starts
    import os
    from types import SimpleNamespace

    from mlsctl.data.loader import check_batches_fit

    images = make_images(tmp_path / "images", 4)
    transform = MultiCrop(16, (0.5, 1.0), n_local=0, photometric="none", to_float=False)
    dataset = MultiCropDataset(ImageFolder(images), transform, seed=0, augment="gpu", decode_size=1024)
    sampler = SimpleNamespace(batch_size=8)  # 8 x 3 x 1024^2 bytes = 24 MiB a batch
    monkeypatch.setattr(os, "sysconf", lambda name: 4096 if name == "SC_PAGE_SIZE" else 100_000)  # 390 MiB free
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=2**30 // 4096, f_frsize=4096))  # 1 GiB
    check_batches_fit(dataset, sampler, workers=1)  # 5 batches in flight: 120 MiB
    with pytest.raises(UserError, match=r"data.decode_size 1024 makes a batch of 8 images 0.02 GiB, with 9 in flight "
                                        r"\(2 workers x 4 prefetched and the one in use\): more than half the free"):
        check_batches_fit(dataset, sampler, workers=2)  # 216 MiB > 195 MiB
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_bavail=16_000, f_frsize=4096))  # 64 MB of shm
    with pytest.raises(UserError, match=r"more than the free shared memory in /dev/shm .*--shm-size"):
        check_batches_fit(dataset, sampler, workers=1)  # 4 prefetched: 96 MiB
    check_batches_fit(dataset, sampler, workers=0)  # nothing travels through /dev/shm
    cpu_path = MultiCropDataset(ImageFolder(images), transform, seed=0, augment="cpu")
    check_batches_fit(cpu_path, sampler, workers=2)  # crops, not decoded images: not this check's
    # MILE's sets: set_length photos an item (a review, 2026-12-07: one was counted)
    sets = SimpleNamespace(resized=dataset.resized, images_per_item=4)
    with pytest.raises(UserError, match=r"a batch of 8 sets of 4 images 0.09 GiB, with 5 in flight .* more than half"):
        check_batches_fit(sets, sampler, workers=1)  # 480 MiB > 195 MiB
    from mlsctl.data.objects import ObjectSetDataset

    assert ObjectSetDataset.images_per_item.fget(SimpleNamespace(set_length=4)) == 4
