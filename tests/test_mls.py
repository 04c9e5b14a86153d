"""MLS and its MoCo-v2 baseline: closed-form losses, pseudo-labels from Q_g, aligned queues, shuffle BN,
gradients, resume, two processes, CNN runs through every command, bad input."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from mlsctl import config
from mlsctl.methods.mls import MLS
from mlsctl.methods.mls.ops import info_nce, mls_loss, multi_label_loss, pseudo_labels
from mlsctl.models.batchnorm import GroupBatchNorm2d
from mlsctl.schedules import Schedule

from conftest import (as_killed_at, REPO, TWO_PROCESSES, cli, cli_env, cli_ok, in_process, make_images, tiny_recipe,
                      write_fake_fmnist, write_recipe)

CNN = {"arch": "test_resnet", "img_size": 32, "patch_size": 32, "drop_path_rate": 0.0, "timm_kwargs": {}}
MLS_METHOD = {"name": "mls", "queue_size": 12, "k": 3, "proj_hidden_dim": 32, "proj_dim": 16, "bn_group_size": 2}
SGD = {"batch_size": 4, "epochs": 2, "lr": 0.03, "scale_lr": False, "warmup_epochs": 0, "min_lr": 0.0,
       "weight_decay": 1e-4, "weight_decay_end": 1e-4, "optimizer": "sgd", "decay_biases_and_norms": True,
       "clip_grad": 0.0, "freeze_last_layer_epochs": 0}


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def mls_recipe(images: Path, model: dict | None = None, **method) -> dict:
    raw = tiny_recipe(images, data__local_crops={"count": 0, "size": 32, "scale": [0.1, 0.4]}, data__photometric="mocov2",
                      optim=dict(SGD))
    raw["method"] = {**MLS_METHOD, **method}
    if model is not None:
        raw["model"] = dict(model)
    return raw


# ------------------------------------------------------------------------------------------ losses


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 5), d=st.integers(3, 30), k=st.integers(1, 30), seed=st.integers(0, 999))
def test_pseudo_labels_are_exactly_the_k_most_similar_entries(b, d, k, seed):
    k = min(k, d)
    features, queue = unit(b, 8, seed), unit(d, 8, seed + 1)
    y = pseudo_labels(features, queue, k)
    assert y.shape == (b, d) and torch.equal(y.sum(1), torch.full((b,), float(k)))
    scores = features @ queue.T
    for row in range(b):  # every chosen entry scores at least as high as every entry left out
        chosen, left = scores[row][y[row].bool()], scores[row][~y[row].bool()]
        assert left.numel() == 0 or chosen.min() >= left.max()


def test_multi_label_losses_equal_their_closed_forms_on_a_hand_made_queue():
    z1 = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0]])
    # logits p/τ with τ = 0.5: [2, 0, -2]
    bce = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(-2))) / 3
    assert float(multi_label_loss(z1, queue, y, 0.5, "bce")) == pytest.approx(bce, rel=1e-6)
    assert float(multi_label_loss(z1, queue, y, 0.5, "bce_pos")) == pytest.approx(math.log(1 + math.exp(-2)) / 3,
                                                                                   rel=1e-6)
    softmax = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert float(multi_label_loss(z1, queue, y, 0.5, "knn_softmax")) == pytest.approx(softmax, rel=1e-6)


def test_multi_label_losses_are_per_entry_means_over_two_images_with_two_labels_each():
    """Two images, k = 2: pins what one image with one label cannot (a fidelity review, 2026-12-07). Eq. 10 of the
    supplement (as its Eq. 14 expands it) is a mean of logs over the positives, not Eq. 11's log of their sum; each
    loss is a mean over the batch, not a sum."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    # logits p/τ with τ = 0.5: [2, 0, -2] and [0, 2, 0]; softplus(-x) = -log σ(x), log(1 - σ(x)) = -softplus(x)
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log σ(x)
    bce = ((sp(2) + sp(0) + sp(2)) / 3 + (sp(0) + sp(2) + sp(0)) / 3) / 2  # Eq. 9: row 0's third is -log(1 - σ(-2))
    assert float(multi_label_loss(z1, queue, y, 0.5, "bce")) == pytest.approx(bce, rel=1e-6)
    bce_pos = ((sp(2) + sp(0)) / 3 + (sp(2) + sp(0)) / 3) / 2  # Eq. 15: the positives only, still over D = 3
    assert float(multi_label_loss(z1, queue, y, 0.5, "bce_pos")) == pytest.approx(bce_pos, rel=1e-6)
    z0, z1_ = math.exp(2) + 1 + math.exp(-2), 1 + math.exp(2) + 1
    knn = (-(2 - math.log(z0) + 0 - math.log(z0)) / 2 - (2 - math.log(z1_) + 0 - math.log(z1_)) / 2) / 2
    assert float(multi_label_loss(z1, queue, y, 0.5, "knn_softmax")) == pytest.approx(knn, rel=1e-6)
    log_of_sum = (-math.log((math.exp(2) + 1) / z0) - math.log((math.exp(2) + 1) / z1_)) / 2  # Eq. 11's reading
    assert abs(knn - log_of_sum) > 0.5


