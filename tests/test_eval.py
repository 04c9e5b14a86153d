"""Evaluation: segmentation metrics by hand, the Hungarian matching against brute force, dense
k-NN segmentation against a brute-force reference, weighted k-NN classification, and the CLI."""

from __future__ import annotations

import itertools
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

from mlsctl.errors import UserError
from mlsctl.evaluate import knn, knn_seg
from mlsctl.evaluate.segmentation import (confusion_update, hungarian_mean_iou, iou_per_class, linear_assignment,
                                          mean_iou)
from mlsctl.features import Features

from conftest import cli, in_process, make_images, write_feature_folder

# ---------------------------------------------------------------------------------------------- metrics


def test_confusion_and_miou_by_hand():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    prediction = np.array([[0, 1, 1, 1], [2, 0, 3, 3]])
    confusion = confusion_update(np.zeros((0, 0), dtype=np.int64), target, prediction)
    # pixels with target 255 are not counted, even though they were predicted as class 3
    assert confusion.sum() == 6 and confusion.shape == (3, 3)
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 (a 0 predicted 1) → 1/3
    # class 1: tp 2, fp 1, fn 0 → 2/3 ; class 2: tp 1, fn 1 → 1/2
    assert iou_per_class(confusion) == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert mean_iou(confusion) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)


def test_absent_classes_do_not_count():
    # class 1 is in neither ground truth nor predictions; class 3 is only predicted (IoU 0, counted)
    target = np.array([0, 0, 2, 2])
    prediction = np.array([0, 0, 2, 3])
    confusion = confusion_update(np.zeros((4, 4), dtype=np.int64), target, prediction)
    iou = iou_per_class(confusion)
    assert np.isnan(iou[1]) and iou[3] == 0
    assert mean_iou(confusion) == pytest.approx((1 + 0.5 + 0) / 3)
    # a class only in the ground truth, never predicted, counts with IoU 0
    confusion = confusion_update(np.zeros((2, 2), dtype=np.int64), np.array([0, 1]), np.array([0, 0]))
    assert mean_iou(confusion) == pytest.approx((0.5 + 0) / 2)


def test_custom_ignore_index_and_growth():
    confusion = confusion_update(np.zeros((2, 2), dtype=np.int64), np.array([0, 7, 5]), np.array([0, 0, 5]),
                                 ignore_index=7)
    assert confusion.shape == (6, 6) and confusion.sum() == 2 and mean_iou(confusion) == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.lists(st.lists(st.integers(0, 9), min_size=n, max_size=n),
                                                     min_size=n, max_size=n)))
def test_linear_assignment_is_optimal(cost):
    cost = np.array(cost, dtype=float)
    column = linear_assignment(cost)
    assert sorted(column.tolist()) == list(range(len(cost)))
    best = min(sum(cost[i, p[i]] for i in range(len(cost))) for p in itertools.permutations(range(len(cost))))
    assert cost[np.arange(len(cost)), column].sum() == pytest.approx(best)


def test_hungarian_miou_matches_classes_by_the_largest_summed_iou():
    """The reference (open-hummingbird-eval's PredsmIoU) matches on 1 − IoU; matching on pixel counts, as
    before (a review, 2026-12-05), can pick another matching. Against every permutation of 5 classes."""
    import itertools

    rng = np.random.default_rng(3)
    for _ in range(20):
        confusion = rng.integers(0, 50, size=(5, 5)) * (rng.random((5, 5)) < 0.6)
        best = max(itertools.permutations(range(5)),
                   key=lambda perm: float(np.nansum(iou_per_class(confusion[:, list(perm)]))))
        assert hungarian_mean_iou(confusion) == pytest.approx(mean_iou(confusion[:, list(best)]))
        assert hungarian_mean_iou(confusion) >= mean_iou(confusion) - 1e-12 or np.isnan(iou_per_class(confusion)).any()


def test_hungarian_miou_undoes_a_relabelling():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, 500)
    prediction = np.where(rng.random(500) < 0.8, target, rng.integers(0, 4, 500))
    confusion = confusion_update(np.zeros((4, 4), dtype=np.int64), target, prediction)
    permuted = confusion_update(np.zeros((4, 4), dtype=np.int64), target, np.array([2, 0, 3, 1])[prediction])
    assert hungarian_mean_iou(permuted) == pytest.approx(mean_iou(confusion))
    assert mean_iou(permuted) < mean_iou(confusion)


# ------------------------------------------------------------------------------------------ knn-seg parts


def test_patch_soft_labels_and_rare_class_sampling():
    mask = np.zeros((4, 4), dtype=np.int64)
    mask[:2, :2] = 1
    mask[0, 0] = 255
    mask[2:, 2:] = 255
    soft = knn_seg.patch_soft_labels(mask, (2, 2), 3)
    assert soft[0].tolist() == [0, 1, 0]  # the ignored pixel does not count
    assert soft[1].tolist() == [1, 0, 0] and soft[3].tolist() == [0, 0, 0]
    half = knn_seg.patch_soft_labels(np.array([[0, 2], [2, 2]]), (1, 1), 3)
    assert half[0].tolist() == pytest.approx([0.25, 0, 0.75])
    # one patch of class 1 among 99 of class 0: drawn with weight 1 against 99 × 1/99, i.e. half the time
    soft = torch.zeros(100, 2)
    soft[:99, 0] = 1
    soft[99, 1] = 1
    hits = sum(99 in knn_seg.sample_patches(soft, 1, torch.Generator().manual_seed(s)).tolist() for s in range(400))
    assert 150 < hits < 250
    assert len(knn_seg.sample_patches(soft, 500, torch.Generator())) == 100


def test_majority_patch_labels_are_the_one_hot_of_the_most_frequent_class():
    """CrIBo's Table 1 labels a memory patch by its majority class (--patch-labels majority); ties go to the lower
    class; ignored pixels do not count; fully ignored patches stay out, as with soft labels."""
    mask = np.array([[0, 1, 2, 2],
                     [1, 1, 2, 255],
                     [0, 0, 255, 255],
                     [1, 1, 255, 255]])
    feature_map = torch.randn(2, 2, 4)
    pairs = lambda: iter([(0, feature_map, mask)])  # noqa: E731
    soft = knn_seg.build_memory(pairs(), 3, per_image=None, ignore_index=255, generator=torch.Generator())
    hard = knn_seg.build_memory(pairs(), 3, per_image=None, ignore_index=255, generator=torch.Generator(),
                                majority=True)
    assert torch.equal(hard.features, soft.features) and len(hard.labels) == 3  # the fully ignored patch is out
    # patches: [0,1,1,1] -> 1; [2,2,2] -> 2; [0,0,1,1] -> a tie, to 0
    assert hard.labels.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    assert soft.labels[2].tolist() == [0.5, 0.5, 0.0]


def test_patch_soft_labels_equal_area_pooling_of_the_one_hot_mask():
    """The counting implementation against its definition: adaptive average pooling of the one-hot
    mask (ignored pixels zero), renormalised; cell edges that do not divide the mask included."""
    rng = np.random.default_rng(0)
    for _ in range(60):
        height, width = rng.integers(1, 50, 2)
        classes, grid = int(rng.integers(1, 25)), (int(rng.integers(1, 10)), int(rng.integers(1, 10)))
        mask = rng.integers(0, classes, (height, width))
        mask[rng.random((height, width)) < 0.3] = 255
        valid = torch.from_numpy(mask != 255)
        one_hot = F.one_hot(torch.from_numpy(np.where(mask == 255, 0, mask)), classes).permute(2, 0, 1).float()
        pooled = F.adaptive_avg_pool2d((one_hot * valid)[None], grid)[0].permute(1, 2, 0).reshape(-1, classes)
        total = pooled.sum(1, keepdim=True)
        expected = torch.where(total > 0, pooled / total.clamp_min(1e-12), torch.zeros_like(pooled))
        assert torch.allclose(knn_seg.patch_soft_labels(mask, grid, classes), expected, atol=1e-6)
    with pytest.raises(ValueError, match="mask holds class 7 but num_classes is 3"):
        knn_seg.patch_soft_labels(np.array([[0, 7]]), (1, 1), 3)


