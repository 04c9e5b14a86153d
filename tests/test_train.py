"""The training loop: run layout, exact resume after SIGKILL, run-folder rules, --init-from,
bad files, and two processes against one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlsctl import config
from mlsctl.bank import load_banks
from mlsctl.methods.dino import DINO
from mlsctl.runs import Run
from mlsctl.schedules import Schedule

from conftest import REPO, cli, cli_env, make_images, run_cli, sigkill_then_resume, tiny_recipe, write_recipe
from test_images import write_bad_files

pytestmark = pytest.mark.slow


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in metrics(run)]


def test_run_layout(finished_run):
    run_dir, recipe_path = finished_run
    run = Run(run_dir)
    saved = config.load_recipe(str(run.config_path))
    assert saved == config.load_recipe(str(recipe_path))
    records = metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, 9))
    for key in ("loss", "loss/dino", "lr", "weight_decay", "momentum", "images_per_s", "bank_fill/cls", "epoch"):
        assert key in records[0], key
    assert records[0]["momentum"] == pytest.approx(0.99) and records[-1]["momentum"] > records[0]["momentum"]
    assert [c.step for c in run.checkpoints()] == [6, 8]  # every 3 steps and at the end, newest 2 kept
    latest = run.latest()
    for name in ("model.safetensors", "banks.safetensors", "optimizer.pt", "rng.pt", "state.json"):
        assert (latest.path / name).is_file(), name
    assert latest.state()["step"] == 8 and latest.state()["method"] == "dino"
    banks = load_banks(latest.banks_path)
    assert banks["cls"].filled == 20 and banks["cls"].n_written == 32
    summary = json.loads(run.summary_path.read_text())
    assert summary["steps"] == 8 and summary["images_per_s"] > 0
    assert "done: 8 steps" in run.log_path.read_text()
    assert not list(run.checkpoints_dir.glob(".*"))  # no temporary folders left


def test_exported_teacher_is_a_timm_backbone(finished_run):
    run_dir, recipe_path = finished_run
    from mlsctl.models.backbone import build_backbone

    recipe = config.load_recipe(str(recipe_path), ["model.weights=" + str(run_dir / "teacher.safetensors")])
    backbone = build_backbone(recipe.model)
    state = load_file(str(Run(run_dir).latest().model_path))
    for key, value in backbone.net.state_dict().items():
        assert torch.equal(value, state[f"teacher.backbone.model.{key}"])


def test_teacher_follows_the_student_and_last_layer_was_frozen(tmp_path: Path, images: Path, capsys):
    """With a checkpoint after every step: the teacher is the EMA of the student at the step's logged
    momentum (teacher_s = m_s teacher_{s-1} + (1 - m_s) student_s, every parameter), and the student's last
    layer stays at its initial value for exactly the first freeze_last_layer_epochs (4 steps), then moves."""
    recipe = tiny_recipe(images)
    recipe["train"].update(checkpoint_every=1, keep_checkpoints=8)
    code, _, err = cli("pretrain", str(write_recipe(tmp_path / "r.yaml", recipe)), "--out", str(tmp_path / "run"),
                       capsys=capsys)
    assert code == 0, err
    states = {c.step: load_file(str(c.model_path)) for c in Run(tmp_path / "run").checkpoints()}
    assert sorted(states) == list(range(1, 9))
    momentum = {r["step"]: r["momentum"] for r in metrics(tmp_path / "run") if "momentum" in r}
    for step in range(2, 9):
        m = momentum[step]
        assert 0.99 <= m < 1
        for key, teacher in states[step].items():
            if key.startswith("teacher."):
                expected = m * states[step - 1][key] + (1 - m) * states[step]["student." + key[len("teacher."):]]
                assert torch.allclose(teacher, expected, atol=1e-6), (step, key)
    last = "student.head.last_layer.direction"
    assert torch.allclose(states[1][last], states[1]["teacher.head.last_layer.direction"], atol=1e-7)  # the init
    assert all(torch.equal(states[step][last], states[1][last]) for step in (2, 3, 4))
    assert not torch.equal(states[5][last], states[4][last])
    assert not torch.equal(states[2]["student.head.mlp.0.weight"], states[1]["student.head.mlp.0.weight"])


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path: Path, images: Path):
    recipe = tiny_recipe(images)
    recipe["optim"]["epochs"] = 12  # 48 steps
    recipe["train"]["checkpoint_every"] = 4
    full, killed = sigkill_then_resume(write_recipe(tmp_path / "r.yaml", recipe), tmp_path, 48)
    assert losses(killed) == losses(full)
    a, b = load_file(str(killed / "teacher.safetensors")), load_file(str(full / "teacher.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    banks_a = load_banks(Run(killed).latest().banks_path)["cls"]
    banks_b = load_banks(Run(full).latest().banks_path)["cls"]
    assert torch.equal(banks_a.vectors, banks_b.vectors) and banks_a.ptr == banks_b.ptr


def test_run_folder_rules(finished_run, tmp_path: Path, capsys):
    run_dir, recipe = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), capsys=capsys)
    assert code == 2 and "is not empty: add --resume" in err
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 0 and "already complete (8 steps)" in err
    (copy / "teacher.safetensors").unlink()  # a run stopped before its teacher was written, or a removed file
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 0 and "had no teacher.safetensors: written from its last checkpoint" in err
    written, original = load_file(str(copy / "teacher.safetensors")), load_file(str(run_dir / "teacher.safetensors"))
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in original)
    code, _, err = cli("pretrain", str(recipe), "optim.lr=0.5", "--out", str(copy), "--resume", capsys=capsys)
    assert code == 2 and "differs from" in err and "optim.lr" in err
    code, _, err = cli("pretrain", str(recipe), "--out", str(tmp_path / "new"), "--resume", capsys=capsys)
    assert code == 2 and "nothing to resume" in err
    code, _, err = cli("pretrain", str(recipe), "--out", str(tmp_path / "n2"), "--resume", "--init-from", str(run_dir),
                       capsys=capsys)
    assert code == 2 and "use one" in err
    # a run's own resolved recipe: the default --out is runs/<the run's name> (it was runs/config)
    (tmp_path / "runs" / "copy").mkdir(parents=True)
    (tmp_path / "runs" / "copy" / "notes.txt").write_text("mine")
    code, _, err = cli("pretrain", str(copy / "config.yaml"), cwd=tmp_path, capsys=capsys)
    assert code == 2 and "--out runs/copy is not empty" in err and not (tmp_path / "runs" / "config").exists()


def test_resume_refuses_a_config_yaml_edited_since_the_checkpoint(finished_run, tmp_path: Path, capsys):
    """RUN/config.yaml resumed as itself (the command a stop prints) compared only with itself: a
    hand-edited lr, schedule or batch changed the run mid-way, and a finished run trained on. Each
    checkpoint now keeps the recipe it was trained with, and --resume compares with it."""
    run_dir, recipe = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config = copy / "config.yaml"
    original = config.read_text()
    assert (Run(copy).latest().config_path).read_text() == original
    teacher = (copy / "teacher.safetensors").read_bytes()
    for key, old, new in [("optim.epochs", "epochs: 2", "epochs: 4"), ("optim.lr", "lr: 0.001", "lr: 0.002"),
                          ("optim.batch_size", "batch_size: 4", "batch_size: 8")]:
        assert f"  {old}\n" in original
        config.write_text(original.replace(f"  {old}\n", f"  {new}\n", 1))
        code, _, err = cli("pretrain", str(config), "--out", str(copy), "--resume", capsys=capsys)
        assert code == 2 and "was edited after step-00000008 was trained" in err and key in err, err
        assert (copy / "teacher.safetensors").read_bytes() == teacher
    config.write_text(original.replace("  log_every: 1\n", "  log_every: 2\n", 1))  # a key that may change
    code, _, err = cli("pretrain", str(config), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 0 and "already complete (8 steps)" in err
    config.unlink()
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 2 and "checkpoints/step-00000008/config.yaml, the recipe its newest checkpoint" in err


def test_init_from_a_run_and_from_a_weights_file(finished_run, images: Path):
    run_dir, recipe_path = finished_run
    from mlsctl.restore import initial_weights as _load_initial_weights

    recipe = config.load_recipe(str(recipe_path))
    torch.manual_seed(1)
    method = DINO(recipe, Schedule(4, 2))
    assert "all weights" in _load_initial_weights(method, str(run_dir))
    saved = load_file(str(Run(run_dir).latest().model_path))
    assert all(torch.equal(v, saved[k]) for k, v in method.state_dict().items())

    torch.manual_seed(2)
    method = DINO(recipe, Schedule(4, 2))
    assert "every backbone" in _load_initial_weights(method, str(run_dir / "teacher.safetensors"))
    for backbone in (method.student.backbone, method.teacher.backbone):
        for key, value in backbone.net.state_dict().items():
            assert torch.equal(value, saved[f"teacher.backbone.model.{key}"])


def test_bad_files_are_skipped_during_training(tmp_path: Path):
    images = make_images(tmp_path / "images", 8)
    write_bad_files(images / "broken")
    recipe = tiny_recipe(images, optim__epochs=1)
    recipe["optim"]["batch_size"] = 11  # one step visits every file
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = run_cli("pretrain", str(path), "--out", str(tmp_path / "run"), check=True)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("skipped broken/")]
    assert sorted(warnings) == sorted([
        "skipped broken/empty.png: empty file (0 bytes)",
        "skipped broken/notes.jpg: not an image file",
        "skipped broken/truncated.jpg: truncated image data",
    ])
    assert f"skipped 3 unreadable files in {images}" in result.stderr


def test_two_processes_agree_with_one(tmp_path: Path, images: Path):
    """2 processes x batch 2 see the images 1 process x batch 4 sees, in the same order: the
    losses agree to float precision and both ranks' banks equal the single process's bank."""
    recipe = tiny_recipe(images, optim__epochs=1)
    recipe["train"]["checkpoint_every"] = 2
    one = dict(recipe, optim={**recipe["optim"], "batch_size": 4})
    two = dict(recipe, optim={**recipe["optim"], "batch_size": 2})
    run_cli("pretrain", str(write_recipe(tmp_path / "one.yaml", one)), "--out", str(tmp_path / "one"), check=True)
    env = cli_env()
    accelerate = Path(sys.executable).parent / "accelerate"
    result = subprocess.run([str(accelerate), "launch", "--num_processes", "2", "-m", "mlsctl", "pretrain",
                             str(write_recipe(tmp_path / "two.yaml", two)), "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broadcast_buffers" not in result.stderr  # torch's deprecation, once per rank, is ours to silence
    log = (tmp_path / "two" / "train.log").read_text()
    assert "2 processes" in log and "memory banks identical on all 2 processes" in log
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, _ in a] == [s for s, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)
    bank_one = load_banks(Run(tmp_path / "one").latest().banks_path)["cls"]
    bank_two = load_banks(Run(tmp_path / "two").latest().banks_path)["cls"]
    assert torch.equal(bank_one.payload["image_id"], bank_two.payload["image_id"])
    assert torch.allclose(bank_one.vectors, bank_two.vectors, atol=1e-4)


def test_a_lora_run_saves_its_adapters_and_a_merged_teacher(tmp_path: Path, images: Path):
    recipe = tiny_recipe(images, optim__epochs=1)
    recipe["model"]["lora"] = {"enabled": True, "rank": 2, "alpha": 4.0, "bias": "lora_only"}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    run_cli("pretrain", str(path), "--out", str(tmp_path / "run"), check=True)
    adapters = tmp_path / "run" / "teacher_adapters"
    assert (adapters / "adapter_model.safetensors").is_file() and (adapters / "adapter_config.json").is_file()
    merged = load_file(str(tmp_path / "run" / "teacher.safetensors"))
    assert not any("lora" in k for k in merged)
    from mlsctl.models.backbone import build_backbone

    plain = config.load_recipe(str(path), ["model.lora.enabled=false", f"model.weights={tmp_path / 'run' / 'teacher.safetensors'}"])
    build_backbone(plain.model)  # the merged teacher loads strictly into a plain ViT


def test_tensorboard_receives_every_metrics_record(tmp_path, images):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mlsctl.train import pretrain

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images))
    recipe = config.load_recipe(str(path), ["train.log_with=[tensorboard]"])
    pretrain(recipe, tmp_path / "run", recipe_source=str(path))
    events = list((tmp_path / "run" / "trackers").rglob("events.out.tfevents*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent)).Reload()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    scalars = accumulator.Scalars("loss")
    assert [s.step for s in scalars] == [r["step"] for r in logged]
    assert all(abs(s.value - r["loss"]) < 1e-5 for s, r in zip(scalars, logged))
    assert "lr" in accumulator.Tags()["scalars"]


def test_a_tracker_that_is_not_installed_is_one_sentence(tmp_path, images, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images))
    code, _, err = cli("pretrain", str(path), "train.log_with=[wandb]", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code != 0 and "pip install 'mlsctl[wandb]'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def _labelled(root: Path, seed: int = 0, per_class: int = 4) -> Path:
    for cls in ("a", "b"):
        make_images(root / cls, per_class, size=(32, 32), seed=ord(cls) + seed)
    return root


def test_the_monitor_logs_knn_and_never_changes_the_losses(tmp_path, images):
    from mlsctl.train import pretrain

    _labelled(tmp_path / "mon_train")
    _labelled(tmp_path / "mon_val", seed=100, per_class=30)  # other images than the memory's, 60: top-1 in 1/60
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images))
    plain = config.load_recipe(str(path))
    watched = config.load_recipe(str(path), ["train.monitor.every=2", f"train.monitor.train={tmp_path / 'mon_train'}",
                                             f"train.monitor.val={tmp_path / 'mon_val'}", "train.monitor.k=3"])
    pretrain(plain, tmp_path / "plain", recipe_source=str(path))
    pretrain(watched, tmp_path / "watched", recipe_source=str(path))

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = lambda run: [(r["step"], r["loss"]) for r in rows(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "plain") == losses(tmp_path / "watched")
    monitored = [r for r in rows(tmp_path / "watched") if "monitor/knn_top1" in r]
    assert [r["step"] for r in monitored] == [2, 4, 6, 8]
    assert all(0 <= r["monitor/knn_top1"] <= 1 and r["time/monitor"] > 0 for r in monitored)
    # step 8's value is what `eval knn` measures with the teacher of the step-8 checkpoint (the run's last)
    out = tmp_path / "knn.json"
    run_cli("eval", "knn", "--train", str(tmp_path / "mon_train"), "--val", str(tmp_path / "mon_val"), "--run",
            str(tmp_path / "watched"), "--k", "3", "--out", str(out), cwd=tmp_path, check=True)
    measured = json.loads(out.read_text())["results"][0]
    assert monitored[-1]["monitor/knn_top1"] == pytest.approx(measured["top1"], abs=1e-9)


def test_the_monitor_folders_are_checked_before_training(tmp_path, images, capsys):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images))
    code, _, err = cli("pretrain", str(path), "train.monitor.every=2", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 2 and "train.monitor.val are needed" in err
    code, _, err = cli("pretrain", str(path), "train.monitor.every=2", f"train.monitor.train={images}",
                       f"train.monitor.val={images}", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code != 0 and "outside class folders" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_the_monitor_measures_knn_seg_where_masks_are_given(tmp_path, fake_fmnist):
    from mlsctl.config import MonitorConfig
    from mlsctl.data.fmnist import build_scenes
    from mlsctl.models.backbone import Backbone
    from mlsctl.monitor import Monitor

    build_scenes(tmp_path / "scenes", n_train=6, n_val=3, size=32, source=fake_fmnist, progress=False)
    for split in ("train", "val"):
        files = sorted(p.name for p in (tmp_path / "scenes" / split / "images").iterdir())
        (tmp_path / f"{split}.csv").write_text("".join(f"{f},{'xy'[i % 2]}\n" for i, f in enumerate(files)))
    cfg = MonitorConfig(every=1, train=str(tmp_path / "scenes/train/images"), val=str(tmp_path / "scenes/val/images"),
                        train_labels=str(tmp_path / "train.csv"), val_labels=str(tmp_path / "val.csv"),
                        train_masks=str(tmp_path / "scenes/train/masks"), val_masks=str(tmp_path / "scenes/val/masks"), k=3)
    monitor = Monitor(cfg, 32, 8)
    backbone = Backbone("vit_small_patch16_224", img_size=32, patch_size=8,
                        timm_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2})
    result = monitor(backbone, "cpu")
    assert 0 <= result["monitor/knn_top1"] <= 1 and 0 < result["monitor/knn_seg_miou"] <= 1
    assert backbone.training  # left as it was
    # the monitor segments with the code of `eval knn-seg`: the same features (float16, as a feature folder
    # stores them) give the same mIoU, at that command's default temperature
    from conftest import write_feature_folder
    from mlsctl.evaluate import knn_seg
    from mlsctl.features import Features

    splits = {}
    for name, split in (("train", monitor.train), ("val", monitor.val)):
        cls, dense = monitor._embed(backbone, split, "cpu")
        folder = write_feature_folder(tmp_path / f"feats-{name}", split.files, cls, dense,
                                      input_root=tmp_path / "scenes" / name / "images")
        splits[name] = (knn_seg.FeatureMasks(Features(folder), tmp_path / "scenes" / name / "masks", name),
                        dense.half().float())
    evaluated = knn_seg.evaluate_once(splits["train"][0], splits["val"][0], list(range(6)),
                                      knn_seg.Settings(k=cfg.seg_k), monitor.seg_classes, run_seed=0)
    assert monitor._knn_seg(splits["train"][1], splits["val"][1]) == pytest.approx(evaluated["miou"], abs=1e-12)


def test_data_wait_share_says_how_much_of_each_interval_waited_for_the_loader(tmp_path, images, monkeypatch):
    """metrics.jsonl's data_wait_share: the seconds spent in the loader (with workers=0 the loading
    itself) over each logged interval's wall time. A loader slowed to 100 ms an image dominates."""
    import time

    from mlsctl.data import loader
    from mlsctl.train import pretrain

    def read(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["data_wait_share"] for r in rows if "loss" in r]

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images, optim__epochs=1))
    pretrain(config.load_recipe(str(path)), tmp_path / "fast", recipe_source=str(path))
    real = loader.MultiCropDataset.__getitem__

    def slow(self, key):
        time.sleep(0.1)
        return real(self, key)

    monkeypatch.setattr(loader.MultiCropDataset, "__getitem__", slow)
    pretrain(config.load_recipe(str(path)), tmp_path / "slow", recipe_source=str(path))
    fast, slowed = read(tmp_path / "fast"), read(tmp_path / "slow")
    assert len(fast) == len(slowed) >= 3 and all(0 <= share <= 1 for share in fast + slowed)
    # 4 images a step: 0.4 s of waiting against the tiny model's few milliseconds; the first interval holds the
    # start, the last the final checkpoint (0.3 s of it on a busy machine once took the share to 0.55)
    assert min(slowed[1:-1]) > 0.6 and min(slowed[1:-1]) > max(fast[1:-1]), (fast, slowed)


