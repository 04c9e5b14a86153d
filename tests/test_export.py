"""mlsctl export: a timm model folder whose outputs equal mlsctl embed's features."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli, cli_ok, write_litter


def test_export_loads_in_timm_and_equals_embed(finished_run, tmp_path, capsys):
    import timm
    from PIL import Image

    from mlsctl import load_backbone
    from mlsctl.features import Features

    run_dir, _ = finished_run
    out, _ = cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"), "--json")
    record = json.loads(out)
    assert record["files"] == ["config.json", "mlsctl.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True).eval()  # no mlsctl needed
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))

    images = sorted((run_dir.parent / "images").rglob("*.png"))[:5]
    folder = tmp_path / "some"
    folder.mkdir()
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    cli_ok(capsys, "embed", str(folder), "--run", str(run_dir), "--dtype", "fp32", "--out", str(tmp_path / "feats"))
    features = Features(tmp_path / "feats")
    expected = features.global_features().float()
    with torch.no_grad():
        got = torch.stack([model(transform(Image.open(folder / name).convert("RGB"))[None])[0] for name in features.files])
    assert torch.allclose(got, expected, atol=1e-5), float((got - expected).abs().max())
    with torch.no_grad():
        again = load_backbone(tmp_path / "exp")(transform(Image.open(folder / features.files[0]).convert("RGB"))[None])
        from_run = load_backbone(run_dir)(transform(Image.open(folder / features.files[0]).convert("RGB"))[None])
    assert torch.allclose(again[0], expected[0], atol=1e-5) and torch.allclose(from_run[0], expected[0], atol=1e-5)
    # a new user's probe (2026-12-06): --weights EXPORT was refused, and EXPORT/model.safetensors asked for --model,
    # which cannot name the reshaped ViT; both read its architecture from the export's mlsctl.json
    for weights in (tmp_path / "exp", tmp_path / "exp" / "model.safetensors"):
        out = tmp_path / f"via-{weights.name}"
        cli_ok(capsys, "embed", str(folder), "--weights", str(weights), "--dtype", "fp32", "--out", str(out))
        assert Features(out).model["fingerprint"] == features.model["fingerprint"]
        assert torch.equal(Features(out).global_features(), features.global_features())


def test_export_refuses_to_overwrite_what_it_did_not_write(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "precious"), "--overwrite", capsys=capsys)
    assert code != 0 and "not an mlsctl export" in err and (tmp_path / "precious" / "thesis.tex").is_file()
    # a new-user probe (2026-12-05): without --overwrite it advised --overwrite, which then refused
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "precious"), capsys=capsys)
    assert code == 2 and "not an mlsctl export" in err and "add --overwrite" not in err
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"))
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "exp"), capsys=capsys)
    assert code != 0 and "add --overwrite" in err
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"), "--overwrite")
    code, _, err = cli("export", str(tmp_path), "--out", str(tmp_path / "x"), capsys=capsys)
    assert code != 0 and "is not a run folder" in err


def test_export_overwrite_keeps_foreign_files_and_files_are_readable(finished_run, tmp_path, capsys):
    import os
    import stat

    from mlsctl.export import EXPORT_FILES

    run_dir, _ = finished_run
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"))
    mode = stat.S_IMODE(os.stat(tmp_path / "exp" / "model.safetensors").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    for litter in (".DS_Store", "._model.safetensors", "desktop.ini"):  # a file browser's: replaced with the export
        write_litter(tmp_path / "exp" / litter)
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"), "--overwrite")
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == sorted(EXPORT_FILES)
    (tmp_path / "exp" / ".DS_Store").write_text("x")
    (tmp_path / "exp" / "notes.txt").write_text("mine")
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "exp"), "--overwrite", capsys=capsys)
    assert code != 0 and "also holds notes.txt, which" in err and (tmp_path / "exp" / "notes.txt").read_text() == "mine"
    (tmp_path / "exp" / ".DS_Store").unlink()
    # a new user's probe, 2026-12-07: a hidden folder, and a folder under an export file's name, go with the swap too
    (tmp_path / "exp" / "notes.txt").unlink()
    (tmp_path / "exp" / ".git").mkdir()
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "exp"), "--overwrite", capsys=capsys)
    assert code != 0 and "also holds .git/, which export did not write" in err and (tmp_path / "exp" / ".git").is_dir()
    (tmp_path / "exp" / ".git").rmdir()
    (tmp_path / "exp" / "model.safetensors").rename(tmp_path / "model.safetensors")
    (tmp_path / "exp" / "model.safetensors").mkdir()
    (tmp_path / "exp" / "model.safetensors" / "mine.txt").write_text("mine")
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "exp"), "--overwrite", capsys=capsys)
    assert code != 0 and "also holds model.safetensors/, which" in err, err
    assert (tmp_path / "exp" / "model.safetensors" / "mine.txt").read_text() == "mine"
    code, _, err = cli("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), capsys=capsys)
    assert code != 0 and "does not exist" in err


# ----------------------------------------------------------------------------------- issue 23, item 5


def _export_state(out):
    import hashlib

    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    if files != ["config.json", "mlsctl.json", "model.safetensors"]:
        return ("incomplete", files)
    return (json.loads((out / "mlsctl.json").read_text())["step"],
            hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())


class Killed(Exception):
    pass


def test_5_overwrite_swaps_the_export_in_one_step(finished_run, tmp_path, capsys, monkeypatch):
    """An exception at every rename of `export --overwrite` (the atomic exchange on Linux, and the
    two renames where there is none) leaves --out holding the old export or the new one, whole."""
    import os

    from mlsctl import atomic, export
    from mlsctl.runs import Run

    run_dir, _ = finished_run
    first = Run(run_dir).checkpoints()[0].step
    out = tmp_path / "exp"
    cli_ok(capsys, "export", str(run_dir), "--out", str(out), "--step", str(first))
    old = _export_state(out)
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "ref"))
    new = _export_state(tmp_path / "ref")
    assert old != new and old[0] == first
    real_replace, real_exchange = os.replace, atomic._exchange
    for exchange in (True, False):  # Linux's exchange, and the fallback of two renames
        for n in range(1, 4):
            for when in ("before", "after"):
                calls = []

                def step(real):
                    def wrapped(*args, **kwargs):
                        calls.append(args)
                        if len(calls) == n and when == "before":
                            raise Killed(n)
                        result = real(*args, **kwargs)
                        if len(calls) == n:
                            raise Killed(n)
                        return result
                    return wrapped

                monkeypatch.setattr(os, "replace", step(real_replace))
                monkeypatch.setattr(atomic, "_exchange", step(real_exchange) if exchange else lambda a, b: False)
                try:
                    export.export_timm(run_dir, out, overwrite=True)
                except Killed:
                    pass
                monkeypatch.setattr(os, "replace", real_replace)
                monkeypatch.setattr(atomic, "_exchange", real_exchange)
                assert _export_state(out) in (old, new), (exchange, n, when)
                assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left over
                export.export_timm(run_dir, out, step=first, overwrite=True)  # back to the old one
                assert _export_state(out) == old


def test_5_a_kill_between_the_fallback_renames_is_undone_by_the_next_export(finished_run, tmp_path, capsys):
    import os

    run_dir, _ = finished_run
    out = tmp_path / "exp"
    cli_ok(capsys, "export", str(run_dir), "--out", str(out))
    state = _export_state(out)
    os.replace(out, tmp_path / ".exp.swap-old")  # where a kill after the first rename leaves it
    code, _, err = cli("export", str(run_dir), "--out", str(out), capsys=capsys)  # the old export is back, so:
    assert code == 2 and "add --overwrite" in err and _export_state(out) == state


def test_5_out_a_symbolic_link_or_a_file_is_one_sentence(finished_run, tmp_path, capsys):
    from test_hardening import one_sentence

    run_dir, _ = finished_run
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "real"))
    state = _export_state(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for args in ([], ["--overwrite"]):
        code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "link"), *args, capsys=capsys)
        assert code == 2 and "is a symbolic link" in one_sentence(err)
    assert (tmp_path / "link").is_symlink() and _export_state(tmp_path / "real") == state
    (tmp_path / "file").write_text("x")
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "file"), "--overwrite", capsys=capsys)
    assert code == 2 and "is a file" in one_sentence(err)


# ----------------------------------------------------------------------------------- issue 24, item 1


def _odd_images(folder):
    """Three tiny images of other sizes and aspects than the model's input (32 px): a resize that
    crops, or keeps the aspect, differs from embed's squash."""
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(24)
    for i, size in enumerate([(48, 40), (20, 36), (70, 70)]):
        low = rng.uniform(0, 255, size=(5, 5, 3)).astype(np.uint8)
        Image.fromarray(low).resize(size, Image.BILINEAR).save(folder / f"odd_{i}.png")
    return folder


