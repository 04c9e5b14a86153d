"""mlsctl report: one self-contained HTML page, rendered by headless Chromium where installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from conftest import cli_ok

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _report(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "results").mkdir()
    (run / "results" / "knn.json").write_text(json.dumps({
        "command": "eval knn", "model": {"path": str(run / "teacher.safetensors")},
        "results": [{"k": 10, "top1": 0.5, "top5": 0.9}]}))
    out, _ = cli_ok(capsys, "report", str(run), "--out", str(tmp_path / "report.html"), "--results", str(tmp_path),
                    "--patch-images", "4", "--json")
    return json.loads(out), (tmp_path / "report.html").read_text()


def test_report_is_one_self_contained_page_with_every_section(finished_run, tmp_path, capsys):
    record, page = _report(finished_run, tmp_path, capsys)
    for section in ("summary", "recipe", "curves", "patch-maps", "banks", "evaluations"):
        assert f'<section id="{section}">' in page
    assert record["images"] >= 3 and record["evaluations"] == 1
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # nothing fetched: every picture is a data URI
    assert page.count('src="data:image/png;base64,') == record["images"]
    assert "top-1 %" in page and "50.00" in page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(finished_run, tmp_path, capsys):
    record, _ = _report(finished_run, tmp_path, capsys)
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) == str(record["images"])
    for section in ("Summary", "Recipe", "Training curves", "PCA patch maps", "Memory banks", "Evaluations"):
        assert f"<h2>{section}</h2>" in dom


def test_report_skips_a_strangers_or_a_damaged_result_with_a_note(finished_run, tmp_path, capsys):
    """Issue 23, item 8: a malformed eval result — the run's own, or a stranger's in ./results, the
    default — is skipped with a note; a damaged summary.json is one sentence naming it."""
    from conftest import cli

    run_dir, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "results").mkdir()
    (run / "results" / "linear.json").write_text(json.dumps({"command": "eval linear", "results": {}}))  # no 'chosen'
    (run / "results" / "knn.json").write_text(json.dumps({"command": "eval knn", "results": [{"k": 1}]}))
    strangers = tmp_path / "results"
    strangers.mkdir()
    (strangers / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (strangers / "theirs.json").write_text(json.dumps({"command": "eval knn", "model": [1, 2]}))
    (strangers / "mine.json").write_text(json.dumps({"command": "eval knn", "model": {"path": str(run)},
                                                     "results": [{"k": 10, "top1": 0.5, "top5": 0.9}]}))
    out, err = cli_ok(capsys, "report", str(run), "--out", str(tmp_path / "r.html"), "--json", cwd=tmp_path)
    record = json.loads(out)
    assert record["evaluations"] == 1 and len(record["skipped"]) == 3
    assert "linear.json: not the result that eval linear writes (no 'chosen')" in err
    assert "knn.json: not the result that eval knn writes (no 'top1')" in err and "deep.json: not readable JSON" in err
    page = (tmp_path / "r.html").read_text()
    assert "50.00" in page and page.count('class="note">skipped') == 3
    for damage in ('{"steps": 4', "[1, 2]", "[" * 100_000 + "]" * 100_000):
        (run / "summary.json").write_text(damage)
        code, _, err = cli("report", str(run), "--out", str(tmp_path / "r.html"), capsys=capsys)
        assert code == 2 and "summary.json is damaged" in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
