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
    for name in ("model.safetensors", "banks.safetensors", "optimizer.pt", "rng.pt", "state.json", "recipe.yaml"):
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
    # a new user (2026-12-06): a resumed run's summary gave its last session's time and commit only
    summary = json.loads((killed / "summary.json").read_text())
    first, second = summary["sessions"]
    assert first["from_step"] == 0 and first["to_step"] == second["from_step"] == summary["resumed_from"]
    assert second["to_step"] == 48 and all(s["commit"] == summary["commit"] and s["seconds"] > 0 for s in (first, second))
    assert summary["seconds_all_sessions"] == round(first["seconds"] + second["seconds"], 1)
    assert [s["to_step"] for s in json.loads((full / "summary.json").read_text())["sessions"]] == [48]


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stop_saves_the_step_under_way_and_resume_equals_an_uninterrupted_run(tmp_path: Path, images: Path,
                                                                              capfd, signum):
    """A new user (2026-12-07): Ctrl-C or a scheduler's SIGTERM lost every step since the last
    checkpoint. The step under way now ends, is written as a checkpoint, and --resume goes on from it,
    bit for bit as a run that was never stopped."""
    import os
    import signal

    recipe = tiny_recipe(images)
    recipe["train"]["checkpoint_every"] = 3
    path = write_recipe(tmp_path / "r.yaml", recipe)
    cli("pretrain", str(path), "--out", str(tmp_path / "full"), capsys=capfd)
    training_step, sent = DINO.training_step, getattr(signal, signum)

    def stopped_in_step_5(self, batch, step):
        if step == 4:  # in the middle of step 5: after its forward, before its backward
            os.kill(os.getpid(), sent)
        return training_step(self, batch, step)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even under `make test &`
    try:
        DINO.training_step = stopped_in_step_5
        code, _, err = cli("pretrain", str(path), "--out", str(tmp_path / "stopped"), capsys=capfd)
    finally:
        DINO.training_step = training_step
        signal.signal(signal.SIGINT, previous)
    assert code == 130 and "Traceback" not in err, err
    assert "stopping after step 5, which will be saved as a checkpoint" in err
    assert f"the last checkpoint is step 5, written at the stop ({tmp_path / 'stopped'}" in err
    assert Run(tmp_path / "stopped").latest().step == 5 and not (tmp_path / "stopped" / "summary.json").exists()
    code, _, err = cli("pretrain", str(path), "--out", str(tmp_path / "stopped"), "--resume", capsys=capfd)
    assert code == 0 and "from step 5" in err
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert losses(stopped) == losses(full)
    a, b = load_file(str(stopped / "teacher.safetensors")), load_file(str(full / "teacher.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(str(Run(run).latest().model_path)) for run in (stopped, full))
    assert all(torch.equal(a[k], b[k]) for k in a)  # student, teacher and centre
    banks = [load_banks(Run(run).latest().banks_path)["cls"] for run in (stopped, full)]
    assert torch.equal(banks[0].vectors, banks[1].vectors) and banks[0].ptr == banks[1].ptr


def test_a_stop_in_the_first_step_leaves_out_as_it_was(tmp_path: Path, images: Path, capsys):
    # nothing saved: a start stopped at once (a wrong --overwrite, perhaps) leaves --out as it found it
    import os
    import signal

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(images))
    training_step = DINO.training_step

    def stopped_in_step_1(self, batch, step):
        os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, batch, step)

    try:
        DINO.training_step = stopped_in_step_1
        code, _, err = cli("pretrain", str(path), "--out", str(tmp_path / "run"), capsys=capsys)
    finally:
        DINO.training_step = training_step
    assert code == 130 and "nothing was saved" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "run").exists()


