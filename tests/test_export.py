"""mlsctl export: a timm model folder whose outputs equal mlsctl embed's features."""

from __future__ import annotations

import json

import torch

from conftest import cli, cli_ok


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


def test_export_refuses_to_overwrite_what_it_did_not_write(finished_run, tmp_path, capsys):
    run_dir, _ = finished_run
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("x")
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "precious"), "--overwrite", capsys=capsys)
    assert code != 0 and "is not an mlsctl export" in err and (tmp_path / "precious" / "thesis.tex").is_file()
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"))
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "exp"), capsys=capsys)
    assert code != 0 and "add --overwrite" in err
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"), "--overwrite")
    code, _, err = cli("export", str(tmp_path), "--out", str(tmp_path / "x"), capsys=capsys)
    assert code != 0 and "is not a run folder" in err


def test_export_overwrite_keeps_foreign_files_and_files_are_readable(finished_run, tmp_path, capsys):
    import os
    import stat

    run_dir, _ = finished_run
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exp"))
    mode = stat.S_IMODE(os.stat(tmp_path / "exp" / "model.safetensors").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    (tmp_path / "exp" / "notes.txt").write_text("mine")
    code, _, err = cli("export", str(run_dir), "--out", str(tmp_path / "exp"), "--overwrite", capsys=capsys)
    assert code != 0 and "notes.txt" in err and (tmp_path / "exp" / "notes.txt").read_text() == "mine"
    code, _, err = cli("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), capsys=capsys)
    assert code != 0 and "does not exist" in err
