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
    assert a.fingerprint == b.fingerprint != other.fingerprint
    assert a.fingerprint != loaded.fingerprint
    assert a.backbone.embed_dim == loaded.backbone.embed_dim == 32


@pytest.mark.skipif(not BACKBONE.is_file(), reason="weights/dino_fmnist_backbone.safetensors is not in this checkout")
def test_the_shipped_backbone_loads_through_model_weights_and_says_what_it_is():
    from mlsctl import config
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