def test_info_nce_equals_its_closed_form_and_lambda_zero_is_moco_alone():
    z1, z2, queue = unit(3, 8, 0), unit(3, 8, 1), unit(10, 8, 2)
    expected = torch.stack([-(z1[i] @ z2[i] / 0.2) + torch.logsumexp(torch.cat([(z1[i] @ z2[i])[None], queue @ z1[i]])
                                                                      / 0.2, 0) for i in range(3)]).mean()
    assert torch.allclose(info_nce(z1, z2, queue, 0.2), expected, atol=1e-6)
    loss, terms, _ = mls_loss(z1, z2, unit(3, 6, 3), unit(10, 6, 4), queue, k=2, temperature=0.2, weight=0.0)
    assert torch.equal(loss, info_nce(z1, z2, queue, 0.2)) and set(terms) == {"info_nce"}
    full, terms, labels = mls_loss(z1, z2, unit(3, 6, 3), unit(10, 6, 4), queue, k=2, temperature=0.2, weight=0.5)
    assert torch.allclose(full, terms["info_nce"] + 0.5 * terms["multi_label"])
    assert torch.allclose(terms["multi_label"], multi_label_loss(z1, queue, labels, 0.2))


def test_labels_come_from_the_backbone_queue_not_the_projection_queue():
    g1, q_g = unit(4, 6, 0), unit(12, 6, 1)
    z1, q_z = unit(4, 8, 2), unit(12, 8, 3)
    _, _, labels = mls_loss(z1, unit(4, 8, 4), g1, q_g, q_z, k=3, temperature=0.2, weight=0.5)
    assert torch.equal(labels, pseudo_labels(g1, q_g, 3))
    assert not torch.equal(labels, pseudo_labels(z1, q_z, 3))  # the one-queue ablation would differ here


# ------------------------------------------------------------------------------------------ shuffle BN


def test_group_batchnorm_normalises_each_group_by_itself_and_averages_running_statistics():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    grouped = GroupBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3), group_size=2)
    singles = [nn.BatchNorm2d(3) for _ in range(3)]
    expected = torch.cat([bn(x[2 * i:2 * i + 2]) for i, bn in enumerate(singles)])
    assert torch.allclose(grouped(x), expected, atol=1e-6)
    assert torch.allclose(grouped.running_mean, torch.stack([bn.running_mean for bn in singles]).mean(0), atol=1e-7)
    assert torch.allclose(grouped.running_var, torch.stack([bn.running_var for bn in singles]).mean(0), atol=1e-7)
    assert set(grouped.state_dict()) == set(nn.BatchNorm2d(3).state_dict())  # checkpoints see plain BatchNorm
    grouped.eval()
    assert torch.allclose(grouped(x), F.batch_norm(x, grouped.running_mean, grouped.running_var, grouped.weight,
                                                   grouped.bias, False, 0.0, grouped.eps), atol=1e-6)
    # a channels-last input (CNNs on CUDA) keeps its layout and its values
    grouped.train()
    channels_last = grouped(x.contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(channels_last, expected, atol=1e-6)


def _method(tmp_path, model=CNN, n_images=8, **method):
    from mlsctl.data.images import ImageFolder

    images = make_images(tmp_path / "images", n_images, size=(32, 32))
    recipe = config.from_dict(mls_recipe(images, model, **method))
    mls = MLS(recipe, Schedule(steps_per_epoch=2, epochs=2))
    dataset, collate = MLS.build_dataset(recipe, ImageFolder(str(images), "data.root"))
    return mls, dataset.on_device(collate([dataset[(0, i)] for i in range(4)]))


def test_the_key_encoder_sees_a_shuffled_batch_in_other_batchnorm_groups(tmp_path):
    from mlsctl.data.loader import sample_seed
    from mlsctl.methods.mls import SHUFFLE_STREAM

    method, batch = _method(tmp_path)
    assert any(isinstance(m, GroupBatchNorm2d) for m in method.key.modules())
    x = batch.crops[1]
    with torch.no_grad():
        g, z = method._encode_keys(x, step=5)
        order = torch.randperm(4, generator=torch.Generator().manual_seed(sample_seed(0, 5, SHUFFLE_STREAM)))
        g_perm, z_perm = method.key(x[order])  # the groups are consecutive images of the permuted batch
        plain_g, _ = method.key(x)
    assert not torch.equal(order, torch.arange(4))
    assert torch.allclose(g[order], g_perm, atol=1e-6) and torch.allclose(z[order], z_perm, atol=1e-6)
    assert not torch.allclose(g, plain_g, atol=1e-4)  # other groups, other statistics


# ------------------------------------------------------------------------------------------ the method


@pytest.mark.parametrize("model", [CNN, None], ids=["cnn", "vit"])
def test_a_step_trains_every_query_parameter_and_no_key_parameter(tmp_path, model):
    method, batch = _method(tmp_path, model)
    assert method.global_feature == ("pooled" if model else "cls")
    out = method.training_step(batch, 0)
    assert set(out.terms) == {"info_nce", "multi_label"} and torch.isfinite(out.loss)
    out.loss.backward()
    # timm's ResNet starts each residual branch with its last BatchNorm's weight at zero
    # (zero_init_last): the layers before it inside the branch get exactly zero gradient at init
    zero_bns = [name[:-len("weight")] for name, p in method.query.named_parameters()
                if name.endswith(("bn2.weight", "bn3.weight")) and not p.detach().any()]
    for name, p in method.query.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        behind_a_zero_bn = any(name.startswith(bn.rsplit(".", 2)[0] + ".") and not name.startswith(bn)
                               for bn in zero_bns)
        if not behind_a_zero_bn:
            assert p.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in method.key.parameters())


