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
