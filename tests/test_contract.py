"""The contract every registered method keeps, checked on each one at tiny sizes, in process:

* a few steps through the shared loop (``mlsctl.train.pretrain``), a checkpoint every step;
* the run as a kill right after an earlier checkpoint leaves it (:func:`conftest.as_killed_at`),
  resumed: the same losses in metrics.jsonl, bit for bit, the same weights (model, teacher) and the
  same banks as the run that never stopped;
* the method and its teacher read back through :mod:`mlsctl.restore` hold the checkpoint's weights;
* a method with a backbone exports it (:func:`mlsctl.export.export_timm`) as a folder timm loads
  (``local-dir:``) with the teacher's weights; one without (refine) has no teacher to export.

A method registered without a case here fails :func:`test_every_registered_method_has_a_contract_case`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlsctl import config, registry

from conftest import REPO, as_killed_at, make_images, tiny_recipe, write_recipe

TRAIN = {"checkpoint_every": 1, "keep_checkpoints": 50, "log_every": 1, "bank_health_every": 0}


# ---------------------------------------------------------------------------- tiny recipes, one a method
def _dino(data: Path) -> dict:
    raw = tiny_recipe(make_images(data / "images", 8, size=(32, 32)))
    raw["method"]["monitor_bank_size"] = 8
    return raw  # 8 images, batch 4: 2 steps x 2 epochs


def _cribo(data: Path) -> dict:
    raw = tiny_recipe(make_images(data / "images", 8, size=(32, 32)),
                      data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = {"name": "cribo", "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "n_clusters": 4,
                     "bank_images": 2, "warmup_teacher_temp_epochs": 0}
    return raw


def _mile(data: Path) -> dict:
    rng = np.random.default_rng(0)  # 4 objects of 2 photos (conftest.mile_run's layout)
    for o in range(4):
        colour = rng.uniform(0, 255, 3)
        for k in range(2):
            pixels = np.clip(colour + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            (data / "train" / f"obj{o}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(data / "train" / f"obj{o}" / f"{k}.png")
    raw = tiny_recipe(data / "train", data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]},
                      optim__batch_size=2)
    raw["method"] = {"name": "mile", "set_length": 2, "cross_heads": 2, "out_dim": 64, "hidden_dim": 64,
                     "bottleneck_dim": 32, "warmup_teacher_temp_epochs": 0}
    return raw


def _sove(data: Path) -> dict:
    from test_sove import SOVE_METHOD

    raw = tiny_recipe(make_images(data / "images", 8, size=(32, 32)),
                      data__local_crops={"count": 2, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = dict(SOVE_METHOD)
    return raw


def _mls(data: Path) -> dict:
    from test_mls import mls_recipe

    return mls_recipe(make_images(data / "images", 8, size=(32, 32)))


def _ms(data: Path) -> dict:
    from test_ms import _class_images, _ms_recipe

    images = _class_images(data / "images", 4, 4)
    files = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.png"))
    labels = data / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{f},{f.split('/')[0]}\n" for f in files))
    return _ms_recipe(images, labels_file=str(labels))  # 16 images, batch 8: 2 steps x 2 epochs


def _refine(data: Path):
    """refine's own route (``mlsctl refine train``): recipes/refine.yaml with data.root a feature folder."""
    from test_refine import _clusters, _folder

    x, y = _clusters(n_classes=8, per_class=4)
    feats = _folder(data / "feats", x, y)
    overrides = [f"data.root={feats}", "method.blocks=2", "method.neighbours=4", "method.zero_init=false",
                 "optim.epochs=2", "optim.batch_size=16"] + [f"train.{k}={v}" for k, v in TRAIN.items()]
    path = REPO / "recipes" / "refine.yaml"
    return config.load_recipe(str(path), overrides), str(path)


CASES = {"dino": _dino, "cribo": _cribo, "mile": _mile, "sove": _sove, "mls": _mls, "ms": _ms, "refine": _refine}


def test_every_registered_method_has_a_contract_case():
    assert sorted(registry.names()) == sorted(CASES), "a registered method needs a case in tests/test_contract.py"


# ---------------------------------------------------------------------------- one run a method, shared
def _train(name: str, tmp: Path):
    from mlsctl.train import pretrain

    made = CASES[name](tmp / "data")
    if isinstance(made, dict):
        made["train"].update(TRAIN)
        made["model"]["drop_path_rate"] = 0.1  # the global RNG in the step: its restore on resume is checked too
        path = write_recipe(tmp / f"{name}.yaml", made)
        recipe, source = config.load_recipe(str(path)), str(path)
    else:
        recipe, source = made
    assert recipe.method.name == name
    summary = pretrain(recipe, tmp / "full", resume=False, recipe_source=source)
    return recipe, source, summary


def _losses(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith("loss")} for r in rows if "loss" in r]