def test_24_1_timms_transform_of_the_run_and_of_the_export_is_embeds(finished_run, tmp_path, capsys):
    """load_backbone(RUN), the export loaded by timm alone, and the teacher file loaded by timm with
    the documented overlay (docs/loading.md) all resolve, through timm.data.resolve_data_config +
    create_transform, to embed's preprocessing: their features equal embed's."""
    import timm
    from PIL import Image

    from mlsctl import load_backbone
    from mlsctl.features import Features

    run_dir, _ = finished_run
    folder = _odd_images(tmp_path / "odd")
    cli_ok(capsys, "embed", str(folder), "--run", str(run_dir), "--dtype", "fp32", "--dense", "--out",
           str(tmp_path / "feats"))
    features = Features(tmp_path / "feats")
    expected = features.global_features().float()
    expected_patches = torch.cat([dense for _, dense in features.iter_dense(batch=len(features.files))]).float()
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"))
    plain = timm.create_model(  # the README's plain-timm call, with the run's preprocessing in the overlay
        "vit_small_patch16_224", pretrained=True, num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=2, pretrained_cfg_overlay=dict(file=str(run_dir / "teacher.safetensors"), input_size=(3, 32, 32),
                                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=1.0,
                                                 crop_mode="squash"))
    models = {"load_backbone(run)": load_backbone(run_dir),
              "load_backbone(weights file)": load_backbone(run_dir / "teacher.safetensors"),  # was refused
              "timm local-dir export": timm.create_model(f"local-dir:{tmp_path / 'exp'}", pretrained=True),
              "timm + overlay": plain}
    for name, model in models.items():
        config = timm.data.resolve_data_config({}, model=model.eval())
        assert config["input_size"] == (3, 32, 32) and config["crop_mode"] == "squash", (name, config)
        transform = timm.data.create_transform(**config)
        batch = torch.stack([transform(Image.open(folder / f).convert("RGB")) for f in features.files])
        with torch.no_grad():
            got = model(batch)
            patches = model.forward_features(batch)[:, model.num_prefix_tokens:]  # as load_backbone's docstring says
        assert torch.allclose(got, expected, atol=1e-5), (name, float((got - expected).abs().max()))
        assert torch.allclose(patches, expected_patches.flatten(1, 2), atol=1e-5), name