def _expected_loss(method, batch, step, q_g, q_z, label_queue="g"):
    """The loss recomputed from the queues as they were before the step (no weights changed)."""
    with torch.no_grad():
        g1, z1 = method.query(batch.crops[0])
        g2, z2 = method._encode_keys(batch.crops[1], step)
    features, queue = (g1, q_g) if label_queue == "g" else (z1, q_z)
    return mls_loss(z1, z2, features, queue, q_z, k=3, temperature=0.2, weight=0.5)[0], g2, z2


def test_queues_take_view_two_of_the_key_encoder_and_stay_aligned_across_the_wrap(tmp_path):
    method, batch = _method(tmp_path, queue_size=6)  # 6 is not a multiple of the batch of 4
    for step in range(4):
        q_g, q_z = method.queue_g.vectors.clone(), method.queue_z.vectors.clone()
        out = method.training_step(batch, step)
        expected, g2, z2 = _expected_loss(method, batch, step, q_g, q_z)
        assert torch.allclose(out.loss.detach(), expected, atol=1e-5)  # scored before the batch was enqueued
        newest = (torch.arange(4) + 4 * step) % 6  # slots written by this step
        assert torch.allclose(method.queue_g.vectors[newest], g2, atol=1e-5)
        assert torch.allclose(method.queue_z.vectors[newest], z2, atol=1e-5)
    g_state, z_state = method.queue_g.state_dict(), method.queue_z.state_dict()
    assert method.queue_g.ptr == method.queue_z.ptr == 16 % 6 and method.queue_g.n_written == 16
    for column in ("payload.image_id", "payload.step", "payload.box"):
        assert torch.equal(g_state[column], z_state[column]), column


def test_one_queue_ablation_takes_labels_from_q_z(tmp_path):
    method, batch = _method(tmp_path, label_queue="z")
    for step in range(2):  # the second step scores a queue that holds real keys
        q_g, q_z = method.queue_g.vectors.clone(), method.queue_z.vectors.clone()
        out = method.training_step(batch, step)
    from_z = _expected_loss(method, batch, 1, q_g, q_z, label_queue="z")[0]
    from_g = _expected_loss(method, batch, 1, q_g, q_z, label_queue="g")[0]
    assert torch.allclose(out.loss.detach(), from_z, atol=1e-5) and not torch.allclose(from_z, from_g, atol=1e-5)


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="session")
def mls_cnn_run(tmp_path_factory):
    """MLS on tiny fmnist-scenes with a CNN (stride 8: a 8x8 grid at 64 px): a run every command reads."""
    from mlsctl.data.fmnist import build_scenes
    from mlsctl.train import pretrain

    tmp = tmp_path_factory.mktemp("mls")
    source = write_fake_fmnist(tmp / "fmnist")
    scenes = tmp / "scenes"
    build_scenes(scenes, n_train=12, n_val=6, size=64, source=source, progress=False)
    model = {**CNN, "img_size": 64, "patch_size": 8, "timm_kwargs": {"output_stride": 8}}
    raw = mls_recipe(scenes / "train" / "images", model)
    raw["data"]["global_crops"] = {"count": 2, "size": 32, "scale": [0.4, 1.0]}
    raw["optim"]["epochs"] = 3
    raw["train"].update(checkpoint_every=3, keep_checkpoints=5, log_every=1)
    path = write_recipe(tmp / "mls.yaml", raw)
    pretrain(config.load_recipe(str(path)), tmp / "run", recipe_source=str(path))
    return tmp / "run", path, scenes


