"""eval linear-seg: a linear layer on frozen patch features, scored like knn-seg."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import cli, cli_ok, write_feature_folder


def _split(tmp_path, name: str, n: int, seed: int, informative: bool = True):
    """n images of a 4x4 patch grid, masks 16x16 with one class (0-2) per patch; the features of a
    patch are its class's direction plus noise (or pure noise)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes = torch.eye(3, 8) * 3
    files, dense = [], []
    (tmp_path / name / "masks").mkdir(parents=True)
    for i in range(n):
        grid = rng.integers(0, 3, size=(4, 4))
        Image.fromarray(np.kron(grid, np.ones((4, 4))).astype(np.uint8), mode="L").save(
            tmp_path / name / "masks" / f"{i:03d}.png")
        signal = classes[torch.from_numpy(grid)] if informative else 0
        dense.append(signal + 0.3 * torch.randn(4, 4, 8, generator=g))
        files.append(f"{i:03d}.png")
    dense = torch.stack(dense)
    return write_feature_folder(tmp_path / f"feats-{name}", files, dense.mean((1, 2)), dense,
                                input_root=tmp_path / name / "images")


def test_separable_patches_are_segmented_perfectly(tmp_path, capsys):
    train, val = _split(tmp_path, "train", 24, 0), _split(tmp_path, "val", 8, 1)
    out, _ = cli_ok(capsys, "eval", "linear-seg", "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                    "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), "--epochs", "20",
                    "--batch-size", "8", "--json", "--out", str(tmp_path / "r.json"))
    result = json.loads(out)
    assert result["miou"] > 0.9 and result["num_classes"] == 3  # bilinear upsampling blurs patch borders only
    assert result["train_loss_per_epoch"][-1] < result["train_loss_per_epoch"][0]
    assert sum(map(sum, result["confusion"])) == 8 * 16 * 16
    assert result["predicted_classes"] == ["0", "1", "2"]
    # the constant rule: every pixel the training patches' most frequent class, scored on the same val pixels
    from mlsctl.evaluate.segmentation import constant_rule

    majority = result["classes"].index(result["chance"]["majority_class"])
    assert result["chance"]["miou"] == pytest.approx(constant_rule(np.array(result["confusion"]), majority)["miou"])
    assert result["chance"]["miou"] < 0.5 < result["miou"]


def test_a_probe_that_predicts_one_class_everywhere_is_flagged():
    # a new user's probe (2026-12-07): a probe predicting background for every pixel was shown as any other result
    from mlsctl.evaluate.linear_seg import one_class_note
    from mlsctl.report import _evaluation

    result = {"command": "eval linear-seg", "miou": 0.066, "foreground_iou": 0.0, "pixel_accuracy": 0.66,
              "predicted_classes": ["background"]}
    note = one_class_note(result)
    assert note.startswith("note: the probe predicts background for every val pixel")
    assert note in html.unescape(_evaluation(result, Path("r.json"), "final teacher"))
    assert one_class_note({**result, "predicted_classes": ["background", "bag"]}) == ""
    assert one_class_note({"miou": 0.1}) == ""  # results before it was recorded


def test_noise_features_do_not_segment(tmp_path, capsys):
    train = _split(tmp_path, "train", 24, 0, informative=False)
    val = _split(tmp_path, "val", 8, 1, informative=False)
    out, _ = cli_ok(capsys, "eval", "linear-seg", "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                    "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), "--epochs", "5", "--json",
                    "--out", str(tmp_path / "r.json"))
    assert json.loads(out)["miou"] < 0.5


def test_features_without_dense_maps_are_one_sentence(tmp_path, capsys):
    folder = write_feature_folder(tmp_path / "g", ["a.png"], torch.randn(1, 8))
    (tmp_path / "m").mkdir()
    code, _, err = cli("eval", "linear-seg", "--train", str(folder), "--train-masks", str(tmp_path / "m"), "--val",
                       str(folder), "--val-masks", str(tmp_path / "m"), capsys=capsys)
    assert code != 0 and "has no dense features" in err and len(err.strip().splitlines()) == 1


