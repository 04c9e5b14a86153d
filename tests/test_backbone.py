from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mlsctl.errors import UserError
from mlsctl.models.backbone import Backbone
from mlsctl.models.lora import LoraSettings, merged_vit, save_adapters

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny(**kwargs) -> Backbone:
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, timm_kwargs=TINY)
    args.update(kwargs)
    return Backbone("vit_small_patch16_224", **args).eval()


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (48, 24)])
def test_outputs_cls_and_patch_grid(size):
    out = tiny()(torch.randn(2, 3, *size))
    assert out.cls.shape == (2, 32)
    assert out.patches.shape == (2, size[0] // 8, size[1] // 8, 32)


def test_a_batch_that_is_not_float_images_is_one_sentence():
    """An API probe (2026-12-05): one image without its batch dimension gave 'not enough values to
    unpack', uint8 pixels a conv's dtype error from inside torch."""
    with pytest.raises(ValueError, match=r"got a torch.float32 tensor of shape \[3, 32, 32\] \(add a batch dimension"):
        tiny()(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"takes normalised float images \[B, C, H, W\], got a torch.uint8"):
        tiny()(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_register_tokens_are_not_patches():
    model = Backbone("vit_small_patch16_224", img_size=32, patch_size=8, timm_kwargs={**TINY, "reg_tokens": 4})
    assert model.num_prefix_tokens == 5
    assert model(torch.randn(1, 3, 32, 32)).patches.shape == (1, 4, 4, 32)


def test_a_vit_without_class_token_gives_its_pooled_feature_not_a_patch():
    """A review (2026-12-06): with timm's class_token=False the global feature was tokens[:, 0], the top-left patch."""
    model = Backbone("vit_small_patch16_224", img_size=32, patch_size=8,
                     timm_kwargs={**TINY, "class_token": False, "global_pool": "avg"}).eval()
    assert not model.has_cls_token
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        tokens = model.net.forward_features(x)
    assert not torch.allclose(out.cls, out.patches[:, 0, 0])
    assert torch.allclose(out.cls, model.net.fc_norm(tokens.mean(1)), atol=1e-5)  # timm's average pool and its norm


def test_forward_crops_equals_separate_forwards():
    model = tiny()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    together = model.forward_crops(crops)
    for crop, out in zip(crops, together):
        assert torch.allclose(model(crop).cls, out.cls, atol=1e-5)


def reference_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tiny().net.state_dict().items()}


@pytest.mark.parametrize("layout", ["timm", "dino_release", "dino_checkpoint", "ddp_student", "mlsctl_run"])
def test_weights_load_from_every_layout(tmp_path: Path, layout: str):
    state = {k: torch.randn_like(v) for k, v in reference_state().items()}
    if layout == "timm":
        path, payload = tmp_path / "w.safetensors", {**state, "head.weight": torch.zeros(10, 32)}
        save_file(payload, str(path))
    else:
        path = tmp_path / "w.pth"
        if layout == "dino_release":
            payload = state
        elif layout == "dino_checkpoint":
            payload = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, "head.mlp.0.weight": torch.zeros(3, 3)},
                       "student": {f"module.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}, "epoch": 3}
        elif layout == "ddp_student":
            payload = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
        else:
            payload = {**{f"teacher.backbone.model.{k}": v for k, v in state.items()},
                       **{f"student.backbone.model.{k}": torch.zeros_like(v) for k, v in state.items()},
                       "center": torch.zeros(1, 4)}
        torch.save(payload, path)
    model = tiny(weights=str(path))
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_position_embedding_is_resampled(tmp_path: Path):
    state = reference_state()  # 4x4 grid
    save_file(state, str(tmp_path / "w.safetensors"))
    model = tiny(img_size=48, weights=str(tmp_path / "w.safetensors"))  # 6x6 grid
    assert model.net.pos_embed.shape == (1, 37, 32)
    assert torch.equal(model.net.pos_embed[:, :1], state["pos_embed"][:, :1])


def test_mismatched_weights_list_missing_and_unexpected_keys(tmp_path: Path):
    state = reference_state()
    del state["norm.weight"]
    state["extra.thing"] = torch.zeros(2)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(UserError) as info:
        tiny(weights=str(tmp_path / "w.safetensors"))
    message = str(info.value)
    assert "missing 1 keys (norm.weight)" in message and "unexpected 1 keys (extra.thing)" in message


def test_weight_file_errors_are_one_sentence(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        tiny(weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights"):
        tiny(weights=str(tmp_path / "junk.pth"))
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(UserError, match="must end in .safetensors or .pth"):
        tiny(weights=str(tmp_path / "w.npz"))


def test_pth_loading_runs_no_code(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError):
        tiny(weights=str(tmp_path / "evil.pth"))
    assert not (tmp_path / "pwned").exists()


def test_unknown_arch_fails_clearly():
    with pytest.raises(UserError, match="not a timm model"):
        Backbone("vit_smol_patch16_224")
    with pytest.raises(UserError, match="set model.patch_size=32"):
        Backbone("resnet18")  # a CNN, with a ViT's patch size


def test_offline_pretrained_fails_with_one_sentence(tmp_path: Path, recipe_file: Path):
    """HF_HUB_OFFLINE=1 and an empty cache: timm cannot fetch the weights."""
    import subprocess
    import sys

    from conftest import cli_env

    env = {**cli_env(), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "mlsctl", "pretrain", str(recipe_file), "model.pretrained=true",
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "model.pretrained=true for 'vit_small_patch16_224'" in result.stderr
    assert "not in the Hugging Face cache" in result.stderr and "set model.weights" in result.stderr
    assert "Traceback" not in result.stderr


def test_lora_trains_only_adapters_and_merges(tmp_path: Path):
    model = tiny(lora=LoraSettings(rank=4, alpha=8, bias="lora_only"))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(("lora_" in n) or n.endswith("qkv.base_layer.bias") for n in trainable)
    assert any(n.endswith("qkv.base_layer.bias") for n in trainable)
    # adapters start as a no-op (B = 0); make them matter, then merge
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    expected = model(x).cls
    merged = merged_vit(model.model)
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(merged.forward_features(x)[:, 0], expected, atol=1e-4)
    save_adapters(model.model, tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters" / "adapter_config.json").is_file()


def test_lora_with_no_matching_module_fails():
    with pytest.raises(UserError, match="matched no module"):
        tiny(lora=LoraSettings(targets=["query"]))


# ------------------------------------------------------------------------------------------- CNN backbones
def tiny_cnn(**kwargs) -> Backbone:
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=32)
    args.update(kwargs)
    return Backbone("test_resnet", **args).eval()


def test_cnn_global_feature_is_the_pooled_last_stage_and_patches_its_grid():
    model = tiny_cnn()
    assert model.kind == "cnn" and model.patch_size == 32 and not model.has_cls_token
    x = torch.randn(2, 3, 64, 96)
    out = model(x)
    grid = model.net.forward_features(x)  # timm's own last-stage map [B, C, h, w]
    assert out.patches.shape == (2, 2, 3, model.embed_dim)
    assert torch.equal(out.patches, grid.permute(0, 2, 3, 1))
    assert torch.allclose(out.cls, grid.mean(dim=(2, 3)))
    # timm's own pooled head (num_classes=0, average pooling) gives the same global feature
    import timm

    reference = timm.create_model("test_resnet", num_classes=0)
    reference.load_state_dict(model.net.state_dict())
    assert torch.allclose(out.cls, reference.eval()(x), atol=1e-6)


def test_cnn_output_stride_sets_its_patch_size():
    model = tiny_cnn(patch_size=8, timm_kwargs={"output_stride": 8})
    assert model.patch_size == 8
    assert model(torch.randn(1, 3, 64, 64)).patches.shape[1:3] == (8, 8)
    assert Backbone("test_resnet", patch_size=None).patch_size == 32  # inferred when not given


def test_cnn_misconfigurations_are_one_sentence():
    with pytest.raises(UserError, match="stride 32: set model.patch_size=32"):
        Backbone("test_resnet", patch_size=16)
    with pytest.raises(UserError, match="needs a Vision Transformer"):
        Backbone("test_resnet", patch_size=32, mask_token=True)
    with pytest.raises(UserError, match="is a CNN: set model.lora.enabled=false"):
        Backbone("test_resnet", patch_size=32, lora=LoraSettings(enabled=True))
    with pytest.raises(UserError, match="NCHW feature map"):
        Backbone("test_mambaout", patch_size=32)  # channels-last output: neither kind


def test_cnn_weights_round_trip_through_a_file(tmp_path: Path):
    model = tiny_cnn()
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.manual_seed(1)
    loaded = Backbone("test_resnet", patch_size=32, weights=str(tmp_path / "w.safetensors")).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(loaded(x).cls, model(x).cls)


def test_a_convnext_global_feature_is_timm_s_own_pooled_and_normed_feature():
    import timm

    torch.manual_seed(0)
    model = Backbone("test_convnext", patch_size=32).eval()
    x = torch.randn(2, 3, 64, 64)
    reference = timm.create_model("test_convnext", num_classes=0)
    reference.load_state_dict(model.net.state_dict())
    out = model(x)
    assert torch.allclose(out.cls, reference.eval()(x), atol=1e-5)  # pooled, then the head's LayerNorm
    assert not torch.allclose(out.cls, out.patches.mean(dim=(1, 2)), atol=1e-3)


def test_an_embedding_layer_of_another_shape_in_the_weights_is_said(tmp_path, caplog):
    """A code-health review (2026-12-05): model.weights with an embedding layer of another width than
    model.embedding_dim left the layer freshly initialised without a word (a file without one stays quiet: it is
    the usual start, a self-supervised backbone)."""
    donor = tiny(embedding_dim=8)
    save_file({k: v.contiguous() for k, v in donor.model.state_dict().items()}, str(tmp_path / "w8.safetensors"))
    save_file({k: v.contiguous() for k, v in tiny().model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    with caplog.at_level("WARNING", logger="mlsctl"):
        tiny(embedding_dim=8, weights=str(tmp_path / "w8.safetensors"))
        tiny(embedding_dim=16, weights=str(tmp_path / "plain.safetensors"))
        assert caplog.records == []
        tiny(embedding_dim=16, weights=str(tmp_path / "w8.safetensors"))
    assert len(caplog.records) == 1 and "embedding layer of another shape" in caplog.records[0].getMessage()


def test_model_weights_of_a_folder_names_the_file_inside(tmp_path):
    """A new-user probe (2026-12-05): model.weights=RUN said the (existing) run folder 'does not exist'."""
    from mlsctl.models.weights import check_weights_file

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "teacher.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a folder; give a .safetensors or .pth file; did you mean .*run/teacher"):
        check_weights_file(tmp_path / "run")


def test_a_vit_without_class_token_or_pooling_gives_the_mean_of_its_patches():
    """A review (2026-12-06): with global_pool '' timm's forward_head pools nothing, and the global feature was 3-D."""
    model = Backbone("vit_small_patch16_224", img_size=32, patch_size=8,
                     timm_kwargs={**TINY, "class_token": False, "global_pool": ""}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.cls.shape == (2, 32) and torch.allclose(out.cls, out.patches.mean(dim=(1, 2)))


def test_a_mistyped_arch_is_told_the_closest_name_of_its_family():
    """A new user's probe (2026-12-07): model.arch=vit_tinyy was offered gcvit_tiny."""
    with pytest.raises(UserError, match=r"model.arch 'vit_tinyy' is not a timm model; did you mean 'vit_tiny_patch16_"):
        Backbone("vit_tinyy", img_size=32, patch_size=8)
    with pytest.raises(UserError, match=r"did you mean 'convnext_tiny'\?"):
        Backbone("convnxt_tiny", img_size=32)
