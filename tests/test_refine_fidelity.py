"""The refinement part of the fidelity suite: its report from finished rows (the runs themselves
are `benchmarks/refine_fidelity.py --profile smoke`, a few minutes: not part of `make test`)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import refine_fidelity  # noqa: E402


def test_summary_compares_the_default_cell_with_the_baseline_over_seeds():
    profile = refine_fidelity.PROFILES["cpu"]
    grid = []
    for seed in (0, 1, 2):
        for k in profile.ks:
            grid.append({"blocks": 0, "k": k, "seed": seed, "recall": {"1": 0.10, "8": 0.40}})
            for blocks in (1, 2, 4, 8):
                gain = 0.01 * blocks if k == 8 else -0.01
                grid.append({"blocks": blocks, "k": k, "seed": seed,
                             "recall": {"1": 0.10 + gain + 0.001 * seed, "8": 0.40 - 0.01}})
    ssl = [{"seed": s, "blocks": 8, "k": 8, "before": {"1": 0.05}, "after": {"1": 0.04}} for s in (0, 1, 2)]
    summary = refine_fidelity.summarise(profile, grid, ssl)
    assert summary["default"] == [8, 8]
    r1 = summary["table"]["8x8"]["1"]
    assert r1["mean"] == pytest.approx(18.1) and r1["std"] == pytest.approx(0.1) and r1["n"] == 3
    assert [c["holds"] for c in summary["claims"]] == [True, False, False]  # R@1 yes, R@8 no, DINO no
    text = refine_fidelity.markdown(summary, profile)
    assert "| 8 | 9.10 ± 0.10 | 18.10 ± 0.10 | 9.10 ± 0.10 |" in text  # the grid row T = 8 over k = 4, 8, 16
    assert "| 0 | 10.00 ± 0.00 | 10.00 ± 0.00 | 10.00 ± 0.00 |" in text
    # R@1 +8.1 points against a spread of 0.1: established; R@8 -1 against 0: a direction, not a spread
    assert [c["within_seed_spread"] for c in summary["claims"]] == [False, False, False]
    close = [dict(r, recall={"1": r["recall"]["1"] - 0.0805 if r["blocks"] == 8 and r["k"] == 8 else r["recall"]["1"],
                             "8": r["recall"]["8"]}) for r in grid]
    claims = refine_fidelity.summarise(profile, close, [])["claims"]  # +0.05 against a spread of 0.1
    assert claims[0]["holds"] and claims[0]["within_seed_spread"]
    assert "yes (within the seed spread)" in refine_fidelity.markdown(refine_fidelity.summarise(profile, close, []), profile)
    one_seed = refine_fidelity.summarise(profile, [r for r in close if r["seed"] == 0], [])["claims"]
    assert one_seed[0]["within_seed_spread"] is None  # one seed: no spread to compare with


def test_the_input_scale_ablation_sits_beside_its_grid_cell_and_smoke_runs_only_the_default_cell():
    profile = refine_fidelity.PROFILES["cpu"]
    grid, ablation = [], []
    for seed in (0, 1, 2):
        for k in profile.ks:
            grid.append({"blocks": 0, "k": k, "seed": seed, "recall": {"1": 0.10, "8": 0.40}})
            for blocks in (1, 2, 4, 8):
                grid.append({"blocks": blocks, "k": k, "seed": seed, "recall": {"1": 0.12 + 0.001 * seed, "8": 0.41}})
        for blocks, k in profile.ablation:
            ablation.append({"blocks": blocks, "k": k, "seed": seed, "input_scale": "sqrt_d",
                             "recall": {"1": 0.09 + 0.001 * seed, "8": 0.38}})
    summary = refine_fidelity.summarise(profile, grid, [], ablation)
    assert summary["ablation"]["variant"] == "input_scale=sqrt_d"
    assert list(summary["ablation"]["cells"]) == ["1x8", "2x8", "4x8", "8x8"]
    pair = summary["ablation"]["cells"]["8x8"]
    assert pair["default"]["1"]["mean"] == pytest.approx(12.1) and pair["input_scale=sqrt_d"]["1"]["mean"] == pytest.approx(9.1)
    assert [c["claim"] for c in summary["claims"]] == [c["claim"] for c in refine_fidelity.summarise(profile, grid, [])["claims"]]
    text = refine_fidelity.markdown(summary, profile)
    assert "## Ablation: the √d input scaling (ours, not in the paper)" in text
    assert text.count("| 0 | 8 | baseline (e⁰) | 10.00 ± 0.00 | 40.00 ± 0.00 |") == 1
    assert "| 8 | 8 | none (default) | 12.10 ± 0.10 | 41.00 ± 0.00 |" in text
    assert "| 8 | 8 | sqrt_d | 9.10 ± 0.10 | 38.00 ± 0.00 |" in text
    assert "Ablation" not in refine_fidelity.markdown(refine_fidelity.summarise(profile, grid, []), profile)
    # the ablation's runs: the same refine train with the override, in their own folders
    assert refine_fidelity.ABLATION_OVERRIDES == ("method.input_scale=sqrt_d",)
    assert refine_fidelity.cell_name(8, 8, refine_fidelity.ABLATION_OVERRIDES) == "T8-k8-inputscale-sqrtd"
    assert refine_fidelity.cell_name(8, 8) == "T8-k8-inputscale-none"  # never a cell of the old default (T8-k8)
    smoke = refine_fidelity.PROFILES["smoke"]
    assert smoke.ablation == (tuple(refine_fidelity.summarise(smoke, [], [])["default"]),)


# ------------------------------------------------------------------------------ the warm start (profile backbone)


def _overrides(profile) -> dict:
    return dict(o.split("=", 1) for o in profile.ms_overrides)


def test_the_backbone_profile_starts_ms_from_the_shipped_backbone_and_embeds_it_for_the_ssl_part(tmp_path, monkeypatch):
    import json

    from safetensors import safe_open

    profile = refine_fidelity.PROFILES["backbone"]
    ms = _overrides(profile)
    weights = refine_fidelity.BACKBONE
    assert ms["model.weights"] == str(weights) and weights.is_absolute() and weights.is_file()
    with safe_open(str(weights), "pt") as f:  # the header only: the architecture the file records
        recorded = json.loads(f.metadata()["model"])
    assert recorded["arch"] == "vit_small_patch16_224" and recorded["img_size"] == 96
    assert int(ms["model.patch_size"]) == recorded["patch_size"]
    assert {k: int(ms[f"model.timm_kwargs.{k}"]) for k in recorded["timm_kwargs"]} == recorded["timm_kwargs"]
    # 64 px photos, 64 px crops (the 12 x 12 grid resampled to 8 x 8 at loading), ms_cub's lr 1e-4, 2 epochs
    assert ms["model.img_size"] == ms["data.global_crops.size"] == "64"
    assert float(ms["optim.lr"]) == 1e-4 and ms["optim.epochs"] == "2"
    assert "warm start" in profile.about and "warm start" in profile.start
    assert profile.ssl_weights == weights and profile.ssl_embed == ("--resolution", "64", "--resize", "center-crop")
    monkeypatch.setattr(refine_fidelity, "pretrain", lambda *a, **k: pytest.fail("no DINO run for the backbone"))
    assert refine_fidelity.ssl_model(profile, tmp_path, tmp_path, tmp_path / "log", 1) == ["--weights", str(weights)]
    # the other profiles still train their DINO run
    calls = []
    monkeypatch.setattr(refine_fidelity, "pretrain", lambda recipe, overrides, run, *a: calls.append((recipe, run)))
    assert refine_fidelity.ssl_model(refine_fidelity.PROFILES["cpu"], tmp_path, tmp_path, tmp_path / "log", 1) == \
        ["--run", str(tmp_path / "run")]
    assert calls == [("dino_fmnist_quick", tmp_path / "run")]


def test_a_warm_start_from_a_tiny_weights_file_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """The backbone profile's path with a tiny ViT: MS starts from a weights file trained at another
    size (its position grid resampled), the SSL part embeds that file as it is; the stages run in
    this process (``mlsctl`` replaced by the in-process CLI)."""
    import dataclasses
    import json

    import timm
    import torch
    from safetensors.torch import load_file, save_file
    from timm.layers import resample_abs_pos_embed

    from conftest import cli, make_images
    from mlsctl.features import Features

    architecture = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=48, patch_size=8, num_classes=0, **architecture)
    weights = tmp_path / "tiny-backbone.safetensors"  # a 6 x 6 position grid; the runs use 32 px: 4 x 4
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights), metadata={"model": json.dumps(
        {"arch": "vit_small_patch16_224", "img_size": 48, "patch_size": 8, "timm_kwargs": architecture})})
    data = tmp_path / "sop"
    for split, objects in (("train", 8), ("test", 4)):
        for i in range(objects):
            make_images(data / split / f"{split}{i:02d}", 4, size=(32, 32), seed=100 * (split == "test") + i)
    for path in data.rglob("sub"):  # make_images puts some photos in sub/: one folder per object here
        for photo in path.iterdir():
            photo.rename(path.parent / photo.name)
        path.rmdir()
    vit_overrides = tuple(o for o in refine_fidelity.TINY_VIT if not o.startswith("model.img_size"))
    smoke = refine_fidelity.PROFILES["smoke"]
    profile = dataclasses.replace(
        smoke, name="warm", blocks=(0, 2), ks=(2,), ablation=(),
        refine_options=("--epochs", "1", "optim.batch_size=16"),
        ms_overrides=(*refine_fidelity.warm_start(weights, vit_overrides, 32), "model.embedding_dim=16",
                      "optim.batch_size=8", "optim.epochs=1", "optim.lr=1e-12", "optim.min_lr=0",
                      "optim.warmup_epochs=0"),
        start="warm start from a tiny file", ssl_weights=weights,
        ssl_embed=("--resolution", "32", "--resize", "center-crop"),
        compare=("cpu",))

    def in_process(args, cwd, log, threads):
        code, out, err = cli(*args, cwd=cwd, capsys=capsys)
        assert code == 0, f"mlsctl {' '.join(args)} failed ({code}):\n{out}\n{err}"
        return 0.5

    monkeypatch.setattr(refine_fidelity, "mlsctl", in_process)
    work = tmp_path / "work"
    rows, ablation = refine_fidelity.run_seed(profile, work, data, 0, 1)
    ssl = refine_fidelity.run_ssl(profile, work, data, 1)
    assert [(r["blocks"], r["k"]) for r in rows] == [(0, 2), (2, 2)] and ablation == []
    # the MS run started from the file: at lr 1e-12 its ViT is the file's, the position grid resampled to 4 x 4
    start, after = load_file(str(weights)), load_file(str(work / "seed0" / "ms" / "teacher.safetensors"))
    assert torch.allclose(after["blocks.1.mlp.fc2.weight"], start["blocks.1.mlp.fc2.weight"], atol=1e-6)
    assert after["pos_embed"].shape == (1, 17, 32) and torch.allclose(
        after["pos_embed"], resample_abs_pos_embed(start["pos_embed"], new_size=[4, 4], num_prefix_tokens=1), atol=1e-6)
    assert after["head.weight"].shape == (16, 32)  # a fresh embedding layer on top
    # the SSL part: the file's own features (no DINO run), with the MS features' preprocessing
    assert not (work / "dino" / "run").exists()
    ms_feats, ssl_feats = Features(work / "seed0" / "ms-test"), Features(work / "dino" / "dino-test")
    assert ssl_feats.dim == 32 and ms_feats.dim == 16
    for feats in (ms_feats, ssl_feats):
        assert (feats.manifest["preprocessing"]["resize"], feats.manifest["preprocessing"]["resolution"]) == \
            ("center-crop", 32)
    assert [(r["seed"], r["blocks"], r["k"]) for r in ssl] == [(0, 2, 2)]
    # the report: which baseline is which
    cpu = {"about": "MS from scratch, its budget", "default": [8, 8],
           "table": {"0x8": {"1": {"mean": 13.7, "std": 0.8, "n": 3}}}}
    summary = refine_fidelity.summarise(profile, rows, ssl, [], {"cpu": cpu})
    assert [b["label"] for b in summary["baselines"]] == [
        "MS, warm start from a tiny file (this profile)", "the backbone's own features, no MS",
        "MS, from scratch (profile `cpu`)"]
    text = refine_fidelity.markdown(summary, profile)
    assert "## MS baseline (warm start from a tiny file) before and after refinement" in text
    assert "## MS from scratch against MS from the backbone" in text
    assert "| MS, from scratch (profile `cpu`) | 13.70 ± 0.80 |" in text
    assert "| backbone features |" in text and "tiny-backbone.safetensors as it is" in text


def test_summary_from_a_work_folder_with_nothing_finished_is_refused_and_writes_nothing(tmp_path):
    """--summary over an empty or wrong --work would replace a finished report with an empty one."""
    results = tmp_path / "results"
    (results / "smoke").mkdir(parents=True)
    (results / "smoke" / "summary.md").write_text("the report of a finished run\n")
    with pytest.raises(SystemExit, match="holds no finished stage of profile smoke"):
        refine_fidelity.main(["--profile", "smoke", "--summary", "--work", str(tmp_path / "elsewhere"),
                              "--results", str(results)])
    assert (results / "smoke" / "summary.md").read_text() == "the report of a finished run\n"
    assert sorted(p.name for p in (results / "smoke").iterdir()) == ["summary.md"]
    assert not (tmp_path / "elsewhere").exists()
