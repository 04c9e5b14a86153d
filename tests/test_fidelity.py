"""The fidelity suite's smoke profile, end to end: killed, rerun to the end, rerun again to reuse."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, cli_env


# four cells: every kind (trained, untrained, retrieval, with the linear probe); the others run the same code
CELLS = ("--only", "scenes/random/*", "scenes/dino/*", "products/*", "scenes/mls/*")


def suite(tmp: Path, fmnist: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "benchmarks" / "fidelity.py"), "--profile", "smoke", "--work", str(tmp / "work"),
            "--results", str(tmp / "results"), "--fmnist", str(fmnist), *CELLS, *extra]


@pytest.mark.long  # ~95 s: the real smoke suite; the budget and resume logic have fast tests below
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


# ------------------------------------------------------------------------------------------ --budget-s, fast

sys.path.insert(0, str(REPO / "benchmarks"))
import fidelity  # noqa: E402


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fake_record(cell, seconds: float) -> dict:
    """What run_cell writes for a finished cell, with ``seconds`` as its measured wall time."""
    return {"cell": cell.id, "profile": cell.profile.name, "spec": cell.spec(), "spec_sha": cell.spec_sha(),
            "metrics": {"miou": 0.1} if cell.variant.benchmark == "scenes" else {"mile@trained/noise0": 0.1}, "steps": 8, "resumed_from": 0, "device": fidelity.device_description(),
            "torch": "t", "timm": "t", "commit": "c", "seconds_this_session": {"train": seconds, "eval": 0.0},
            "train_seconds_total": seconds,
            "timing": {"device": fidelity.device_description(), "variant_sha": fidelity.variant_sha(cell.spec()),
                       "seconds": seconds}}


@pytest.fixture
def budget_suite(tmp_path: Path, monkeypatch):
    """The smoke profile with 2 seeds and declared estimates; cells take fake seconds on a fake clock."""
    import dataclasses

    profile = dataclasses.replace(fidelity.PROFILES["smoke"], seeds=(0, 1),
                                  estimates=(("random", 30), ("dino", 50), ("supervised", 40), ("mile", 20)))
    monkeypatch.setitem(fidelity.PROFILES, "smoke", profile)
    clock = FakeClock()
    monkeypatch.setattr(fidelity, "CLOCK", clock)
    monkeypatch.setattr(fidelity, "build_data", lambda *args, **kwargs: None)
    true_seconds = {"random": 30, "dino": 55, "supervised": 40, "mile": 20}  # dino takes longer than declared
    ran: list[str] = []

    def fake_run_cell(cell, threads, rerun, deadline=None):
        assert deadline is not None and clock.now + true_seconds[cell.variant.name] <= deadline + 5
        clock.now += true_seconds[cell.variant.name]
        ran.append(cell.id)
        record = fake_record(cell, true_seconds[cell.variant.name])
        fidelity.atomic.write_json(cell.result_path, record)
        return record

    monkeypatch.setattr(fidelity, "run_cell", fake_run_cell)

    def run(*extra: str) -> int:
        ran.clear()
        return fidelity.main(["--profile", "smoke", "--work", str(tmp_path / "work"), "--results",
                              str(tmp_path / "results"), "--only", "scenes/random/*", "scenes/dino/*",
                              "scenes/supervised/*", "products/*", *extra])

    return run, ran, tmp_path / "results" / "smoke"


def test_budget_runs_the_cells_that_fit_and_the_next_run_goes_on(budget_suite, capsys):
    run, ran, results = budget_suite
    assert run("--budget-s", "100") == 0
    # random/0 (30 s) and dino/0 (55 s) fit; supervised/0 (40 s) does not fit in the 15 s left, nor anything after
    assert ran == ["scenes/random/0", "scenes/dino/0"]
    progress = {r["cell"]: r for r in json.loads((results / "progress.json").read_text())["cells"]}
    assert [c for c, r in progress.items() if r["state"] == "done"] == ["scenes/random/0", "scenes/dino/0"]
    assert progress["scenes/supervised/0"]["why"] == "did not fit: declared estimate 40s, 15s left"
    # dino/1 is planned with what dino/0 measured on this device, not the declared 50 s
    assert (progress["scenes/dino/1"]["estimate_s"], progress["scenes/dino/1"]["estimate_from"]) == (55, "measured")
    assert (progress["scenes/supervised/1"]["estimate_s"], progress["scenes/supervised/1"]["estimate_from"]) == \
        (40, "declared")
    assert "2 done, 6 pending" in capsys.readouterr().out

    assert run("--budget-s", "200") == 0  # goes on with what is pending, in order, while it fits
    assert ran == ["scenes/supervised/0", "products/mile/0", "scenes/random/1", "scenes/dino/1", "scenes/supervised/1"]
    assert run("--budget-s", "10") == 0 and ran == []  # nothing fits: stops at once, still exit 0
    assert run("--budget-s", "100") == 0 and ran == ["products/mile/1"]
    assert json.loads((results / "summary.json").read_text())["cells"] == 8


def test_pack_and_unpack_results_merges_the_cells_of_a_device_window(budget_suite, tmp_path: Path, capsys):
    run, ran, results = budget_suite
    archive = tmp_path / "window.tar.gz"
    assert run("--budget-s", "100", "--pack-results", str(archive)) == 0
    import tarfile

    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    assert names == ["smoke/cells/scenes-dino-seed0.json", "smoke/cells/scenes-random-seed0.json",
                     "smoke/progress.json", "smoke/summary.json", "smoke/summary.md", "smoke/summary.png"]
    here = tmp_path / "here"
    assert fidelity.main(["--profile", "smoke", "--results", str(here), "--unpack-results", str(archive)]) == 0
    merged = sorted(p.name for p in (here / "smoke" / "cells").glob("*.json"))
    assert merged == sorted(n.rsplit("/", 1)[1] for n in names if "/cells/" in n)
    assert json.loads((here / "smoke" / "summary.json").read_text())["cells"] == len(merged)
    with pytest.raises(SystemExit, match="holds results of profile smoke, not cpu"):
        fidelity.main(["--profile", "cpu", "--results", str(here), "--unpack-results", str(archive)])


@pytest.mark.parametrize("dino_miou,passes", [(0.20, True), (0.12, False)])
def test_no_other_cell_runs_before_the_calibration_holds(tmp_path: Path, monkeypatch, capsys, dino_miou, passes):
    """A review (2026-12-06): with DINO too long for the time left, a window filled it with other cells, on a
    benchmark the calibration might yet change; and the methods ran whether or not the calibration held."""
    import dataclasses

    profile = dataclasses.replace(fidelity.PROFILES["smoke"], seeds=(0, 1), calibration=("random", "dino", "supervised"),
                                  estimates=(("random", 30), ("dino", 50), ("supervised", 40), ("mile", 20)))
    monkeypatch.setitem(fidelity.PROFILES, "smoke", profile)
    clock = FakeClock()
    monkeypatch.setattr(fidelity, "CLOCK", clock)
    monkeypatch.setattr(fidelity, "build_data", lambda *args, **kwargs: None)
    miou = {"random": 0.10, "dino": dino_miou, "supervised": 0.40, "mile": None}
    ran, packed = [], []

    seconds = {"random": 30, "dino": 55, "supervised": 40, "mile": 20}

    def fake_run_cell(cell, threads, rerun, deadline=None):
        clock.now += seconds[cell.variant.name]
        ran.append(cell.id)
        record = fake_record(cell, seconds[cell.variant.name])
        if miou[cell.variant.name] is not None:
            record["metrics"] = {"miou": miou[cell.variant.name]}
        fidelity.atomic.write_json(cell.result_path, record)
        return record

    monkeypatch.setattr(fidelity, "run_cell", fake_run_cell)
    real_pack = fidelity.pack_results
    monkeypatch.setattr(fidelity, "pack_results", lambda *args: packed.append(list(ran)) or real_pack(*args))

    def run(budget: str) -> None:
        ran.clear()
        assert fidelity.main(["--profile", "smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r"),
                              "--only", "scenes/random/*", "scenes/dino/*", "scenes/supervised/*", "products/*",
                              "--budget-s", budget, "--pack-results", str(tmp_path / "w.tar.gz")]) == 0

    # random/0 and dino/0 fit, 25 s are left: not supervised/0 (40), and no other scenes cell runs instead; MILE's
    # cells (fmnist-products, which the calibration does not concern) go on
    run("110")
    assert ran == ["scenes/random/0", "scenes/dino/0", "products/mile/0"]
    assert packed == [["scenes/random/0"], ["scenes/random/0", "scenes/dino/0"], ran[:3], ran[:3]]
    progress = {r["cell"]: r for r in json.loads((tmp_path / "r" / "smoke" / "progress.json").read_text())["cells"]}
    assert progress["scenes/random/1"]["why"].startswith("waits for the calibration (scenes/supervised/0 not done)")
    run("1000")
    if passes:
        assert ran == ["scenes/supervised/0", "scenes/random/1", "scenes/dino/1", "scenes/supervised/1", "products/mile/1"]
    else:
        assert ran == ["scenes/supervised/0", "products/mile/1"]
        progress = {r["cell"]: r for r in json.loads((tmp_path / "r" / "smoke" / "progress.json").read_text())["cells"]}
        assert "the calibration failed (DINO 12.0 is not 5 mIoU points above the random init 10.0)" in \
            progress["scenes/random/1"]["why"]
        run("1000")  # judged again from the records: no scenes cell but the calibration's
        assert ran == []
    # --only without the calibration's cells does not get past it (a review, 2026-12-06)
    (tmp_path / "r" / "smoke" / "cells" / "scenes-supervised-seed0.json").unlink()
    ran.clear()
    assert fidelity.main(["--profile", "smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r"),
                          "--only", "scenes/dino/1", "--rerun", "--budget-s", "1000"]) == 0
    assert ran == []


def test_with_two_workers_the_calibration_gate_waits_and_loses_no_cell(tmp_path: Path, monkeypatch):
    """A review (2026-12-06): with --jobs 2, a worker asking while the other still trained DINO took every other
    cell off the queue for good, and nothing ran after the calibration passed."""
    import dataclasses
    import threading

    profile = dataclasses.replace(fidelity.PROFILES["smoke"], seeds=(0, 1), calibration=("random", "dino", "supervised"),
                                  jobs=2)
    monkeypatch.setitem(fidelity.PROFILES, "smoke", profile)
    monkeypatch.setattr(fidelity, "build_data", lambda *args, **kwargs: None)
    miou = {"random": 0.10, "dino": 0.20, "supervised": 0.40}
    ran, lock = [], threading.Lock()

    def fake_run_cell(cell, threads, rerun, deadline=None):
        time.sleep(1.0 if cell.variant.name == "dino" and cell.seed == 0 else 0.05)  # DINO/0 outlasts the others
        with lock:
            ran.append(cell.id)
        record = fake_record(cell, 1)
        record["metrics"] = {"miou": miou[cell.variant.name]}
        fidelity.atomic.write_json(cell.result_path, record)
        return record

    monkeypatch.setattr(fidelity, "run_cell", fake_run_cell)
    assert fidelity.main(["--profile", "smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r"),
                          "--only", "scenes/random/*", "scenes/dino/*", "scenes/supervised/*"]) == 0
    assert sorted(ran) == sorted(f"scenes/{v}/{s}" for v in miou for s in (0, 1))
    calibration = {"scenes/random/0", "scenes/dino/0", "scenes/supervised/0"}
    assert set(ran[:3]) == calibration  # nothing else before the calibration was done


def test_unpack_keeps_a_later_record_and_refuses_one_declared_otherwise(budget_suite, tmp_path: Path, capsys):
    """A review (2026-12-06): windows unpacked out of order, or an archive made before a change of the suite,
    replaced the records here without a word."""
    run, ran, results = budget_suite
    archive = tmp_path / "window.tar.gz"
    assert run("--budget-s", "100", "--pack-results", str(archive)) == 0  # random/0, dino/0
    here = tmp_path / "here" / "smoke" / "cells"
    here.mkdir(parents=True)
    later = json.loads((results / "cells" / "scenes-random-seed0.json").read_text())
    later["finished"], later["metrics"] = "2999-01-01 00:00:00", {"miou": 0.3}
    (here / "scenes-random-seed0.json").write_text(json.dumps(later))
    import tarfile

    other = tmp_path / "other.tar.gz"
    with tarfile.open(archive) as source, tarfile.open(other, "w:gz") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith("scenes-dino-seed0.json"):
                record = json.loads(data)
                record["spec_sha"] = "0" * 16
                data = json.dumps(record).encode()
            member.size = len(data)
            import io

            target.addfile(member, io.BytesIO(data))
    assert fidelity.main(["--profile", "smoke", "--results", str(tmp_path / "here"), "--unpack-results", str(other)]) == 0
    out = capsys.readouterr().out
    assert "merged 0 cell records" in out
    assert "not merged: scenes/random/0: the record here finished later (2999-01-01 00:00:00)" in out
    assert "not merged: scenes/dino/0: declared otherwise here now" in out
    assert json.loads((here / "scenes-random-seed0.json").read_text())["metrics"] == {"miou": 0.3}


FAKE_MLSCTL = '''
import json, signal, sys, time
from pathlib import Path
args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
if args[0] == "pretrain":
    out.mkdir(parents=True, exist_ok=True)
    if "--resume" in args:
        (out / "summary.json").write_text(json.dumps({"steps": 8, "resumed_from": 2, "seconds": 0.1}))
        (out / "teacher.safetensors").write_bytes(b"")
        sys.exit(0)
    checkpoint = out / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 2, "format_version": 1}))
    def stop(signum, frame):
        (out / "terminated").write_text("SIGTERM")
        sys.exit(130)
    signal.signal(signal.SIGTERM, stop)
    time.sleep(120)  # a training far longer than its estimate
    sys.exit(3)
if args[:2] == ["eval", "knn-seg"]:
    out.write_text(json.dumps({"results": [{"miou": 0.25, "iou_per_class": [0.4, 0.1],
                                            "runs": [{"confusion": [[8, 2], [3, 7]]}]}]}))
elif args[:2] == ["eval", "knn"]:
    out.write_text(json.dumps({"results": [{"k": 5, "top1": 0.2}]}))
'''


def test_a_cell_running_at_the_deadline_is_stopped_and_resumes_in_the_next_run(tmp_path: Path, monkeypatch, capsys):
    import dataclasses

    monkeypatch.setitem(fidelity.PROFILES, "smoke",
                        dataclasses.replace(fidelity.PROFILES["smoke"], estimates=(("dino", 1),)))
    fake = tmp_path / "fake_mlsctl.py"
    fake.write_text(FAKE_MLSCTL)
    monkeypatch.setattr(fidelity, "MLSCTL", [sys.executable, str(fake)])
    monkeypatch.setattr(fidelity, "STOP_GRACE_S", 10.0)
    monkeypatch.setattr(fidelity, "build_data", lambda *args, **kwargs: None)
    argv = ["--profile", "smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
            "--only", "scenes/dino/*"]
    run = tmp_path / "work" / "cells" / "scenes" / "dino" / "seed0" / "run"

    started = time.monotonic()
    assert fidelity.main([*argv, "--budget-s", "3"]) == 0
    assert 3 <= time.monotonic() - started < 3 + 10  # stopped at the deadline, well before its 120 s
    assert (run / "terminated").read_text() == "SIGTERM"
    out = capsys.readouterr().out
    assert "scenes/dino/0: mlsctl pretrain stopped at the deadline" in out and "0 done, 1 pending" in out
    row = json.loads((tmp_path / "results" / "smoke" / "progress.json").read_text())["cells"][0]
    assert row["state"] == "pending" and row["resumable"] and "resumes from its last checkpoint" in row["why"]

    assert fidelity.main([*argv, "--budget-s", "60"]) == 0
    record = json.loads((tmp_path / "results" / "smoke" / "cells" / "scenes-dino-seed0.json").read_text())
    assert record["resumed_from"] == 2 and "--resume" in (run.parent / "cell.log").read_text()
    assert record["metrics"]["miou"] == 0.25
    assert record["timing"]["seconds"] >= 3  # the stopped session counts: the next window plans with it
    assert "1 done, 0 pending" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ the supervised ceiling

import supervised_ceiling  # noqa: E402


def test_supervised_crops_cut_image_and_mask_alike():
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (6, 4, 4)).repeat_interleave(8, 1).repeat_interleave(8, 2)  # 32x32, 8x8 blocks
    images = (masks * 60).to(torch.uint8)[:, None].repeat(1, 3, 1, 1)
    boxes = supervised_ceiling.crop_boxes(6, (0.3, 1.0), generator)
    assert set(boxes[:, 0].tolist()) == {-1.0, 1.0} and bool((boxes[:, 1:3] <= 1).all())
    pixels, labels = supervised_ceiling.crop(images, masks, boxes, 16)
    # away from block edges (where bilinear mixes two blocks) the pixel says the label
    agree = (pixels[:, 0] * 255 / 60).round().long() == labels
    assert agree.float().mean() > 0.8
    target, labelled = supervised_ceiling.patch_targets(labels, 8, 4)
    assert target.shape == (6, 2, 2, 4) and bool(labelled.all())
    assert torch.allclose(target.sum(-1), torch.ones(6, 2, 2))


def test_supervised_ceiling_writes_a_run_that_evaluations_read(tmp_path: Path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from mlsctl.restore import from_run

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(8):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 1 + i % 2
        mask[0, :] = 255  # ignored pixels
        image = (mask[..., None] * 90 + rng.integers(0, 20, (32, 32, 3))).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "images" / f"{i:03d}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i:03d}.png")
    out = tmp_path / "run"
    overrides = [f"data.root={tmp_path / 'images'}", *fidelity.TINY_VIT, "data.global_crops.size=16",
                 "optim.batch_size=4", "optim.epochs=2", "optim.warmup_epochs=1", "seed=3"]
    assert supervised_ceiling.main(["dino_fmnist_quick", *overrides, "--masks", str(tmp_path / "masks"),
                                    "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["classes"] == 3
    choice = from_run(out)
    trained = load_file(str(out / "teacher.safetensors"))
    start = from_run(out, random_init=True, seed=3).backbone.model.state_dict()
    assert set(trained) == set(start)
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # it trained
    assert choice.backbone.width == 32
    assert supervised_ceiling.main(["dino_fmnist_quick", *overrides, "--masks", str(tmp_path / "masks"),
                                    "--out", str(out)]) == 2  # a finished run is never overwritten


@pytest.mark.parametrize("name", sorted(fidelity.PROFILES))
def test_every_profile_plans_its_default_cells_and_evaluates_a_weights_file_only_where_listed(name, tmp_path):
    # the device window's dry run (smoke profile) stopped at "declares no estimate for variant backbone": the warm
    # profile's variant, whose weights file (ViT width 320) no other profile's ViT fits, was in every default list
    profile = fidelity.PROFILES[name]
    cells = fidelity.cells_of(profile, tmp_path, [])
    declared = dict(profile.estimates)
    assert cells and all(c.variant.name in declared for c in cells), [c.id for c in cells if c.variant.name not in declared]
    with_weights = {c.variant.name for c in cells if c.variant.needs_its_profile}
    assert with_weights <= set(profile.variants or ()), with_weights
    assert not {c.variant.name for c in fidelity.cells_of(profile, tmp_path, ["*/*/0"])
                if c.variant.needs_its_profile} - set(profile.variants or ())


def test_a_cell_that_starts_from_the_backbone_names_its_weights_by_content_not_by_place(tmp_path, monkeypatch):
    """mile-backbone trains from weights/: the spec holds the file's SHA-256 (a retrained backbone under the
    same name is another cell) and no path of this checkout (a device's copy reuses the cells made here)."""
    backbone = tmp_path / "repo" / fidelity.BACKBONE
    backbone.parent.mkdir(parents=True)
    backbone.write_bytes(b"first")
    monkeypatch.setattr(fidelity, "REPO", tmp_path / "repo")
    warm = fidelity.PROFILES["warm"]
    cell = next(c for c in fidelity.cells_of(warm, tmp_path / "work", []) if c.id == "products/mile-backbone/0")
    assert f"model.weights={tmp_path / 'repo' / fidelity.BACKBONE}" in cell.overrides()  # what the run reads
    spec = cell.spec()
    assert f"model.weights={fidelity.BACKBONE}" in spec["overrides"] and str(tmp_path) not in json.dumps(spec)
    assert spec["weights_sha256"] == ["a7937b64b8caa58f03721bb6bacf5c78cb235febe0e70b1b84cd99541461a08e"]  # sha256("first")
    first = cell.spec_sha()
    backbone.write_bytes(b"retrained")  # another size: a new version even where mtimes are coarse
    assert cell.spec_sha() != first
    backbone.unlink()
    with pytest.raises(SystemExit, match="is missing"):
        cell.spec()


def test_the_report_has_a_table_and_claims_for_mile_from_the_backbone(tmp_path):
    def record(variant: str, seed: int, mile: float, mean_cls: float) -> dict:
        return {"cell": f"products/{variant}/{seed}", "spec": {"variant": variant},
                "metrics": {"mile@trained/noise0": mile, "mean-cls@trained/noise0": mean_cls,
                            "mean-cls@start/noise0": mean_cls, "max-pairwise@trained/noise0": 0.01,
                            "max-pairwise@start/noise0": 0.01},
                "device": "cpu", "commit": "abc", "torch": "2"}

    records = [record("mile-backbone", s, 0.20 + s / 100, 0.10) for s in range(3)] + [record("mile", 0, 0.02, 0.05)]
    summary = fidelity.summarise(fidelity.PROFILES["warm"], records)
    claims = {c["claim"]: c["holds"] for c in summary["claims"]}
    assert claims["MILE from the backbone > mean-cls of the backbone it started from, AR@10 on fmnist-products"]
    assert claims["MILE > mean-cls of the trained backbone, AR@10 on fmnist-products"] is False
    text = fidelity.markdown(summary)
    assert "`mile-backbone`: MILE fine-tuned from weights/dino_fmnist_backbone.safetensors, 3 seed(s)" in text
    assert "| mile | trained | 21.0 ± 1.0 |" in text and "| mile | trained | 2.0 |" in text
    # the warm profile lists its variants: claims and rows of others (CrIBo's ablations, the ceiling) are left out
    assert "Table 5 order" not in text and "| cribo-global |" not in text and "## Calibration" not in text
    assert "| cribo |" in text and "claims on variants this profile does not run are left out" in text
    assert any("Table 5 order" in c["claim"] for c in summary["claims"])  # summary.json keeps every claim
    only_products = fidelity.summarise(fidelity.PROFILES["warm"], records[:3])  # no scenes cells: one panel
    fidelity.chart(only_products, tmp_path / "summary.png")
    from PIL import Image

    measured = [c for c in only_products["claims"] if c["holds"] is not None]
    # 12 x (5.2 + the claims panel: 0.9 + 0.25 a claim) inches at 110 dpi
    assert Image.open(tmp_path / "summary.png").size == (1320, round(110 * (6.1 + 0.25 * len(measured))))


def test_a_cell_records_the_commit_it_started_with_and_the_one_it_finished_with(tmp_path, monkeypatch):
    """The code may change while a cell runs (a long CPU cell, commits beside it): the record names the commit
    of the cell's first start and of its training's end, besides the one when it was written."""
    monkeypatch.setattr(fidelity, "RESULTS", tmp_path / "results")
    current = ["aaa"]
    monkeypatch.setattr(fidelity, "commit", lambda: current[0])

    def train(cell, threads, deadline=None):
        cell.run.mkdir(parents=True)
        (cell.run / "summary.json").write_text(json.dumps({"steps": 8, "resumed_from": 0, "seconds": 1.0,
                                                           "commit": "bbb"}))
        current[0] = "ccc"  # committed while the cell evaluated
        return 1.0

    monkeypatch.setattr(fidelity, "train", train)
    monkeypatch.setattr(fidelity, "evaluate", lambda cell, threads, deadline=None: ({}, 0.5))
    monkeypatch.setattr(fidelity, "metrics_of", lambda cell, result: {"miou": 0.1})
    cell = fidelity.cells_of(fidelity.PROFILES["smoke"], tmp_path / "work", ["scenes/dino/0"])[0]
    record = fidelity.run_cell(cell, 1, False)
    assert (record["commit_at_start"], record["trained_at_commit"], record["commit"]) == ("aaa", "bbb", "ccc")
    assert json.loads(cell.result_path.read_text())["commit_at_start"] == "aaa"


def test_a_claim_whose_gap_is_within_the_seed_spread_says_so():
    def record(variant: str, seed: int, metrics: dict, benchmark: str = "scenes") -> dict:
        return {"cell": f"{benchmark}/{variant}/{seed}", "spec": {"variant": variant}, "metrics": metrics,
                "device": "cpu", "commit": "abc", "torch": "2"}

    def scenes(variant: str, mious: tuple) -> list[dict]:
        return [record(variant, s, {"miou": m}) for s, m in enumerate(mious)]

    # DINO 0.110 ± 0.015 against random 0.100 ± 0.001: the gap (0.010) is below the larger std
    random = scenes("random", (0.099, 0.100, 0.101))
    close = scenes("dino", (0.095, 0.110, 0.125)) + random
    clear = scenes("dino", (0.1099, 0.1100, 0.1101)) + random  # the same means with tight seeds: a clear gap
    one_seed = scenes("dino", (0.2,)) + scenes("random", (0.1,))
    name = "DINO > random init on fmnist-scenes mIoU"
    for records, within in ((close, True), (clear, False), (one_seed, None)):
        found = {c["claim"]: c for c in fidelity.summarise(fidelity.PROFILES["cpu"], records)["claims"]}[name]
        assert (found["holds"], found["within_seed_spread"]) == (True, within)
    text = fidelity.markdown(fidelity.summarise(fidelity.PROFILES["cpu"], close))
    assert f"| {name} | yes (within the seed spread) | 11.0, 10.0 |" in text
    # an order (Table 5's) is within the spread when any neighbour gap is (a review, 2026-12-05: SOVE's judges
    # 11.3 < 11.8 < 12.0 with stds 0.6/0.4/0.4 were marked "yes" with no caveat) ...
    cribo = scenes("cribo-global", (0.09, 0.10, 0.11)) + scenes("cribo-cross-view", (0.099, 0.101, 0.103)) + \
        scenes("cribo", (0.1499, 0.15, 0.1501))
    orders = [c for c in fidelity.summarise(fidelity.PROFILES["cpu"], close + cribo)["claims"]
              if "order" in c["claim"] and "mIoU" in c["claim"]]
    assert [(c["holds"], c["within_seed_spread"]) for c in orders] == [(True, True)]  # 0.10 -> 0.101: within 0.01
    tight = scenes("cribo-global", (0.0999, 0.1, 0.1001)) + scenes("cribo-cross-view", (0.1199, 0.12, 0.1201)) + \
        scenes("cribo", (0.1499, 0.15, 0.1501))
    orders = [c for c in fidelity.summarise(fidelity.PROFILES["cpu"], tight)["claims"] if "order" in c["claim"]
              and "mIoU" in c["claim"]]
    assert [(c["holds"], c["within_seed_spread"]) for c in orders] == [(True, False)]
    # ... and differences (MILE's fall under noise) have no such mark
    mile = [record("mile", s, {f"{score}@trained/noise{n}": 0.1 - n / 10 + s / 1000
                               for score in ("mile", "mean-cls", "max-pairwise") for n in (0, 0.5)}, "products")
            for s in range(3)]
    claims = fidelity.summarise(fidelity.PROFILES["cpu"], close + mile)["claims"]
    derived = [c for c in claims if "falls less" in c["claim"] and c["holds"] is not None]
    assert len(derived) == 2 and all(c["within_seed_spread"] is None for c in derived), derived


def test_every_measured_claim_has_a_margin_positive_exactly_where_it_holds():
    """The chart draws a claim as its margin in the claim's direction: for "a > b" a - b, for "falls less" the
    other way round, for the calibration the distance to its 5-point threshold, for an order its smallest step."""
    def record(variant: str, seed: int, metrics: dict, benchmark: str = "scenes") -> dict:
        return {"cell": f"{benchmark}/{variant}/{seed}", "spec": {"variant": variant}, "metrics": metrics,
                "device": "cpu", "commit": "abc", "torch": "2"}

    miou = {"random": 0.10, "dino": 0.12, "supervised": 0.30, "cribo-global": 0.13, "cribo-cross-view": 0.125,
            "cribo": 0.14}
    records = [record(v, s, {"miou": m + s / 1000, "foreground_iou": 2 * m}) for v, m in miou.items() for s in range(2)]
    records += [record("mile", s, {"mile@trained/noise0": 0.10, "mile@trained/noise0.5": 0.09,
                                   "mean-cls@trained/noise0": 0.08, "mean-cls@trained/noise0.5": 0.05,
                                   "max-pairwise@trained/noise0": 0.12, "max-pairwise@trained/noise0.5": 0.11},
                       "products") for s in range(2)]
    claims = {c["claim"]: c for c in fidelity.summarise(fidelity.PROFILES["cpu"], records)["claims"]}
    measured = [c for c in claims.values() if c["holds"] is not None]
    assert len(measured) >= 12
    for c in measured:
        assert (c["margin"] > 0) == c["holds"], c
    assert claims["Calibration: DINO >= random init + 5 mIoU points on fmnist-scenes"]["margin"] == pytest.approx(-3.0)
    assert claims["CrIBo Table 5 order on fmnist-scenes mIoU: global only < + cross-view < + cross-image"]["margin"] \
        == pytest.approx(-0.5)  # 13.0 -> 12.5 -> 14.0: its smallest step is -0.5
    assert claims["MILE: its AR@10 falls less than mean-cls's from 0 to 50% noise"]["margin"] == pytest.approx(2.0)
    assert claims["MILE > max-pairwise of the trained backbone, AR@10 on fmnist-products"]["margin"] == pytest.approx(-2.0)


def test_declared_estimates_are_stretched_on_a_device_they_were_not_measured_on():
    """A review (2026-12-05): the gpu estimates come from an H200, and a lent H100 planned with them, starting
    cells its deadline would stop (their work lost on a fresh machine)."""
    gpu = fidelity.PROFILES["gpu"]
    cell = next(c for c in fidelity.cells_of(gpu, Path("/nonexistent"), []) if c.variant.name == "dino")
    assert fidelity.estimate(cell, "NVIDIA H200 (CUDA 13.0)") == (190.0, "declared")
    seconds, source = fidelity.estimate(cell, "NVIDIA H100 80GB HBM3 (CUDA 13.0)")
    assert seconds == pytest.approx(190 * fidelity.OTHER_DEVICE_MARGIN) and source.startswith("declared for NVIDIA H200")


def test_a_device_copy_names_the_commit_it_was_prepared_from(monkeypatch):
    """A review (2026-12-05): the first device window's records named the commit of the copy's stale .git;
    scripts/device_prepare.sh writes .whl/COMMIT and the device scripts export it as MLSCTL_COMMIT."""
    from mlsctl import provenance

    monkeypatch.setenv("MLSCTL_COMMIT", "0123456789ab+dirty")
    assert provenance.commit() == fidelity.commit() == "0123456789ab+dirty"
    monkeypatch.delenv("MLSCTL_COMMIT")
    assert provenance.commit() != "0123456789ab+dirty"


def test_a_calibration_run_again_with_rerun_is_judged_on_its_new_records(tmp_path: Path, monkeypatch):
    """A review (2026-12-06): with --rerun the calibration cells already done ran again without holding the
    other scenes cells, and the calibration was judged on their old records."""
    import dataclasses

    profile = dataclasses.replace(fidelity.PROFILES["smoke"], seeds=(0,), calibration=("random", "dino", "supervised"))
    monkeypatch.setitem(fidelity.PROFILES, "smoke", profile)
    cells = fidelity.cells_of(profile, tmp_path / "work", ["scenes/random/*", "scenes/dino/*", "scenes/supervised/*",
                                                            "scenes/cribo/*"])

    def record(cell, miou):
        data = fake_record(cell, 1)
        data["metrics"] = {"miou": miou}
        fidelity.atomic.write_json(cell.result_path, data)

    for cell, miou in zip(cells, (0.10, 0.30, 0.50, 0.2)):  # done, and holding
        record(cell, miou)
    planner = fidelity.Planner(cells, None, "CPU")  # --rerun: every selected cell again
    handed = [planner.next() for _ in range(3)]
    assert [c.variant.name for c in handed] == ["random", "dino", "supervised"]
    for cell, miou in zip(handed, (0.10, 0.11, 0.50)):  # run again: DINO no longer 5 points above random
        record(cell, miou)
        planner.finished(cell)
    assert planner.next() is None and "the calibration failed (DINO 11.0" in planner.left_for_later["scenes/cribo/0"]


def test_record_times_say_utc_and_compare_with_those_written_without_a_zone():
    now = fidelity.utc_now()
    assert now.endswith(" UTC") and fidelity.record_time(now) > fidelity.record_time("2026-12-06 09:00:00")
    assert fidelity.record_time("2026-12-06 10:00:00") == fidelity.record_time("2026-12-06 10:00:00 UTC") > 0
    assert fidelity.record_time("2026-12-06 09:00:00 UTC") < fidelity.record_time("2026-12-06 10:00:00")
    assert fidelity.record_time(None) == fidelity.record_time("yesterday") == 0.0
