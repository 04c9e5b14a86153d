"""mlsctl compare: the evaluations of several runs side by side, matched by the weights' fingerprints."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import cli, cli_ok


def _fingerprints(run, seed: int = 0) -> tuple[str, str]:
    """The fingerprints of a run's teacher and of a random init of its architecture at ``seed``."""
    from mlsctl.restore import from_run

    return from_run(run).fingerprint, from_run(run, random_init=True, seed=seed).fingerprint


def _retrained(run) -> None:
    """The run trained again, as another seed would: one tensor of its final teacher moved."""
    from safetensors.torch import load_file, save_file

    path = run / "teacher.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, path, metadata=metadata)


def _knn(path, model: dict, top1: float, date: str = "2026-12-07T10:00:00", k: int = 10, temperature: float = 0.07,
         train: str = "data/x/train"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "command": "eval knn", "model": model, "temperature": temperature, "train_images": 60, "val_images": 100,
        "dataset": {"name": "folders", "train_root": train, "val_root": "data/x/val"},
        "chance": {"rule": "every val image called the most frequent training class", "majority_class": "coat",
                   "top1": 0.12, "top5": 0.52},
        "results": [{"k": k, "neighbours": k, "top1": top1, "top5": 0.9}], "written": {"date": date}}))


@pytest.fixture
def two_runs(finished_run, tmp_path):
    run_dir, _ = finished_run
    a, b = tmp_path / "runs" / "dino_a", tmp_path / "runs" / "dino_b"
    shutil.copytree(run_dir, a)
    shutil.copytree(run_dir, b)
    _retrained(b)
    return a, b


def test_compare_lines_up_the_runs_their_random_init_and_chance(two_runs, tmp_path, capsys):
    a, b = two_runs
    teacher_a, random_a = _fingerprints(a)
    teacher_b, random_b = _fingerprints(b)
    assert teacher_a != teacher_b and random_a == random_b  # one architecture: one random init
    results = tmp_path / "results"
    _knn(results / "a.json", {"source": "run", "path": str(a / "teacher.safetensors"), "fingerprint": teacher_a}, 0.31)
    _knn(results / "b-old.json", {"source": "run", "path": "elsewhere", "fingerprint": teacher_b}, 0.20,
         date="2026-12-07T09:00:00")
    _knn(b / "results" / "b.json", {"source": "run", "path": "elsewhere", "fingerprint": teacher_b}, 0.25)
    _knn(results / "random.json", {"source": "random-init", "path": str(b), "seed": 0, "fingerprint": random_a}, 0.13)
    _knn(results / "stranger.json", {"source": "weights", "path": "w.safetensors", "fingerprint": "f" * 64}, 0.99)
    _knn(results / "temperature.json", {"source": "run", "path": "x", "fingerprint": teacher_a}, 0.40,
         temperature=0.5)
    (results / "broken.json").write_text("{")

    out, err = cli_ok(capsys, "compare", str(a), str(b), "--results", str(results), "--out", str(tmp_path / "c.html"))
    assert "skipped" in err and "broken.json" in err
    lines = out.splitlines()
    # two tables of one evaluation and data, told apart by the setting they differ in
    assert "eval knn · train data/x/train, val data/x/val · temperature 0.07" in lines
    assert "eval knn · train data/x/train, val data/x/val · temperature 0.5" in lines
    first = lines[lines.index("eval knn · train data/x/train, val data/x/val · temperature 0.07"):][:7]
    assert first[1].split() == ["model", "top-1", "k=10", "%"]
    rows = [" ".join(line.split()) for line in first[3:7]]
    assert rows[0].startswith(f"{a}: final teacher") and rows[0].endswith(" 31.0")
    # b's two results: the newest shown, and said
    assert rows[1].startswith(f"{b}: final teacher") and rows[1].endswith("(newest of 2 results) 25.0")
    assert rows[2].startswith(f"random init (seed 0) of {a}'s architecture: ?") and rows[2].endswith(" 13.0")
    assert rows[3] == "chance (every image the majority class, coat) 12.0"
    assert "99.0" not in out  # a model of no run's is left out
    page = (tmp_path / "c.html").read_text()
    assert page.count("<table>") == 2 and "31.0" in page and 'alt="training curves"' in page

    record = json.loads(cli_ok(capsys, "compare", str(a), str(b), "--results", str(results), "--json")[0])
    assert record["runs"] == [str(a), str(b)] and len(record["tables"]) == 2
    table = next(t for t in record["tables"] if t["settings"] == {"temperature": 0.07})
    assert [r["kind"] for r in table["rows"]] == ["own", "own", "comparison", "chance"]
    assert table["rows"][1]["values"] == {"top-1 k=10": 0.25} and table["rows"][1]["results"] == 2
    assert table["rows"][1]["file"] == str(b / "results" / "b.json")