def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(mls_cnn_run, tmp_path):
    from safetensors.torch import load_file

    from mlsctl.bank import load_banks
    from mlsctl.runs import Run
    from mlsctl.train import pretrain

    run_dir, recipe_path, _ = mls_cnn_run
    copy = as_killed_at(run_dir, tmp_path / "killed", 3)
    pretrain(config.load_recipe(str(recipe_path)), copy, resume=True, recipe_source=str(recipe_path))

    def losses(folder):
        return [(r["step"], r["loss"], r["loss/info_nce"], r["loss/multi_label"])
                for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(copy) == losses(run_dir) and len(losses(run_dir)) == 9
    a, b = load_file(str(copy / "teacher.safetensors")), load_file(str(run_dir / "teacher.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # BatchNorm running statistics included
    banks_a, banks_b = load_banks(Run(copy).latest().banks_path), load_banks(Run(run_dir).latest().banks_path)
    for name in ("Q_g", "Q_z"):
        sa, sb = banks_a[name].state_dict(), banks_b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_a_cnn_run_works_with_embed_eval_viz_and_bank(mls_cnn_run, tmp_path, capsys, monkeypatch):
    run_dir, _, scenes = mls_cnn_run
    out, _ = cli_ok(capsys, "embed", str(scenes / "val" / "images"), "--run", str(run_dir), "--dense", "--out",
                    str(tmp_path / "val"))
    from mlsctl.features import Features

    features = Features(tmp_path / "val")
    assert features.global_features().shape == (6, 96) and features.has_dense
    cli_ok(capsys, "embed", str(scenes / "train" / "images"), "--run", str(run_dir), "--dense", "--out",
           str(tmp_path / "train"))
    out, _ = cli_ok(capsys, "eval", "knn-seg", "--train", str(tmp_path / "train"), "--train-masks",
                    str(scenes / "train" / "masks"), "--val", str(tmp_path / "val"), "--val-masks",
                    str(scenes / "val" / "masks"), "--fraction", "1/1", "--json", "--out", str(tmp_path / "seg.json"))
    assert 0.0 <= json.loads(out)["results"][0]["miou"] <= 1.0
    out, _ = cli_ok(capsys, "eval", "linear", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                    "--multi-label", "--train-labels", str(scenes / "train" / "scenes.jsonl"), "--val-labels",
                    str(scenes / "val" / "scenes.jsonl"), "--json", "--out", str(tmp_path / "linear.json"))
    assert "map" in json.dumps(json.loads(out)).lower()
    cli_ok(capsys, "viz", "pca", str(tmp_path / "val"), "--out", str(tmp_path / "pca.png"), "--n", "2")
    assert (tmp_path / "pca.png").stat().st_size > 0
    out, _ = cli_ok(capsys, "bank", "inspect", str(run_dir), "--json")
    inspected = json.loads(out)["banks"]
    for name in ("Q_g", "Q_z"):
        tags = inspected[name]["method"]["tags"]
        assert sum(tags.values()) >= 12  # every entry counted once per tag of its scene
        precision = inspected[name]["method"]["label_precision"]
        assert 0 <= precision["precision"] <= 1 and precision["k"] == 3
    # two banks side by side were 330 characters wide (a new user, 2026-12-06): one table each beyond the terminal
    monkeypatch.setenv("COLUMNS", "100")
    out, _ = cli_ok(capsys, "bank", "inspect", str(run_dir))
    assert out.count("bank  ") >= 1 and [line.split()[1] for line in out.splitlines() if line.startswith("bank ")] \
        == ["Q_g", "Q_z"], out
    cli_ok(capsys, "bank", "neighbors", str(run_dir), "--bank", "Q_z", "--query",
           str(next((scenes / "val" / "images").glob("*.png"))), "-k", "3", "--out", str(tmp_path / "nb.png"))
    assert (tmp_path / "nb.png").stat().st_size > 0


def test_the_exported_cnn_equals_embed(mls_cnn_run, tmp_path, capsys):
    import timm

    from mlsctl.export import load_backbone
    from mlsctl.features import Features, Preprocessing
    from mlsctl.data.images import load_rgb

    run_dir, _, scenes = mls_cnn_run
    cli_ok(capsys, "export", str(run_dir), "--out", str(tmp_path / "exported"))
    model = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    cli_ok(capsys, "embed", str(scenes / "val" / "images"), "--run", str(run_dir), "--dtype", "fp32", "--out",
           str(tmp_path / "f"))
    features = Features(tmp_path / "f")
    pixels = torch.stack([Preprocessing(64)(load_rgb(features.image_path(i))) for i in range(len(features))])
    with torch.no_grad():
        assert torch.allclose(model(pixels), features.global_features(), atol=1e-4)
        assert torch.allclose(load_backbone(run_dir)(pixels), features.global_features(), atol=1e-4)


@pytest.mark.slow
def test_two_processes_hold_the_queues_and_weights_of_one(tmp_path):
    """With shuffle BN over groups and the shuffle over the global batch, 2 processes of batch 2
    compute what 1 process of batch 4 computes: the same queues, losses and weights."""
    from safetensors.torch import load_file

    from mlsctl.bank import load_banks
    from mlsctl.runs import Run

    images = make_images(tmp_path / "images", 8, size=(64, 64))
    runs = {}
    for processes, batch in ((1, 4), (2, 2)):
        raw = mls_recipe(images, CNN)
        raw["data"]["global_crops"]["size"] = 64  # 2x2 maps in the last stage: BatchNorm over 8 values, not 2
        raw["optim"]["batch_size"] = batch
        raw["train"]["checkpoint_every"] = 4
        path = write_recipe(tmp_path / f"r{processes}.yaml", raw)
        out = tmp_path / f"run{processes}"
        if processes == 2:
            result = subprocess.run([*TWO_PROCESSES, "pretrain", str(path), "--out", str(out)], capture_output=True,
                                    text=True, env=cli_env(), timeout=300, cwd=REPO)
        else:  # in the test process: no interpreter start
            result = in_process("pretrain", str(path), "--out", str(out), cwd=REPO)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = out
    # equal up to float summation order (all-reduced gradients): measured 1e-7 on the weights here
    # (with 32 px crops, BatchNorm over 2 values per channel in the last stage amplified it to 1e-2)
    one, two = (load_banks(Run(runs[n]).latest().banks_path) for n in (1, 2))
    for name in ("Q_g", "Q_z"):
        assert torch.equal(one[name].payload["image_id"], two[name].payload["image_id"])
        assert torch.equal(one[name].payload["step"], two[name].payload["step"])
        assert torch.allclose(one[name].vectors, two[name].vectors, atol=1e-5), name

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses(runs[1]) == pytest.approx(losses(runs[2]), rel=1e-5) and len(losses(runs[1])) == 4
    # the weights agree; the BatchNorm running statistics do not and need not: as in MoCo, each process
    # keeps those of its own groups (they are used only at evaluation), and rank 0 saves its own
    a, b = load_file(str(runs[1] / "teacher.safetensors")), load_file(str(runs[2] / "teacher.safetensors"))
    weights = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in weights)


@pytest.mark.parametrize("override, words", [
    ("method.k=50", "cannot come from a queue of 12"),
    ("method.queue_size=3", "smaller than the global batch"),
    ("method.bn_group_size=3", "does not divide optim.batch_size 4"),
    ("method.bn_group_size=4", "the batch is one BatchNorm group"),
    ("method.global_feature=cls", "needs a CLS token"),
    ("data.local_crops.count=2", "must be 0 for MLS"),
])
def test_bad_settings_are_one_sentence_before_training(tmp_path, capsys, override, words):
    images = make_images(tmp_path / "images", 4, size=(32, 32))
    path = write_recipe(tmp_path / "r.yaml", mls_recipe(images, CNN))
    code, _, err = cli("pretrain", str(path), override, "--out", str(tmp_path / "run"), capsys=capsys)
    assert code != 0 and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_sgd_and_decay_of_every_parameter_are_recipe_settings(tmp_path):
    from mlsctl.train import build_optimizer, param_groups

    method, _ = _method(tmp_path)
    recipe = config.from_dict(mls_recipe(tmp_path / "images", CNN))
    groups = param_groups(method, recipe.optim.decay_biases_and_norms)
    assert not groups[1]["params"]  # MoCo decays biases and BatchNorm too
    optimizer = build_optimizer(recipe.optim, groups)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert param_groups(method)[1]["params"]  # DINO's default exempts them


def test_shipped_recipes_validate(tmp_path):
    root = REPO / "recipes"
    expected = {"mls_coco.yaml": 0.5, "mocov2_coco.yaml": 0.0, "mls_fmnist_quick.yaml": 0.5,
                "mocov2_fmnist_quick.yaml": 0.0}
    for name, weight in expected.items():
        recipe = config.load_recipe(str(root / name), [f"data.root={tmp_path}"])
        assert recipe.method.name == "mls" and recipe.method.lambda_ml == weight
        assert not MLS.check_recipe(recipe)
    paper = config.load_recipe(str(root / "mls_coco.yaml"), [f"data.root={tmp_path}"])
    assert (paper.model.arch, paper.optim.optimizer, paper.optim.lr, paper.optim.weight_decay, paper.optim.epochs,
            paper.method.queue_size, paper.method.k, paper.method.temperature, paper.method.momentum_teacher) == \
        ("resnet50", "sgd", 0.3, 1e-4, 400, 4096, 20, 0.2, 0.995)
    assert MLS.recipe_notes(paper) == []  # constant momentum, as MoCo's
    # a review (2026-12-06): MoCo-v2's 0.999 given as momentum_teacher alone fell to 0.995 on a cosine, unsaid
    moco = config.load_recipe(str(root / "mocov2_coco.yaml"), [f"data.root={tmp_path}", "method.momentum_teacher=0.999"])
    assert MLS.recipe_notes(moco) == ["the key encoder's momentum goes from method.momentum_teacher=0.999 to "
                                      "method.momentum_teacher_end=0.995 on a cosine; MoCo keeps it constant: set both "
                                      "to one value for that"]
    both = config.load_recipe(str(root / "mocov2_coco.yaml"), [f"data.root={tmp_path}", "method.momentum_teacher=0.999",
                                                               "method.momentum_teacher_end=0.999"])
    assert MLS.recipe_notes(both) == []


def test_label_precision_counts_neighbours_carrying_each_tag_against_chance():
    from mlsctl.methods.mls.views import label_precision

    vectors = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0], [0.7, 0.7]])
    ids = torch.arange(5)
    tags = [frozenset({"a"}), frozenset({"a"}), frozenset({"b"}), frozenset({"b"}), None]  # 4: never written
    result = label_precision(vectors, ids, tags, k=1)
    assert result["precision"] == pytest.approx(1.0) and result["chance"] == pytest.approx(1 / 3)
    assert result["queries"] == 4
    ids[1] = 0  # the same image's other view is never a neighbour: entry 0 now finds a "b"
    assert label_precision(vectors, ids, tags, k=1)["precision"] == pytest.approx(0.5)


