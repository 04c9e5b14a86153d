"""Bank health indicators on hand-built banks with known statistics, and the trainer's warning."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mlsctl.bank import Column, MemoryBank, QueryFeature, load_banks, save_banks
from mlsctl.bank_health import (bank_health, effective_rank, mean_pairwise_cosine, near_duplicates, sample_rows,
                                uniformity)


def bank_of(vectors: torch.Tensor, step: int = 0, **payload) -> MemoryBank:
    columns = {name: Column(tuple(value.shape[1:]), value.dtype) for name, value in payload.items()}
    bank = MemoryBank(len(vectors), vectors.shape[1], columns)
    bank.enqueue(vectors, step=step, gather=False, **payload)
    return bank


def test_orthogonal_vectors_have_full_effective_rank_zero_cosine_and_uniformity_minus_four():
    n = 12
    vectors = torch.eye(n, 20) * torch.arange(1, n + 1)[:, None]  # orthogonal, different norms
    assert effective_rank(vectors) == pytest.approx(n)
    assert mean_pairwise_cosine(vectors) == pytest.approx(0.0, abs=1e-12)
    assert uniformity(vectors) == pytest.approx(-4.0)  # every pair at squared distance 2
    assert near_duplicates(vectors) == 0
    health = bank_health(bank_of(vectors), "orthogonal", step=0)
    assert not health.collapsed
    assert health.norm_min == pytest.approx(1) and health.norm_max == pytest.approx(n)


def test_identical_vectors_are_flagged_as_collapsed():
    vectors = torch.tensor([[0.3, -1.0, 2.0]]).repeat(10, 1)
    health = bank_health(bank_of(vectors), "same", step=0)
    assert health.mean_cosine == pytest.approx(1.0)
    assert health.effective_rank == pytest.approx(1.0)
    assert health.uniformity == pytest.approx(0.0, abs=1e-9)
    assert health.near_duplicates == 9  # every entry but the oldest copies an older one
    assert health.collapsed and len(health.collapse_reasons()) == 2


def test_dimensional_collapse_is_flagged_by_the_effective_rank_alone():
    # vectors spread over a line through the origin in both directions: mean cosine ~0, rank 1
    signs = torch.tensor([1.0, -1.0]).repeat(20)[:, None]
    vectors = signs * torch.linspace(1, 2, 40)[:, None] * torch.tensor([[1.0, 2.0, 0.0, 0.0]])
    health = bank_health(bank_of(vectors), "line", step=0)
    assert abs(health.mean_cosine) < 0.05
    assert health.effective_rank == pytest.approx(1.0)
    assert health.collapse_reasons() == ["effective rank 1.00 < 2.0"]


def test_planted_duplicates_are_counted_exactly():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(300, 64, generator=generator)
    # 3 copies of row 5 (one scaled: cosine ignores the norm), a copy of row 100, a near copy of row 7
    vectors[50] = vectors[5]
    vectors[120] = 2.5 * vectors[5]
    vectors[299] = vectors[5]
    vectors[200] = vectors[100]
    vectors[250] = vectors[7] + 1e-4 * torch.randn(64, generator=generator)
    assert near_duplicates(vectors) == 5
    assert near_duplicates(vectors, block=7) == 5  # blockwise = whole
    health = bank_health(bank_of(vectors), "planted", step=0)
    assert health.near_duplicates == 5 and health.duplicate_rate == pytest.approx(5 / 300)


def test_ages_and_fill_after_wrap_around():
    bank = MemoryBank(5, 2)
    for step in range(4):  # 8 entries into 5 slots: steps 1, 2, 2, 3, 3 remain
        bank.enqueue(torch.randn(2, 2), step=step, gather=False)
    health = bank_health(bank, "fifo", step=10)
    assert (health.filled, health.fill, health.ptr, health.n_written) == (5, 1.0, 3, 8)
    assert (health.age_min, health.age_median, health.age_max) == (7, 8.0, 9)


def test_partly_filled_bank_uses_only_written_entries():
    bank = MemoryBank(100, 3)
    bank.enqueue(torch.eye(3), step=4, gather=False)
    health = bank_health(bank, "partial", step=6)
    assert (health.filled, health.sample, health.duplicate_rows) == (3, 3, 3)
    assert health.effective_rank == pytest.approx(3.0)
    assert (health.age_min, health.age_max) == (2, 2)


def test_labels_are_counted_per_label():
    labels = torch.tensor([3, 1, 3, 3, 0, 1])
    health = bank_health(bank_of(torch.randn(6, 4), label=labels), "labelled", step=0)
    assert health.label_counts == {0: 1, 1: 2, 3: 3}


def test_metrics_record_names_every_indicator():
    health = bank_health(bank_of(torch.randn(8, 4)), "cls", step=3)
    keys = set(health.metrics())
    assert {"bank/cls/mean_cosine", "bank/cls/effective_rank", "bank/cls/uniformity", "bank/cls/duplicate_rate",
            "bank/cls/fill", "bank/cls/age_median"} <= keys


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), dim=st.integers(1, 6), seed=st.integers(0, 1000))
def test_pairwise_indicators_match_brute_force(n, dim, seed):
    vectors = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    unit = F.normalize(vectors, dim=1)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    cosine = sum(float(unit[i] @ unit[j]) for i, j in pairs) / len(pairs)
    assert mean_pairwise_cosine(vectors) == pytest.approx(cosine, abs=1e-9)
    value = math.log(sum(math.exp(-2 * float((unit[i] - unit[j]).pow(2).sum())) for i, j in pairs) / len(pairs))
    assert uniformity(vectors) == pytest.approx(value, abs=1e-9)
    duplicates = sum(any(float(unit[i] @ unit[j]) >= 0.9 for j in range(i)) for i in range(n))
    assert near_duplicates(vectors, threshold=0.9, block=3) == duplicates


def test_sample_is_fixed_sorted_and_within_range():
    a, b = sample_rows(1000, 50, seed=1), sample_rows(1000, 50, seed=1)
    assert torch.equal(a, b) and len(a.unique()) == 50 and torch.equal(a, a.sort().values)
    assert torch.equal(sample_rows(10, 50), torch.arange(10))


def test_query_feature_survives_save_and_load(tmp_path: Path):
    bank = MemoryBank(4, 6, query_feature=QueryFeature("patch_mean", 0, 3))
    plain = MemoryBank(4, 6)
    save_banks({"objects": bank, "plain": plain}, tmp_path / "banks.safetensors")
    loaded = load_banks(tmp_path / "banks.safetensors")
    assert loaded["objects"].query_feature == QueryFeature("patch_mean", 0, 3)
    assert loaded["plain"].query_feature is None
    with pytest.raises(ValueError):
        QueryFeature("mean")


def test_trainer_warns_once_per_collapsed_bank(caplog):
    from mlsctl.train import _bank_health

    collapsed = bank_of(torch.ones(6, 4))
    healthy = bank_of(torch.eye(6))
    warned: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="mlsctl"):
        record = _bank_health({"q": collapsed, "ok": healthy}, 50, warned)
        _bank_health({"q": collapsed, "ok": healthy}, 100, warned)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'q' looks collapsed at step 50" in warnings[0] and "\n" not in warnings[0]
    assert record["bank/q/mean_cosine"] == pytest.approx(1.0)
    assert record["bank/ok/effective_rank"] == pytest.approx(6.0)