def test_a_stop_of_an_overwrite_start_before_its_first_checkpoint_puts_the_old_run_back(finished_run, tmp_path: Path,
                                                                                      capfd):
    # a review (2026-12-07): the stop's checkpoint discarded the run --overwrite had set aside; a wrong
    # --overwrite stopped at once (after a step or two on a GPU) had deleted a finished run
    import os
    import signal

    run_dir, recipe = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    training_step = DINO.training_step

    def stopped_in_step_3(self, batch, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return training_step(self, batch, step)

    try:
        DINO.training_step = stopped_in_step_3
        code, _, err = cli("pretrain", str(recipe), "train.checkpoint_every=100", "--out", str(copy), "--overwrite",
                           capsys=capfd)
    finally:
        DINO.training_step = training_step
    assert code == 130 and "stopping after step 3; another SIGTERM, 2 s or more from now, stops at once" in err, err
    assert f"nothing was saved (no checkpoint yet) and {copy} is as it was before this start" in err
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before


def test_pretrain_and_embed_take_a_folder_holding_only_a_file_browsers_litter(finished_run, tmp_path: Path, capsys):
    run_dir, recipe = finished_run
    for out in (tmp_path / "run", tmp_path / "features"):
        out.mkdir()
        (out / ".DS_Store").write_bytes(b"Bud1")
    code, _, err = cli("pretrain", str(recipe), "optim.epochs=1", "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 0, err
    images = config.load_recipe(str(recipe)).data.root
    code, _, err = cli("embed", str(images), "--run", str(run_dir), "--out", str(tmp_path / "features"), capsys=capsys)
    assert code == 0, err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")  # anything else is still the user's
    code, _, err = cli("pretrain", str(recipe), "--out", str(tmp_path / "mine"), capsys=capsys)
    assert code == 2 and "is not empty and holds no run (notes.txt)" in err


def test_run_folder_rules(finished_run, tmp_path: Path, capsys):
    run_dir, recipe = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), capsys=capsys)
    assert code == 2 and "is not empty: add --resume" in err
    (tmp_path / "notes").mkdir()  # a new user (2026-12-06): told to --resume or --overwrite, both of which failed
    (tmp_path / "notes" / "a.txt").write_text("mine")
    code, _, err = cli("pretrain", str(recipe), "--out", str(tmp_path / "notes"), capsys=capsys)
    assert code == 2 and "is not empty and holds no run (a.txt): choose another --out" in err
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
    checkpoint now keeps the recipe it was trained with (recipe.yaml), and --resume compares with it."""

    run_dir, recipe = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    config = copy / "config.yaml"
    original = config.read_text()
    latest = Run(copy).latest()
    assert latest.recipe_path.read_text() == original
    assert not Run(latest.path).has_config() and not Run(latest.path).is_run()  # a checkpoint is not a run folder
    teacher = (copy / "teacher.safetensors").read_bytes()
    for key, old, new in [("optim.epochs", "epochs: 2", "epochs: 4"), ("optim.lr", "lr: 0.001", "lr: 0.002"),
                          ("optim.batch_size", "batch_size: 4", "batch_size: 8")]:
        assert f"  {old}\n" in original
        config.write_text(original.replace(f"  {old}\n", f"  {new}\n", 1))
        code, _, err = cli("pretrain", str(config), "--out", str(copy), "--resume", capsys=capsys)
        assert code == 2 and "was edited after step-00000008 was trained: set " in err, err
        assert f"set {key} back to {old.split(': ')[1]} (as " in err, err
        assert (copy / "teacher.safetensors").read_bytes() == teacher
    # the recipe it was trained with, given while config.yaml is still edited: resumed, config.yaml put right
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 0 and "already complete (8 steps)" in err and config.read_text() == original
    config.write_text(original.replace("  log_every: 1\n", "  log_every: 2\n", 1))  # a key that may change
    code, _, err = cli("pretrain", str(config), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 0 and "already complete (8 steps)" in err
    code, _, err = cli("pretrain", str(recipe), "optim.lr=0.5", "--out", str(copy), "--resume", capsys=capsys)
    assert code == 2 and "the recipe differs from" in err and "step-00000008/recipe.yaml at optim.lr;" in err
    latest.recipe_path.write_text("optim: [\n")
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 1 and "recipe.yaml is damaged" in err and f"delete {latest.path} to resume" in err
    latest.recipe_path.unlink()  # a checkpoint written before recipe.yaml: checked against config.yaml, as then
    code, _, err = cli("pretrain", str(config), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 0 and "already complete (8 steps)" in err
    shutil.copy(copy / "config.yaml", latest.recipe_path)
    config.unlink()
    code, _, err = cli("pretrain", str(recipe), "--out", str(copy), "--resume", capsys=capsys)
    assert code == 2 and "checkpoints/step-00000008/recipe.yaml, the recipe its newest checkpoint" in err


def test_resume_of_a_run_of_another_method_says_which_methods(tmp_path: Path):
    """A probe (2026-12-05): a DINO recipe resumed into an MLS run listed five differing keys."""
    from mlsctl import config as config_lib
    from mlsctl.errors import UserError
    from mlsctl.train.run_dir import check_resumable

    saved = config_lib.load_recipe("mls_fmnist_quick")
    with pytest.raises(UserError, match=r"run is a run of method mls, and the recipe trains dino; resume continues"):
        check_resumable(Run(tmp_path / "run"), saved, None, config_lib.load_recipe("dino_fmnist_quick"))
    with pytest.raises(UserError, match=r"differs from .*config.yaml at [a-z_.]+(, [a-z_.]+){4} and 1 more; resume"):
        check_resumable(Run(tmp_path / "run"), saved, None, config_lib.load_recipe(
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


def test_a_run_gives_the_caller_its_logging_back(tmp_path, capsys, caplog):
    """A review (2026-12-07): a run left the ``mlsctl`` logger with ``propagate`` False, so a program calling train()
    no longer received mlsctl's warnings on its own root handlers after the run. Its propagation and level are the
    caller's again once the run ends."""
    import logging

    log = logging.getLogger("mlsctl")
    before = (log.propagate, log.level)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe(make_images(tmp_path / "images", 4), optim__epochs=1))
    code, _, err = cli("pretrain", str(recipe), "--out", str(tmp_path / "run"), capsys=capsys)
    assert code == 0, err
    assert (log.propagate, log.level) == before and not log.handlers
    with caplog.at_level(logging.WARNING):
        log.warning("a note after the run")
    assert "a note after the run" in caplog.text


