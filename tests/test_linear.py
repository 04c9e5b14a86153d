"""eval linear: the probe, its metrics, multi-label tags from fmnist-scenes, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from mlsctl.evaluate.linear import (ProbeSettings, average_precision, mean_average_precision, predict, read_multi_labels,
                                    train_linear)

from conftest import cli, cli_ok, write_feature_folder
from mlsctl.errors import UserError


def test_average_precision_matches_a_hand_computed_case():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positives = torch.tensor([True, False, True, False, True])
    # precision at the positives' ranks: 1/1, 2/3, 3/5
    assert average_precision(scores, positives) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    targets = torch.tensor([[1, 0], [0, 0], [1, 1], [0, 0], [1, 0]])
    scores2 = torch.stack([scores, torch.tensor([0.1, 0.2, 0.9, 0.3, 0.4])], 1)
    value, aps = mean_average_precision(scores2, targets)
    assert aps[1] == 1.0 and value == pytest.approx(((1 + 2 / 3 + 3 / 5) / 3 + 1) / 2)
    value, aps = mean_average_precision(scores2, torch.tensor([[1, 0]] * 5))
    assert value == 1.0 and aps[1] != aps[1]  # a class without positives is left out (NaN)


def test_average_precision_of_tied_scores_does_not_depend_on_the_rows_order():
    """An API probe (2026-12-05): equal scores were ranked by row, so a model giving every image the same score
    got AP 1.0 or 0.42 depending on where the positives sat. Tied scores are one threshold (scikit-learn's rule)."""
    positives = torch.tensor([True, True, False, False])
    for order in (positives, positives.flip(0)):
        assert average_precision(torch.zeros(4), order) == pytest.approx(0.5)  # precision 2/4 at recall 1
    # two thresholds: {0.9: one positive, one negative} then {0.1: one positive}: 1/2 * 1/2 + 1/2 * 2/3
    scores, hits = torch.tensor([0.9, 0.9, 0.1]), torch.tensor([False, True, True])
    assert average_precision(scores, hits) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision(scores, torch.tensor([True, False, True])) == average_precision(scores, hits)  # tied rows swapped


def test_the_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)
    layer, mean, std = train_linear(x, y, ProbeSettings(0.1, 0.0, epochs=30, batch_size=64), multi_label=False)
    assert (predict(layer, mean, std, x).argmax(1) == y).float().mean() == 1.0
    tags = torch.stack([(y == 0) | (y == 1), (y == 2)], 1).float()  # two overlapping tags
    layer, mean, std = train_linear(x, tags, ProbeSettings(0.1, 0.0, epochs=30, batch_size=64), multi_label=True)
    assert mean_average_precision(predict(layer, mean, std, x), tags)[0] == pytest.approx(1.0)


def test_scenes_jsonl_is_a_multi_label_file(tmp_path):
    (tmp_path / "scenes.jsonl").write_text(
        json.dumps({"image": "images/000000.png", "items": [{"class_name": "bag"}, {"class_name": "sandal"},
                                                             {"class_name": "bag"}]}) + "\n")
    assert read_multi_labels(tmp_path / "scenes.jsonl") == {"images/000000.png": ["bag", "sandal"]}
    (tmp_path / "tags.csv").write_text("path,tags\na.png,cat;dog\n")
    assert read_multi_labels(tmp_path / "tags.csv") == {"a.png": ["cat", "dog"]}


def _folders(tmp_path, multi: bool):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(3, 8, generator=g) * 4
    names = ["bag", "coat", "shirt"]
    folders = {}
    for split, n in (("train", 60), ("val", 30)):
        y = torch.arange(n) % 3
        x = centres[y] + 0.5 * torch.randn(n, 8, generator=g)
        images = tmp_path / split / "images"
        files = [f"{names[c]}/{i:03d}.png" if not multi else f"{i:06d}.png" for i, c in enumerate(y.tolist())]
        folders[split] = write_feature_folder(tmp_path / f"feats-{split}", files, x, input_root=images)
        if multi:  # scenes.jsonl beside images/, paths relative to it; the second tag is always 'floor'
            images.mkdir(parents=True)
            (tmp_path / split / "scenes.jsonl").write_text("".join(
                json.dumps({"image": f"images/{f}", "items": [{"class_name": names[c]}, {"class_name": "floor"}]}) + "\n"
                for f, c in zip(files, y.tolist())))
    return folders