def test_train_log_drops_a_failed_write_quietly_but_not_a_malformed_message(tmp_path, capsys):
    """train.log's handler: a full disk is reported by the next checkpoint or metrics line, so its own write
    failures are dropped without a logging traceback; a message that cannot be formatted is our bug and is shown."""
    import errno
    import logging

    from mlsctl.train.setup import _RunLogHandler

    handler = _RunLogHandler(tmp_path / "train.log")
    logger = logging.getLogger("test-train-log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        def full_disk(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        handler.stream.write = full_disk
        logger.warning("a line the disk has no room for")
        assert capsys.readouterr().err == ""
        logger.warning("%d steps", "many")  # formatting fails before anything is written
        assert "--- Logging error ---" in capsys.readouterr().err
    finally:
        logger.removeHandler(handler)
        del handler.stream.write  # the file's own write again, then closed
        handler.close()


def test_resume_cuts_metrics_back_keeping_a_damaged_line_and_dropping_a_torn_last_one(tmp_path, caplog):
    """--resume keeps the records up to its step; a line that is not a record in the middle of the
    file is not ours to delete (it used to end the file there, dropping every record after it), and
    a torn last line goes."""
    from mlsctl.train.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": 3.0}', "not json", '[2]', '{"step": 2, "loss": 2.5}', '{"epoch": 0}',
             '{"step": 3, "loss": 2.0}', '{"step": 4, "loss": 1.5}', '{"step": 5, "lo']
    path.write_text("".join(line + "\n" for line in lines))
    with caplog.at_level("WARNING", logger="mlsctl"):
        truncate_metrics(path, 3)
    assert path.read_text().splitlines() == lines[:6]
    assert [r.getMessage().split(" is not")[0] for r in caplog.records] == [f"{path} line {n}" for n in (2, 3, 5)]