def test_the_soft_label_cache_gives_back_the_dense_labels_and_keeps_only_their_non_zeros():
    """Kept for every training image across epochs, dense soft labels cost h·w·C floats an image
    (about 12 GiB for ADE20K at 512 px); the cache keeps non-zeros and gives back the same rows."""
    from mlsctl.evaluate.knn_seg import patch_soft_labels
    from mlsctl.evaluate.linear_seg import SoftLabelCache

    rng = np.random.default_rng(0)
    cache, reads = SoftLabelCache(150, 255), []
    masks = {0: np.kron(rng.integers(0, 150, size=(8, 8)), np.ones((8, 8), dtype=np.int64)),  # one class a patch
             1: rng.integers(0, 150, size=(61, 47)),  # patch cells sharing rows and columns, many classes a patch
             2: np.full((16, 16), 255)}  # every pixel ignored: all-zero rows
    masks[1][rng.random(masks[1].shape) < 0.2] = 255
    for _ in range(2):  # the second pass reads the cache, not the masks
        for row, mask in masks.items():
            got = cache.get(row, lambda mask=mask, row=row: reads.append(row) or mask, (8, 8))
            assert torch.equal(got, patch_soft_labels(mask, (8, 8), 150, 255))
    assert reads == [0, 1, 2]
    one_class = 8 * 64  # 64 patches of one class: one entry each
    cache = SoftLabelCache(150, 255)
    cache.get(0, lambda: masks[0], (8, 8))
    assert cache.nbytes() == one_class  # against 64 x 150 x 4 bytes dense: 1/75
    # the class mass (the constant rule's class) is the dense rows' sum
    assert torch.allclose(cache.class_mass(), patch_soft_labels(masks[0], (8, 8), 150, 255).sum(0).double())


def test_a_mask_value_outside_the_named_classes_is_one_sentence_in_both_evaluations(tmp_path, capsys):
    """A probe (2026-12-06): with meta.json naming 3 classes, val masks holding 42 made a 43-class confusion
    matrix (a lower mIoU, exit 0), and training masks holding it an internal error of linear-seg."""
    train, val = _split(tmp_path, "train", 8, 0), _split(tmp_path, "val", 4, 1)
    for split in ("train", "val"):
        (tmp_path / split / "meta.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    out, _ = cli_ok(capsys, "eval", "linear-seg", "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                    "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), "--epochs", "1", "--json")
    assert json.loads(out)["classes"] == ["a", "b", "c"]  # the names are read
    assert "foreground_iou" not in json.loads(out)  # class 0 is no background (a review, 2026-12-06: ADE20K's "wall")
    (tmp_path / "train" / "meta.json").write_text(json.dumps({"classes": ["background", "b", "c"]}))
    # a probe (2026-12-06): val's own meta.json was ignored, so two class lists could disagree silently
    code, _, err = cli("eval", "linear-seg", "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                       "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), "--epochs", "1", capsys=capsys)
    assert code == 2 and "class names of the training masks" in err and "differ" in err, err
    (tmp_path / "val" / "meta.json").write_text(json.dumps({"classes": ["background", "b", "c"]}))
    out, _ = cli_ok(capsys, "eval", "linear-seg", "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                    "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), "--epochs", "1", "--json")
    assert 0 <= json.loads(out)["foreground_iou"] <= 1
    for split in ("val", "train"):
        broken = tmp_path / split / "masks" / "001.png"
        mask = np.array(Image.open(broken))
        mask[0, 0] = 42
        Image.fromarray(mask).save(broken)
        for command in (["linear-seg", "--epochs", "1"], ["knn-seg", "--fraction", "1/1"]):
            code, _, err = cli("eval", *command, "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                               "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), capsys=capsys)
            assert code == 2 and f"mask {broken} holds class 42, but the class names (meta.json) give 3 classes" in err, \
                (split, command, err)