def test_queue_tags_read_the_tags_file_s_paths_as_every_labels_file_is_read(tmp_path):
    """A new user's probe (2026-12-07): the tags of a queue's entries were found by resolving the file's paths against
    its own folder only: a tags file kept elsewhere, keyed by paths under data.root, tagged nothing, and ``./`` or
    decomposed-Unicode paths missed. Now they are read as labels files are (ImagePaths), once for all the queues."""
    import unicodedata
    from types import SimpleNamespace

    from mlsctl.methods.mls.views import image_tags, queue_views, written_images

    root = tmp_path / "data" / "train" / "images"
    names = ["a.png", "b.png", "sub/c.png", "caf\u00e9.png", "d.png"]
    image_paths = [root / name for name in names]
    table = {"a.png": ["x"],  # relative to data.root, the file kept elsewhere
             "./b.png": ["y"],
             str(root / "sub" / "c.png"): ["x", "y"],  # absolute
             unicodedata.normalize("NFD", "caf\u00e9.png"): ["z"]}  # macOS' decomposed é
    bank = SimpleNamespace(payload={"image_id": torch.tensor([0, 1, 2, 3, 4, 0, 9]),
                                    "step": torch.tensor([3, 3, 3, 3, 3, -1, 3])})  # never written; no such image
    slots = written_images(bank, len(image_paths))
    assert slots == [0, 1, 2, 3, 4, None, None]
    tags = image_tags([i for i in slots if i is not None], image_paths, table, tmp_path / "elsewhere" / "t.jsonl", root)
    assert tags == {0: frozenset({"x"}), 1: frozenset({"y"}), 2: frozenset({"x", "y"}), 3: frozenset({"z"})}
    # a file beside images/, keyed relative to its own folder (fmnist-scenes' scenes.jsonl), or with ".."
    beside = {"images/b.png": ["y"], "../train/images/sub/c.png": ["x"], "images/../images/d.png": ["w"]}
    assert image_tags(range(5), image_paths, beside, root.parent / "scenes.jsonl", root) == {
        1: frozenset({"y"}), 2: frozenset({"x"}), 4: frozenset({"w"})}
    # two rows naming one image with two tag lists: the queues' rows say so instead of tags
    (tmp_path / "twice.jsonl").write_text('{"path": "a.png", "labels": ["x"]}\n{"path": "./a.png", "labels": ["y"]}\n')
    recipe = SimpleNamespace(method=SimpleNamespace(tags_file=str(tmp_path / "twice.jsonl"), k=1),
                             data=SimpleNamespace(root=str(root)))
    views = queue_views(recipe, {"Q_g": bank, "Q_z": bank}, image_paths)
    assert [row[0] for row in views["Q_g"]] == ["tags"] and views["Q_g"][0][1].startswith("not shown: ")
    assert "a.png twice" in views["Q_z"][0][1], views