def _killed_copy(run: Path, copy: Path, step: int, has_backbone: bool) -> Path:
    if has_backbone:
        return as_killed_at(run, copy, step)
    assert not (run / "teacher.safetensors").exists()  # as_killed_at removes it: a run with no backbone has none
    (run / "teacher.safetensors").touch()
    try:
        return as_killed_at(run, copy, step)
    finally:
        (run / "teacher.safetensors").unlink()


def _equal_states(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys() and a, what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:5]}"


@pytest.mark.parametrize("name", list(CASES))
def test_method_contract(name, tmp_path, capfd):
    from safetensors.torch import load_file

    from mlsctl import methods
    from mlsctl.bank import load_banks
    from mlsctl.errors import UserError
    from mlsctl.restore import from_checkpoint, method_from_checkpoint
    from mlsctl.runs import Run
    from mlsctl.train import pretrain

    if name not in registry.names():
        pytest.fail(f"{name} has a contract case but is not registered")
    recipe, source, summary = _train(name, tmp_path)
    full = Run(tmp_path / "full")
    has_backbone = methods.method_class(name).has_backbone
    total = summary.steps
    assert 3 <= total <= 6, total  # a few steps, a checkpoint each
    assert [c.step for c in full.checkpoints()] == list(range(1, total + 1))
    assert (full.root / "summary.json").is_file()
    assert full.teacher_weights_path.is_file() == has_backbone

    # ---- exact resume after a kill right after the checkpoint of an earlier step
    stop = total // 2
    killed = Run(_killed_copy(full.root, tmp_path / "killed", stop, has_backbone))
    assert [c.step for c in killed.checkpoints()] == list(range(1, stop + 1))
    assert not (killed.root / "summary.json").exists() and not killed.teacher_weights_path.exists()
    capfd.readouterr()
    resumed = pretrain(recipe, killed.root, resume=True, recipe_source=source)
    assert f"resuming {killed.root} from step {stop}\n" in capfd.readouterr().err
    assert resumed.steps == total and not resumed.already_complete
    assert [c.step for c in killed.checkpoints()] == list(range(1, total + 1))
    losses = _losses(full.root)
    assert [r["step"] for r in losses] == list(range(1, total + 1))
    assert _losses(killed.root) == losses  # bit for bit: floats read back from JSON compare exactly
    assert len({r["loss"] for r in losses}) > 1  # the loss moves: a frozen run would pass trivially
    for step in range(stop + 1, total + 1):
        _equal_states(load_file(str(killed.checkpoint(step).model_path)), load_file(str(full.checkpoint(step).model_path)),
                      f"model at step {step}")
    first, last = load_file(str(full.checkpoint(1).model_path)), load_file(str(full.latest().model_path))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # training changed the weights
    if has_backbone:
        _equal_states(load_file(str(killed.teacher_weights_path)), load_file(str(full.teacher_weights_path)), "teacher")

    # ---- banks (their own file: restore reads weights, not banks): the same contents and write counts
    _, method, checkpoint = method_from_checkpoint(full.root)
    assert checkpoint.step == total
    bank_names = set(method.banks())
    if bank_names:
        banks_full, banks_killed = load_banks(full.latest().banks_path), load_banks(killed.latest().banks_path)
        assert set(banks_full) == set(banks_killed) == bank_names
        for bank in bank_names:
            assert torch.equal(banks_full[bank].vectors, banks_killed[bank].vectors), bank
            assert banks_full[bank].n_written == banks_killed[bank].n_written > 0, bank

    # ---- restore: the method and its teacher hold the checkpoint's weights
    saved = load_file(str(checkpoint.model_path))
    _equal_states({k: v.detach() for k, v in method.state_dict().items()}, saved, "restored method")
    _, at_stop, _ = method_from_checkpoint(full.root, stop)
    assert any(not torch.equal(at_stop.state_dict()[k], saved[k]) for k in saved)  # the step chosen is the one read
    if not has_backbone:
        with pytest.raises(UserError, match="has no backbone"):
            method.teacher_backbone()
        return
    teacher = from_checkpoint(recipe, checkpoint, full).backbone.model
    prefix = next(n for n, m in method.named_modules() if m is method.teacher_backbone().model)
    teacher_state = {k: v.detach() for k, v in teacher.state_dict().items()}
    _equal_states(teacher_state, {k: saved[f"{prefix}.{k}"] for k in teacher_state}, "restored teacher vs checkpoint")
    exported_teacher = load_file(str(full.teacher_weights_path))
    _equal_states(teacher_state, exported_teacher, "restored teacher vs teacher.safetensors")

    # ---- export: a timm folder with the teacher's weights
    import timm

    from mlsctl.export import export_timm

    record = export_timm(full.root, tmp_path / "export")
    assert record["method"] == name and record["step"] == total
    assert record["files"] == ["config.json", "mlsctl.json", "model.safetensors"]
    _equal_states(load_file(str(tmp_path / "export" / "model.safetensors")), exported_teacher, "export")
    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    _equal_states({k: v.detach() for k, v in model.state_dict().items()}, exported_teacher, "timm local-dir")
    x = torch.randn(2, 3, recipe.model.img_size, recipe.model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), teacher.eval()(x), atol=1e-5)