def test_a_recipe_edited_in_python_is_checked_like_a_file(tmp_path, images):
    """An API probe (2026-12-05): pretrain() of a recipe given lr -1 by dataclasses.replace trained (gradient
    ascent) and wrote a config.yaml every command then refused."""
    import dataclasses

    from mlsctl.config import ConfigError
    from mlsctl.train import pretrain

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images, optim__epochs=1))
    recipe = config.load_recipe(str(path))
    bad = dataclasses.replace(recipe, optim=dataclasses.replace(recipe.optim, lr=-1.0))
    with pytest.raises(ConfigError, match="'optim.lr' must be > 0.0, got -1.0"):
        pretrain(bad, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_pretrain_in_python_leaves_the_callers_random_state_as_it_was(tmp_path, images):
    """An API probe (2026-12-05): pretrain() reseeded a notebook's random, NumPy and torch generators."""
    import random

    import numpy as np

    from mlsctl.train import pretrain

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images, optim__epochs=1))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    expected = draws()
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    pretrain(config.load_recipe(str(path)), tmp_path / "run")
    assert draws() == expected


def test_an_empty_init_from_is_refused(tmp_path, images):
    """A new-user probe (2026-12-05): --init-from "" (an unset shell variable) trained from scratch, silently."""
    from mlsctl.errors import UserError
    from mlsctl.train import pretrain

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images, optim__epochs=1))
    with pytest.raises(UserError, match="--init-from is empty"):
        pretrain(config.load_recipe(str(path)), tmp_path / "run", init_from="")
    assert not (tmp_path / "run").exists()