def _scene_data(tmp_path: Path, name: str, n: int, grid: int, dim: int, classes: int, seed: int):
    """Random dense features whose patches carry their class in a few dimensions, with masks."""
    rng = np.random.default_rng(seed)
    noise = torch.Generator().manual_seed(seed)  # not the global RNG: the data was another after another test
    masks_dir = tmp_path / name / "masks"
    masks_dir.mkdir(parents=True)
    files, dense = [], []
    size = grid * 4
    for i in range(n):
        mask = rng.integers(0, classes, (grid, grid)).repeat(4, 0).repeat(4, 1).astype(np.uint8)
        mask[rng.random((size, size)) < 0.05] = 255
        Image.fromarray(mask).save(masks_dir / f"{i:03d}.png")
        files.append(f"{i:03d}.png")
        coarse = torch.from_numpy(mask[::4, ::4].astype(np.int64)).clamp_max(classes - 1)
        features = torch.randn(grid, grid, dim, generator=noise) + 3.0 * F.one_hot(coarse, dim).float()
        dense.append(features)
    dense = torch.stack(dense)
    folder = write_feature_folder(tmp_path / name / "feats", files, dense.mean((1, 2)), dense)
    return folder, masks_dir


def _reference_confusion(train_dir, train_masks, val_dir, val_masks, k, temperature, classes):
    """Brute force: every labelled train patch, full cosine matrix, softmax over the top k."""
    train, val = Features(train_dir), Features(val_dir)
    memory, labels = [], []
    for row, dense in zip(range(len(train)), torch.cat([d for _, d in train.iter_dense()])):
        mask = np.array(Image.open(train_masks / train.files[row])).astype(np.int64)
        soft = knn_seg.patch_soft_labels(mask, train.grid, classes)
        keep = soft.sum(1) > 0
        memory.append(F.normalize(dense.reshape(-1, dense.shape[-1]), dim=1)[keep])
        labels.append(soft[keep])
    memory, labels = torch.cat(memory), torch.cat(labels)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for row, dense in zip(range(len(val)), torch.cat([d for _, d in val.iter_dense()])):
        mask = np.array(Image.open(val_masks / val.files[row])).astype(np.int64)
        queries = F.normalize(dense.reshape(-1, dense.shape[-1]), dim=1)
        cos = queries @ memory.T
        top, index = cos.topk(k, dim=1)
        weights = torch.softmax(top / temperature, dim=1)
        probs = (weights[..., None] * labels[index]).sum(1)
        maps = F.interpolate(probs.T.reshape(1, classes, *val.grid), size=mask.shape, mode="bilinear",
                             align_corners=False)
        confusion = confusion_update(confusion, mask, maps[0].argmax(0).numpy())
    return confusion