def test_24_1_the_export_says_what_it_is_and_borrows_no_tag_or_licence(finished_run, tmp_path, capsys):
    from mlsctl import load_backbone
    from mlsctl.restore import from_run
    from mlsctl.runs import Run

    run_dir, recipe = finished_run
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"))
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    data_root = str(run_dir.parent / "images")
    step = Run(run_dir).latest().step
    for cfg in (config["pretrained_cfg"], load_backbone(run_dir).pretrained_cfg, load_backbone(tmp_path / "exp").pretrained_cfg):
        assert not {"tag", "license", "url", "hf_hub_id", "paper_ids", "origin_url"} & {k for k, v in cfg.items() if v}
        assert all(s in cfg["description"] for s in (f"run {run_dir.name}", "dino", data_root, f"step {step}"))
    assert config["mlsctl"] == {**config["mlsctl"], "run": run_dir.name, "method": "dino", "data_root": data_root,
                                "step": step, "fingerprint": from_run(run_dir).fingerprint}


def test_the_export_of_a_run_without_checkpoints_names_the_step_of_its_teacher(finished_run, tmp_path, capsys):
    # a new user's probe (2026-12-07): a run whose checkpoints were removed exported "step": null,
    # though summary.json says at which step its teacher.safetensors was written
    import shutil

    run_dir, _ = finished_run
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare, ignore=shutil.ignore_patterns("checkpoints"))
    out, _ = cli_ok(capsys, "export", str(bare), "--out", str(tmp_path / "exp"), "--json")
    steps = json.loads((run_dir / "summary.json").read_text())["steps"]
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["mlsctl"]["step"] == steps == 8 and f"step {steps}" in config["pretrained_cfg"]["description"]
    (bare / "summary.json").unlink()  # killed between the teacher's export and summary.json: no step is known
    cli_ok(capsys, "export", str(bare), "--out", str(tmp_path / "exp"), "--overwrite")
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert config["mlsctl"]["step"] is None and "its final teacher" in config["pretrained_cfg"]["description"]


