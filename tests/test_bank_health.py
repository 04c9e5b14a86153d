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
from mlsctl.bank_health import (COLLAPSED, HEALTHY, PARTIAL, UNKNOWN, bank_health, effective_rank,
                                mean_pairwise_cosine, near_duplicates, sample_rows, uniformity)


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
    duplicates = [any(float(unit[i] @ unit[j]) >= 0.9 for j in range(i)) for i in range(n)]
    assert near_duplicates(vectors, threshold=0.9, block=3) == sum(duplicates)
    rows = sample_rows(n, max(1, n // 2), seed)  # a sample's rows, each still against every older row
    assert near_duplicates(vectors, threshold=0.9, block=3, rows=rows) == sum(duplicates[i] for i in rows.tolist())


def test_above_the_exact_limit_the_sampled_entries_are_checked_against_every_older_one():
    """bank inspect and report counted near-duplicates over every pair of written entries: hours for
    a 1.6 M-entry CrIBo bank. Above ``exact_duplicates_up_to`` the sampled entries (at least 2048,
    whatever --sample: a probe's --sample 2 said 100 %) are checked, each against every older
    entry, which estimates the same rate; the trainer's variant is unchanged."""
    from mlsctl.bank_health import DUPLICATE_SAMPLE

    generator = torch.Generator().manual_seed(0)
    originals = torch.randn(2400, 16, generator=generator)
    copies = originals[:600] + 1e-4 * torch.randn(600, 16, generator=generator)
    bank = bank_of(torch.cat([originals, copies]))  # rows 2400..2999 copy older ones: a rate of 20 %
    exact = bank_health(bank, "b", step=1, sample=100)
    assert (exact.duplicate_rows, exact.near_duplicates) == (3000, 600)
    for sample in (2, 100, 2500):
        estimate = bank_health(bank, "b", step=1, sample=sample, exact_duplicates_up_to=2999)
        rows = sample_rows(3000, max(sample, DUPLICATE_SAMPLE), 0)
        assert estimate.duplicate_rows == len(rows) and estimate.near_duplicates == int((rows >= 2400).sum())
        assert 0.17 < estimate.duplicate_rate < 0.23 and estimate.sample == sample
    within = bank_health(bank, "b", step=1, sample=100, duplicates_on_sample=True)
    assert within.duplicate_rows == 100 and within.near_duplicates < 5


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


def gaussian(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def in_subspace(n: int, dim: int, k: int, seed: int) -> torch.Tensor:
    """``n`` vectors with isotropic Gaussian coordinates in a random ``k``-dimensional subspace of R^dim."""
    basis, _ = torch.linalg.qr(gaussian(dim, k, seed + 1))  # [dim, k], orthonormal columns
    return gaussian(n, k, seed) @ basis.T


def test_status_levels_on_constructed_banks():
    healthy = bank_health(bank_of(gaussian(512, 64, 0)), "random", step=0)
    assert (healthy.status, healthy.status_line()) == (HEALTHY, "healthy")
    assert healthy.effective_rank > 0.9 * 64 and healthy.near_duplicates == 0

    thirds = gaussian(300, 64, 1)
    thirds[200:] = thirds[:100] + 1e-4 * gaussian(100, 64, 2)  # a third of the entries repeat older ones
    duplicated = bank_health(bank_of(thirds), "thirds", step=0)
    assert duplicated.status == PARTIAL and duplicated.duplicate_rate == pytest.approx(1 / 3)
    assert duplicated.status_line() == "PARTIAL COLLAPSE: near-duplicates 33.3% >= 10%"
    assert not duplicated.collapsed and duplicated.effective_rank > 50  # the other indicators see nothing

    flat = bank_health(bank_of(in_subspace(640, 64, 4, 3)), "flat", step=0)  # 4 of 64 directions
    assert flat.status == PARTIAL and 2 <= flat.effective_rank < 6.4 and abs(flat.mean_cosine) < 0.05
    assert flat.status_reasons() == [f"effective rank {flat.effective_rank:.1f} < 6.4 (10% of the 64 directions "
                                     f"the sample could span)"]

    one_way = torch.tensor([1.0] + [0.0] * 63) + 0.01 * gaussian(200, 64, 4)  # all within 5° of one direction
    collapsed = bank_health(bank_of(one_way), "one way", step=0)
    assert collapsed.status == COLLAPSED and collapsed.status_line().startswith("COLLAPSED: mean pairwise cosine 0.9")


def test_partial_collapse_thresholds_are_relative_to_the_bank():
    # near-duplicates: 10 % of the entries is partial collapse, 9 % is not
    for copies, status in ((10, PARTIAL), (9, HEALTHY)):
        vectors = gaussian(100, 64, 5)
        vectors[100 - copies:] = vectors[:copies]
        health = bank_health(bank_of(vectors), "d", step=0)
        assert (health.near_duplicates, health.status) == (copies, status)
    # effective rank: the floor is 10 % of min(sample, dim), here 6.4 of 64 directions
    for k, status in ((7, HEALTHY), (6, PARTIAL)):
        health = bank_health(bank_of(in_subspace(640, 64, k, 6)), "r", step=0)
        assert health.status == status, (k, health.effective_rank)
        assert 0.95 * k < health.effective_rank <= k
    # ... of a bank of 32 entries in 384 dimensions, 3.2 of 32: the same vectors pass in a larger sample
    few = bank_health(bank_of(in_subspace(32, 384, 3, 7)), "few", step=0)
    assert few.rank_directions == 32 and few.status == PARTIAL


def test_a_prefilled_bank_is_judged_by_what_training_wrote():
    queue = MemoryBank(1024, 64, init="random_unit", generator=torch.Generator().manual_seed(0))
    start = bank_health(queue, "queue", step=0)
    assert (start.filled, start.written, start.fill, start.status) == (1024, 0, 0.0, UNKNOWN)
    assert start.status_line() == "unknown: 0 entries written by training; 2 are needed"
    same = torch.tensor([[1.0] + [0.0] * 63]).repeat(16, 1)
    for step in range(3):  # 48 writes of one vector: a collapsed encoder
        queue.enqueue(same, step=step, gather=False)
    health = bank_health(queue, "queue", step=3)
    assert (health.filled, health.written, health.fill) == (1024, 48, 48 / 1024)
    assert (health.sample, health.duplicate_rows, health.near_duplicates) == (48, 48, 47)
    assert health.status == COLLAPSED  # over all 1024 slots the random start would look healthy
    assert health.to_dict()["written"] == 48 and health.to_dict()["status"] == COLLAPSED


def test_trainer_warns_once_per_bank_and_level(caplog):
    from mlsctl.train import _bank_health

    collapsed = bank_of(torch.ones(6, 4))
    healthy = bank_of(torch.eye(6))
    partial = gaussian(40, 32, 0)
    partial[30:] = partial[:10]
    becoming = bank_of(partial)  # partly collapsed (25 % duplicates), then collapsed
    warned: set = set()
    with caplog.at_level(logging.WARNING, logger="mlsctl"):
        record = _bank_health({"q": collapsed, "ok": healthy, "p": becoming}, 50, warned)
        _bank_health({"q": collapsed, "ok": healthy, "p": becoming}, 100, warned)
        becoming.vectors[:] = 1.0
        _bank_health({"q": collapsed, "ok": healthy, "p": becoming}, 150, warned)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings)
    assert "'q' looks collapsed at step 50" in warnings[0]
    assert "'p' looks partly collapsed at step 50: near-duplicates 25.0% >= 10%" in warnings[1]
    assert "'p' looks collapsed at step 150" in warnings[2]
    assert record["bank/q/mean_cosine"] == pytest.approx(1.0)
    assert record["bank/ok/effective_rank"] == pytest.approx(6.0)


def test_the_readme_sove_memory_reads_partial_collapse():
    """SOVE's E_C at the end of the fidelity suite's seed-0 cell (README): 37 % near-duplicates,
    effective rank 7.4 of 256, mean pairwise cosine 0.65 — reported as "no collapse" before."""
    from mlsctl.bank_health import BankHealth

    health = BankHealth(name="E_C", size=4096, dim=256, dtype="float32", filled=4096, written=4096, fill=1.0, ptr=0,
                        n_written=31744, step=496, age_min=1, age_median=8.0, age_max=16, norm_min=1.0, norm_mean=1.0,
                        norm_max=1.0, norm_std=0.0, sample=2048, mean_cosine=0.65, effective_rank=7.4, uniformity=-1.0,
                        duplicate_rows=4096, near_duplicates=1516, duplicate_threshold=0.999, label_counts=None)
    assert health.status_line() == ("PARTIAL COLLAPSE: near-duplicates 37.0% >= 10%; effective rank 7.4 < 25.6 "
                                    "(10% of the 256 directions the sample could span)")