def test_label_precision_in_chunks_equals_the_whole_score_matrix(monkeypatch):
    """A scale review (2026-12-05): label_precision built n x n scores (40 GiB at a 65,536-entry
    queue); it now scores chunks of rows. Checked against the whole matrix, as it was computed."""
    import mlsctl.methods.mls.views as views

    generator = torch.Generator().manual_seed(0)
    n, names = 300, ["a", "b", "c", "d"]
    vectors, ids = torch.randn(n, 8, generator=generator), torch.randint(0, 120, (n,), generator=generator)
    draws = torch.rand(n, len(names), generator=generator) < 0.4
    tags = [frozenset(t for t, on in zip(names, row) if on) or None for row in draws.tolist()]
    rows = torch.tensor([i for i, t in enumerate(tags) if t])
    x, image = F.normalize(vectors[rows], dim=1), ids[rows]
    onehot = torch.tensor([[float(t in tags[i]) for t in names] for i in rows.tolist()])
    other = image[:, None] != image[None, :]
    top = (x @ x.T).masked_fill(~other, float("-inf")).topk(5, dim=1).indices
    pairs = onehot.sum()
    precision = float((onehot[top].mean(dim=1) * onehot).sum() / pairs)
    chance = float((((other.float() @ onehot) / other.float().sum(1, keepdim=True)) * onehot).sum() / pairs)
    for chunk in (1, 37, 4096):
        monkeypatch.setattr(views, "LABEL_PRECISION_CHUNK", chunk)
        result = views.label_precision(vectors, ids, tags, k=5)
        assert result["precision"] == pytest.approx(precision, abs=1e-6) and result["chance"] == pytest.approx(chance)


