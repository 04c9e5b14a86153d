"""eval recall: Recall@K of the deep-metric-learning protocol against a brute-force count; bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mlsctl.errors import UserError
from mlsctl.evaluate.recall import default_ks, recall_at_k

from conftest import cli, cli_ok, write_feature_folder


def _brute_force(x: torch.Tensor, y: torch.Tensor, K: int) -> float:
    """Every embedding a query against all the others: count the queries with a same-class
    embedding among their K most similar (cosine), skipping classes of one embedding."""
    x = F.normalize(x.double(), dim=1)
    hits = queries = 0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        if not any(y[j] == y[i] for j in others):
            continue
        similarity = sorted(((float(x[i] @ x[j]), j) for j in others), reverse=True)
        queries += 1
        hits += any(y[j] == y[i] for _, j in similarity[:K])
    return hits / queries


def _data(n: int = 120, classes: int = 15, dim: int = 8, seed: int = 0, noise: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    y = torch.arange(n) % classes
    return centres[y] + noise * torch.randn(n, dim, generator=g), y


def test_recall_equals_a_brute_force_count():
    x, y = _data()
    y[0] = 99  # a class of one embedding: not a query
    result = recall_at_k(x, y, [1, 2, 4, 8, 16])
    expected = [_brute_force(x, y, K) for K in (1, 2, 4, 8, 16)]
    assert [result["recall"][str(K)] for K in (1, 2, 4, 8, 16)] == pytest.approx(expected, abs=1e-12)
    assert 0.1 < expected[0] < expected[-1] < 1.0  # neither trivial nor perfect
    assert result["precision_at_1"] == pytest.approx(expected[0])
    assert result["lone_queries"] == 1 and result["queries"] == 119 and result["classes"] == 16


def _brute_force_map_at_r(x: torch.Tensor, y: torch.Tensor) -> float:
    """MAP@R (Musgrave et al. 2020): for each query with R > 0 others of its class, the mean over the R
    nearest others of the precision at every rank that holds one of its class."""
    x = F.normalize(x.double(), dim=1)
    scores = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        R = sum(int(y[j] == y[i]) for j in others)
        if R == 0:
            continue
        ranked = [j for _, j in sorted(((float(x[i] @ x[j]), j) for j in others), reverse=True)][:R]
        hits, total = 0, 0.0
        for rank, j in enumerate(ranked, start=1):
            if y[j] == y[i]:
                hits += 1
                total += hits / rank
        scores.append(total / R)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("classes, ks", [(15, [1, 2, 4, 8, 16]), (4, [1, 2]), (2, [1])])
def test_map_at_r_equals_a_brute_force_count(classes, ks):
    """A test review (2026-12-05): MAP@R is printed and reported but was never checked; with classes larger
    than the largest K + 1 a short neighbour list would cut it silently."""
    x, y = _data(classes=classes)
    y[0] = 99  # a class of one embedding: not a query
    assert recall_at_k(x, y, ks)["map_at_r"] == pytest.approx(_brute_force_map_at_r(x, y), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 50, 10_000])
def test_queries_in_chunks_give_what_the_library_gives_for_the_whole_set(chunk):
    """The calculator sees QUERY_CHUNK queries at a time (the whole-set call holds n x k arrays and a
    classes x n matrix: ~60 GB for ImageNet); weighted by their retrievable queries, the chunks'
    metrics are the library's own on the whole set."""
    from mlsctl.evaluate.recall import recall_calculator

    x, y = _data(classes=15)
    y[0], y[1] = 99, 98  # two classes of one embedding: queries left out, in the first chunks
    ks = [1, 2, 4, 8, 16]
    k = int(torch.unique(y, return_counts=True)[1].max()) + 8  # beyond the largest class, as recall_at_k asks
    whole = recall_calculator(ks, k).get_accuracy(F.normalize(x, dim=-1), y.float())
    result = recall_at_k(x, y, ks, chunk=chunk)
    assert [result["recall"][str(K)] for K in ks] == pytest.approx([whole[f"recall_at_{K}"] for K in ks], abs=1e-12)
    assert result["precision_at_1"] == pytest.approx(whole["precision_at_1"], abs=1e-12)
    assert result["map_at_r"] == pytest.approx(whole["mean_average_precision_at_r"], abs=1e-12)


def test_a_query_never_finds_itself_but_finds_its_duplicate():
    # rows 0 and 1 are the same vector in two classes; rows 2 and 3 are each other's nearest, of two classes
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.44]])
    y = torch.tensor([0, 1, 0, 1])
    # itself excluded, every query's nearest is of the other class (a query finding itself would hit)
    assert recall_at_k(x, y, [1])["recall"]["1"] == 0.0 == _brute_force(x, y, 1)
    assert recall_at_k(x, y, [3])["recall"]["3"] == 1.0