def test_compare_refuses_a_run_given_twice_and_says_when_nothing_is_found(two_runs, tmp_path, capsys):
    a, _ = two_runs
    code, _, err = cli("compare", str(a), str(a) + "/", capsys=capsys)
    assert code == 2 and f"{a} is given twice; give each run once" in err
    out, _ = cli_ok(capsys, "compare", str(a), "--results", str(tmp_path))
    assert out.startswith("no evaluation of these runs found")
    code, _, err = cli("compare", str(a), "--out", str(tmp_path / "c.png"), capsys=capsys)
    assert code == 2 and "must end in .html" in err


def test_over_seeds_makes_the_runs_of_one_recipe_one_row_with_their_spread(two_runs, tmp_path, capsys):
    a, b = two_runs
    c = tmp_path / "runs" / "dino_c"  # another recipe: its batch differs
    shutil.copytree(a, c)
    _retrained(c)
    _retrained(c)
    (c / "config.yaml").write_text((c / "config.yaml").read_text().replace("batch_size: 4", "batch_size: 2"))
    assert "batch_size: 2" in (c / "config.yaml").read_text()
    (b / "config.yaml").write_text((b / "config.yaml").read_text().replace("seed: 0", "seed: 1", 1))
    results = tmp_path / "results"
    for run, top1 in ((a, 0.30), (b, 0.20), (c, 0.50)):
        _knn(results / f"{run.name}.json", {"source": "run", "path": "x", "fingerprint": _fingerprints(run)[0]}, top1)
    record = json.loads(cli_ok(capsys, "compare", str(a), str(b), str(c), "--results", str(results), "--over-seeds",
                               "--json")[0])
    rows = record["tables"][0]["rows"]
    assert [r["model"] for r in rows][:2] == [f"{a}, {b}: final teacher (mean of 2 seeds)",
                                              f"{c}: final teacher (step 8)"]
    assert rows[0]["values"]["top-1 k=10"] == pytest.approx(0.25) and rows[0]["seeds"] == [str(a), str(b)]
    assert rows[0]["std"]["top-1 k=10"] == pytest.approx(0.0707107, abs=1e-6)  # sample standard deviation, n - 1
    out, _ = cli_ok(capsys, "compare", str(a), str(b), str(c), "--results", str(results), "--over-seeds")
    row = next(line for line in out.splitlines() if "(mean of 2 seeds)" in line)
    assert row.split()[-3:] == ["25.0", "±", "7.1"]
    # without --over-seeds, one row a run
    record = json.loads(cli_ok(capsys, "compare", str(a), str(b), str(c), "--results", str(results), "--json")[0])
    assert sum(r["kind"] == "own" for r in record["tables"][0]["rows"]) == 3