def test_knn_seg_equals_brute_force(tmp_path: Path):
    train_dir, train_masks = _scene_data(tmp_path, "train", 6, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", 4, 4, 8, 3, seed=1)
    train = knn_seg.FeatureMasks(Features(train_dir), train_masks, "train features")
    val = knn_seg.FeatureMasks(Features(val_dir), val_masks, "val features")
    options = knn_seg.Settings(k=5, temperature=0.1, query_batch=3)
    outcome = knn_seg.evaluate_once(train, val, list(range(6)), options, 3, run_seed=0)
    reference = _reference_confusion(train_dir, train_masks, val_dir, val_masks, 5, 0.1, 3)
    assert np.array_equal(outcome["confusion"], reference)
    assert outcome["miou"] == pytest.approx(mean_iou(reference))
    assert outcome["memory_patches"] == 6 * 16
    assert outcome["miou"] > 0.6  # the class is written into the features: transfer must find it
    # IVF with every list probed is exact as well
    ivf = knn_seg.evaluate_once(train, val, list(range(6)), knn_seg.Settings(k=5, temperature=0.1, index="ivf",
                                                                            nlist=2, nprobe=2), 3, run_seed=0)
    assert ivf["miou"] == pytest.approx(outcome["miou"])
    # an --nlist above the memory's patches (a small fraction's memory) is one list per patch: faiss's C++
    # assertion was an internal error after the larger fractions' work (a new user's probe, 2026-12-06)
    few = knn_seg.evaluate_once(train, val, [0], knn_seg.Settings(k=5, temperature=0.1, index="ivf", nlist=100_000,
                                                                   nprobe=100_000), 3, run_seed=0)
    assert few["memory_patches"] == 16 and "nlist 16," in few["search"]


def test_fractions_runs_and_bounded_memory(tmp_path: Path):
    train_dir, train_masks = _scene_data(tmp_path, "train", 16, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", 3, 4, 8, 3, seed=1)
    train = knn_seg.FeatureMasks(Features(train_dir), train_masks, "train features")
    val = knn_seg.FeatureMasks(Features(val_dir), val_masks, "val features")
    result = knn_seg.knn_segmentation(train, val, [Fraction(1), Fraction(1, 8)],
                                      knn_seg.Settings(k=3, memory_size=32, runs=3), names=["a", "b", "c"])
    full, eighth = result["results"]
    assert len(full["runs"]) == 1 and len(eighth["runs"]) == 3 and eighth["train_images"] == 2
    assert full["runs"][0]["memory_patches"] == 32  # 2 patches from each of 16 images
    assert eighth["runs"][0]["memory_patches"] == 32  # 16 from each of 2
    import statistics

    mious = [r["miou"] for r in eighth["runs"]]
    assert [r["seed"] for r in eighth["runs"]] == [0, 1, 2] and len({str(r["confusion"]) for r in eighth["runs"]}) == 3
    assert eighth["miou"] == pytest.approx(statistics.mean(mious)) and eighth["miou_std"] == pytest.approx(
        statistics.stdev(mious)) and eighth["miou_std"] > 0  # three different subsets: the spread is theirs
    assert result["classes"] == ["a", "b", "c"]
    again = knn_seg.knn_segmentation(train, val, [Fraction(1, 8)], knn_seg.Settings(k=3, memory_size=32, runs=3))
    assert again["results"][0]["miou"] == eighth["miou"]  # seeded


def test_the_constant_rule_scores_what_calling_every_pixel_one_class_scores():
    """knn-seg's and linear-seg's chance row (2026-12-07): every val pixel called one class, scored by the same
    metric code as the model, on the same pixels (the confusion matrix's row sums), by hand."""
    from mlsctl.evaluate.segmentation import constant_rule, constant_rule_text

    confusion = np.array([[6, 2], [1, 1]])  # 8 background pixels, 2 foreground
    background = constant_rule(confusion, 0)
    assert background["miou"] == pytest.approx((8 / 10 + 0) / 2) and background["pixel_accuracy"] == 0.8
    assert background["foreground_iou"] == 0.0  # no foreground pixel predicted
    item = constant_rule(confusion, 1)
    assert item["miou"] == pytest.approx((0 + 2 / 10) / 2) and item["foreground_iou"] == pytest.approx(0.2)
    # a class absent from the val masks: every true class scores 0, and it takes part in the mean as a prediction
    assert constant_rule(confusion, 2)["miou"] == 0.0 and constant_rule(confusion, 2)["pixel_accuracy"] == 0.0
    assert "foreground_iou" not in constant_rule(confusion, 0, ["wall", "floor"])  # class 0 is no background
    assert constant_rule_text({**background, "majority_class": "background"}) == (
        "every pixel background: mIoU 40.0%, foreground IoU 0.0%, pixel accuracy 80.0%")


def test_knn_seg_records_the_constant_rule_of_the_training_majority_class(tmp_path: Path):
    """The rule's class is the training masks' most frequent (by patch label mass), counted over every labelled
    patch, not over the memory's sample, which draws rare classes more often."""
    from mlsctl.evaluate.segmentation import constant_rule

    mask = np.full((4, 4), 2)
    mask[0, 0], mask[0, 1] = 0, 1  # 14 patches of class 2, one of 0, one of 1
    memory = knn_seg.build_memory(iter([(i, torch.randn(4, 4, 8), mask) for i in range(4)]), 3, per_image=2,
                                  ignore_index=255, generator=torch.Generator().manual_seed(0))
    assert memory.majority_class() == 2 and memory.class_mass.tolist() == [4, 4, 56]
    assert int(memory.labels.sum(0).argmax()) != 2  # the sample's majority is another: rare classes drawn first

    train_dir, train_masks = _scene_data(tmp_path, "train", 8, 4, 8, 3, seed=0)
    for path in sorted(train_masks.iterdir())[:6]:  # class 2 the majority of the training pixels, not of the val's
        mask = np.array(Image.open(path))
        mask[mask != 255] = 2
        Image.fromarray(mask).save(path)
    val_dir, val_masks = _scene_data(tmp_path, "val", 3, 4, 8, 3, seed=1)
    train = knn_seg.FeatureMasks(Features(train_dir), train_masks, "train features")
    val = knn_seg.FeatureMasks(Features(val_dir), val_masks, "val features")
    result = knn_seg.knn_segmentation(train, val, [Fraction(1), Fraction(1, 4)],
                                      knn_seg.Settings(k=3, memory_size=16, runs=2), names=["a", "b", "c"])
    pixels = np.bincount(np.concatenate([np.array(Image.open(p)).ravel() for p in train_masks.iterdir()]))[:3]
    assert int(pixels.argmax()) == 2 and result["chance"]["majority_class"] == "c"
    full = result["results"][0]
    expected = constant_rule(np.array(full["runs"][0]["confusion"]), 2)
    assert result["chance"]["miou"] == pytest.approx(expected["miou"]) == pytest.approx(full["chance"]["miou"])
    val_pixels = np.bincount(np.concatenate([np.array(Image.open(p)).ravel() for p in val_masks.iterdir()]))
    assert expected["pixel_accuracy"] == pytest.approx(val_pixels[2] / val_pixels[:3].sum())
    assert full["miou"] > result["chance"]["miou"]  # the class is written into the features


def test_knn_seg_refuses_mismatched_inputs(tmp_path: Path):
    train_dir, train_masks = _scene_data(tmp_path, "train", 2, 4, 8, 3, seed=0)
    (train_masks / "001.png").unlink()
    with pytest.raises(UserError, match="no mask for 1 of 2 images"):
        knn_seg.FeatureMasks(Features(train_dir), train_masks, "train features")
    flat = write_feature_folder(tmp_path / "flat", ["000.png"], torch.randn(1, 8))
    with pytest.raises(UserError, match="has no dense features"):
        knn_seg.FeatureMasks(Features(flat), train_masks, "val features")
    with pytest.raises(UserError, match="fraction like"):
        knn_seg.parse_fraction("half")


# -------------------------------------------------------------------------------- neighbour search


def _random_unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("scores_per_chunk", [1 << 25, 50 * 37])  # one pass; 37 queries x 50 memory rows at a time
def test_torch_search_equals_faiss_flat(scores_per_chunk):
    import faiss

    memory, queries = _random_unit(3000, 32, 0), _random_unit(500, 32, 1)
    index = faiss.IndexFlatIP(32)
    index.add(memory.numpy())
    faiss_scores, faiss_ids = index.search(queries.numpy(), 30)
    scores, ids = knn.exact_search(memory, queries, 30, query_chunk=37, scores_per_chunk=scores_per_chunk)
    assert ids.dtype == torch.int64 and scores.dtype == torch.float32 and ids.shape == (500, 30)
    # the same ids in the same order, but for rows two memory rows tie to float32 rounding: there faiss and torch
    # may take them in either order (faiss-cpu 1.15.1 put row 308's tie of 3e-8 the other way round, 2026-12-06);
    # whatever either puts at a place has the score the other has there, computed exactly
    faiss_ids = torch.from_numpy(faiss_ids)
    swapped = (ids != faiss_ids).nonzero()
    assert len(swapped) <= 10, swapped
    exact = (memory.double()[ids] * queries.double()[:, None]).sum(-1)
    faiss_exact = (memory.double()[faiss_ids] * queries.double()[:, None]).sum(-1)
    assert torch.allclose(exact, faiss_exact, atol=1e-6, rtol=0)
    assert all(len(set(row)) == 30 for row in ids.tolist())
    assert torch.allclose(scores, torch.from_numpy(faiss_scores), atol=1e-5, rtol=0)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # descending, as faiss returns them
    with pytest.raises(ValueError, match="exceeds"):
        knn.exact_search(memory[:5], queries, 6)


def _scene_sources(tmp_path: Path, n_train: int, n_val: int) -> tuple[knn_seg.FeatureMasks, knn_seg.FeatureMasks]:
    """(train, val) sources of :func:`_scene_data`: grid 4, 8 dimensions, 3 classes."""
    train_dir, train_masks = _scene_data(tmp_path, "train", n_train, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", n_val, 4, 8, 3, seed=1)
    return (knn_seg.FeatureMasks(Features(train_dir), train_masks, "train features"),
            knn_seg.FeatureMasks(Features(val_dir), val_masks, "val features"))


def test_knn_seg_predictions_are_the_same_with_torch_and_faiss_search(tmp_path: Path):
    train, val = _scene_sources(tmp_path, 6, 4)
    outcomes = {backend: knn_seg.evaluate_once(train, val, list(range(6)),
                                               knn_seg.Settings(k=7, temperature=0.05, search=backend, device="cpu"),
                                               3, run_seed=0)
                for backend in ("torch", "faiss")}
    assert np.array_equal(outcomes["torch"]["confusion"], outcomes["faiss"]["confusion"])
    assert outcomes["torch"]["search"].startswith("exact, torch") and "faiss" in outcomes["faiss"]["search"]
    with pytest.raises(UserError, match="--index ivf is a faiss index"):
        knn_seg.build_search(torch.randn(4, 8), knn_seg.Settings(index="ivf", search="torch"))
    with pytest.raises(UserError, match="--search gpu is not one of"):
        knn_seg.build_search(torch.randn(4, 8), knn_seg.Settings(search="gpu"))


def test_evaluations_run_without_faiss(tmp_path: Path, monkeypatch):
    import subprocess
    import sys

    # importing the evaluations (and their CLI) does not import faiss
    code = ("import sys, mlsctl.evaluate.knn, mlsctl.evaluate.knn_seg, mlsctl.cli.eval; "
            "assert 'faiss' not in sys.modules, 'faiss imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    train, val = _scene_sources(tmp_path, 3, 2)
    outcome = knn_seg.evaluate_once(train, val, [0, 1, 2], knn_seg.Settings(k=3), 3, run_seed=0)
    assert outcome["search"].startswith("exact, torch")
    with pytest.raises(UserError, match="faiss, which is not installed"):
        knn_seg.evaluate_once(train, val, [0, 1, 2], knn_seg.Settings(k=3, search="faiss"), 3, run_seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_search_equals_cpu_faiss():
    import faiss

    memory, queries = _random_unit(20000, 64, 0), _random_unit(2000, 64, 1)
    index = faiss.IndexFlatIP(64)
    index.add(memory.numpy())
    faiss_scores, faiss_ids = index.search(queries.numpy(), 30)
    scores, ids = knn.exact_search(memory.cuda(), queries, 30, scores_per_chunk=1 << 20)
    assert torch.equal(ids, torch.from_numpy(faiss_ids))
    assert torch.allclose(scores, torch.from_numpy(faiss_scores), atol=1e-5, rtol=0)
    assert knn.search_device("auto").type == "cuda"


# ---------------------------------------------------------------------------------------------- knn


def test_knn_is_perfect_on_separated_clusters():
    torch.manual_seed(0)
    centers = torch.eye(4, 16) * 10
    train = centers.repeat_interleave(25, 0) + torch.randn(100, 16)
    labels = torch.arange(4).repeat_interleave(25)
    queries = centers.repeat_interleave(5, 0) + torch.randn(20, 16)
    query_labels = torch.arange(4).repeat_interleave(5)
    scores = knn.knn_classify(train, labels, queries, ks=(1, 10, 20), chunk=7)
    assert sorted(scores) == [1, 10, 20]
    for s in scores.values():
        assert s.shape == (20, 4) and knn.accuracy(s, query_labels, 1) == 1.0


def test_knn_votes_are_weighted_by_similarity():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.2]])
    scores = knn.knn_classify(train, labels, query, ks=(3,), temperature=0.07)[3][0]
    cos0 = 1 / np.hypot(1, 0.2)
    cos1 = 0.2 / np.hypot(1, 0.2)
    # exp(cos / T), relative to the nearest neighbour's (the same ranking, no overflow)
    assert scores.tolist() == pytest.approx([1.0, 2 * np.exp((cos1 - cos0) / 0.07)], rel=1e-5)
    assert knn.accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 1) == 0.0
    assert knn.accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 2) == 1.0


