"""The refinement part of the fidelity suite: its report from finished rows (the runs themselves
are `benchmarks/refine_fidelity.py --profile smoke`, a few minutes: not part of `make test`)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import refine_fidelity  # noqa: E402


def test_summary_compares_the_default_cell_with_the_baseline_over_seeds():
    profile = refine_fidelity.PROFILES["cpu"]
    grid = []
    for seed in (0, 1, 2):
        for k in profile.ks:
            grid.append({"blocks": 0, "k": k, "seed": seed, "recall": {"1": 0.10, "8": 0.40}})
            for blocks in (1, 2, 4, 8):
                gain = 0.01 * blocks if k == 8 else -0.01
                grid.append({"blocks": blocks, "k": k, "seed": seed,
                             "recall": {"1": 0.10 + gain + 0.001 * seed, "8": 0.40 - 0.01}})
    ssl = [{"seed": s, "blocks": 8, "k": 8, "before": {"1": 0.05}, "after": {"1": 0.04}} for s in (0, 1, 2)]
    summary = refine_fidelity.summarise(profile, grid, ssl)
    assert summary["default"] == [8, 8]
    r1 = summary["table"]["8x8"]["1"]
    assert r1["mean"] == pytest.approx(18.1) and r1["std"] == pytest.approx(0.1) and r1["n"] == 3
    assert [c["holds"] for c in summary["claims"]] == [True, False, False]  # R@1 yes, R@8 no, DINO no
    text = refine_fidelity.markdown(summary, profile)
    assert "| 8 | 9.10 ± 0.10 | 18.10 ± 0.10 | 9.10 ± 0.10 |" in text  # the grid row T = 8 over k = 4, 8, 16
    assert "| 0 | 10.00 ± 0.00 | 10.00 ± 0.00 | 10.00 ± 0.00 |" in text


def test_the_input_scale_ablation_sits_beside_its_grid_cell_and_smoke_runs_only_the_default_cell():
    profile = refine_fidelity.PROFILES["cpu"]
    grid, ablation = [], []
    for seed in (0, 1, 2):
        for k in profile.ks:
            grid.append({"blocks": 0, "k": k, "seed": seed, "recall": {"1": 0.10, "8": 0.40}})
            for blocks in (1, 2, 4, 8):
                grid.append({"blocks": blocks, "k": k, "seed": seed, "recall": {"1": 0.12 + 0.001 * seed, "8": 0.41}})
        for blocks, k in profile.ablation:
            ablation.append({"blocks": blocks, "k": k, "seed": seed, "input_scale": "none",
                             "recall": {"1": 0.09 + 0.001 * seed, "8": 0.38}})
    summary = refine_fidelity.summarise(profile, grid, [], ablation)
    assert summary["ablation"]["variant"] == "input_scale=none"
    assert list(summary["ablation"]["cells"]) == ["1x8", "2x8", "4x8", "8x8"]
    pair = summary["ablation"]["cells"]["8x8"]
    assert pair["default"]["1"]["mean"] == pytest.approx(12.1) and pair["input_scale=none"]["1"]["mean"] == pytest.approx(9.1)
    assert [c["claim"] for c in summary["claims"]] == [c["claim"] for c in refine_fidelity.summarise(profile, grid, [])["claims"]]
    text = refine_fidelity.markdown(summary, profile)
    assert "## Ablation: the √d input scaling (ours, not in the paper)" in text
    assert text.count("| 0 | 8 | baseline (e⁰) | 10.00 ± 0.00 | 40.00 ± 0.00 |") == 1
    assert "| 8 | 8 | √d (default) | 12.10 ± 0.10 | 41.00 ± 0.00 |" in text
    assert "| 8 | 8 | none | 9.10 ± 0.10 | 38.00 ± 0.00 |" in text
    assert "Ablation" not in refine_fidelity.markdown(refine_fidelity.summarise(profile, grid, []), profile)
    # the ablation's runs: the same refine train with the override, in their own folders
    assert refine_fidelity.ABLATION_OVERRIDES == ("method.input_scale=none",)
    assert refine_fidelity.cell_name(8, 8, refine_fidelity.ABLATION_OVERRIDES) == "T8-k8-inputscale-none"
    assert refine_fidelity.cell_name(8, 8) == "T8-k8"
    smoke = refine_fidelity.PROFILES["smoke"]
    assert smoke.ablation == (tuple(refine_fidelity.summarise(smoke, [], [])["default"]),)
