"""What a score is measured against (mlsctl.evaluate.baselines): the Wilson interval, the majority-class rule
and a random ranking's mAP; and that eval knn and eval linear record and show them."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from mlsctl.evaluate.baselines import (interval_text, majority_class, random_ranking_ap, random_ranking_map,
                                       wilson_interval)
from mlsctl.evaluate.linear import average_precision, mean_average_precision

from conftest import cli_ok, in_process, write_feature_folder


def test_wilson_interval_matches_published_values():
    # Brown, Cai & DasGupta (2001) and every statistics table: 50/100 → 0.4038–0.5962, 0/10 → 0–0.2775
    assert wilson_interval(0.5, 100) == pytest.approx([0.40383, 0.59617], abs=1e-5)
    assert wilson_interval(0.0, 10) == pytest.approx([0.0, 0.27753], abs=1e-5)
    low, high = wilson_interval(1.0, 10)
    assert [low, high] == pytest.approx([0.72247, 1.0], abs=1e-5)
    assert wilson_interval(0.5, 0) is None and wilson_interval(float("nan"), 10) is None
    assert wilson_interval(None, 10) is None and interval_text(None) == "–"
    assert interval_text([0.0831, 0.2012]) == "8.3–20.1"


@pytest.mark.parametrize("n, p", [(30, 0.1), (100, 0.12), (100, 0.5), (400, 0.03)])
def test_wilson_interval_covers_the_true_share_about_95_percent_of_the_time(n, p):
    # exact coverage: the probability, over the binomial draw of k hits, that the interval of k/n holds p
    coverage = sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k)
                   for k in range(n + 1) if wilson_interval(k / n, n)[0] <= p <= wilson_interval(k / n, n)[1])
    assert 0.92 <= coverage <= 0.985


def test_majority_class_scores_the_largest_training_class_on_the_val_images():
    train = ["coat"] * 5 + ["bag"] * 5 + ["shirt"] * 3 + ["dress", "boot", "hat"]
    val = ["bag"] * 2 + ["coat"] * 3 + ["shirt"] * 4 + ["sneaker"]  # sneaker: unseen in training, always an error
    chance = majority_class(train, val)
    assert chance["majority_class"] == "bag"  # tied with coat at 5: the first name
    assert chance["top1"] == pytest.approx(0.2)
    # the five most frequent training classes: bag, coat, shirt, then boot and dress (tied at 1, by name)
    assert chance["top5"] == pytest.approx(0.9)
    assert majority_class(["a", "b", "b"], ["a", "b"])["top5"] is None  # fewer than 5 classes: 100 % by construction


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_random_ranking_ap_is_the_mean_over_every_order(n):
    for positives in range(1, n + 1):
        relevant = torch.tensor([True] * positives + [False] * (n - positives))
        orders = list(itertools.permutations(range(n)))
        scores = torch.arange(n, 0, -1, dtype=torch.float32)  # rank 1 first
        mean = sum(average_precision(scores, relevant[list(order)]) for order in orders) / len(orders)
        assert random_ranking_ap(positives, n) == pytest.approx(mean, rel=1e-9), (positives, n)
    assert math.isnan(random_ranking_ap(0, n))


def test_random_ranking_map_averages_the_classes_mean_average_precision_averages():
    targets = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.float32)
    expected = (random_ranking_ap(2, 6) + random_ranking_ap(4, 6)) / 2  # class 1 has no positive: no AP
    assert random_ranking_map([2, 0, 4], 6) == pytest.approx(expected)
    # the mean of mAP over random scorings approaches it (a check of the averaging, not of the formula)
    g = torch.Generator().manual_seed(0)
    draws = [mean_average_precision(torch.rand(6, 3, generator=g), targets)[0] for _ in range(1500)]
    assert sum(draws) / len(draws) == pytest.approx(expected, abs=0.015)


def _features(tmp_path, val_counts):
    """Train: 3 classes at well-separated centres, 6 images each; val: ``val_counts`` images of each class."""
    torch.manual_seed(0)
    centers = torch.eye(3, 8) * 10
    train = [f"c{i}/{j}.png" for i in range(3) for j in range(6)]
    val = [f"c{i}/v{j}.png" for i in range(3) for j in range(val_counts[i])]
    y_val = torch.tensor([i for i in range(3) for _ in range(val_counts[i])])
    write_feature_folder(tmp_path / "tr", train, centers.repeat_interleave(6, 0) + torch.randn(18, 8))
    write_feature_folder(tmp_path / "va", val, centers[y_val] + torch.randn(len(val), 8))
    return tmp_path / "tr", tmp_path / "va"


def test_eval_knn_records_and_shows_the_majority_class_and_the_interval(tmp_path):
    train, val = _features(tmp_path, (2, 5, 3))
    result = in_process("eval", "knn", "--train", str(train), "--val", str(val), "--k", "1", "3",
                        "--out", str(tmp_path / "knn.json"), check=True)
    saved = json.loads((tmp_path / "knn.json").read_text())
    assert saved["chance"] == {"rule": "every val image called the most frequent training class",
                               "majority_class": "c0", "top1": pytest.approx(0.2), "top5": None}
    assert all(r["top1"] == 1.0 and r["top1_interval95"] == pytest.approx(wilson_interval(1.0, 10))
               for r in saved["results"])
    row = next(line for line in result.stdout.splitlines() if line.startswith("majority class: c0"))
    assert "20.00" in row
    assert "top-1 95 % interval" in result.stdout and interval_text(wilson_interval(1.0, 10)) in result.stdout


def test_eval_linear_records_and_shows_the_majority_class_and_the_interval(tmp_path, capsys):
    train, val = _features(tmp_path, (1, 2, 7))
    out, _ = cli_ok(capsys, "eval", "linear", "--train", str(train), "--val", str(val), "--epochs", "20", "--lr",
                    "0.1", "--wd", "0", "--out", str(tmp_path / "lin.json"))
    saved = json.loads((tmp_path / "lin.json").read_text())
    assert saved["chance"]["majority_class"] == "c0" and saved["chance"]["top1"] == pytest.approx(0.1)
    assert saved["results"]["top1_interval95"] == pytest.approx(wilson_interval(saved["results"]["top1"], 10))
    assert "(95 % interval " in out
    assert "chance: calling every val image the majority class (c0) scores top-1 10.00%" in out


def test_accuracies_are_exact_shares_not_float32_artefacts():
    # a new user's probe (2026-12-07): 13 hits of 100 were written as 0.12999999523162842 (a float32 mean)
    from mlsctl.evaluate.knn import accuracy
    from mlsctl.evaluate.linear import top_k_accuracy
    from mlsctl.evaluate.retrieval import recall_at

    labels = torch.tensor([0] * 13 + [1] * 87)
    scores = torch.tensor([[1.0, 0.0]]).repeat(100, 1)  # every image called class 0
    assert accuracy(scores, labels, 1) == 0.13 and top_k_accuracy(scores, labels, 1) == 0.13
    assert recall_at(torch.tensor([1] * 13 + [5] * 87), [1])[1] == 0.13
    assert json.dumps(majority_class(["a", "b", "b"], ["b"] * 13 + ["a"] * 87)["top1"]) == "0.13"