def test_knn_scores_stay_finite_at_a_small_temperature_and_top_5_needs_votes():
    """A probe (2026-12-06): exp(cos / T) overflowed to inf for T below ~0.011, and T = 0.001 gave top-1 12 %
    where the nearest neighbour alone gives 8 %. A review: top-5 was filled with classes no neighbour voted for."""
    torch.manual_seed(0)
    train, labels = F.normalize(torch.randn(60, 8), dim=1), torch.arange(60) % 10
    queries = F.normalize(torch.randn(30, 8), dim=1)
    scores = knn.knn_classify(train, labels, queries, ks=(20,), temperature=0.001)[20]
    assert not torch.isnan(scores).any() and (scores < float("inf")).all()  # -inf: classes no neighbour voted for
    nearest = labels[(queries @ train.T).argmax(1)]
    assert torch.equal(scores.argmax(1), nearest)  # at T -> 0 the nearest neighbour decides
    one_class = torch.full((4, 10), float("-inf"))
    one_class[:, 7] = 3.0  # every neighbour voted for class 7
    assert knn.accuracy(one_class, torch.tensor([7, 1, 2, 3]), 5) == 0.25  # the unvoted classes are no hits
    # a review: a voter 0.15 below the nearest weighs exp(-150) = 0 in float32 at T = 0.001, and is still a vote
    train2 = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]), dim=1)
    scores2 = knn.knn_classify(train2, torch.tensor([0, 1, 2]), torch.tensor([[1.0, 0.0]]), ks=(2,),
                               temperature=0.001)[2]
    assert knn.accuracy(scores2, torch.tensor([1]), 5) is None  # 3 classes
    assert torch.isinf(scores2[0, 2]) and scores2[0, 1] == 0 and knn.accuracy(scores2, torch.tensor([1]), 2) == 1.0
    assert knn.accuracy(torch.rand(4, 3), torch.tensor([0, 1, 2, 0]), 5) is None  # 3 classes: no top-5
    from mlsctl.evaluate.linear import top_k_accuracy

    assert top_k_accuracy(torch.rand(4, 3), torch.tensor([0, 1, 2, 0]), 5) is None


def test_labels_from_folders_and_files(tmp_path: Path):
    feats = write_feature_folder(tmp_path / "f", ["cat/1.png", "dog/2.png"], torch.randn(2, 4))
    assert knn.labels_for(Features(feats), None, "train") == ["cat", "dog"]
    (tmp_path / "labels.csv").write_text("path,label\ncat/1.png,x\ndog/2.png,y\n")
    assert knn.labels_for(Features(feats), tmp_path / "labels.csv", "train") == ["x", "y"]
    (tmp_path / "labels.jsonl").write_text('{"path": "cat/1.png", "label": 3}\n')
    with pytest.raises(UserError, match="no label for 1 image "):
        knn.labels_for(Features(feats), tmp_path / "labels.jsonl", "train")
    flat = write_feature_folder(tmp_path / "g", ["1.png"], torch.randn(1, 4))
    with pytest.raises(UserError, match="not inside a class folder.*give it with --train-labels"):
        knn.labels_for(Features(flat), None, "train", "--train-labels")  # the sentence names the flag to use


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_knn_and_knn_seg(tmp_path: Path):
    torch.manual_seed(0)
    centers = torch.eye(3, 8) * 10
    names = [f"c{i}/{j}.png" for i in range(3) for j in range(6)]
    write_feature_folder(tmp_path / "tr", names, centers.repeat_interleave(6, 0) + torch.randn(18, 8))
    write_feature_folder(tmp_path / "va", names[::2], centers.repeat_interleave(3, 0) + torch.randn(9, 8))
    result = in_process("eval", "knn", "--train", str(tmp_path / "tr"), "--val", str(tmp_path / "va"), "--k", "1", "5",
                        "--out", str(tmp_path / "knn.json"), check=True)
    assert "100.00" in result.stdout
    saved = json.loads((tmp_path / "knn.json").read_text())
    assert [r["k"] for r in saved["results"]] == [1, 5] and all(r["top1"] == 1.0 for r in saved["results"])
    # a probe (2026-12-05): k 0 and -1 printed accuracies, and a k above the 18 training images said nothing
    for bad in ("0", "-1"):
        refused = in_process("eval", "knn", "--train", str(tmp_path / "tr"), "--val", str(tmp_path / "va"), "--k", bad)
        assert refused.returncode == 2 and "--k" in refused.stderr and "top-1" not in refused.stdout
    result = in_process("eval", "knn", "--train", str(tmp_path / "tr"), "--val", str(tmp_path / "va"), "--k", "5",
                        "500", "--out", str(tmp_path / "knn.json"), check=True)
    assert "500 (all 18)" in result.stdout
    assert [r["neighbours"] for r in json.loads((tmp_path / "knn.json").read_text())["results"]] == [5, 18]

    train_dir, train_masks = _scene_data(tmp_path, "train", 8, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", 3, 4, 8, 3, seed=1)
    result = in_process("eval", "knn-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                        str(val_dir), "--val-masks", str(val_masks), "--fraction", "1/1", "1/2", "--runs", "2",
                        "--k", "5", "--out", str(tmp_path / "seg.json"), check=True)
    assert "Hungarian" in result.stdout and "1/2" in result.stdout
    saved = json.loads((tmp_path / "seg.json").read_text())
    chance_row = next(line for line in result.stdout.splitlines() if line.startswith("chance: every pixel "))
    assert f"{100 * saved['chance']['miou']:.1f}" in chance_row  # the constant rule, last in the table
    assert [r["fraction"] for r in saved["results"]] == ["1/1", "1/2"] and saved["settings"]["k"] == 5
    assert "note:" not in result.stdout
    # a new-user probe (2026-12-05): fractions that round to the same images, and a k above the memory, said nothing
    result = in_process("eval", "knn-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                        str(val_dir), "--val-masks", str(val_masks), "--fraction", "1/1", "1/64", "1/128", "--runs",
                        "1", "--k", "1000000", "--out", str(tmp_path / "seg.json"), check=True)
    assert "note: fractions 1/64, 1/128 all use 1 training image (of 8)" in result.stdout
    assert "note: --k 1000000 is more than the memory of some runs holds" in result.stdout
    assert all(run["k"] == run["memory_patches"] for r in json.loads((tmp_path / "seg.json").read_text())["results"]
               for run in r["runs"])
    partial = in_process("eval", "knn-seg", "--train", str(train_dir))
    assert partial.returncode == 2 and "give all of --train" in partial.stderr


@pytest.mark.slow
def test_cli_knn_seg_embeds_image_folders_with_a_run(tmp_path: Path, finished_run):
    run_dir, _ = finished_run
    for split, n in (("train", 6), ("val", 3)):
        images = make_images(tmp_path / split / "images", n, size=(32, 32), seed=n)
        masks = tmp_path / split / "masks"
        masks.mkdir()
        for path in sorted(images.rglob("*.png")):
            target = masks / path.relative_to(images)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((np.arange(32 * 32).reshape(32, 32) // 300 % 3).astype(np.uint8)).save(target)
    args = ["eval", "knn-seg", "--train", str(tmp_path / "train" / "images"), "--train-masks",
            str(tmp_path / "train" / "masks"), "--val", str(tmp_path / "val" / "images"), "--val-masks",
            str(tmp_path / "val" / "masks"), "--run", str(run_dir), "--fraction", "1/1", "--aug-passes", "1",
            "--json"]
    result = in_process(*args, cwd=tmp_path, check=True)
    payload = json.loads(result.stdout)
    assert payload["results"][0]["runs"][0]["memory_patches"] == 2 * 6 * 16
    assert "embedded 6 images" in result.stderr
    again = in_process(*args, cwd=tmp_path, check=True)
    assert "already in" in again.stderr
    assert json.loads(again.stdout)["results"][0]["miou"] == payload["results"][0]["miou"]
    # a new-user probe (2026-12-06): feature folders and --aug-passes without --run took the newest run under
    # ./runs (or timm's DINOv2), then refused it as "not the model of" the features; their manifest names it
    kept = {json.loads(m.read_text())["input_root"]: m.parent for m in (tmp_path / "features").rglob("manifest.json")}
    train_features, val_features = (kept[str(tmp_path / split / "images")] for split in ("train", "val"))
    result = in_process("eval", "knn-seg", "--train", str(train_features), "--train-masks",
                        str(tmp_path / "train" / "masks"), "--val", str(val_features), "--val-masks",
                        str(tmp_path / "val" / "masks"), "--fraction", "1/1", "--aug-passes", "1", "--json",
                        cwd=tmp_path, check=True)
    assert f"(the model of {train_features})" in result.stderr
    assert json.loads(result.stdout)["results"][0]["miou"] == payload["results"][0]["miou"]


@pytest.mark.slow
def test_cli_knn_seg_without_arguments_evaluates_the_newest_run_on_fmnist_scenes(tmp_path: Path, finished_run,
                                                                                  fake_fmnist):
    from mlsctl.data.fmnist import build_scenes

    run_dir, _ = finished_run
    build_scenes(tmp_path / "data" / "fmnist-scenes", n_train=8, n_val=3, size=32, source=fake_fmnist, progress=False)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").symlink_to(run_dir)
    result = in_process("eval", "knn-seg", "--fraction", "1/1", "1/4", "--runs", "2", cwd=tmp_path, check=True)
    assert "evaluating teacher of run runs/tiny" in result.stderr and "fmnist-scenes benchmark" in result.stderr
    assert "background" in result.stdout and "ankle boot" in result.stdout
    saved = json.loads(next((tmp_path / "results").glob("knn-seg-*.json")).read_text())
    assert saved["train"]["images"] == 8 and saved["val"]["images"] == 3 and len(saved["classes"]) == 11
    # foreground IoU, the README's headline figure, printed and saved (a new user's probe, 2026-12-06: only demo.sh
    # computed it), per run and as each fraction's mean
    from mlsctl.evaluate.segmentation import foreground_background_iou

    whole, quarter = saved["results"]
    assert "foreground IoU %" in result.stdout
    assert whole["foreground_iou"] == foreground_background_iou(whole["runs"][0]["confusion"])["foreground_iou"]
    assert quarter["foreground_iou"] == pytest.approx(np.mean([r["foreground_iou"] for r in quarter["runs"]]))


def test_foreground_background_iou_merges_every_item_class():
    from mlsctl.evaluate.segmentation import foreground_background_iou

    # rows: true background, item 1, item 2; columns: predicted
    confusion = np.array([[6, 1, 1],
                          [2, 3, 1],   # item 1 taken for item 2 once: still foreground
                          [0, 0, 4]])
    result = foreground_background_iou(confusion)
    # background: TP 6, FP 2, FN 2 -> 6/10; foreground: TP 3+1+0+4 = 8, FP 2, FN 2 -> 8/12
    assert result["background_iou"] == pytest.approx(0.6) and result["foreground_iou"] == pytest.approx(8 / 12)
    assert result["binary_miou"] == pytest.approx((0.6 + 8 / 12) / 2)


def test_retrieval_and_recall_refuse_what_they_cannot_score():
    """An API probe (2026-12-05): a NaN query embedding ranked 0 (a hit at R@1), an empty query set likewise, and
    Recall@0 or @-1 returned numbers."""
    from mlsctl.evaluate.recall import recall_at_k
    from mlsctl.evaluate.retrieval import evaluate_retrieval, ranks

    assert ranks(torch.tensor([[float("nan"), 0.5], [0.9, 0.1]]), torch.tensor([0, 0])).tolist() == [2**62, 1]
    cls = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1], [0.7, 0.7], [float("nan"), 0]])
    result = evaluate_retrieval(None, [[0], [2], [4]], [[1], [3], [5]], cls, None, methods=("mean-cls",))[0]
    assert result.recalls[1] == pytest.approx(2 / 3) and result.recalls[10] == pytest.approx(2 / 3)
    with pytest.raises(UserError, match="empty gallery or query set"):
        evaluate_retrieval(None, [[0], [2]], [[1], []], cls, None, methods=("mean-cls",))
    with pytest.raises(UserError, match=r"noise fractions must be in \[0, 1\)"):
        evaluate_retrieval(None, [[0], [2]], [[1], [3]], cls, None, noise=(1.0,), methods=("mean-cls",))
    embeddings, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    for bad in ([0], [-1, 1]):
        with pytest.raises(UserError, match="Recall@K needs K of 1 or more"):
            recall_at_k(embeddings, labels, bad)
    with pytest.raises(UserError, match="each of the 6 classes has one embedding"):
        recall_at_k(embeddings, torch.arange(6), [1])
    from mlsctl.evaluate.knn import knn_classify

    train, labels = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    for bad, said in ((dict(num_classes=1), "beyond num_classes 1"), (dict(ks=(0,)), "every k of 1 or more")):
        with pytest.raises(ValueError, match=said):
            knn_classify(train, labels, train, **{"ks": (1,), **bad})
    with pytest.raises(ValueError, match="got 0 features and 0 labels"):
        knn_classify(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), train, ks=(1,))