def test_process_dependent_checks_run_at_training_only(tmp_path):
    """A run trained on 8 processes of 32 with groups of 32 is read back in one process (bank
    neighbors, export --step, embed of an unfinished run): building the method must not refuse it."""
    recipe = config.from_dict(mls_recipe(make_images(tmp_path / "images", 4, size=(32, 32)), CNN, bn_group_size=4))
    MLS(recipe, Schedule(steps_per_epoch=1, epochs=1))  # builds
    assert MLS.check_training(recipe, world_size=2, device_type="cpu") == []
    assert "one BatchNorm group" in MLS.check_training(recipe, world_size=1, device_type="cpu")[0][1]
    sync = config.from_dict(mls_recipe(tmp_path / "images", CNN, key_bn="sync"))
    assert "needs CUDA processes" in MLS.check_training(sync, world_size=2, device_type="cpu")[0][1]
    assert MLS.check_training(sync, world_size=2, device_type="cuda") == []


def test_the_key_encoder_is_the_momentum_average_of_parameters_and_keeps_its_own_buffers(tmp_path):
    from mlsctl.train import ema_update

    method, batch = _method(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(method.query.state_dict().values(), method.key.state_dict().values()))
    with torch.no_grad():
        for p in method.query.parameters():
            p.add_(torch.randn_like(p))
    key_before = {k: v.clone() for k, v in method.key.state_dict().items()}
    query = dict(method.query.named_parameters())
    method.training_step(batch, 0)  # the key encoder's forward updates its own running statistics
    buffers_after_step = {k: v.clone() for k, v in method.key.named_buffers()}
    ema_update(method.ema_pairs(), 0.995)
    for name, p in method.key.named_parameters():
        assert torch.allclose(p, 0.995 * key_before[name] + 0.005 * query[name], atol=1e-6), name
    for name, b in method.key.named_buffers():  # buffers are not averaged
        assert torch.equal(b, buffers_after_step[name]), name
    assert any(not torch.equal(buffers_after_step[n], key_before[n]) for n in buffers_after_step if "running_mean" in n)