def test_review_edges_dates_in_other_zones_partial_seeds_reasons_and_bad_scores(two_runs, tmp_path, capsys):
    """A review (2026-12-07): results' dates were compared as text (an older one in UTC+1 shown as the newest); a
    merged row showed one seed's score as the mean of two; every left-out result was said to be "trained again
    since"; a score that is no number crashed the whole command."""
    a, b = two_runs
    teacher_a, _ = _fingerprints(a)
    teacher_b, _ = _fingerprints(b)
    (b / "config.yaml").write_text((b / "config.yaml").read_text().replace("seed: 0", "seed: 1", 1))
    results = tmp_path / "results"
    own_a = {"source": "run", "path": "x", "fingerprint": teacher_a}
    _knn(results / "a-late.json", own_a, 0.9, date="2026-12-07T16:30:00+01:00")  # 15:30 UTC: the older
    _knn(results / "a-early.json", own_a, 0.1, date="2026-12-07T16:00:00+00:00")
    _knn(results / "b.json", {"source": "run", "path": "x", "fingerprint": teacher_b}, 0.3,
         date="2026-12-07T16:00:00+00:00")
    _knn(results / "a-k20.json", own_a, 0.5, k=20)  # only seed a has k = 20
    _knn(results / "bad.json", own_a, "0.5", k=30)  # a score that is no number
    _knn(a / "results" / "old.json", {"source": "run", "path": str(a / "teacher.safetensors")}, 0.7)  # no fingerprint
    record = json.loads(cli_ok(capsys, "compare", str(a), str(b), "--results", str(results), "--json")[0])
    rows = {r["run"]: r for r in record["tables"][0]["rows"] if r["kind"] == "own"}
    assert rows[str(a)]["values"]["top-1 k=10"] == 0.1 and rows[str(a)]["file"].endswith("a-early.json")
    assert any("bad.json" in line and "not the result" in line for line in record["skipped"])
    assert record["unmatched"] == [f"{a / 'results' / 'old.json'} (records no fingerprint of the weights it evaluated "
                                   f"(written by an older mlsctl), so it cannot be told from another model's result)"]
    merged = json.loads(cli_ok(capsys, "compare", str(a), str(b), "--results", str(results), "--over-seeds",
                               "--json")[0])["tables"][0]["rows"][0]
    assert merged["values"] == {"top-1 k=10": pytest.approx(0.2), "top-1 k=20": None}  # b has no k = 20
    _, err = cli_ok(capsys, "compare", str(a), str(b), "--results", str(results))
    assert "left out, not known to be a run's weights: " in err and "older mlsctl" in err



def test_a_fifo_or_a_device_among_the_results_is_skipped_not_read(two_runs, tmp_path, capsys, monkeypatch):
    """A FIFO reports size 0 and hung the scan; a link to /dev/zero was read until memory ran out (a probe)."""
    import os

    from mlsctl import report

    a, _ = two_runs
    teacher_a, _ = _fingerprints(a)
    results = tmp_path / "results"
    _knn(results / "a.json", {"source": "run", "path": str(a / "teacher.safetensors"), "fingerprint": teacher_a}, 0.31)
    os.mkfifo(results / "fifo.json")
    (results / "zero.json").symlink_to("/dev/zero")
    monkeypatch.setattr(report, "RESULT_READ_LIMIT", 1000)  # were /dev/zero read, a bounded read
    found, skipped = report.read_results([results])
    assert [p.name for p, _ in found] == ["a.json"]
    assert f"skipped {results / 'fifo.json'}: not a regular file" in skipped
    assert f"skipped {results / 'zero.json'}: not a regular file" in skipped
    out, err = cli_ok(capsys, "compare", str(a), "--results", str(results))
    assert "fifo.json: not a regular file" in err and "zero.json: not a regular file" in err and "31.0" in out


def test_a_row_merged_from_several_results_records_every_file_its_values_came_from(two_runs, tmp_path, capsys):
    """A new user's probe (2026-12-08): a row "(newest of 2 results)" took k=1 from the older file and k=10 from the
    newer, but the JSON's ``file`` named the newer alone."""
    a, _ = two_runs
    teacher_a, _ = _fingerprints(a)
    model = {"source": "run", "path": str(a / "teacher.safetensors"), "fingerprint": teacher_a}
    results = tmp_path / "results"
    _knn(results / "old.json", model, 0.20, date="2026-12-07T09:00:00", k=1)
    _knn(results / "new.json", model, 0.31, k=10)
    _knn(results / "newest.json", model, 0.33, date="2026-12-07T11:00:00", k=10)  # overrides new.json's k=10
    record = json.loads(cli_ok(capsys, "compare", str(a), "--results", str(results), "--json")[0])
    row = record["tables"][0]["rows"][0]
    assert row["values"] == {"top-1 k=1": 0.20, "top-1 k=10": 0.33} and row["results"] == 3
    assert row["file"] == str(results / "newest.json")  # kept, for scripts that read it
    assert row["files"] == [str(results / "newest.json"), str(results / "old.json")]
    assert row["sources"] == {"top-1 k=1": str(results / "old.json"), "top-1 k=10": str(results / "newest.json")}