def test_eval_knn_and_linear_embed_images_as_dino_with_resize_center_crop(tmp_path: Path, finished_run, capsys):
    """An evaluation review (2026-12-05): eval knn embedded image folders resized whole, while DINO's k-NN protocol
    resizes to 256 and centre-crops 224. --resize center-crop embeds that way, into a cache folder of its own."""
    from mlsctl.features import Features

    run_dir, _ = finished_run
    for split, seed in (("train", 0), ("val", 50)):
        for c in ("a", "b"):
            make_images(tmp_path / split / c, 3, size=(48, 32), seed=seed + ord(c))
    payloads = {}
    for resize in ("square", "center-crop"):
        code, out, err = cli("eval", "knn", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                             "--run", str(run_dir), "--k", "3", "--resize", resize, "--json", "--out",
                             str(tmp_path / f"{resize}.json"), cwd=tmp_path, capsys=capsys)
        assert code == 0, err
        payloads[resize] = json.loads(out)
    folders = {Features(Path(tmp_path / payloads[r]["train"])).preprocessing["resize"]: payloads[r]["train"]
               for r in payloads}
    assert set(folders) == {"square", "center-crop"} and folders["center-crop"].endswith("-global-center-crop")
    assert folders["square"].endswith("-global")  # the square cache keeps its name: earlier caches are reused
    code, _, err = cli("eval", "linear", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--run",
                       str(run_dir), "--resize", "center-crop", "--epochs", "2", "--lr", "0.1", "--wd", "0",
                       "--out", str(tmp_path / "linear.json"), cwd=tmp_path, capsys=capsys)
    assert code == 0 and "already in" in err  # the centre-cropped features of eval knn, reused