def test_the_step_takes_labels_from_the_query_view_not_the_key_view(tmp_path):
    method, batch = _method(tmp_path)
    method.training_step(batch, 0)  # fill part of the queues with real keys
    q_g, q_z = method.queue_g.vectors.clone(), method.queue_z.vectors.clone()
    out = method.training_step(batch, 1)
    with torch.no_grad():
        g1, z1 = method.query(batch.crops[0])
        g2, z2 = method._encode_keys(batch.crops[1], 1)
    from_g1 = mls_loss(z1, z2, g1, q_g, q_z, k=3, temperature=0.2, weight=0.5)[0]
    from_g2 = mls_loss(z1, z2, g2, q_g, q_z, k=3, temperature=0.2, weight=0.5)[0]
    assert torch.allclose(out.loss.detach(), from_g1, atol=1e-5) and not torch.allclose(from_g1, from_g2, atol=1e-5)
    assert torch.equal(method.queue_g.payload["box"][4:8], batch.boxes[:, 1].float())  # view 2's crop boxes


@pytest.mark.parametrize("kind", ["bce_pos", "knn_softmax"])
def test_the_loss_switches_reach_the_step(tmp_path, kind):
    method, batch = _method(tmp_path, multi_label_loss=kind)
    q_g, q_z = method.queue_g.vectors.clone(), method.queue_z.vectors.clone()
    out = method.training_step(batch, 0)
    with torch.no_grad():
        g1, z1 = method.query(batch.crops[0])
        g2, z2 = method._encode_keys(batch.crops[1], 0)
    labels = pseudo_labels(g1, q_g, 3)
    expected = info_nce(z1, z2, q_z, 0.2) + 0.5 * multi_label_loss(z1, q_z, labels, 0.2, kind)
    assert torch.allclose(out.loss.detach(), expected, atol=1e-5)


def test_group_batchnorm_refuses_a_batch_that_does_not_split():
    with pytest.raises(ValueError, match="does not split into groups of 4"):
        GroupBatchNorm2d(3, 4)(torch.randn(6, 3, 2, 2))


def test_label_metrics_are_measured_where_logged_and_count_the_images_own_views(tmp_path):
    """A review (2026-12-06): the label metrics cost a [B, D] product and a top-k every step, logged or not."""
    method, batch = _method(tmp_path)
    method.logged = False
    assert method.training_step(batch, 0).metrics == {}  # the queues now hold this batch's 4 images
    method.logged = True
    q_g = method.queue_g.vectors.clone()
    out = method.training_step(batch, 1)
    with torch.no_grad():
        g1, _ = method.query(batch.crops[0])
    scores = F.normalize(g1.float(), dim=-1) @ q_g.T
    top = scores.topk(3, dim=1)
    ids = method.queue_g.payload["image_id"]  # entries 0-3: step 0's batch, 4-7: this one's, then never written
    before = torch.arange(len(ids)) < 4
    own_rows = (ids[None, :] == batch.image_ids[:, None]) & before[None, :]
    expected_share = own_rows.gather(1, top.indices).float().sum() / top.indices.numel()
    assert 0 < float(expected_share) and float(out.metrics["labels/self_share"]) == pytest.approx(float(expected_share))
    assert float(out.metrics["labels/kth_cosine"]) == pytest.approx(float(top.values[:, -1].mean()), abs=1e-6)


def test_init_from_an_mls_run_takes_its_released_encoder(tmp_path, capsys, finished_run):
    """A new user's probe (2026-12-06): --init-from an MLS run into another method was refused for 'missing 54
    keys ... unexpected key.backbone.model...': the run's teacher, the query encoder it exports, is taken
    from the method."""
    from safetensors.torch import load_file

    from mlsctl.restore import build_method, initial_weights

    images = make_images(tmp_path / "images", 8, size=(32, 32))
    raw = mls_recipe(images)
    raw["optim"]["epochs"] = 1
    cli_ok(capsys, "pretrain", str(write_recipe(tmp_path / "mls.yaml", raw)), "--out", str(tmp_path / "mls"))
    teacher = load_file(str(tmp_path / "mls" / "teacher.safetensors"))
    _, dino_recipe = finished_run
    torch.manual_seed(1)
    dino = build_method(config.load_recipe(str(dino_recipe)))
    for source in (tmp_path / "mls", next((tmp_path / "mls" / "checkpoints").iterdir())):
        assert initial_weights(dino, str(source)).startswith("every backbone from")
        for backbone in dino.backbones():
            state = backbone.net.state_dict()
            assert all(torch.equal(state[key], value.to(state[key].dtype)) for key, value in teacher.items()), source
