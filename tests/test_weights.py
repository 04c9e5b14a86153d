"""Weights files as models: ``--weights FILE --random-init`` (the file's architecture, randomly
initialised: what a pretrained backbone is compared with) and the bf16 backbone of ``weights/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mlsctl.restore import choose_model

from conftest import REPO

BACKBONE = REPO / "weights" / "dino_fmnist_backbone.safetensors"


def _weights_file(tmp_path: Path) -> Path:
    from mlsctl.models.backbone import Backbone

    torch.manual_seed(123)
    backbone = Backbone("vit_small_patch16_224", img_size=32, patch_size=8,
                        timm_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    spec = {"arch": "vit_small_patch16_224", "img_size": 32, "patch_size": 8,
            "timm_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.net.state_dict().items()}, str(path),
              metadata={"model": json.dumps(spec)})
    return path


def test_random_init_of_a_weights_file_is_its_architecture_seeded(tmp_path):
    path = _weights_file(tmp_path)
    loaded = choose_model(weights=path)
    a, b = choose_model(weights=path, random_init=True, seed=0), choose_model(weights=path, random_init=True, seed=0)
    other = choose_model(weights=path, random_init=True, seed=1)
    assert a.info["source"] == "random-init" and "architecture of" in a.description
    # a new user (2026-12-06): the width-32 ViT of patch 8 was said to be a vit_small_patch16_224
    reshaped = "vit_small_patch16_224 reshaped to width 32, depth 2, patch 8"
    assert a.description.startswith(f"randomly initialised {reshaped} (") and loaded.description.startswith(reshaped)
    assert a.fingerprint == b.fingerprint != other.fingerprint
    assert a.fingerprint != loaded.fingerprint
    assert a.backbone.embed_dim == loaded.backbone.embed_dim == 32


def test_a_missing_foreign_or_damaged_weights_file_is_named_as_such(tmp_path):
    """A probe (2026-12-05): all three said the file 'does not say which architecture it holds; add --model'."""
    from mlsctl.errors import UserError

    (tmp_path / "labels.csv").write_text("a.png,cat\n")
    damaged = tmp_path / "cut.safetensors"
    damaged.write_bytes(_weights_file(tmp_path).read_bytes()[:100])
    for path, words in ((tmp_path / "nosuch.safetensors", "does not exist"),
                        (tmp_path / "labels.csv", "must end in .safetensors or .pth"),
                        (damaged, "cannot read weights from")):
        for random_init in (False, True):
            with pytest.raises(UserError, match=words):
                choose_model(weights=path, random_init=random_init)


@pytest.mark.skipif(not BACKBONE.is_file(), reason="weights/dino_fmnist_backbone.safetensors is not in this checkout")
def test_the_shipped_backbone_loads_through_model_weights_and_says_what_it_is():
    from mlsctl import config
    from mlsctl.errors import UserError
    from mlsctl.models.backbone import build_backbone

    with safe_open(str(BACKBONE), "pt") as handle:
        metadata = handle.metadata()
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys()}
    assert dtypes == {torch.bfloat16} and BACKBONE.stat().st_size <= 20 * 10**6
    provenance = json.loads(metadata["provenance"])
    assert provenance["method"] == "dino" and provenance["steps"] > 0
    recipe = config.load_recipe(str(REPO / "recipes" / "dino_fmnist_backbone.yaml"), [f"model.weights={BACKBONE}"])
    backbone = build_backbone(recipe.model, drop_path_rate=0.0)  # strict: every key and shape fits
    with safe_open(str(BACKBONE), "pt") as handle:
        expected = handle.get_tensor("blocks.0.attn.qkv.weight").float()
    assert torch.equal(backbone.net.state_dict()["blocks.0.attn.qkv.weight"], expected)
    # into another recipe's ViT: what to set, read off the file (a new user's run-through, 2026-12-06: 600 characters
    # of key lists and "check the architecture")
    quick = config.load_recipe(str(REPO / "recipes" / "dino_fmnist_quick.yaml"), [f"model.weights={BACKBONE}"])
    with pytest.raises(UserError, match="the file records its architecture: set model.arch=vit_small_patch16_224 "
                                        "model.img_size=96 model.patch_size=8 model.timm_kwargs.depth=8 "
                                        "model.timm_kwargs.embed_dim=320 model.timm_kwargs.num_heads=5"):
        build_backbone(quick.model, drop_path_rate=0.0)


# ------------------------------------------------------------- loading without initialising (issue 24, item 6)
MILE_METHOD = {"name": "mile", "set_length": 2, "cross_heads": 2, "out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32,
               "warmup_teacher_temp_epochs": 0}
SOVE_METHOD = {"name": "sove", "hidden_dim": 64, "bottleneck_dim": 32, "class_memory_size": 64, "patch_memory_size": 32,
               "cls_anchors": 6, "cls_supports": 3, "cls_tasks": 2, "patch_anchors": 4, "warmup_teacher_temp_epochs": 0}


@pytest.mark.parametrize("method", [MILE_METHOD, SOVE_METHOD], ids=["mile", "sove"])
def test_a_method_loaded_without_initialising_equals_one_built_then_loaded(tmp_path, method):
    from mlsctl import config, methods
    from mlsctl.models.weights import built_with
    from mlsctl.schedules import Schedule

    from conftest import make_images, tiny_recipe

    raw = tiny_recipe(make_images(tmp_path / "images", 2), data__local_crops={"count": 0, "size": 16, "scale": [0.1, 0.4]})
    raw["method"] = method
    recipe = config.from_dict(raw)
    cls, schedule = methods.method_class(method["name"]), Schedule(steps_per_epoch=1, epochs=1)
    torch.manual_seed(7)
    trained = cls(recipe, schedule)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a teacher that differs from its student, as after training
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    before = torch.get_rng_state()
    loaded = built_with(lambda: cls(recipe, schedule), state)
    assert torch.equal(torch.get_rng_state(), before)  # nothing was drawn
    ordinary = cls(recipe, schedule)
    ordinary.load_state_dict(state, strict=True)
    assert list(loaded.state_dict()) == list(ordinary.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ordinary.state_dict().values()))
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in ordinary.parameters()]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = loaded.teacher_backbone().eval()(x), ordinary.teacher_backbone().eval()(x)
    assert torch.equal(a.cls, b.cls) and torch.equal(a.patches, b.patches)


def test_a_module_with_buffers_outside_its_state_is_built_the_ordinary_way():
    from mlsctl.models.weights import built_with

    class Rotary(torch.nn.Module):  # as EVA's rotary tables: computed in the constructor, not saved
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.register_buffer("table", torch.arange(8.0).sin(), persistent=False)

    state = {k: torch.full_like(v, 0.5) for k, v in Rotary().state_dict().items()}
    before = torch.get_rng_state()
    loaded = built_with(Rotary, state)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(loaded.table, torch.arange(8.0).sin()) and torch.equal(loaded.linear.weight, state["linear.weight"])
    with pytest.raises(RuntimeError, match="Missing key"):
        built_with(Rotary, {"linear.weight": state["linear.weight"]})


def test_a_backbone_from_a_weights_file_skips_only_its_initialisation(tmp_path):
    from mlsctl.models.backbone import Backbone

    path = _weights_file(tmp_path)
    spec = dict(arch="vit_small_patch16_224", patch_size=8, timm_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    for size in (32, 48):  # the file's grid, and another one (its position embedding resampled)
        torch.manual_seed(0)
        ordinary = Backbone(img_size=size, weights=str(path), **spec).eval()
        before = torch.get_rng_state()
        fast = Backbone(img_size=size, weights=str(path), skip_init=True, **spec).eval()
        assert torch.equal(torch.get_rng_state(), before)
        assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), ordinary.state_dict().values()))
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(fast(x).cls, ordinary(x).cls)
    with pytest.raises(Exception, match="do not fit model.arch"):
        Backbone(img_size=32, weights=str(path), skip_init=True, arch="vit_small_patch16_224", patch_size=8,
                 timm_kwargs={"embed_dim": 32, "depth": 3, "num_heads": 2})


def test_a_runs_teacher_becomes_the_bf16_weights_file_and_comes_back_from_its_parts(finished_run, tmp_path, monkeypatch):
    """scripts/backbone_weights.py: how a backbone lands in weights/ — bf16, with the provenance a reader needs
    (where it trained included), in parts below a device's file limit, joined back to the same bytes."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    import backbone_weights

    run, _ = finished_run
    (whole,) = backbone_weights.to_bf16(run, tmp_path / "bb")
    with safe_open(str(whole), "pt") as handle:
        provenance = json.loads(handle.metadata()["provenance"])
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    assert provenance["method"] == "dino" and provenance["steps"] == 8 and provenance["device"] == "cpu"
    assert provenance["precision"] and provenance["commit"] is not None
    model = choose_model(weights=whole)
    with safe_open(str(run / "teacher.safetensors"), "pt") as handle:
        expected = handle.get_tensor("blocks.0.attn.qkv.weight").to(torch.bfloat16).float()
    assert torch.equal(model.backbone.net.state_dict()["blocks.0.attn.qkv.weight"], expected)

    monkeypatch.setattr(backbone_weights, "PART_BYTES", whole.stat().st_size // 3 + 1)
    parts = backbone_weights.to_bf16(run, tmp_path / "parts" / "bb")
    assert len(parts) == 3 and not (tmp_path / "parts" / "bb.safetensors").exists()
    # nothing else ever sat in the folder that comes back from a device (the whole file was over its 16 MiB)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [p.name for p in parts]
    joined = backbone_weights.join(tmp_path / "parts" / "bb", tmp_path / "joined.safetensors")
    assert joined.read_bytes() == b"".join(part.read_bytes() for part in parts)
    with safe_open(str(joined), "pt") as a, safe_open(str(whole), "pt") as b:  # (safetensors orders metadata freely)
        assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())


