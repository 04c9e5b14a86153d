"""mlsctl/restore.py: the one place a run is read back (a recipe, a method with a checkpoint's
weights, the teacher), and the one "not a run folder" sentence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlsctl.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_open_run_refuses_a_folder_without_config_yaml_in_one_sentence(tmp_path):
    from mlsctl.restore import open_run

    with pytest.raises(UserError) as caught:
        open_run(tmp_path)
    assert str(caught.value) == f"{tmp_path} is not a run folder (no config.yaml); give a folder written by mlsctl pretrain"
    with pytest.raises(UserError) as caught:
        open_run(tmp_path, flag="--run", hint="give a MILE run")
    assert str(caught.value) == f"--run {tmp_path} is not a run folder (no config.yaml); give a MILE run"
    # what it is instead, with the fix (a new user, 2026-12-06: each was "is not a run folder (no config.yaml)")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000012").mkdir(parents=True)
    (run / "config.yaml").write_text("method: {name: dino}\n")
    (run / "metrics.jsonl").write_text("")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, said in ((tmp_path / "nowhere", "does not exist; give a folder written by mlsctl pretrain"),
                       (tmp_path / "loop", "is a symbolic link that loops or leads nowhere; give a folder written by "
                                           "mlsctl pretrain"),
                       (run / "config.yaml", f"is the run's config.yaml; give its folder {run}"),
                       (run / "metrics.jsonl", "is a file, not a run folder; give a folder written by mlsctl pretrain"),
                       (run / "checkpoints" / "step-00000012",
                        f"is a checkpoint of the run {run}; give the run (with --step 12 where the command takes one)")):
        with pytest.raises(UserError) as caught:
            open_run(path)
        assert str(caught.value) == f"{path} {said}"


def test_a_run_and_its_checkpoint_give_the_same_method_and_teacher(finished_run):
    from mlsctl.models.source import fingerprint
    from mlsctl.restore import from_checkpoint, method_from_checkpoint, open_run

    run = open_run(finished_run[0])
    recipe, method, checkpoint = method_from_checkpoint(run)
    assert checkpoint.path == run.latest().path and recipe.method.name
    again = method_from_checkpoint(checkpoint)[1]
    teacher = fingerprint(method.teacher_backbone().model)
    assert fingerprint(again.teacher_backbone().model) == teacher
    assert from_checkpoint(recipe, checkpoint, run).fingerprint == teacher


def test_reading_a_run_back_reaches_up_no_layer():
    """models/source.py (layer 1) no longer builds methods nor reads --init-from through the training
    loop: restore.py (layer 3) does."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from layers import upward_imports
    finally:
        sys.path.remove(str(REPO / "scripts"))
    upward, unmapped, _ = upward_imports(REPO)
    assert unmapped == []
    assert [u for u in upward if u["module"].startswith(("mlsctl.models", "mlsctl.restore"))] == []


def test_no_module_imports_from_a_layer_above_its_own():
    """The layer map of docs/development.md holds everywhere: no import, at module level or inside a
    function, runs from a lower layer up (the package face, mlsctl/__init__.py, is the one exception
    the map allows)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from layers import upward_imports
    finally:
        sys.path.remove(str(REPO / "scripts"))
    upward, unmapped, _ = upward_imports(REPO)
    assert unmapped == [] and upward == [], upward


def test_no_method_package_imports_another():
    """Methods share code through the modules directly in mlsctl/methods/ (base, base_config,
    self_distillation, multi_similarity), never through another method's package: CrIBo, MILE and
    SOVE took DINO's loss and networks from methods.dino, refinement its loss from methods.ms."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from layers import cross_method_imports
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert cross_method_imports(REPO) == []


def test_init_from_a_lora_run_of_other_settings_takes_its_merged_teacher(tmp_path, capsys, finished_run):
    """A review (2026-12-06): --init-from a LoRA run into another method or settings was refused for peft's keys
    (base_layer, lora_A), blamed on model.arch; the source's teacher is taken with its adapters merged."""
    import torch
    from safetensors.torch import load_file

    from mlsctl import config
    from mlsctl.restore import build_method, initial_weights

    from conftest import cli_ok, make_images, tiny_recipe, write_recipe

    raw = tiny_recipe(make_images(tmp_path / "images", 8, size=(32, 32)))
    raw["model"]["lora"] = {"enabled": True, "rank": 2, "alpha": 4}
    raw["optim"]["epochs"] = 1
    cli_ok(capsys, "pretrain", str(write_recipe(tmp_path / "lora.yaml", raw)), "--out", str(tmp_path / "lora"))
    teacher = load_file(str(tmp_path / "lora" / "teacher.safetensors"))  # merged by the export
    _, dino_recipe = finished_run
    torch.manual_seed(1)
    dino = build_method(config.load_recipe(str(dino_recipe)))  # no LoRA, another seed: other settings
    assert initial_weights(dino, str(tmp_path / "lora")).startswith("every backbone from")
    for backbone in dino.backbones():
        state = backbone.net.state_dict()
        assert all(torch.equal(state[key], value.to(state[key].dtype)) for key, value in teacher.items())