def test_images_beside_features_are_embedded_with_the_features_model(tmp_path: Path, finished_run, capsys):
    """A new user's probe (2026-12-06): eval knn --train FEATURES --val IMAGES embedded the val images with the
    newest run under ./runs (another model), then refused to compare them. With no model named, the one the
    features' manifest names embeds them; a model named that is not theirs is refused before any image is."""
    run_dir, _ = finished_run
    for split, seed in (("train", 0), ("val", 50)):
        for c in ("a", "b"):
            make_images(tmp_path / split / c, 3, size=(32, 32), seed=seed + ord(c))
    code, _, err = cli("embed", str(tmp_path / "train"), "--run", str(run_dir), "--out", str(tmp_path / "tf"),
                       capsys=capsys)
    assert code == 0, err
    work = tmp_path / "work"  # no runs here: the default model would be DINOv2, which is not on this machine
    work.mkdir()
    code, out, err = cli("eval", "knn", "--train", str(tmp_path / "tf"), "--val", str(tmp_path / "val"), "--k", "3",
                         "--json", "--out", str(tmp_path / "knn.json"), cwd=work, capsys=capsys)
    assert code == 0, err
    assert f"(the model of {tmp_path / 'tf'})" in err
    val = Features(work / json.loads(out)["val"])
    assert val.model["fingerprint"] == Features(tmp_path / "tf").model["fingerprint"]
    code, _, err = cli("eval", "knn", "--train", str(tmp_path / "tf"), "--val", str(tmp_path / "val"), "--run",
                       str(run_dir), "--random-init", "--k", "3", cwd=work, capsys=capsys)
    assert code == 2 and "come from another model" in err and "leave the model out" in err, err
    assert sorted(p.name for p in (work / "features").iterdir()) == [val.path.parent.name]  # nothing embedded
    # a review (2026-12-06): images prepared otherwise than the features (another --resize, --resolution) were
    # refused only once embedded; now before, with the options that embed them as the features were
    embedded = sorted(p.name for p in (work / "features").rglob("*"))
    code, _, err = cli("eval", "knn", "--train", str(tmp_path / "tf"), "--val", str(tmp_path / "val"), "--resize",
                       "center-crop", "--k", "3", cwd=work, capsys=capsys)
    assert code == 2 and "were embedded with resize square, and the images beside them would be embedded with " \
                         "resize center-crop; give --resize square to embed them so" in " ".join(err.split()), err
    code, _, err = cli("embed", str(tmp_path / "train"), "--run", str(run_dir), "--resolution", "48", "--dense",
                       "--out", str(tmp_path / "tf48"), capsys=capsys)
    assert code == 0, err
    for folder in ("train-masks", "val-masks"):
        (tmp_path / folder).mkdir()
    code, _, err = cli("eval", "knn-seg", "--train", str(tmp_path / "tf48"), "--train-masks", str(tmp_path / "train-masks"),
                       "--val", str(tmp_path / "val"), "--val-masks", str(tmp_path / "val-masks"), cwd=work, capsys=capsys)
    assert code == 2 and "were embedded with resolution 48, and the images beside them would be embedded with " \
                         "resolution 32; give --resolution 48 to embed them so" in " ".join(err.split()), err
    code, _, err = cli("eval", "knn", "--train", str(tmp_path / "tf48"), "--val", str(tmp_path / "val"), "--k", "3",
                       cwd=work, capsys=capsys)  # knn has no --resolution: embed says how
    assert code == 2 and "embed them so with mlsctl embed --resize square --resolution 48" in " ".join(err.split()), err
    assert sorted(p.name for p in (work / "features").rglob("*")) == embedded  # nothing embedded
    # a review (2026-12-06): features whose manifest names no fingerprint, or refined ones, got circular advice
    import shutil

    for name, change in (("no-fingerprint", lambda m: m["model"].pop("fingerprint")),
                         ("refined", lambda m: m["model"].update(refiner={"run": "r"}))):
        shutil.copytree(tmp_path / "tf", tmp_path / name)
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        change(manifest)
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
        code, _, err = cli("eval", "knn", "--train", str(tmp_path / name), "--val", str(tmp_path / "val"), "--k", "3",
                           cwd=work, capsys=capsys)
        words = "records no model to embed them with" if name == "no-fingerprint" else "are refined features"
        assert code == 2 and words in err and "--run" not in err, err