def test_a_run_taken_for_want_of_a_model_flag_is_named_when_it_cannot_serve(finished_run, tmp_path):
    """A probe (2026-12-05): without --run, eval took the newest run under runs/ (a refine run) and refused it
    without saying that it had chosen it, nor which."""
    import shutil

    from mlsctl.errors import UserError

    run_dir, _ = finished_run
    taken = tmp_path / "runs" / "latest"
    shutil.copytree(run_dir, taken)
    (taken / "teacher.safetensors").write_bytes((taken / "teacher.safetensors").read_bytes()[:100])
    with pytest.raises(UserError, match=f"the newest run under .*runs/ was taken \\({taken}\\).*give --run RUN"):
        choose_model(runs_root=tmp_path / "runs")


def test_a_missing_weights_file_of_the_repository_names_its_copy(tmp_path, monkeypatch):
    """A new user's run-through (2026-12-06): mile_fmnist_backbone run by name from another folder failed with
    "weights file /elsewhere/weights/dino_fmnist_backbone.safetensors does not exist" and no more."""
    from mlsctl.errors import UserError
    from mlsctl.models.weights import check_weights_file

    monkeypatch.chdir(tmp_path)
    shipped = Path(__file__).resolve().parents[1] / "weights" / "dino_fmnist_backbone.safetensors"
    with pytest.raises(UserError, match=f"the repository's is {shipped}: run from the repository's folder"):
        check_weights_file(tmp_path / "weights" / "dino_fmnist_backbone.safetensors")
    with pytest.raises(UserError, match="give a local .safetensors or .pth file"):
        check_weights_file(tmp_path / "weights" / "nothing-of-ours.safetensors")