def test_a_mask_in_the_raw_order_of_a_turned_image_is_one_sentence(tmp_path, capsys):
    """A review (2026-12-06): images are turned by their EXIF orientation, masks are not, and predictions are
    upsampled to whatever shape the mask has: a phone photo's mask in raw pixel order was scored transposed.
    Masks of another aspect that line up (resized whole to a square, as for the model) are scored."""
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees: 40 x 60 (w x h) of raw pixels shows as 60 x 40
    for i in range(4):
        Image.new("RGB", (40, 60), (50 * i, 0, 0)).save(images / f"{i}.jpg", exif=exif)
    files = [f"{i}.jpg" for i in range(4)]
    feats = write_feature_folder(tmp_path / "f", files, torch.randn(4, 8), torch.randn(4, 2, 2, 8), input_root=images)
    for masks, shape, fine in (("raw", (60, 40), False), ("shown", (40, 60), True), ("half", (20, 30), True),
                               ("square", (32, 32), True)):  # resized whole, as the model sees the image: lines up
        (tmp_path / masks).mkdir()
        for i in range(4):
            Image.fromarray((np.arange(shape[0] * shape[1]).reshape(shape) % 2).astype(np.uint8)).save(
                tmp_path / masks / f"{i}.png")
        code, _, err = cli("eval", "linear-seg", "--train", str(feats), "--train-masks", str(tmp_path / masks), "--val",
                           str(feats), "--val-masks", str(tmp_path / masks), "--epochs", "1", capsys=capsys)
        if fine:
            assert code == 0, (masks, err)
        else:
            assert code == 2 and "is 40x60 px, the raw pixel order of its image" in err and "as 60x40" in err, err


def test_training_masks_with_no_labelled_pixel_are_one_sentence_and_an_unlabelled_batch_is_skipped(tmp_path, capsys):
    """A review (2026-12-06): linear-seg trained on training masks that were all the ignore label, with loss nan,
    and printed a made-up mIoU with exit 0. One batch of unlabelled masks among labelled ones made the loss of
    that batch NaN, and with it the layer."""
    from mlsctl.evaluate.knn_seg import FeatureMasks
    from mlsctl.evaluate.linear_seg import train_linear_seg
    from mlsctl.features import Features

    train = _split(tmp_path, "train", 16, 0)
    masks = sorted((tmp_path / "train" / "masks").iterdir())
    for mask in masks[:8]:  # the first batch of 8 labels nothing
        Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(mask)
    layer, _, _, losses = train_linear_seg(FeatureMasks(Features(train), tmp_path / "train" / "masks", "train"), 3,
                                           epochs=2, image_batch=8)
    assert all(np.isfinite(losses)) and bool(torch.isfinite(layer.weight).all())
    for mask in masks[8:]:
        Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(mask)
    val = _split(tmp_path, "val", 4, 1)
    code, _, err = cli("eval", "linear-seg", "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                       "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), "--epochs", "1", capsys=capsys)
    assert code == 2 and "the training masks label no patch" in err, err


def test_val_masks_with_no_labelled_pixel_are_one_sentence(tmp_path, capsys):
    """A probe (2026-12-06): val masks that are all the ignore label gave "mIoU -%" with exit 0."""
    train, val = _split(tmp_path, "train", 8, 0), _split(tmp_path, "val", 4, 1)
    for mask in (tmp_path / "val" / "masks").iterdir():
        Image.fromarray(np.full((16, 16), 255, dtype=np.uint8)).save(mask)
    for command in (["linear-seg", "--epochs", "1"], ["knn-seg", "--fraction", "1/1"]):
        code, _, err = cli("eval", *command, "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
                           "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), capsys=capsys)
        assert code == 2 and "no pixel of the val masks" in err and "nothing to score" in err, (command, err)


def test_a_diverged_probe_is_flagged_and_said_naming_lr(tmp_path, capsys):
    """A new user's probe (2026-12-08): --lr 1e30 reported a train loss of 9.4e29 and an mIoU with no warning."""
    train, val = _split(tmp_path, "train", 16, 0, informative=False), _split(tmp_path, "val", 4, 1)
    args = ["eval", "linear-seg", "--train", str(train), "--train-masks", str(tmp_path / "train" / "masks"),
            "--val", str(val), "--val-masks", str(tmp_path / "val" / "masks"), "--epochs", "2"]
    out, _ = cli_ok(capsys, *args, "--lr", "1e30", "--out", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["diverged"] is True and 0 < result["train_loss_initial"] < 5
    assert "note: the probe diverged (training loss" in out and "give a smaller --lr than 1e+30" in out, out
    out, _ = cli_ok(capsys, *args, "--lr", "0.01", "--out", str(tmp_path / "ok.json"))
    assert json.loads((tmp_path / "ok.json").read_text())["diverged"] is False and "the probe diverged" not in out