def test_the_start_says_where_the_backbone_comes_from_and_a_warm_up_as_long_as_the_run(finished_run, tmp_path, capsys):
    """A new user's probe (2026-12-07): `pretrain ... model.weights=exports/mls` said nowhere that the weights were
    loaded, and a 1-epoch run with a 1-epoch warm-up (the learning rate never decaying) said nothing either."""
    source, _ = finished_run
    images = make_images(tmp_path / "images", 8)
    one = write_recipe(tmp_path / "one.yaml", tiny_recipe(images, optim__epochs=1))
    code, _, err = cli("pretrain", str(one), "--out", str(tmp_path / "a"), capsys=capsys)
    assert code == 0 and "backbone: randomly initialised (seed 0)" in err, err
    log = (tmp_path / "a" / "train.log").read_text()
    assert "note: the learning-rate warm-up (optim.warmup_epochs=1) lasts the whole run of 2 steps" in log
    assert "note: the learning-rate warm-up" in err and "never decays" in err
    two = write_recipe(tmp_path / "two.yaml", tiny_recipe(images))  # 2 epochs, 1 of warm-up: no note
    weights = source / "teacher.safetensors"
    code, _, err = cli("pretrain", str(two), f"model.weights={weights}", "--out", str(tmp_path / "b"), capsys=capsys)
    assert code == 0 and f"backbone: weights of model.weights {weights}" in err and "warm-up" not in err, err
    # resumed, the weights are the checkpoint's, not model.weights': the line is not said again
    code, _, err = cli("pretrain", str(tmp_path / "b" / "config.yaml"), "--out", str(tmp_path / "b"), "--resume",
                       capsys=capsys)
    assert code == 0 and "already complete" in err and "backbone:" not in err, err