def test_default_ks_and_bad_input():
    assert default_ks(1600) == [1, 2, 4, 8] and default_ks(60502) == [1, 2, 4, 8, 10, 100, 1000]
    x, y = _data(n=10, classes=2)
    assert recall_at_k(x, y, [1, 8, 100])["ks_too_large"] == [100]
    with pytest.raises(UserError, match="one class"):
        recall_at_k(x, torch.zeros(10, dtype=torch.long))


def test_eval_recall_cli(tmp_path, capsys):
    x, y = _data(n=60, classes=6)
    files = [f"class{int(c)}/{i:03d}.png" for i, c in enumerate(y)]
    feats = write_feature_folder(tmp_path / "feats", files, x)
    out, _ = cli_ok(capsys, "eval", "recall", str(feats), "--out", str(tmp_path / "r.json"))
    assert "R@1" in out and "R@8" in out and "MAP@R" in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["recall"]["1"] == pytest.approx(_brute_force(x.half().float(), y, 1))
    out, _ = cli_ok(capsys, "eval", "recall", str(feats), "--k", "1", "3", "--json", "--out", str(tmp_path / "r2.json"))
    assert list(json.loads(out)["recall"]) == ["1", "3"]
    # bad input: one sentence each
    single = tmp_path / "single.csv"
    single.write_text("".join(f"{f},a\n" for f in files))
    partial = tmp_path / "partial.csv"
    partial.write_text("".join(f"{f},a\n" for f in files[:10]))
    for labels, message in ((single, "single class"), (partial, "has no label for 50 images")):
        code, _, err = cli("eval", "recall", str(feats), "--labels", str(labels), "--out", str(tmp_path / "x.json"),
                           capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_chance_is_what_every_ranking_gives_on_average_and_a_k_past_the_other_classes_is_certain(tmp_path, capsys):
    """eval recall's chance row: R@K of a random ranking, against the mean over every order of the others
    (a new user's probe, 2026-12-07: R@K on few classes, with no chance level and no word that a K past
    the other classes' embeddings is 100 % by construction)."""
    import itertools

    from mlsctl.evaluate.recall import certain_ks, chance_map_at_r, chance_recall

    labels = [0, 0, 0, 1, 1, 2]  # a class of one has no query
    for K in (1, 2, 3, 4):
        hits = queries = 0
        for i, own in enumerate(labels):
            others = [y for j, y in enumerate(labels) if j != i]
            if own not in others:
                continue
            orders = list(itertools.permutations(others))
            hits += sum(own in order[:K] for order in orders) / len(orders)
            queries += 1
        assert chance_recall([3, 2, 1], K) == pytest.approx(hits / queries)
    assert certain_ks([3, 2, 1], [1, 2, 3, 4, 5]) == [5]  # a query of class 1 has 4 others of other classes
    for sizes in ([3, 2, 1], [4, 2], [2, 2, 2], [5, 1]):  # MAP@R: the mean over every order of the others
        labels = [c for c, size in enumerate(sizes) for _ in range(size)]
        total = queries = 0
        for i, own in enumerate(labels):
            others = [y for j, y in enumerate(labels) if j != i]
            r = others.count(own)
            if not r:
                continue
            orders = list(itertools.permutations(others))
            total += sum(sum(order[:p + 1].count(own) / (p + 1) for p in range(r) if order[p] == own) / r
                         for order in orders) / len(orders)
            queries += 1
        assert chance_map_at_r(sizes) == pytest.approx(total / queries), sizes
    x, y = _data(n=4, classes=2)  # two classes of two: any 3 others hold the query's class
    feats = write_feature_folder(tmp_path / "feats", [f"class{int(c)}/{i}.png" for i, c in enumerate(y)], x)
    out, _ = cli_ok(capsys, "eval", "recall", str(feats), "--k", "1", "2", "3", "--out", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["chance"] == pytest.approx({"1": 1 / 3, "2": 2 / 3, "3": 1.0}) and result["ks_certain"] == [3]
    # R = 1 of N = 3 others: MAP@R is P(the one at rank 1) = 1/3
    assert result["chance_map_at_r"] == pytest.approx(1 / 3) and out.count("33.33") == 2
    assert "chance (a random ranking)" in out and "33.33" in out
    assert "note: R@3 is 100 % by construction: any 3 embeddings other than a query hold one of its class" in out