def test_cli_single_label_from_folder_names(tmp_path, capsys):
    folders = _folders(tmp_path, multi=False)
    out, _ = cli_ok(capsys, "eval", "linear", "--train", str(folders["train"]), "--val", str(folders["val"]),
                    "--epochs", "20", "--out", str(tmp_path / "r.json"))
    assert " chosen" in out and " yes" in out and "top-1 100.00%" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["results"]["top1"] == 1.0 and len(result["sweep"]) == 8 and result["classes"] == 3
    assert result["protocol"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto


def test_cli_multi_label_map_from_scenes_jsonl(tmp_path, capsys):
    folders = _folders(tmp_path, multi=True)
    out, _ = cli_ok(capsys, "eval", "linear", "--train", str(folders["train"]), "--val", str(folders["val"]),
                    "--multi-label", "--train-labels", str(tmp_path / "train" / "scenes.jsonl"),
                    "--val-labels", str(tmp_path / "val" / "scenes.jsonl"), "--epochs", "20", "--lr", "0.1",
                    "--wd", "0", "--json", "--out", str(tmp_path / "r.json"))
    result = json.loads(out)
    assert result["multi_label"] and result["classes"] == 4 and result["results"]["mAP"] == pytest.approx(1.0)
    assert result["sweep"] == [] and result["chosen"] == {"lr": 0.1, "weight_decay": 0.0}


def test_cli_errors_are_one_sentence(tmp_path, capsys):
    folders = _folders(tmp_path, multi=True)
    code, _, err = cli("eval", "linear", "--train", str(folders["train"]), "--val", str(folders["val"]),
                       "--multi-label", capsys=capsys)
    assert code != 0 and "--multi-label needs --train-labels" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text('{"image": "images/x.png"}\n')
    code, _, err = cli("eval", "linear", "--train", str(folders["train"]), "--val", str(folders["val"]),
                       "--multi-label", "--train-labels", str(tmp_path / "bad.jsonl"), capsys=capsys)
    assert code != 0 and "bad.jsonl:1 is not a JSON object" in err
    # a docs probe (2026-12-05): the train file named for the val images too (the default) lacks them
    code, _, err = cli("eval", "linear", "--train", str(folders["train"]), "--val", str(folders["val"]),
                       "--multi-label", "--train-labels", str(tmp_path / "train" / "scenes.jsonl"), capsys=capsys)
    assert code == 2 and "give the val images' tags with --val-labels" in err
    # a review (2026-12-07): the images folder is named, as labels are said, not "val features"
    assert f"has no tags for 30 images of val images {tmp_path / 'val' / 'images'} (first: 000000.png)" in err, err
    # a new-user probe (2026-12-05): --holdout 0 with a sweep silently trained the first lr and wd given
    single = _folders(tmp_path / "single", multi=False)
    code, _, err = cli("eval", "linear", "--train", str(single["train"]), "--val", str(single["val"]), "--holdout", "0",
                       "--lr", "1", "0.001", capsys=capsys)
    assert code == 2 and "--holdout 0 leaves no images to choose among 2 learning rates and 2 weight decays" in err
    # a new user's probe (2026-12-06): --holdout 0.01 held out one image, every setting tied, the first "chosen"
    code, out, err = cli("eval", "linear", "--train", str(single["train"]), "--val", str(single["val"]), "--holdout",
                         "0.01", "--epochs", "2", "--lr", "0.01", "0.1", "--wd", "0", "--out", str(tmp_path / "tiny.json"),
                         capsys=capsys)
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert code == 0 and saved["protocol"]["holdout_images"] == 1, err
    assert [r["top1"] for r in saved["sweep"]] == [1.0, 1.0]
    assert "scored the same on the 1 held-out image, so the first was chosen" in out, out


def test_binary_labels_and_metrics_files_are_one_sentence(tmp_path, capsys, finished_run):
    folders = _folders(tmp_path, multi=False)
    (tmp_path / "bin.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    code, _, err = cli("eval", "linear", "--train", str(folders["train"]), "--val", str(folders["val"]),
                       "--train-labels", str(tmp_path / "bin.csv"), capsys=capsys)
    assert code != 0 and "is not UTF-8 text" in err and len(err.strip().splitlines()) == 1
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    (run / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = cli("plot", str(run), "--out", str(tmp_path / "c.png"), capsys=capsys)
    assert code != 0 and "is not UTF-8 text" in err and len(err.strip().splitlines()) == 1


def test_the_library_refuses_a_sweep_torch_cannot_train_as_the_cli_does():
    """A code-health review (2026-12-07): the check of --lr and --wd lived in the CLI alone, so a library
    call with lrs=[-1] met torch's "Invalid learning rate" (and nan trained)."""
    from mlsctl.evaluate.linear import evaluate_linear

    for lrs, wds, said in (([-1.0], [0.0], "--lr -1.0"), ([float("nan")], [0.0], "--lr nan"), ([0.1], [-1e-4], "--wd")):
        with pytest.raises(UserError, match=said):
            evaluate_linear(None, None, lrs=lrs, wds=wds)  # refused before the features are read


def test_a_tied_sweep_names_the_side_with_too_few_images():
    """A new user's probe (2026-12-08): --holdout 0.9 of 18 training images trained each setting on 2, every setting
    tied, and the advice was "raise --holdout", at its maximum."""
    from mlsctl.evaluate.linear import tied_sweep_note

    def result(train, held, holdout, scores=(0.25, 0.25)):
        return {"train_images": train, "protocol": {"holdout": holdout, "holdout_images": held},
                "sweep": [{"lr": 0.1 * i, "weight_decay": 0.0, "top1": s} for i, s in enumerate(scores, 1)]}

    assert tied_sweep_note(result(18, 16, 0.9)) == (
        "note: every setting scored the same on the 16 held-out images, so the first was chosen; each was trained "
        "on only 2 images (--holdout 0.9 of 18): lower --holdout or give more training images to tell them apart")
    assert tied_sweep_note(result(100, 1, 0.01)).endswith("the first was chosen; raise --holdout to tell them apart")
    assert tied_sweep_note(result(18, 16, 0.9, (0.25, 0.5))) is None


def test_a_diverged_probe_is_flagged_and_said_naming_lr(tmp_path, capsys):
    """A new user's probe (2026-12-08): eval linear-seg --lr 1e30 diverged without a word; eval linear likewise."""
    g = torch.Generator().manual_seed(0)
    folders = {}
    for split, n in (("train", 60), ("val", 30)):  # labels unrelated to the features: nothing to separate
        files = [f"{'abc'[i % 3]}/{i:03d}.png" for i in range(n)]
        folders[split] = write_feature_folder(tmp_path / f"feats-{split}", files, torch.randn(n, 8, generator=g),
                                              input_root=tmp_path / split / "images")
    args = ["eval", "linear", "--train", str(folders["train"]), "--val", str(folders["val"]), "--wd", "0",
            "--holdout", "0", "--epochs", "5"]
    out, _ = cli_ok(capsys, *args, "--lr", "1e30", "--out", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["diverged"] is True and 0 < result["train_loss"]["initial"] < 5, result["train_loss"]
    assert "note: the probe diverged (training loss" in out and "give a smaller --lr than 1e+30" in out, out
    out, _ = cli_ok(capsys, *args, "--lr", "0.01", "--out", str(tmp_path / "ok.json"))
    assert json.loads((tmp_path / "ok.json").read_text())["diverged"] is False and "the probe diverged" not in out
