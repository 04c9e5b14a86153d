"""The fidelity suite's smoke profile, end to end: killed, rerun to the end, rerun again to reuse."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_env

pytestmark = pytest.mark.slow


# four cells: every kind (trained, untrained, retrieval, with the linear probe); the others run the same code
CELLS = ("--only", "scenes/random/*", "scenes/dino/*", "products/*", "scenes/mls/*")


def suite(tmp: Path, fmnist: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--profile", "smoke", "--work", str(tmp / "work"),
            "--results", str(tmp / "results"), "--fmnist", str(fmnist), *CELLS, *extra]


def test_smoke_profile_resumes_after_a_kill_and_reuses_finished_cells(tmp_path: Path, fake_fmnist: Path):
    checkpoint = tmp_path / "work" / "cells" / "scenes" / "dino" / "seed0" / "run" / "checkpoints" / "step-00000002"
    process = subprocess.Popen(suite(tmp_path, fake_fmnist), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not checkpoint.is_dir():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the suite dies mid-cell; its mlsctl child is told to stop
    process.wait()
    assert checkpoint.is_dir()

    done = subprocess.run(suite(tmp_path, fake_fmnist), env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 of 4 cells finished" in done.stdout
    cells = tmp_path / "results" / "smoke" / "cells"
    dino = json.loads((cells / "scenes-dino-seed0.json").read_text())
    assert dino["steps"] == 8 and dino["resumed_from"] > 0  # the killed run went on from its checkpoint
    assert {"device", "torch", "timm", "commit", "seconds_this_session"} <= set(dino)
    assert set(dino["metrics"]) >= {"miou", "foreground_iou", "binary_miou"}
    mile = json.loads((cells / "products-mile-seed0.json").read_text())
    assert {"mile@trained/noise0", "max-pairwise@trained/noise0", "mean-cls@start/noise0.5"} <= set(mile["metrics"])
    mls = json.loads((cells / "scenes-mls-seed0.json").read_text())
    assert {"miou", "knn_top1@5", "linear_map"} <= set(mls["metrics"]) and 0 <= mls["metrics"]["linear_map"] <= 1
    summary = json.loads((tmp_path / "results" / "smoke" / "summary.json").read_text())
    assert summary["cells"] == 4 and any("Table 5 order" in c["claim"] for c in summary["claims"])
    holds = {c["claim"]: c["holds"] for c in summary["claims"]}
    assert holds["CrIBo > DINO on fmnist-scenes mIoU"] is None  # not measured: its cells did not run
    assert holds["DINO > random init on fmnist-scenes mIoU"] in (True, False)
    markdown = (tmp_path / "results" / "smoke" / "summary.md").read_text()
    assert "| dino | 1 |" in markdown and "| cribo-cross-view | 0 |" in markdown and "| mile | trained |" in markdown
    assert (tmp_path / "results" / "smoke" / "summary.png").stat().st_size > 10_000

    again = subprocess.run(suite(tmp_path, fake_fmnist), env=cli_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count(": reused") == 4
    listing = subprocess.run(suite(tmp_path, fake_fmnist, "--list"), env=cli_env(), capture_output=True, text=True)
    assert listing.stdout.count(" done") == 4