def test_a_memory_size_below_one_patch_per_image_is_said(tmp_path: Path, capsys):
    """A new user's probe (2026-12-06): --memory-size 10 for 96 images held 96 patches (one each) while the
    summary said memory=10; the same table as --memory-size 100, without a word."""
    train_dir, train_masks = _scene_data(tmp_path, "train", 8, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", 3, 4, 8, 3, seed=1)
    args = ["eval", "knn-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val", str(val_dir),
            "--val-masks", str(val_masks), "--fraction", "1/1", "--k", "5", "--out", str(tmp_path / "r.json")]
    code, out, err = cli(*args, "--memory-size", "2", capsys=capsys)
    assert code == 0 and "note: --memory-size 2 is less than one patch per training image; each image gave one " \
                          "(8 patches)" in out, err
    code, out, _ = cli(*args, "--memory-size", "16", capsys=capsys)
    assert code == 0 and "--memory-size 16 is less" not in out


def test_knn_seg_cli_records_majority_patch_labels(tmp_path: Path, capsys):
    train_dir, train_masks = _scene_data(tmp_path, "train", 8, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", 3, 4, 8, 3, seed=1)
    results = {}
    for labels in ("soft", "majority"):
        code, out, err = cli("eval", "knn-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                             str(val_dir), "--val-masks", str(val_masks), "--fraction", "1/1", "--k", "5",
                             "--patch-labels", labels, "--json", "--out", str(tmp_path / f"{labels}.json"), capsys=capsys)
        assert code == 0, err
        results[labels] = json.loads(out)
        assert results[labels]["settings"]["patch_labels"] == labels
    assert 0 < results["majority"]["results"][0]["miou"] <= 1


def test_segmentation_says_when_val_images_are_training_images(tmp_path: Path, capsys):
    """A new user's probe (2026-12-07): knn-seg and linear-seg of one folder as train and val said nothing, where
    eval knn and linear say it (41.5 % mIoU against 6.7 % on the model's own val images)."""
    train_dir, train_masks = _scene_data(tmp_path, "train", 4, 4, 8, 3, seed=0)
    for command in ("knn-seg", "linear-seg"):
        extra = ["--fraction", "1/1", "--k", "5"] if command == "knn-seg" else ["--epochs", "1"]
        code, out, err = cli("eval", command, "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                             str(train_dir), "--val-masks", str(train_masks), *extra,
                             "--out", str(tmp_path / f"{command}.json"), capsys=capsys)
        assert code == 0, err
        assert "note: 4 of the 4 val images are training images too" in out  # with the results, not before them
        assert json.loads((tmp_path / f"{command}.json").read_text())["dataset"]["val_images_in_train"] == 4
    # byte copies under other paths count too, as in eval knn and linear: one under another name, one under the
    # training image's own name (a split made by copying); a third has a training image's name but other bytes
    for split, texts in (("train", ["image 0", "image 1", "image 2", "image 3"]),
                         ("val", ["image 9", "other", "image 2", "image 1"])):
        (tmp_path / f"{split}-images").mkdir()
        for name, text in zip([f"{i:03d}.png" for i in range(4)], texts):
            (tmp_path / f"{split}-images" / name).write_text(text)
    val_dir, val_masks = _scene_data(tmp_path, "val", 4, 4, 8, 3, seed=1)
    for folder, images in ((train_dir, "train-images"), (val_dir, "val-images")):
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["input_root"] = str(tmp_path / images)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli("eval", "knn-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                         str(val_dir), "--val-masks", str(val_masks), "--fraction", "1/1", "--k", "5",
                         "--out", str(tmp_path / "copies.json"), capsys=capsys)
    assert code == 0, err
    dataset = json.loads((tmp_path / "copies.json").read_text())["dataset"]
    assert dataset["val_images_in_train"] == 2 and dataset["val_images_in_train_as_copies"] == 2, dataset
    assert "note: 2 of the 4 val images are training images too (byte copies under other paths)" in out


def test_one_class_and_unseen_val_classes_are_refused_not_scored(tmp_path: Path, capsys):
    """A new user's probe (2026-12-07): one class scored 100 % in eval knn, knn-seg and linear-seg, and val classes
    none of which train holds gave 0.00 for every k (eval linear and recall refused such data already)."""
    one = [f"only/{j}.png" for j in range(4)]
    write_feature_folder(tmp_path / "one", one, torch.randn(4, 8))
    code, _, err = cli("eval", "knn", "--train", str(tmp_path / "one"), "--val", str(tmp_path / "one"), capsys=capsys)
    assert code == 2 and "the training labels name 1 class (only)" in err and "Traceback" not in err
    write_feature_folder(tmp_path / "a", [f"{c}/{j}.png" for c in "ab" for j in range(2)], torch.randn(4, 8))
    write_feature_folder(tmp_path / "b", [f"{c}/{j}.png" for c in "cd" for j in range(2)], torch.randn(4, 8))
    code, _, err = cli("eval", "knn", "--train", str(tmp_path / "a"), "--val", str(tmp_path / "b"), capsys=capsys)
    assert code == 2 and "none of the 2 val classes occurs in training" in err and "eval recall" in err
    train_dir, train_masks = _scene_data(tmp_path, "train", 3, 4, 8, 1, seed=0)  # masks of class 0 only
    val_dir, val_masks = _scene_data(tmp_path, "val", 2, 4, 8, 1, seed=1)
    for command in ("knn-seg", "linear-seg"):
        code, _, err = cli("eval", command, "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                           str(val_dir), "--val-masks", str(val_masks), capsys=capsys)
        assert code == 2 and "hold one class (0) and no class names" in err, err


def test_a_model_given_beside_two_feature_folders_must_be_the_one_that_made_them(tmp_path: Path, finished_run, capsys):
    """A new user's probe (2026-12-07): `eval knn --train F --val F --run runs/mls`, F embedded by runs/dino, printed
    DINO's scores without a word: feature folders are evaluated as they are, so the model given was used for nothing.
    It is refused where it did not make them, and accepted where it did."""
    run_dir, _ = finished_run
    for c in ("a", "b"):
        make_images(tmp_path / "images" / c, 4, seed=ord(c))
    code, _, err = cli("embed", str(tmp_path / "images"), "--run", str(run_dir), "--out", str(tmp_path / "f"),
                       capsys=capsys)
    assert code == 0, err
    both = ["--train", str(tmp_path / "f"), "--val", str(tmp_path / "f"), "--k", "2"]
    code, out, err = cli("eval", "knn", *both, "--run", str(run_dir), "--out", str(tmp_path / "a.json"), capsys=capsys)
    assert code == 0 and "top-1" in out, err
    other = ["--run", str(run_dir), "--random-init"]  # another model: the run's architecture, randomly initialised
    code, out, err = cli("eval", "knn", *both, *other, "--out", str(tmp_path / "b.json"), capsys=capsys)
    assert code == 2 and f"were made by {run_dir / 'teacher.safetensors'}, not by" in err, err
    assert "the model given would not be used" in err and "top-1" not in out
    code, _, err = cli("eval", "linear", *both[:4], *other, "--out", str(tmp_path / "c.json"), capsys=capsys)
    assert code == 2 and "the model given would not be used" in err, err


def test_images_without_labels_are_refused_before_anything_is_embedded(tmp_path: Path, finished_run, capsys):
    """A new user's probe (2026-12-07): `eval knn --train scenes/train/images --val scenes/val/images --run RUN`
    embedded all 500 images, then said they lie outside class folders, without naming the labels.csv beside them."""
    run_dir, _ = finished_run
    for split in ("train", "val"):
        images = tmp_path / split / "images"
        images.mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * j, np.uint8)).save(images / f"{j}.png")
        (tmp_path / split / "labels.csv").write_text("".join(f"{j}.png,c{j % 2}\n" for j in range(3)))
    args = ["--train", str(tmp_path / "train" / "images"), "--val", str(tmp_path / "val" / "images"), "--run",
            str(run_dir)]
    code, _, err = cli("eval", "knn", *args, "--out", str(tmp_path / "a.json"), capsys=capsys)
    assert code == 2 and "0.png is not inside a class folder" in err and "model:" not in err, err
    assert f"give it with --train-labels (there is one beside the images: {tmp_path / 'train' / 'labels.csv'})" in err
    code, _, err = cli("eval", "knn", *args, "--train-labels", str(tmp_path / "train" / "labels.csv"), "--out",
                       str(tmp_path / "b.json"), capsys=capsys)
    assert code == 2 and "give it with --val-labels" in err and "model:" not in err, err
    code, out, err = cli("eval", "knn", *args, "--train-labels", str(tmp_path / "train" / "labels.csv"),
                         "--val-labels", os.path.relpath(tmp_path / "val" / "labels.csv"), "--k", "1", "--out",
                         str(tmp_path / "c.json"), capsys=capsys)
    assert code == 0 and "top-1" in out, err
    # both labels files recorded, absolute as the image folders beside them (given relative here)
    dataset = json.loads((tmp_path / "c.json").read_text())["dataset"]
    assert dataset["val_labels"] == str(tmp_path / "val" / "labels.csv") and dataset["val_root"] == \
        str(tmp_path / "val" / "images")


def test_val_classes_partly_unseen_because_they_hold_training_classes_say_so(tmp_path: Path, capsys):
    """A new user's probe (2026-12-07): where some val classes occur in training and others are folders holding
    training classes (val/Boots/ against train/Boots/sub0/), the note named the unseen classes only; it says why and
    what to do, as the refusal of wholly unseen classes does (eval knn and eval linear)."""
    names = [f"{c}/{j}.png" for c in ("Boots/sub0", "Sandal") for j in range(4)]
    write_feature_folder(tmp_path / "tr", names, torch.randn(8, 8))
    write_feature_folder(tmp_path / "va", [f"{c}/{j}.png" for c in ("Boots", "Sandal") for j in range(2)],
                         torch.randn(4, 8))
    hint = ("the val class Boots is a folder holding the training classes Boots/sub0, as each image's own folder is "
            "its class; to compare them as one class, give labels files (CSV or JSONL of path,label) with "
            "--train-labels and --val-labels")
    for command in ("knn", "linear"):
        code, out, err = cli("eval", command, "--train", str(tmp_path / "tr"), "--val", str(tmp_path / "va"), "--out",
                             str(tmp_path / f"{command}.json"), capsys=capsys)
        assert code == 0 and "never occurs in train" in out and hint in out, (command, out, err)
        assert json.loads((tmp_path / f"{command}.json").read_text())["val_classes_unseen_hint"] == hint


def test_the_knn_seg_memory_is_the_concatenation_of_its_pieces(monkeypatch):
    """The memory is gathered in blocks (a peak of its size plus one block, not twice its size)."""
    from mlsctl.evaluate.knn_seg import _Rows

    generator = torch.Generator().manual_seed(0)
    pieces = [torch.randn(int(n), 3, generator=generator) for n in torch.randint(0, 9, (40,), generator=generator)]
    for block_rows in (1, 7, 10_000):
        monkeypatch.setattr(_Rows, "BLOCK_ROWS", block_rows)
        rows = _Rows()
        for piece in pieces:
            rows.append(piece)
        assert len(rows) == sum(len(p) for p in pieces)
        assert torch.equal(rows.cat(), torch.cat(pieces)), block_rows


def test_knn_and_linear_refuse_features_that_hold_nan_or_inf(tmp_path: Path, capsys):
    """A probe (2026-12-06): eval recall refused NaN and inf embeddings, eval knn and eval linear scored them."""
    from conftest import cli

    names = [f"c{i % 2}/{i}.png" for i in range(8)]
    good = write_feature_folder(tmp_path / "good", names, torch.randn(8, 4))
    x = torch.randn(8, 4)
    x[3, 1], x[6, 0] = float("nan"), float("inf")
    bad = write_feature_folder(tmp_path / "bad", names, x)
    for command in (["knn", "--train", str(good), "--val", str(bad), "--k", "1"],
                    ["linear", "--train", str(bad), "--val", str(good), "--epochs", "1", "--lr", "0.1", "--wd", "0"]):
        code, _, err = cli("eval", *command, capsys=capsys)
        assert code == 2 and f"features {bad}: 2 of 8 embeddings hold NaN or inf (first: c1/3.png)" in err, err


def test_linear_refuses_learning_rates_and_decays_it_cannot_train_with(tmp_path: Path, capsys):
    """A probe (2026-12-06): --lr -1 and --wd -1 were internal errors, --lr nan and --lr 0 were accepted."""
    from conftest import cli

    feats = write_feature_folder(tmp_path / "f", [f"c{i % 2}/{i}.png" for i in range(8)], torch.randn(8, 4))
    for option, value in (("--lr", "-1"), ("--lr", "nan"), ("--lr", "0"), ("--wd", "-1"), ("--wd", "inf")):
        code, _, err = cli("eval", "linear", "--train", str(feats), "--val", str(feats), option, value, "--epochs", "1",
                           capsys=capsys)
        assert code == 2 and f"{option} {float(value)}: every value must be a finite number" in err, (option, value, err)


def test_a_missing_image_folder_is_said_before_a_model_loads(tmp_path: Path, capsys):
    """A probe (2026-12-06): eval knn and linear-seg loaded (or looked for) a model before seeing their folder was
    not there."""
    from conftest import cli

    code, _, err = cli("eval", "knn", "--train", str(tmp_path / "nope"), "--val", str(tmp_path / "nope2"), capsys=capsys)
    assert code == 2 and f"--train {tmp_path / 'nope'} does not exist" in err and "model" not in err, err
    # a review (2026-12-06): a missing --val, masks or labels file was found after --train had been embedded
    images = make_images(tmp_path / "images", 4)
    (tmp_path / "masks").mkdir()
    for command, missing in (
            (["knn", "--train", str(images), "--val", str(tmp_path / "nope")], "--val"),
            (["knn", "--train", str(images), "--val", str(images), "--train-labels", str(tmp_path / "l.csv")],
             "--train-labels"),
            (["linear", "--train", str(images), "--val", str(images), "--val-labels", str(tmp_path / "l.csv")],
             "--val-labels"),
            (["linear-seg", "--train", str(images), "--train-masks", str(tmp_path / "masks"), "--val", str(images),
              "--val-masks", str(tmp_path / "nope")], "--val-masks"),
            (["knn-seg", "--train", str(images), "--train-masks", str(tmp_path / "nope"), "--val", str(images),
              "--val-masks", str(tmp_path / "masks")], "--train-masks")):
        code, _, err = cli("eval", *command, capsys=capsys)
        assert code == 2 and f"{missing} " in err and "does not exist" in err and "model" not in err, (command, err)


def test_knn_seg_without_a_model_builds_no_benchmark_first(tmp_path: Path):
    """A new user's run-through (2026-12-06): in a folder without runs it built the 2,000/500-scene benchmark,
    then said that there was no model."""
    result = in_process("eval", "knn-seg", cwd=tmp_path)
    assert result.returncode == 2 and "no model given" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_the_note_on_shared_val_images_counts_files_and_copies_apart():
    from mlsctl.evaluate.inputs import shared_images_note

    note = shared_images_note({"val_images_in_train": 3, "val_images_in_train_as_copies": 2}, 10)
    assert "3 of the 10 val images are training images too (1 the same file, 2 byte copies under other paths)" in note
    note = shared_images_note({"val_images_in_train": 3, "val_images_in_train_as_copies": 1}, 10)
    assert "(2 the same files, 1 byte copy under other paths)" in note
    assert "(a byte copy under another path)" in shared_images_note({"val_images_in_train": 1,
                                                                     "val_images_in_train_as_copies": 1}, 10)
    assert "1 of the 10 val images are training images too (the same file)" in shared_images_note(
        {"val_images_in_train": 1}, 10)


def test_evaluations_name_the_images_they_could_not_read_and_record_them(tmp_path: Path, finished_run, capsys):
    """A new user's probe (2026-12-08): eval knn with a truncated and a 0-byte PNG among the val images said
    "embedded 8 images" and scored 8 of 10, naming neither file, and its result said nothing of them."""
    run_dir, _ = finished_run
    for split, seed in (("train", 0), ("val", 50)):
        for c in ("a", "b"):
            make_images(tmp_path / split / c, 3, size=(32, 32), seed=seed + ord(c))
    (tmp_path / "val" / "a" / "empty.png").write_bytes(b"")
    whole = (tmp_path / "val" / "a" / "img_001.png").read_bytes()
    (tmp_path / "val" / "b" / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "val" / "b" / "readme.txt").write_text("not an image, not counted")
    for command, extra in (("knn", ["--k", "3"]), ("linear", ["--epochs", "1", "--lr", "0.1", "--wd", "0"])):
        for time in range(2):  # embedded, then read from the evaluations' cache: said both times
            code, out, err = cli("eval", command, "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                                 "--run", str(run_dir), *extra, "--json", "--out",
                                 str(tmp_path / f"{command}{time}.json"), cwd=tmp_path, capsys=capsys)
            assert code == 0, err
            assert "val features: 2 image files of" in err and "could not be read and are not scored" in err, err
            note = next(line for line in err.splitlines() if "could not be read" in line)
            assert "a/empty.png" in note and "b/cut.png" in note and "readme.txt" not in note
            dataset = json.loads(out)["dataset"]
            assert dataset["val_images_skipped"] == 2 and dataset["train_images_skipped"] == 0
            assert sorted(dataset["val_images_skipped_files"]) == ["a/empty.png", "b/cut.png"]
            assert "train_images_skipped_files" not in dataset and dataset["val_images_in_train"] == 0


def test_image_options_beside_two_feature_folders_are_refused_not_ignored(tmp_path: Path, capsys):
    """A new user's probe (2026-12-08): --resize with feature folders (knn, linear) and --resolution (knn-seg,
    linear-seg) ran as if heard; knn-seg's result recorded no resolution. Refused as a model given beside them is."""
    train_dir, train_masks = _scene_data(tmp_path, "train", 4, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", 2, 4, 8, 3, seed=1)
    for command in ("knn", "linear"):
        code, _, err = cli("eval", command, "--train", str(train_dir), "--val", str(val_dir), "--resize",
                           "center-crop", capsys=capsys)
        assert code == 2 and "--resize center-crop applies when images are embedded" in err, err
        assert "leave --resize out" in err and "Traceback" not in err
    for command in ("knn-seg", "linear-seg"):
        code, _, err = cli("eval", command, "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                           str(val_dir), "--val-masks", str(val_masks), "--resolution", "64", capsys=capsys)
        assert code == 2 and "--resolution 64 applies when images are embedded" in err, err


def test_notes_go_to_stderr_under_json(tmp_path: Path, capsys):
    """A new user's probe (2026-12-08): `eval knn-seg --memory-size 1 --fraction 1/64 1/128 --json` dropped its
    notes (neither stderr nor the JSON). Under --json stdout is the JSON alone and the notes go to stderr."""
    train_dir, train_masks = _scene_data(tmp_path, "train", 4, 4, 8, 3, seed=0)
    code, out, err = cli("eval", "knn-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                         str(train_dir), "--val-masks", str(train_masks), "--memory-size", "1", "--fraction", "1/64",
                         "1/128", "--k", "5", "--json", "--out", str(tmp_path / "seg.json"), capsys=capsys)
    assert code == 0, err
    json.loads(out)  # the JSON alone
    assert "note: fractions 1/64, 1/128 all use 1 training image" in err
    assert "note: --k 5 is more than the memory of some runs holds" in err
    assert "note: 4 of the 4 val images are training images too" in err
    code, out, err = cli("eval", "linear-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                         str(train_dir), "--val-masks", str(train_masks), "--epochs", "1", "--json", "--out",
                         str(tmp_path / "lseg.json"), capsys=capsys)
    assert code == 0 and json.loads(out) and "note: 4 of the 4 val images are training images too" in err, err


@pytest.mark.parametrize("command", ["knn", "linear", "knn-seg", "linear-seg", "retrieval", "recall"])
def test_an_out_ending_in_a_slash_names_a_folder_and_is_refused(command, tmp_path: Path, capsys):
    """A new user's probe (2026-12-08): `--out newdir2/` (no such folder) wrote a file called newdir2."""
    code, _, err = cli("eval", command, "--out", str(tmp_path / "newdir2") + "/", capsys=capsys)
    assert code == 2 and f"--out {tmp_path / 'newdir2'}/ names a folder; give a file such as " \
                         f"{tmp_path / 'newdir2'}/results.json" in err, err
    assert not (tmp_path / "newdir2").exists()


def test_knn_seg_computes_an_equal_fraction_once_and_says_so(tmp_path: Path, capsys):
    """A new user's probe (2026-12-08): --fraction 1/8 0.125 computed the same fraction twice, then blamed "too few
    training images" for their equal scores."""
    train_dir, train_masks = _scene_data(tmp_path, "train", 8, 4, 8, 3, seed=0)
    val_dir, val_masks = _scene_data(tmp_path, "val", 2, 4, 8, 3, seed=1)
    code, out, err = cli("eval", "knn-seg", "--train", str(train_dir), "--train-masks", str(train_masks), "--val",
                         str(val_dir), "--val-masks", str(val_masks), "--fraction", "1/8", "0.125", "1/1", "--k", "5",
                         "--json", "--out", str(tmp_path / "seg.json"), capsys=capsys)
    assert code == 0, err
    assert [r["fraction"] for r in json.loads(out)["results"]] == ["1/8", "1/1"]
    assert "note: --fraction 0.125 is 1/8, given already; it is computed once" in err
    assert "too few training images" not in err
