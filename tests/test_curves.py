"""mlsctl plot: the curves of one or several runs."""

from __future__ import annotations

import json
import shutil

from PIL import Image

from mlsctl.curves import short_names

from conftest import cli, cli_ok


def test_plot_draws_every_panel_of_several_runs(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    other = tmp_path / "b" / "run"
    shutil.copytree(run_dir, other)
    out, _ = cli_ok(capsys, "plot", str(run_dir), str(other), "--out", str(tmp_path / "c.png"), "--json")
    result = json.loads(out)
    assert result["runs"] == ["run/run", "b/run"] or len(set(result["runs"])) == 2
    panels = result["panels"]
    assert panels["training loss"] == ["loss"] and panels["loss terms"] == ["loss/dino"]
    assert panels["learning rate and weight decay"] == ["lr", "weight_decay"]
    assert panels["memory-bank health"] == ["bank/cls/mean_cosine"]
    image = Image.open(tmp_path / "c.png")
    assert image.size == (1600, 850)


def test_short_names_tell_runs_apart():
    assert short_names(["/x/dino/seed0/run", "/x/sove/seed0/run"]) == ["dino/seed0/run", "sove/seed0/run"]
    assert short_names(["/x/a", "/y/b"]) == ["a", "b"]


def test_plot_of_a_folder_that_is_not_a_run_is_one_sentence(tmp_path, capsys):
    code, _, err = cli("plot", str(tmp_path), capsys=capsys)
    assert code != 0 and "has no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