def test_the_shipped_backbone_s_missing_data_gets_its_build_commands(tmp_path, monkeypatch):
    from mlsctl.data.images import scan_images
    from mlsctl.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as refused:
        scan_images(tmp_path / "data" / "fmnist-backbone", "data.root")
    assert ("mlsctl data fmnist-scenes --out data/fmnist-scenes && mlsctl data fmnist-products --out "
            "data/fmnist-products && mkdir -p data/fmnist-backbone && ln -sfn ../fmnist-scenes/train/images "
            "data/fmnist-backbone/scenes") in refused.value.message


def test_model_beside_weights_that_record_another_architecture_advises_the_command_line(finished_run):
    """A new user's probe (2026-12-08): `embed --weights EXPORT --model vit_tiny_patch16_224` advised "set
    model.arch=... model.img_size=96", keys of a recipe, which embed does not take: leave --model out."""
    from mlsctl.errors import UserError

    run_dir, _ = finished_run
    with pytest.raises(UserError) as caught:
        choose_model(weights=run_dir / "teacher.safetensors", arch="vit_tiny_patch16_224")
    message = str(caught.value)
    assert "do not fit --model vit_tiny_patch16_224" in message and "leave --model out" in message, message
    assert "model.arch=" not in message and "the file records its own architecture (" in message