def test_load_backbone_of_a_missing_path_says_so(tmp_path):
    """An API probe (2026-12-05): a path that does not exist was 'neither an exported model folder nor a run folder'."""
    from mlsctl import load_backbone
    from mlsctl.errors import UserError

    with pytest.raises(UserError, match="nope does not exist; give an exported model folder"):
        load_backbone(tmp_path / "nope")


def test_load_backbone_of_a_weights_file_speaks_python(finished_run, tmp_path):
    """A review (2026-12-05): a file without its architecture said "add --model NAME" to a Python
    caller, and arch= was ignored for folders."""
    from safetensors.torch import load_file, save_file

    from mlsctl import load_backbone
    from mlsctl.errors import UserError

    run_dir, _ = finished_run
    save_file(load_file(str(run_dir / "teacher.safetensors")), str(tmp_path / "bare.safetensors"))  # no metadata
    with pytest.raises(UserError, match=r"bare.safetensors does not say which architecture it holds: give "
                                        r"load_backbone\(\.\.\., arch=NAME\)"):
        load_backbone(tmp_path / "bare.safetensors")
    with pytest.raises(UserError, match="arch= applies to a weights file"):
        load_backbone(run_dir, arch="vit_small_patch16_224")


def test_the_export_says_the_shape_of_its_vit_not_only_timm_s_template(finished_run, tmp_path, capsys):
    """A new user's probe (2026-12-07): a width-128, depth-4, patch-8, 96-px ViT was exported as
    "vit_small_patch16_224 trained with mlsctl", the timm template its model_args override."""
    run_dir, _ = finished_run
    out, _ = cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"))
    config = json.loads((tmp_path / "exp" / "config.json").read_text())
    args = config["model_args"]  # the numbers from what the export wrote; a size may be a pair (img_size [32, 32])
    side = lambda v: v if isinstance(v, int) else v[0] if v[0] == v[1] else f"{v[0]}×{v[1]}"  # noqa: E731
    shape = (f"ViT width {args['embed_dim']}, depth {args['depth']}, patch {side(args['patch_size'])}, "
             f"{side(args['img_size'])} px (timm's vit_small_patch16_224 with model_args)")
    assert shape == "ViT width 32, depth 2, patch 8, 32 px (timm's vit_small_patch16_224 with model_args)"
    assert config["architecture"] == "vit_small_patch16_224"  # timm builds the model from it and model_args
    assert config["pretrained_cfg"]["description"].startswith(shape + " trained with mlsctl")
    assert f": {shape} from " in out.splitlines()[0]


def test_model_shape_is_read_from_the_model():
    import timm

    from mlsctl.export import model_shape

    vit = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=(48, 64), patch_size=16, embed_dim=24,
                            depth=3, num_heads=2)
    assert model_shape(vit, "vit_small_patch16_224") == ("ViT width 24, depth 3, patch 16, 48×64 px "
                                                         "(timm's vit_small_patch16_224 with model_args)")
    assert model_shape(torch.nn.Linear(2, 2), "resnet18") == "resnet18"  # not a ViT: the architecture's name


def test_an_export_format_that_is_not_timm_says_timm_is_the_only_one(finished_run, tmp_path, capsys):
    """A new user's probe (2026-12-08): "--format onnx is not one of timm" read wrong."""
    run_dir, _ = finished_run
    code, out, err = cli("export", str(run_dir), "--out", str(tmp_path / "x"), "--format", "onnx", capsys=capsys)
    assert code != 0 and "--format onnx is not available: the only --format is timm" in err
    assert "Traceback" not in err
