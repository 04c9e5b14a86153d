"""mlsctl report: one self-contained HTML page, rendered by headless Chromium where installed."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import cli_env, cli_ok, in_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _teacher_fingerprint(run) -> str:
    from mlsctl.restore import from_run

    return from_run(run).fingerprint


def _report(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "results").mkdir()
    (run / "results" / "knn.json").write_text(json.dumps({
        "command": "eval knn", "model": {"source": "run", "path": str(run / "teacher.safetensors"),
                                         "fingerprint": _teacher_fingerprint(run)},
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
    # the note under the neighbours counts the query's own entries, not assumes them first (a probe, 2026-12-07)
    from mlsctl.bank import load_banks
    from mlsctl.runs import Run

    bank = load_banks(Run(finished_run[0]).latest().banks_path)["cls"]
    own = int((bank.payload["image_id"][bank.written_mask()] == 0).sum())
    said = re.search(r"the bank holds (\d+) entr(?:y|ies) written from its own earlier views, (\d+) of them among "
                     r"these (\d+)", page)
    assert said and said.group(1) == str(own) and int(said.group(2)) <= min(own, 8), said


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package chromium)")
def test_report_renders_in_headless_chromium(finished_run, tmp_path, capsys):
    record, _ = _report(finished_run, tmp_path, capsys)
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          (tmp_path / "report.html").as_uri()], capture_output=True, text=True, timeout=120).stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded and loaded.group(1) == loaded.group(2) == str(record["images"])
    for section in ("Summary", "Recipe", "Training curves", "PCA patch maps", "Memory banks", "Evaluations"):
        assert f"<h2>{section}</h2>" in dom


def test_report_skips_a_strangers_or_a_damaged_result_with_a_note(finished_run, tmp_path, capsys, monkeypatch):
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
    assert record["unmatched"] == 1 and len(record["skipped"]) == 3  # mine.json records no fingerprint
    assert "linear.json: not the result that eval linear writes (no 'chosen')" in err
    assert "knn.json: not the result that eval knn writes (no 'top1')" in err and "deep.json: not readable JSON" in err
    page = (tmp_path / "r.html").read_text()
    assert "50.00" in page and page.count('class="note">skipped') == 3
    # a JSON far larger than any result, in RUN itself, is not read whole (a review, 2026-12-06)
    from mlsctl import report

    monkeypatch.setattr(report, "RESULT_READ_LIMIT", 100)
    (run / "huge.json").write_text(json.dumps({"command": "eval knn", "pad": "x" * 200}))
    out, err = cli_ok(capsys, "report", str(run), "--out", str(tmp_path / "r.html"), "--overwrite", "--json",
                      cwd=tmp_path)
    assert f"skipped {run / 'huge.json'}: " in err and "more than any eval result holds" in err
    for damage in ('{"steps": 4', "[1, 2]", "[" * 100_000 + "]" * 100_000):
        (run / "summary.json").write_text(damage)
        code, _, err = cli("report", str(run), "--out", str(tmp_path / "r.html"), capsys=capsys)
        assert code == 2 and "summary.json is damaged" in err and "Traceback" not in err
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1


# ----------------------------------------------------------------------------------- issue 24, item 2


def _labelled_images(root):
    """Two classes of tiny images, for train and val."""
    from conftest import make_images

    for split, offset in (("train", 0), ("val", 10)):
        for i, name in enumerate("ab"):
            folder = make_images(root / split / name, 3, seed=i + offset)
            for image in (folder / "sub").glob("*.png"):
                image.rename(folder / f"s{image.name}")
            (folder / "sub").rmdir()
    return root


def test_24_2_evaluations_are_matched_to_the_run_by_fingerprint(finished_run, tmp_path, capsys):
    """The run's own results (its final teacher, the teacher of a checkpoint) are told from the
    results of a random init of its architecture (a comparison, whose recorded path is the run) and
    from results that cannot be matched: one without a fingerprint (an older mlsctl), one recorded
    as the run's teacher whose fingerprint is not the teacher's (the run was trained again). Each
    names its data; a result of another model in --results stays out."""
    from mlsctl import config as config_lib
    from mlsctl.restore import from_checkpoint, from_run
    from mlsctl.runs import Run

    run_dir, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = _labelled_images(tmp_path / "cls")
    results = tmp_path / "results"
    knn = ["eval", "knn", "--train", str(data / "train"), "--val", str(data / "val"), "--k", "3"]
    cli_ok(capsys, *knn, "--run", str(run), "--out", str(results / "trained.json"), cwd=tmp_path)
    cli_ok(capsys, *knn, "--run", str(run), "--random-init", "--out", str(results / "random.json"), cwd=tmp_path)
    trained = json.loads((results / "trained.json").read_text())
    first = Run(run).checkpoints()[0]
    at_first = from_checkpoint(config_lib.load_recipe(str(run / "config.yaml")), first, Run(run)).info
    for name, model in {"checkpoint": at_first,
                        "old": {k: v for k, v in trained["model"].items() if k != "fingerprint"},
                        "stale": {**trained["model"], "fingerprint": "0" * 64},
                        "other": {"source": "weights", "path": str(tmp_path / "theirs.safetensors"),
                                  "fingerprint": "1" * 64},
                        # features of this run refined by a refine run (refine apply's record): a comparison here, not
                        # "unmatched: trained again" (a new user's run-through, 2026-12-06)
                        "refined": {**trained["model"], "fingerprint": "2" * 64,
                                    "base_fingerprint": trained["model"]["fingerprint"],
                                    "refiner": {"run": str(tmp_path / "refiner-run"), "step": 18,
                                                "fingerprint": "3" * 64}}}.items():
        (results / f"{name}.json").write_text(json.dumps({**trained, "model": model}))
    out, _ = cli_ok(capsys, "report", str(run), "--out", str(tmp_path / "r.html"), "--results", str(results),
                    "--patch-images", "1", "--json")
    shown = {group: sorted(Path(p).stem for p in paths) for group, paths in json.loads(out)["results"].items()}
    assert shown == {"own": ["checkpoint", "trained"], "comparison": ["random", "refined"], "unmatched": ["old", "stale"]}
    page = (tmp_path / "r.html").read_text()
    own, comparisons, unmatched = (page.index(f"<h3>{title}") for title in
                                   ("This run&#x27;s weights", "Comparison models", "Unmatched"))
    steps = json.loads((run / "summary.json").read_text())["steps"]
    assert own < page.index(f"eval knn · final teacher (step {steps})") < comparisons
    assert own < page.index(f"eval knn · teacher of the checkpoint at step {first.step}") < comparisons
    assert comparisons < page.index("random init (seed 0) of this run&#x27;s architecture") < unmatched
    assert comparisons < page.index(f"this run&#x27;s features (final teacher (step {steps})) refined by "
                                    f"{tmp_path / 'refiner-run'} at step 18") < unmatched
    assert unmatched < page.index("records no fingerprint") and unmatched < page.index("trained again")
    assert page.count(f"data: train {data / 'train'}, val {data / 'val'} (labels: each image&#x27;s own folder, however deep)") == 6
    assert trained["model"]["fingerprint"] == from_run(run).fingerprint and trained["written"]["date"]


def test_24_2_the_summary_says_when_with_what_and_on_what_a_run_was_trained(finished_run, tmp_path):
    """date, mlsctl version and commit, device and architecture; numbers rounded. A run trained
    before summary.json and state.json recorded them gets date and device from train.log."""
    from mlsctl import config as config_lib
    from mlsctl import provenance
    from mlsctl.report import RunWeights, _summary
    from mlsctl.runs import Run

    run_dir, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    recipe = config_lib.load_recipe(str(run / "config.yaml"))
    weights = RunWeights(Run(run), recipe)
    summary = json.loads((run / "summary.json").read_text())
    commit = provenance.commit()
    assert summary["device"] == "cpu" and summary["commit"] == commit and summary["mlsctl_version"]
    text = " ".join(re.sub(r"<[^>]+>", " ", _summary(Run(run), recipe, weights)).split())
    assert f"commit {commit[:12]}" in text if commit else "no commit (not run from a git checkout)" in text
    assert re.search(r"date \d{4}-\d\d-\d\d \d\d:\d\d to \d{4}-\d\d-\d\d \d\d:\d\d ", text)
    assert re.search(r"device cpu, fp32, 1 process ", text)
    assert "vit_small_patch16_224 (embed_dim 32, depth 2, num_heads 2), 32 px, patch 8; 0.03 M backbone parameters" in text
    assert f"final loss {summary['final_loss']:.4g} " in text and str(summary["final_loss"]) not in text
    for path in [run / "summary.json", *run.glob("checkpoints/*/state.json")]:  # as an older mlsctl wrote them
        record = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in record.items()
                                    if k not in ("finished", "device", "precision", "commit", "mlsctl_version")}))
    text = " ".join(re.sub(r"<[^>]+>", " ", _summary(Run(run), recipe, weights)).split())
    assert re.search(r"date \d{4}-\d\d-\d\d \d\d:\d\d to \d{4}-\d\d-\d\d \d\d:\d\d \(train\.log\)", text)
    assert re.search(r"device cpu, fp32, 1 process ", text) and "commit not recorded" in text
    # a resumed run (a new user, 2026-12-06: only the last session's time and commit were shown)
    record = json.loads((run / "summary.json").read_text())
    record.update(resumed_from=4, seconds=2.0, seconds_all_sessions=5.0, sessions=[
        {"from_step": 0, "to_step": 4, "seconds": 3.0, "commit": "a" * 40, "device": "cuda (NVIDIA H200)"},
        {"from_step": 4, "to_step": 8, "seconds": 2.0, "commit": "b" * 40 + "-dirty", "device": "cpu"}])
    (run / "summary.json").write_text(json.dumps(record))
    text = " ".join(re.sub(r"<[^>]+>", " ", _summary(Run(run), recipe, weights)).split())
    assert "training time 5.0 s in 2 sessions" in text
    assert (f"sessions steps 0–4 (3.0 s, commit {'a' * 12}, cuda (NVIDIA H200)); steps 4–8 (2.0 s, commit "
            f"{'b' * 12}-dirty, cpu)") in text


def test_an_unreadable_training_image_is_left_out_of_the_patch_maps_and_named(finished_run, tmp_path, capsys,
                                                                               monkeypatch):
    """Each PCA tile is captioned with the file it shows: an unreadable image in the middle used to shift every
    later caption onto the wrong file, without a word."""
    from mlsctl import viz
    from mlsctl.data import images

    real_load, real_figure = images.load_rgb, viz.pca_figure
    captions = []

    def load_rgb(path, *args, **kwargs):
        if path.name == sorted(path.parent.iterdir())[1].name:
            raise images.BadImage("truncated image data")
        return real_load(path, *args, **kwargs)

    def pca_figure(seen, colours, names, out):
        captions.extend(names)
        return real_figure(seen, colours, names, out)

    monkeypatch.setattr(images, "load_rgb", load_rgb)
    monkeypatch.setattr(viz, "pca_figure", pca_figure)
    _, page = _report(finished_run, tmp_path, capsys)
    from mlsctl.bank_inspect import SourceImages
    from mlsctl.runs import Run

    sources = SourceImages(Run(tmp_path / "run"))
    first = [sources.path(i) for i in range(4)]
    bad = sorted(first[0].parent.iterdir())[1].name
    assert bad in [p.name for p in first]
    assert captions == [p.name for p in first if p.name != bad]
    assert "3 of the first 4 training images" in page and f"Left out, unreadable: {bad} (truncated image data)" in page


def test_report_never_writes_over_a_file_that_is_not_a_report(finished_run, tmp_path, capsys):
    """A new-user probe (2026-12-05): report --out RUN/teacher.safetensors wrote the page over the run's
    teacher, and --out notes.txt over the user's notes. --out ends in .html; an existing file is
    replaced when it is an earlier report, or with --overwrite."""
    from conftest import cli

    run_dir, _ = finished_run
    teacher = run_dir / "teacher.safetensors"
    weights = teacher.read_bytes()
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    for out, said in ((teacher, "must end in .html"), (tmp_path / "notes.txt", "must end in .html"),
                      (notes, "is not an mlsctl report; add --overwrite"), (tmp_path, "must end in .html")):
        code, _, err = cli("report", str(run_dir), "--out", str(out), "--results", str(tmp_path), capsys=capsys)
        assert code == 2 and said in err, err
    assert teacher.read_bytes() == weights and notes.read_text() == "<p>my notes</p>"
    page = tmp_path / "r.html"
    for _ in range(2):  # an earlier report is replaced without asking
        cli_ok(capsys, "report", str(run_dir), "--out", str(page), "--results", str(tmp_path), "--patch-images", "1")
    cli_ok(capsys, "report", str(run_dir), "--out", str(notes), "--results", str(tmp_path), "--patch-images", "1",
           "--overwrite")
    assert notes.read_text().startswith("<!DOCTYPE html>")


def test_a_results_folder_that_is_not_there_is_one_sentence(finished_run, tmp_path, capsys):
    """A probe (2026-12-06): `report RUN --results nonexist` reported "0 evaluations" without a word."""
    from conftest import cli

    run_dir, _ = finished_run
    (tmp_path / "afile").write_text("x")
    for given, words in ((tmp_path / "nonexist", "does not exist"), (tmp_path / "afile", "is a file")):
        code, _, err = cli("report", str(run_dir), "--out", str(tmp_path / "r.html"), "--results", str(given),
                           capsys=capsys)
        assert code == 2 and f"--results {given} {words}" in err and not (tmp_path / "r.html").exists(), err


def test_a_knn_seg_table_shows_foreground_iou_where_the_result_has_it(tmp_path):
    """A new user (2026-12-06): the report's knn-seg table left out foreground IoU, the README's first metric."""
    from mlsctl.report import _evaluation

    row = {"fraction": "1/1", "train_images": 20, "miou": 0.111, "miou_std": 0.0, "miou_hungarian": 0.116}
    older = _evaluation({"command": "eval knn-seg", "results": [row]}, tmp_path / "r.json", "x")
    newer = _evaluation({"command": "eval knn-seg", "results": [dict(row, foreground_iou=0.494)]},
                        tmp_path / "r.json", "x")
    assert "foreground IoU %" not in older and "foreground IoU %" in newer and "49.40" in newer
    # the constant rule (recorded since 2026-12-07) last, in the score columns; chance_headline for compare
    from mlsctl.evaluate.results import chance_headline

    chance = {"miou": 0.064, "foreground_iou": 0.0, "pixel_accuracy": 0.70, "majority_class": "background"}
    seg = {"command": "eval knn-seg", "chance": chance,
           "results": [dict(row, foreground_iou=0.494, chance=chance),
                       dict(row, fraction="1/8", foreground_iou=0.3, chance=dict(chance, miou=0.05))]}
    assert "<td>chance: every pixel background</td><td></td><td></td><td>6.40</td><td>0.00</td>" in _evaluation(
        seg, tmp_path / "r.json", "x")
    assert chance_headline(seg) == ("chance (every pixel the majority class, background)", {
        "mIoU": 0.064, "foreground IoU": 0.0, "mIoU 1/8": 0.05, "foreground IoU 1/8": 0.0})
    seg["results"][1]["chance"]["majority_class"] = "bag"  # a fraction whose subset's majority is another class
    assert chance_headline(seg)[0] == "chance (every pixel the majority class)"  # a review: it named background
    linear = {"command": "eval linear-seg", "miou": 0.2, "pixel_accuracy": 0.8, "chance": chance}  # no background
    assert chance_headline(linear)[1] == {"mIoU": 0.064, "pixel accuracy": 0.70}
    assert "<td>chance: every pixel background</td><td>6.40</td>" in _evaluation(linear, tmp_path / "r.json", "x")
    assert chance_headline({"command": "eval knn-seg", "results": [row]}) is None  # results before it was kept


def test_a_copied_run_keeps_its_random_init_comparison_and_results_beside_it_count(finished_run, tmp_path, capsys,
                                                                                   monkeypatch):
    """A new user (2026-12-06): the random-init result of a copied run was left out without a word (matched by the
    path it recorded, the original run's), and results kept in RUN itself were not looked at."""
    import shutil

    from conftest import cli

    run, _ = finished_run
    images = run.parent / "images"
    monkeypatch.chdir(tmp_path)  # the evaluation's feature cache
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p.relative_to(images).as_posix()},{i % 2}\n"
                                               for i, p in enumerate(sorted(images.rglob("*.png")))))
    out = tmp_path / "random.json"
    code, _, err = cli("eval", "knn", "--train", str(images), "--val", str(images), "--train-labels", str(labels),
                       "--val-labels", str(labels), "--run", str(run), "--random-init", "--k", "1", "--out", str(out),
                       capsys=capsys)
    assert code == 0, err
    code, _, err = cli("eval", "knn", "--train", str(images), "--val", str(images), "--train-labels", str(labels),
                       "--val-labels", str(labels), "--run", str(run), "--random-init", "--seed", "1", "--k", "1",
                       "--out", str(tmp_path / "other-seed.json"), capsys=capsys)
    assert code == 0, err
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    results = tmp_path / "results"  # away from the copy: matched by fingerprint alone (a review: in RUN any counts)
    results.mkdir()
    shutil.copy(out, results / "random.json")  # recorded with the original run's path
    other = json.loads((tmp_path / "other-seed.json").read_text())  # a seed whose fingerprint is another
    other["model"]["seed"] = 0
    (results / "relabelled.json").write_text(json.dumps(other))
    code, printed, err = cli("report", str(copy), "--results", str(results), "--out", str(tmp_path / "r.html"),
                             "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(printed[printed.index("{"):])
    assert report["results"]["comparison"] == [str(results / "random.json")], report["results"]
    shutil.copy(out, copy / "beside.json")  # results kept in RUN itself are read too
    code, printed, err = cli("report", str(copy), "--results", str(results), "--out", str(tmp_path / "r.html"),
                             "--overwrite", "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(printed[printed.index("{"):])
    assert str(copy / "beside.json") in report["results"]["comparison"], report["results"]


def test_the_report_keeps_the_consoles_notes_on_what_the_scores_mean(tmp_path):
    """A new user's probe (2026-12-07): the report dropped k-NN's effective k (``100 (all 80)``), retrieval's
    chance level and object count, the photos its noise replaced, and recall's chance; each is shown now."""
    from mlsctl.report import _evaluation

    knn = _evaluation({"command": "eval knn", "train_images": 80, "results": [
        {"k": 20, "neighbours": 20, "top1": 0.5, "top5": 0.9}, {"k": 100, "neighbours": 80, "top1": 0.4, "top5": 0.9},
        {"k": 200, "top1": 0.4, "top5": 0.9}]}, tmp_path / "r.json", "x")  # the last: before "neighbours" was kept
    assert "<td>20</td>" in knn and knn.count("(all 80)") == 2
    row = {"method": "mile", "backbone": "trained", "noise": 0.25, "AR@10": 0.95, "R@1": 0.5,
           "replaced_per_set": {"min": 0, "max": 0}}
    retrieval = _evaluation({"command": "eval retrieval", "objects": 2, "results": [row]}, tmp_path / "r.json", "x")
    assert "2 gallery objects" in retrieval and "25% (0 a set)" in retrieval
    assert "<td>chance</td><td>(a random ranking)</td><td></td><td>95.00</td><td>50.00</td>" in retrieval
    assert "R@2 to R@10 are 100 % by construction" in retrieval
    del row["replaced_per_set"]  # a result from before it was kept: its query sets' sizes give it
    retrieval = _evaluation({"command": "eval retrieval", "objects": 2, "query_set_sizes": {"min": 2, "max": 4},
                             "results": [row]}, tmp_path / "r.json", "x")
    assert "25% (0-1 a set)" in retrieval
    recall = _evaluation({"command": "eval recall", "embeddings": 4, "classes": 2, "map_at_r": 1.0,
                          "recall": {"1": 1.0, "3": 1.0}, "chance": {"1": 1 / 3, "3": 1.0}, "ks_certain": [3]},
                         tmp_path / "r.json", "x")
    assert "<td>chance (a random ranking)</td><td>33.33</td><td>100.00</td><td>–</td>" in recall  # no MAP@R kept
    assert html.escape("note: R@3 is 100 % by construction: any 3 embeddings other than a query hold one of its "
                       "class") in recall  # eval recall's words (recall.certain_note), not the page's own
    kept = _evaluation({"command": "eval recall", "embeddings": 4, "classes": 2, "map_at_r": 1.0,
                        "recall": {"1": 1.0}, "chance": {"1": 1 / 3}, "chance_map_at_r": 1 / 3}, tmp_path / "r.json", "x")
    assert "<td>chance (a random ranking)</td><td>33.33</td><td>33.33</td>" in kept


def test_a_result_on_val_images_the_model_trained_on_is_flagged(finished_run, tmp_path, capsys):
    """A new user's probe (2026-12-07): eval knn said "the scores measure memory, not generalisation", and the
    report listed the result as any other. Flagged on the page and in the terminal, for every evaluation
    that records it (knn, linear: ``val_images``; knn-seg, linear-seg: ``val.images``)."""
    run_dir, _ = finished_run
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "results").mkdir()
    model = {"source": "run", "path": str(run / "teacher.safetensors"), "fingerprint": _teacher_fingerprint(run)}
    shared = {"name": "folders", "val_images_in_train": 40, "val_images_in_train_as_copies": 40}
    (run / "results" / "knn.json").write_text(json.dumps({
        "command": "eval knn", "model": model, "dataset": shared, "train_images": 120, "val_images": 40,
        "results": [{"k": 10, "neighbours": 10, "top1": 0.5, "top5": 0.9}]}))
    (run / "results" / "linear-seg.json").write_text(json.dumps({
        "command": "eval linear-seg", "model": model, "dataset": dict(shared, val_images_in_train_as_copies=0),
        "val": {"images": 50}, "miou": 0.3, "pixel_accuracy": 0.8}))
    (run / "results" / "linear.json").write_text(json.dumps({  # none shared: no flag
        "command": "eval linear", "model": model, "dataset": {"name": "folders"}, "val_images": 40,
        "chosen": {"lr": 0.1, "weight_decay": 0.0}, "results": {"top1": 0.5, "top5": 0.9}}))
    compared = "by path only (3.0 GiB of images of equal sizes)"  # none shared, compared by path: a note, no flag
    (run / "results" / "compared.json").write_text(json.dumps({
        "command": "eval knn", "model": model, "dataset": {"name": "folders", "val_images_compared": compared},
        "train_images": 120, "val_images": 40, "results": [{"k": 10, "neighbours": 10, "top1": 0.5, "top5": 0.9}]}))
    out, _ = cli_ok(capsys, "report", str(run), "--out", str(tmp_path / "report.html"), "--patch-images", "1")
    page = (tmp_path / "report.html").read_text()
    assert page.count('<p class="warning">') == 2
    assert (f'<p class="note">note: the val images were compared with the training images {compared}: copies under '
            f"other paths were not looked for</p>") in page
    assert "compared.json" not in out and "compared.json" in page
    assert ("note: 40 of the 40 val images are training images too (byte copies under other paths): the scores "
            "measure memory, not generalisation") in page
    assert "note: 40 of the 50 val images are training images too (the same files)" in page
    assert ("note: 2 evaluations scored val images that are training images too (the page flags them: the scores "
            "measure memory, not generalisation)") in out and "knn.json" in out and "linear.json" not in out


def test_a_description_that_overrides_may_contradict_is_marked_as_the_recipes(finished_run, tmp_path):
    """A new user's probe (2026-12-07): "ViT-S/16 ImageNet-pretrained; GPU" stood in the report of a run with
    model.pretrained=false and a tiny model. pretrain records the keys set on its command line (start.json), and
    the summary marks the description as the recipe's, with what was overridden."""
    from conftest import tiny_recipe, write_recipe

    from mlsctl import config as config_lib
    from mlsctl.report import RunWeights, _summary
    from mlsctl.runs import Run

    def summary_of(run: Path) -> str:
        recipe = config_lib.load_recipe(str(run / "config.yaml"))
        page = _summary(Run(run), recipe, RunWeights(Run(run), recipe))
        return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())

    raw = tiny_recipe(finished_run[0].parent / "images", description="ViT-S/16 ImageNet-pretrained; GPU")
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    in_process("pretrain", str(recipe), "--out", str(tmp_path / "run"), "optim.epochs=1", "model.pretrained=false",
               check=True)
    assert json.loads((tmp_path / "run" / "start.json").read_text())["overridden"] == ["optim.epochs", "model.pretrained"]
    assert ("description ViT-S/16 ImageNet-pretrained; GPU (the recipe's description; overridden: optim.epochs=1, "
            "model.pretrained=false)") in summary_of(tmp_path / "run")
    start = json.loads((tmp_path / "run" / "start.json").read_text())
    (tmp_path / "run" / "start.json").write_text(json.dumps({"init_from": start["init_from"]}))  # an older run's
    assert "(the recipe's description; the keys overridden when the run started are not recorded)" in \
        summary_of(tmp_path / "run")
    in_process("pretrain", str(recipe), "--out", str(tmp_path / "own"), "optim.epochs=1", "description=mine",
               check=True)
    assert "description mine architecture" in summary_of(tmp_path / "own")  # the user's own: shown as it is


def test_results_of_the_weights_a_run_started_from_are_matched_by_fingerprint(finished_run, tmp_path, capsys):
    """A new user's probe (2026-12-07): a run started from `model.weights=exports/mls` (an export folder) left out
    the results of exports/mls/model.safetensors and of runs/mls, those very weights: the start was matched by
    resolved path only. It is matched by the fingerprint of the rebuilt start too."""
    from mlsctl import config as config_lib
    from mlsctl.report import RunWeights, classify
    from mlsctl.restore import from_run
    from mlsctl.runs import Run

    from conftest import tiny_recipe, write_recipe

    source, _ = finished_run
    cli_ok(capsys, "export", str(source), "--out", str(tmp_path / "export"))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(source.parent / "images", optim__epochs=1))
    cli_ok(capsys, "pretrain", str(recipe), f"model.weights={tmp_path / 'export'}", "--out", str(tmp_path / "run"))
    run = Run(tmp_path / "run")
    weights = RunWeights(run, config_lib.load_recipe(str(run.config_path)))
    start = from_run(source).fingerprint
    results = tmp_path / "results"
    for name, model in (("through-run", {"source": "run", "path": str(source)}),
                        ("through-file", {"source": "weights", "path": str(tmp_path / "export" / "model.safetensors")}),
                        ("other", {"source": "weights", "path": str(tmp_path / "elsewhere.safetensors")})):
        result = {"command": "eval knn", "model": dict(model, fingerprint=start if name != "other" else "0" * 64)}
        shown = classify(result, results / f"{name}.json", run, weights)
        if name == "other":
            assert shown is None  # another model's result, outside the run: no place in its report
        else:
            assert shown[0] == "comparison" and shown[1].endswith("(the weights this run started from)"), shown


def test_a_path_that_is_no_run_is_refused_before_torch_loads(tmp_path):
    # a new user's probe (2026-12-07): `report FEATURES` took 4 s of imports to say it was no run
    import sys

    program = ("import sys\nfrom mlsctl.cli import main\ntry:\n    main()\nexcept SystemExit as end:\n"
               "    print(end.code, 'torch' in sys.modules)\n")
    for command in (["report"], ["compare"]):
        done = subprocess.run([sys.executable, "-c", program, *command, str(tmp_path)], capture_output=True, text=True,
                              env=cli_env(), timeout=120)
        assert done.stdout.split() == ["2", "False"], (done.stdout, done.stderr)
        assert "is not a run folder" in done.stderr


def test_the_data_line_names_the_val_labels_where_they_differ():
    from mlsctl.report import data_text

    record = {"name": "folders", "train_root": "/d/train", "val_root": "/d/val", "labels": "/d/train.csv"}
    result = {"command": "eval knn", "dataset": {**record, "val_labels": "/d/val.csv"}}
    assert data_text(result) == "train /d/train, val /d/val (labels: /d/train.csv, val: /d/val.csv)"
    assert data_text({"command": "eval knn", "dataset": {**record, "val_labels": "/d/train.csv"}}) == \
        "train /d/train, val /d/val (labels: /d/train.csv)"
    assert data_text({"command": "eval knn", "dataset": record}) == "train /d/train, val /d/val (labels: /d/train.csv)"