def test_resume_of_a_run_of_another_method_says_which_methods(tmp_path: Path):
    """A probe (2026-12-05): a DINO recipe resumed into an MLS run listed five differing keys."""
    from mlsctl import config as config_lib
    from mlsctl.errors import UserError
    from mlsctl.train.run_dir import _check_unchanged

    saved = config_lib.load_recipe("mls_fmnist_quick")
    with pytest.raises(UserError, match=r"run is a run of method mls, and the recipe trains dino; resume continues"):
        _check_unchanged(Run(tmp_path / "run"), saved, config_lib.load_recipe("dino_fmnist_quick"))
    with pytest.raises(UserError, match=r"differs from .*config.yaml at [a-z_.]+(, [a-z_.]+){4} and 1 more; resume"):
        _check_unchanged(Run(tmp_path / "run"), saved, config_lib.load_recipe(
            "mls_fmnist_quick", ["optim.lr=0.5", "optim.epochs=3", "method.k=5", "method.temperature=0.3", "seed=4",
                                 "optim.weight_decay=0.2"]))


def test_resume_with_images_added_or_removed_at_the_end_names_the_first_one(tmp_path: Path):
    """A probe (2026-12-05): images added after the last one were 'the lists differ at their end'."""
    from types import SimpleNamespace

    from mlsctl.errors import UserError
    from mlsctl.train.run_dir import _same_images

    run = SimpleNamespace(image_list=lambda: ["a.png", "b.png"], images_path=tmp_path / "images.txt", root=tmp_path)
    recipe = SimpleNamespace(data=SimpleNamespace(root="data"))
    for listed, said in [(["a.png", "b.png", "c.png"], "'c.png' and any after it are new"),
                         (["a.png"], "'b.png' and any after it are gone")]:
        with pytest.raises(UserError, match=said):
            _same_images(run, recipe, recipe, SimpleNamespace(relpaths=lambda listed=listed: listed))
