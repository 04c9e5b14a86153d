"""Context refinement: identity blocks, unit norms, self-exclusion in training and in apply, the
shard format of refined features, exact resume after SIGKILL, plots, bad input."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mlsctl.errors import UserError
from mlsctl.methods.refine import ContextDataset, CrossAttentionBlock, Refiner
from mlsctl.methods.refine.neighbours import nearest_neighbours

from conftest import cli, cli_ok, in_process, kill_when, write_feature_folder, write_litter


def _clusters(n_classes: int = 12, per_class: int = 8, dim: int = 16, seed: int = 0, noise: float = 0.8):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=g)
    y = torch.arange(n_classes * per_class) % n_classes
    return F.normalize(centres[y] + noise * torch.randn(len(y), dim, generator=g), dim=1), y


def _folder(path: Path, x: torch.Tensor, y: torch.Tensor, prefix: str = "", input_root: Path | None = None,
            fingerprint: str = "f" * 64) -> Path:
    files = [f"class{int(c)}/{prefix}{i:04d}.png" for i, c in enumerate(y)]
    return write_feature_folder(path, files, x, input_root=input_root or path.parent / "images", fingerprint=fingerprint)


# ------------------------------------------------------------------------------------------ the model


def test_identity_blocks_return_their_input_and_outputs_are_unit_norm():
    torch.manual_seed(0)
    x, neighbours = torch.randn(5, 16), torch.randn(5, 4, 16)
    identity = Refiner(16, blocks=3, zero_init=True)
    with torch.no_grad():  # every other layer is random: only W_o = W_2 = 0 makes a block the identity
        for block in identity.blocks:
            block.q.weight.normal_()
            block.fc1.weight.normal_()
            block.norm.weight.normal_()
    out, states, attentions = identity(x, neighbours, trace=True)
    assert torch.allclose(out, F.normalize(x, dim=1), atol=1e-6)
    assert all(torch.allclose(s, states[0], atol=1e-6) for s in states) and len(states) == 4
    assert all(torch.allclose(a.sum(1), torch.ones(5)) for a in attentions)

    moved = Refiner(16, blocks=3, zero_init=False)
    out, states, _ = moved(x, neighbours, trace=True)
    assert not torch.allclose(out, F.normalize(x, dim=1), atol=1e-3)
    for tensor in (out, *states):
        assert torch.allclose(tensor.norm(dim=1), torch.ones(5), atol=1e-5)
    projected = Refiner(16, blocks=2, out_dim=6, zero_init=False)(x, neighbours)
    assert projected.shape == (5, 6) and torch.allclose(projected.norm(dim=1), torch.ones(5), atol=1e-5)


def test_a_block_attends_to_the_neighbours_it_is_given():
    torch.manual_seed(1)
    block = CrossAttentionBlock(8, zero_init=False)
    x, n = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 5, 8), dim=1)
    a, _ = block(x, n)
    b, _ = block(x, n.flip(1))  # the order of the neighbours does not matter
    c, _ = block(x, torch.cat([n[:, :4], -n[:, 4:]], 1))
    assert torch.allclose(a, b, atol=1e-6) and not torch.allclose(a, c, atol=1e-4)


def _block_by_hand(block: CrossAttentionBlock, x: torch.Tensor, n: torch.Tensor, scale: float) -> torch.Tensor:
    """The block's equations written out (as its forward was before ``input_scale`` existed)."""
    x, n = x * scale, n * scale
    q = x + F.silu(block.q(x))
    k, v = F.silu(block.k(n)), F.silu(block.v(n))
    attention = torch.softmax(torch.einsum("bd,bkd->bk", q, k) / (x.shape[-1] ** 0.5), dim=-1)
    h = x + block.o(torch.einsum("bk,bkd->bd", attention, v))
    return F.normalize(h + block.fc2(F.silu(block.fc1(block.norm(h)))), dim=-1)


def test_one_block_equals_the_supplements_equations_worked_by_hand():
    """d = 2, k = 2, weights chosen so each step can be worked with a pencil (a fidelity review, 2026-12-07:
    the other block tests compare forward with a copy of itself). q = x + SiLU(W_q x) (the skip around the
    query projection), k_j, v_j = SiLU(W n_j), a = softmax(q·k/√d), h = x + W_o Σ a_j v_j,
    h = h + W_2 SiLU(W_1 LN(h)), out = h / |h|."""
    block = CrossAttentionBlock(2, mlp_ratio=0.5, zero_init=False)
    with torch.no_grad():
        for layer in block.q, block.k, block.v:
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
        block.o.weight.copy_(0.5 * torch.eye(2))
        block.o.bias.zero_()
        block.fc1.weight.copy_(torch.tensor([[1.0, 0.0]]))
        block.fc2.weight.copy_(torch.tensor([[1.0], [0.0]]))
        block.fc1.bias.zero_()
        block.fc2.bias.zero_()
        out, attention = block(torch.tensor([[1.0, 0.0]]), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    silu = lambda t: t / (1 + math.exp(-t))  # noqa: E731
    s1 = silu(1.0)
    q = (1 + s1, 0.0)  # x + SiLU(x)
    a1 = 1 / (1 + math.exp(-(q[0] * s1 - 0.0) / math.sqrt(2)))  # softmax of (q·k1, q·k2) = ((1+s1)s1, 0), over √2
    h = (1 + 0.5 * a1 * s1, 0.5 * (1 - a1) * s1)  # x + 0.5 (a1 (s1, 0) + a2 (0, s1))
    c = (h[0] - h[1]) / 2  # LayerNorm of two coordinates: (c, -c) / sqrt(c² + eps)
    h = (h[0] + silu(c / math.sqrt(c * c + 1e-5)), h[1])
    norm = math.hypot(*h)
    assert attention[0].tolist() == pytest.approx([a1, 1 - a1], rel=1e-6)
    assert out[0].tolist() == pytest.approx([h[0] / norm, h[1] / norm], rel=1e-6)


def test_input_scale_none_is_the_default_computation_and_sqrt_d_differs():
    from mlsctl import config

    torch.manual_seed(2)
    x, n = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(4, 5, 16), dim=1)
    torch.manual_seed(3)
    scaled = CrossAttentionBlock(16, zero_init=False, input_scale="sqrt_d")
    torch.manual_seed(3)
    default = CrossAttentionBlock(16, zero_init=False)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), scaled.state_dict().values()))
    with torch.no_grad():
        on_unit_vectors, _ = default(x, n)
        on_sqrt_d, _ = scaled(x, n)
        assert torch.equal(on_sqrt_d, _block_by_hand(scaled, x, n, 16 ** 0.5))  # bit for bit: the outputs of old runs
        assert torch.equal(on_unit_vectors, _block_by_hand(default, x, n, 1.0))  # the supplement's equations
    assert not torch.allclose(on_sqrt_d, on_unit_vectors, atol=1e-3)
    torch.manual_seed(4)
    a = Refiner(16, blocks=2, zero_init=False)(x, n)
    torch.manual_seed(4)
    b = Refiner(16, blocks=2, zero_init=False, input_scale="none")(x, n)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="input_scale"):
        CrossAttentionBlock(16, input_scale="sqrt")
    recipe = config.load_recipe("refine", ["method.input_scale=sqrt_d"])
    assert recipe.method.input_scale == "sqrt_d" and config.load_recipe("refine").method.input_scale == "none"
    with pytest.raises(config.ConfigError, match="sqrt_d"):
        config.load_recipe("refine", ["method.input_scale=sqrt"])


def test_refinement_in_training_and_in_apply_is_the_same_computation():
    """A review (2026-12-07): the training step (the dataset's neighbours and batches) and `refine apply` (its own
    search and normalisation of the context) each feed the refiner; for the same embeddings (stored in fp16, as
    `mlsctl embed` writes them) and the same neighbours they give the same refined embeddings."""
    from mlsctl.refine.apply import refine

    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(200, 32, generator=g), dim=1).half()
    y = torch.arange(200) % 20
    dataset = ContextDataset(x, y, 8, [str(i) for i in range(20)], "t")
    torch.manual_seed(0)
    refiner = Refiner(32, blocks=3, zero_init=False).eval()
    batch = dataset.collate(list(range(200)))
    with torch.no_grad():
        trained = refiner(batch.embeddings, batch.neighbours)
        applied, _, _, rows = refine(refiner, x, x, 8, torch.arange(200), trace=True)
    assert torch.equal(rows, dataset.neighbour_rows)
    assert not torch.allclose(trained, batch.embeddings.float(), atol=1e-2)  # the blocks change the embeddings
    assert torch.allclose(applied, trained, atol=1e-6, rtol=0)


def test_neighbours_exclude_the_query_by_index_and_keep_its_duplicates():
    x, y = _clusters()
    x = torch.cat([x, x[:3]])  # rows 96..98 duplicate rows 0..2
    y = torch.cat([y, y[:3]])
    dataset = ContextDataset(x, y, 8, [str(i) for i in range(12)], "test")
    rows = torch.arange(len(x))[:, None]
    assert not (dataset.neighbour_rows == rows).any()
    assert (dataset.neighbour_rows[:3, 0] == torch.tensor([96, 97, 98])).all()
    assert (dataset.neighbour_rows[96:, 0] == torch.tensor([0, 1, 2])).all()
    batch = dataset.collate([0, 5])
    assert torch.equal(batch.neighbours[1], dataset.embeddings[dataset.neighbour_rows[5]])
    # exact order: the neighbours are the k most similar other rows, best first
    similarity = x @ x.T
    similarity.fill_diagonal_(-2)
    expected = similarity.topk(8, dim=1).values
    found = torch.gather(similarity, 1, dataset.neighbour_rows)
    assert torch.allclose(found, expected, atol=1e-6)
    with pytest.raises(UserError, match="fewer than the 9 a query needs"):
        ContextDataset(x[:8], y[:8], 8, ["a"], "data.root x")
    idx, _ = nearest_neighbours(x[3:7], x, 3)  # no exclusion asked: a query finds itself first
    assert (idx[:, 0] == torch.arange(3, 7)).all()
    from mlsctl.refine import neighbours as old_home  # the module moved into mlsctl.methods.refine

    assert old_home.nearest_neighbours is nearest_neighbours


# ------------------------------------------------------------------------------------------ CLI


def _train_args(feats: Path, out: Path, *extra: str) -> list[str]:
    return ["refine", "train", str(feats), "--out", str(out), "--blocks", "2", "--k", "4", "--epochs", "3",
            "optim.batch_size=16", "train.checkpoint_every=4", "train.log_every=1", *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refine")
    x, y = _clusters(n_classes=12, per_class=8)
    train = _folder(tmp / "train", x, y)
    in_process(*_train_args(train, tmp / "run"), "method.zero_init=false", check=True)
    return tmp, train


def test_train_writes_a_run_through_the_shared_loop(trained):
    tmp, _ = trained
    run = tmp / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 19))  # 96 // 16 = 6 steps x 3 epochs
    assert all("loss/ms" in r and "ms_before" in r and "momentum" not in r for r in lines)
    recipe = yaml.safe_load((run / "config.yaml").read_text())
    assert recipe["method"]["blocks"] == 2 and recipe["method"]["neighbours"] == 4
    assert recipe["optim"]["lr"] == 1e-4 and recipe["optim"]["batch_size"] == 16
    assert (run / "summary.json").is_file() and not (run / "teacher.safetensors").exists()


def test_train_can_start_from_another_refine_run(trained, capsys):
    """A probe (2026-12-05): refine train's --resume refusal advised --init-from, which it did not take."""
    tmp, train = trained
    _, err = cli_ok(capsys, *_train_args(train, tmp / "again", "method.zero_init=false", "--epochs", "1",
                                         "--init-from", str(tmp / "run")))
    assert "initialised all weights of" in err and str(tmp / "run") in err
    # a review: weights of another shape (3 blocks where the run had 2) loaded nothing and said "every backbone"
    from conftest import cli

    args = _train_args(train, tmp / "other", "method.zero_init=false", "--epochs", "1", "--init-from", str(tmp / "run"))
    code, _, err = cli(*[a if a != "2" else "3" for a in args], capsys=capsys)
    assert code == 2 and "weights of another shape" in err and "every backbone" not in err


def test_apply_overwrite_refuses_what_was_put_into_out_while_it_refined(trained, capsys, monkeypatch):
    """A new user's probe, 2026-12-07 (the same hole as the data builds'): what appears in --out while refine apply
    --overwrite works would go with the old folder; the check is made again just before the swap."""
    import mlsctl.refine.apply as apply

    tmp, train = trained
    out = tmp / "refined-meanwhile"
    cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(train), "--out", str(out))
    real = apply.refine

    def and_meanwhile(*args, **kwargs):
        (out / ".notes").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(apply, "refine", and_meanwhile)
    code, _, err = cli("refine", "apply", str(tmp / "run"), str(train), "--out", str(out), "--k", "3", "--overwrite",
                       capsys=capsys)
    assert code == 2 and "holds .notes besides the features" in err and (out / ".notes").read_text() == "mine", err
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".refined-meanwhile")]  # its temporary folder went


def test_train_from_a_run_of_another_method_says_so(trained, finished_run, capsys):
    """A new user's probe (2026-12-06): refine train --init-from an ms run was refused for weights "of another
    shape", while the run was of another method."""
    from conftest import cli

    tmp, train = trained
    dino_run, _ = finished_run
    code, _, err = cli(*_train_args(train, tmp / "from-dino", "--epochs", "1", "--init-from", str(dino_run)),
                       capsys=capsys)
    assert code == 2 and "is a run of dino; a refine run starts from the weights of another refine run" in err, err


def test_overwrite_names_the_method_of_the_run_it_replaces(trained, finished_run, tmp_path, capsys):
    """A new user's probe (2026-12-07): refine train --overwrite of a DINO run's folder said "replacing the run in
    ...", without the method it replaced; other commands name what they replace."""
    _, train = trained
    dino = tmp_path / "dino-run"
    shutil.copytree(finished_run[0], dino)
    _, err = cli_ok(capsys, *_train_args(train, dino, "--epochs", "1", "--overwrite"))
    assert f"replacing the dino run (last checkpoint: step 8) in {dino}: it stays in" in err, err
    _, err = cli_ok(capsys, *_train_args(train, dino, "--epochs", "1", "--overwrite"))
    assert f"replacing the refine run (last checkpoint: step 6) in {dino}" in err, err


def test_apply_writes_features_every_eval_reads_and_never_shows_a_query_itself(trained, capsys):
    from mlsctl.features import Features
    from mlsctl.refine.apply import load_refiner, refine, self_rows

    tmp, train = trained
    x, y = _clusters(n_classes=6, per_class=8, seed=5)
    test = _folder(tmp / "test", x, y, prefix="t")
    out, _ = cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"))
    assert "itself excluded for 48" in out
    refined = Features(tmp / "refined")
    assert refined.files == Features(test).files and refined.dim == 16
    values = refined.global_features()
    assert torch.allclose(values.norm(dim=1), torch.ones(48), atol=1e-5)
    assert not torch.allclose(values, x, atol=1e-3)  # refined (random-init blocks trained 18 steps)
    assert refined.model["refiner"]["k"] == 4 and refined.model["base_fingerprint"] == "f" * 64
    # the same as the library, with every query's own row excluded from its neighbours
    loaded = load_refiner(tmp / "run")
    features = Features(test)
    exclude = self_rows(features, features)
    assert torch.equal(exclude, torch.arange(48))
    again, states, _, rows = refine(loaded.refiner, features.global_features(), features.global_features(), 4, exclude,
                                    trace=True)
    assert not (rows == torch.arange(48)[:, None]).any() and states.shape == (3, 48, 16)
    assert torch.allclose(again, values, atol=1e-6)
    # every evaluation reads the refined folder unchanged
    cli_ok(capsys, "eval", "recall", str(tmp / "refined"), "--out", str(tmp / "r.json"))
    cli_ok(capsys, "eval", "knn", "--train", str(tmp / "refined"), "--val", str(tmp / "refined"), "--k", "5",
           "--out", str(tmp / "k.json"))
    # a context that holds some of the queries' images: only those rows are excluded
    half = write_feature_folder(tmp / "half", features.files[:24], features.global_features()[:24],
                                input_root=features.input_root)
    out, _ = cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--context", str(half), "--out",
                    str(tmp / "refined-half"), "--json")
    assert json.loads(out)["self_excluded"] == 24
    # a new user's probe (2026-12-06): a context of another model was searched without a word (two spaces)
    other = write_feature_folder(tmp / "other-model", features.files[:24], features.global_features()[:24],
                                 input_root=features.input_root, fingerprint="e" * 64)
    for command, written in (("apply", tmp / "mixed"), ("plot", tmp / "mixed.png")):
        code, _, err = cli("refine", command, str(tmp / "run"), str(test), "--context", str(other), "--out",
                           str(written), capsys=capsys)
        assert code == 2 and "come from different models" in err and not written.exists(), err
    # another context (the training set): nothing to exclude
    out, _ = cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--context", str(train), "--out",
                    str(tmp / "refined-train"), "--json")
    assert json.loads(out)["self_excluded"] == 0
    # as embed (a review, 2026-12-06): the same command again finds its work done; made otherwise, it asks
    written = {p.name: p.stat().st_mtime_ns for p in (tmp / "refined").iterdir()}
    out, _ = cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"))
    assert out.strip() == f"{tmp / 'refined'} already holds these refined features (48 rows); nothing to do"
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "refined").iterdir()} == written
    out, _ = cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"), "--json")
    assert json.loads(out)["reused"] is True and json.loads(out)["rows"] == 48
    for other_way in (["--k", "3"], ["--dtype", "fp16"], ["--context", str(train)]):
        code, _, err = cli("refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"), *other_way,
                           capsys=capsys)
        assert code == 2 and "add --overwrite" in err, (other_way, err)
    cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"), "--overwrite")
    # a review (2026-12-06): a link given as --out was exchanged for a real folder (its target kept the old
    # features) and a second --overwrite failed on the link left at the temporary path
    (tmp / "link").symlink_to(tmp / "refined")
    for _ in range(2):
        cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "link"), "--overwrite")
    assert (tmp / "link").is_symlink() and (tmp / "link" / "manifest.json").is_file()
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".")]
    # a replacement cut short between its two renames (no exchange on that system): put back before the checks
    (tmp / "refined").rename(tmp / ".refined.swap-old")
    out, _ = cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"))
    assert "already holds these refined features" in out and (tmp / "refined" / "manifest.json").is_file()
    (tmp / "refined" / "notes.txt").write_text("mine")  # --overwrite replaced it with the folder (a new user)
    code, _, err = cli("refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"), "--overwrite",
                       capsys=capsys)
    assert code == 2 and "holds notes.txt besides the features" in err and (tmp / "refined" / "notes.txt").is_file()
    (tmp / "refined" / "notes.txt").unlink()
    # a new user's probe, 2026-12-07: hidden names were skipped, and only the top level was looked at
    for mine, named in ((tmp / "refined" / ".git" / "HEAD", ".git/"),
                        (tmp / "refined" / ".partial" / "notes.txt", ".partial/notes.txt")):
        mine.parent.mkdir(exist_ok=True)
        mine.write_text("mine")
        code, _, err = cli("refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"), "--overwrite",
                           capsys=capsys)
        assert code == 2 and f"holds {named} besides the features" in err and mine.read_text() == "mine", err
        shutil.rmtree(mine.parent)
    (tmp / "refined" / ".partial").mkdir()  # an unfinished embed's own names are the features'
    (tmp / "refined" / ".partial" / "plan.json").write_text("{}")
    (tmp / "refined" / ".manifest.json.abcd1234.tmp").write_text("{")
    for litter in (".DS_Store", "._manifest.json", "Thumbs.db", ".partial/.DS_Store"):  # a file browser's: no obstacle
        write_litter(tmp / "refined" / litter)
    cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "refined"), "--overwrite")
    assert not (tmp / "refined" / "Thumbs.db").exists()
    assert sorted(p.name for p in (tmp / "refined").iterdir() if p.name.startswith(".")) == []
    # an empty folder given as --out is written without --overwrite (it refined, then refused: a review)
    (tmp / "empty").mkdir()
    cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "empty"))
    # a code-health review (2026-12-07): a folder holding only the lock file a killed embed left was "not a
    # feature folder", and two refines into one --out shared (and emptied) one temporary folder
    from mlsctl.locks import LOCK_NAME, FolderLock

    (tmp / "left").mkdir()
    (tmp / "left" / LOCK_NAME).write_text("")
    cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "left"))
    with FolderLock(tmp / "held", "feature folder", beside=True):
        code, _, err = cli("refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "held"), capsys=capsys)
    assert code == 1 and f"feature folder {tmp / 'held'} is being written by" in err and not (tmp / "held").exists()
    with FolderLock(tmp / "embedding", "feature folder", also_beside=True):  # what embed holds on its --out
        code, _, err = cli("refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "embedding"),
                           capsys=capsys)
    assert code == 1 and "is being written by" in err and not (tmp / "embedding").exists()
    code, _, err = cli("refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "run"), capsys=capsys)
    assert code == 2 and "exists and is a run folder; choose another --out" in err, err
    (tmp / "loop").symlink_to(tmp / "loop")
    code, _, err = cli("refine", "apply", str(tmp / "run"), str(test), "--out", str(tmp / "loop"), capsys=capsys)
    assert code == 2 and "cannot be followed" in err and "internal error" not in err
    # a new user (2026-12-06): refined features refined again, with only a note of "another model"
    for args in ((str(tmp / "refined"),), (str(test), "--context", str(tmp / "refined"))):
        code, _, err = cli("refine", "apply", str(tmp / "run"), *args, "--out", str(tmp / "twice"), capsys=capsys)
        assert code == 2 and "are refined already" in err and f"give {test.resolve()}" in err
        assert not (tmp / "twice").exists()


def test_a_run_loads_with_its_input_scale_and_one_saved_without_it_with_sqrt_d(trained, tmp_path):
    import shutil

    from mlsctl.models.source import fingerprint
    from mlsctl.refine.apply import load_refiner

    tmp, _ = trained
    default = load_refiner(tmp / "run")
    assert default.refiner.input_scale == "none" and default.fingerprint != fingerprint(default.refiner)
    copy = tmp_path / "run"
    shutil.copytree(tmp / "run", copy)
    recipe = yaml.safe_load((copy / "config.yaml").read_text())
    recipe["method"]["input_scale"] = "sqrt_d"
    (copy / "config.yaml").write_text(yaml.safe_dump(recipe))
    scaled = load_refiner(copy)
    assert all(block.input_scale == "sqrt_d" for block in scaled.refiner.blocks)
    assert scaled.fingerprint == fingerprint(scaled.refiner) != default.fingerprint  # same weights, another computation
    # a run saved before input_scale existed (its config.yaml has no such key) was trained with sqrt_d, and
    # loads so: in refine apply, in the restored method and when resumed
    del recipe["method"]["input_scale"]
    (copy / "config.yaml").write_text(yaml.safe_dump(recipe))
    old = load_refiner(copy)
    assert all(block.input_scale == "sqrt_d" for block in old.refiner.blocks) and old.fingerprint == scaled.fingerprint
    from mlsctl import config

    assert config.load_run_recipe(copy / "config.yaml").method.input_scale == "sqrt_d"
    assert config.load_recipe(str(copy / "config.yaml")).method.input_scale == "none"  # a recipe file: today's default
    for saved in copy.glob("checkpoints/*/recipe.yaml"):  # and a checkpoint's own copy, as old checkpoints had none
        checkpoint_recipe = yaml.safe_load(saved.read_text())
        del checkpoint_recipe["method"]["input_scale"]
        saved.write_text(yaml.safe_dump(checkpoint_recipe))
    _, train = trained
    for command in (("refine", "train", str(train), "--out", str(copy), "--resume"),
                    ("pretrain", str(copy / "config.yaml"), "--out", str(copy), "--resume")):
        resumed = in_process(*command)
        assert resumed.returncode == 0 and "already complete" in resumed.stderr, resumed.stderr  # not "differs"


def test_apply_bad_input_is_one_sentence(trained, capsys):
    tmp, train = trained
    x, y = _clusters(n_classes=3, per_class=2, dim=16, seed=2)
    cases = [
        (_folder(tmp / "wide", torch.randn(10, 24), torch.arange(10) % 2), [], "holds 24-d features, but run"),
        (_folder(tmp / "few", x[:4], y[:4]), [], "fewer than the 5 a query needs"),
        (train, ["--out", str(train)], "is the features folder"),
        # a probe (2026-12-06): --overwrite replaced the run's own training features with refined ones
        (_folder(tmp / "other", x, y), ["--out", str(train), "--overwrite"],
         f"is the folder of the features run {tmp / 'run'} trained on (its data.root)"),
        # a new user's probe (2026-12-07): --overwrite replaced features embed had written, which are not its own
        (_folder(tmp / "other2", x, y), ["--out", str(_folder(tmp / "embedded", x, y)), "--overwrite"],
         f"--out {tmp / 'embedded'} holds features mlsctl embed wrote, not refined ones"),
    ]
    for feats, extra, message in cases:
        args = ["refine", "apply", str(tmp / "run"), str(feats)] + (extra or ["--out", str(tmp / "bad")])
        code, _, err = cli(*args, capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli("refine", "apply", str(train), str(train), "--out", str(tmp / "bad"), capsys=capsys)
    assert code == 2 and "not a run folder" in err
    assert not (tmp / "bad").exists()


def test_train_bad_input_is_one_sentence(tmp_path, capsys):
    x, y = _clusters(n_classes=4, per_class=4)
    feats = _folder(tmp_path / "feats", x, y)
    single = tmp_path / "single.csv"
    single.write_text("".join(f"class{int(c)}/{i:04d}.png,one\n" for i, c in enumerate(y)))
    partial = tmp_path / "partial.csv"
    partial.write_text("class0/0000.png,a\n")
    few = _folder(tmp_path / "few", x[:4], y[:4])
    cases = [(["--labels", str(single)], feats, "single class"),
             (["--labels", str(partial)], feats, "has no label for 15 images"),
             ([], few, "fewer than the 5 a query needs (k = 4 besides itself)"),
             ([], tmp_path / "missing", "does not exist"),
             # a new-user probe (2026-12-05): the override beat the option silently (neighbours 4 with --k 8)
             (["method.neighbours=8"], feats, "--k and the override method.neighbours=... both set"),
             (["data.root=elsewhere"], feats, "FEATURES and the override data.root=... both set")]
    for extra, folder, message in cases:
        code, _, err = cli(*_train_args(folder, tmp_path / "run"), *extra, capsys=capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_plots_are_drawn(trained, capsys):
    tmp, train = trained
    sweep = tmp / "sweep.json"
    sweep.write_text(json.dumps({"grid": [{"blocks": b, "k": k, "seed": s, "recall": {"1": 0.1 * b + 0.01 * k + s / 100}}
                                          for b in (0, 1, 2) for k in (4, 8) for s in (0, 1)]}))
    out, _ = cli_ok(capsys, "refine", "plot", str(tmp / "run"), str(train), "--points", "40", "--out",
                    str(tmp / "drift.png"), "--sweep", str(sweep), "--grid-out", str(tmp / "grid.png"), "--json")
    drawn = json.loads(out)
    assert drawn["drift"]["points"] == 40 and drawn["drift"]["blocks"] == 2
    assert drawn["grid"]["r1"]["2x8"] == pytest.approx(100 * (0.28 + 0.005))
    for png in ("drift.png", "grid.png"):
        assert (tmp / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp / "bad.json").write_text("{}")
    code, _, err = cli("refine", "plot", str(tmp / "run"), str(train), "--points", "10", "--out", str(tmp / "d2.png"),
                       "--sweep", str(tmp / "bad.json"), capsys=capsys)
    assert code == 2 and "is not a sweep JSON" in err


def test_drift_query_turns_to_its_own_class_as_retrieval_sees_it(trained, capsys):
    """The drift picture's query: e⁰'s nearest neighbour among the context's e⁰ of another class, e^T's among
    the context's e^T (what refine apply writes and eval recall compares) of its own; the pick compared e^T with
    the unrefined context before (a review, 2026-12-06)."""
    from mlsctl.features import Features

    tmp, train = trained
    out, _ = cli_ok(capsys, "refine", "plot", str(tmp / "run"), str(train), "--points", "96", "--out",
                    str(tmp / "drift-pick.png"), "--json")
    query = json.loads(out)["drift"]["query"]
    assert query["nearest_class_fixed"], query  # the fixture has such queries; the test checks the pick
    cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(train), "--out", str(tmp / "refined-pick"))
    before, after = Features(train), Features(tmp / "refined-pick")
    row = before.files.index(query["file"])
    classes = [f.split("/")[0] for f in before.files]
    for features, wanted in ((before, False), (after, True)):
        x = F.normalize(features.global_features().float(), dim=-1)
        scores = x @ x[row]
        scores[row] = -2.0
        assert (classes[int(scores.argmax())] == query["class"]) is wanted


def test_drift_query_pick_in_a_large_context_refines_only_the_queries_neighbours(trained, capsys, monkeypatch):
    """A review (2026-12-06): refining the whole context to pick one query is an exact search of the context
    against itself, hours at 1 M rows; beyond EXACT_PICK_ROWS only the sampled queries' neighbours are refined,
    and a context of k rows (no row has k others) picks no query instead of refusing the picture."""
    from mlsctl.refine import apply, plot

    tmp, train = trained
    sizes = []
    real = apply.refine
    monkeypatch.setattr(apply, "refine", lambda refiner, q, *a, **kw: sizes.append(len(q)) or real(refiner, q, *a, **kw))
    monkeypatch.setattr(plot, "EXACT_PICK_ROWS", 50)
    drawn = plot.drift_figure(tmp / "run", train, tmp / "drift-large.png", points=10, seed=0)
    assert sizes[0] == 10 and 4 <= sizes[1] <= 40  # the sampled queries, then at most their 10 x 4 neighbours
    assert isinstance(drawn["query"]["nearest_class_fixed"], bool) and (tmp / "drift-large.png").is_file()
    small = _folder(tmp / "four", *[t[:4] for t in _clusters(n_classes=12, per_class=8)], prefix="s")
    drawn = plot.drift_figure(tmp / "run", train, tmp / "drift-small.png", points=10, context_dir=small)
    assert drawn["query"]["nearest_class_fixed"] is False


def test_drift_picture_of_a_refiner_with_a_final_layer(tmp_path, capsys):
    """method.out_dim: e^T is projected to another width after the blocks; the query pick compares the
    refined output with the context refined alike (a first version compared the blocks' e^T with it)."""
    x, y = _clusters(n_classes=8, per_class=4)
    feats = _folder(tmp_path / "feats", x, y)
    in_process(*_train_args(feats, tmp_path / "run"), "method.out_dim=8", "method.zero_init=false", check=True)
    out, _ = cli_ok(capsys, "refine", "plot", str(tmp_path / "run"), str(feats), "--points", "32", "--out",
                    str(tmp_path / "drift.png"), "--json")
    assert json.loads(out)["drift"]["points"] == 32 and (tmp_path / "drift.png").is_file()


def test_neighbours_are_kept_for_resume_and_searched_again_only_when_they_cannot_serve(tmp_path, monkeypatch, caplog):
    """A resumed run read the neighbours of every training embedding from a search again (hours for 1 M
    on a CPU); they are kept in the run's cache/ with what they were searched for."""
    from safetensors.torch import load_file, save_file

    from mlsctl.methods.refine import method as refine_method
    from mlsctl.methods.refine import neighbours as search

    x, y = _clusters()
    kept = tmp_path / "cache" / refine_method.NEIGHBOURS_FILE
    first = ContextDataset(x, y, 4, [str(i) for i in range(12)], "test", search=False)
    assert first.neighbour_rows is None
    rows = first.find_neighbours(kept)
    assert torch.equal(rows, ContextDataset(x, y, 4, [str(i) for i in range(12)], "test").neighbour_rows)
    assert torch.equal(load_file(str(kept))["neighbour_rows"], rows)
    searches = []
    real = search.nearest_neighbours
    monkeypatch.setattr(search, "nearest_neighbours", lambda *a, **kw: searches.append(1) or real(*a, **kw))

    def found(embeddings=x, k=4) -> torch.Tensor:
        return ContextDataset(embeddings, y, k, [str(i) for i in range(12)], "test", search=False).find_neighbours(kept)

    assert torch.equal(found(), rows) and searches == []  # read back: no search
    assert found(k=3).shape == (len(x), 3) and searches == [1]  # another k: searched again, and kept
    assert found(k=3).shape == (len(x), 3) and searches == [1]
    moved = x.clone()
    moved[0] = -moved[0]
    with pytest.raises(UserError, match="the features in data.root changed since this run started"):
        found(moved, k=3)  # the same k, other embeddings: a resume onto re-embedded features (a probe, 2026-12-06)
    assert searches == [1]
    caplog.set_level("INFO", logger="mlsctl")
    for damage in (b"not safetensors", None):
        if damage:
            kept.write_bytes(damage)
        else:  # the right metadata, rows out of range
            save_file({"neighbour_rows": torch.full((len(x), 3), 10**6)}, str(kept), {"k": "3", "embeddings_sha256":
                                                                                     first.features_sha256})
        before = len(searches)
        assert found(k=3).shape == (len(x), 3) and len(searches) == before + 1
    assert "cannot read" in caplog.text and "another shape or range" in caplog.text


def test_a_resumed_refine_run_reads_its_neighbours_back(trained, tmp_path, monkeypatch, capsys):
    import shutil

    from mlsctl.methods.refine import neighbours as search
    from mlsctl.runs import Run

    source, train = trained
    assert (source / "run" / "cache" / "neighbours.safetensors").is_file()
    killed = tmp_path / "killed"
    shutil.copytree(source / "run", killed)
    latest = Run(killed).latest()
    for checkpoint in Run(killed).checkpoints():
        if checkpoint.step >= latest.step:
            shutil.rmtree(checkpoint.path)
    (killed / "summary.json").unlink()
    stopped_at = Run(killed).latest().step

    def no_search(*args, **kwargs):
        raise AssertionError("the neighbours were searched again")

    monkeypatch.setattr(search, "nearest_neighbours", no_search)
    # a probe (2026-12-06): without the options the run started with, --resume fell back on the shipped recipe
    # ("too few classes for batches of 128"); it now continues from the run's own config.yaml
    _, err = cli_ok(capsys, "refine", "train", str(train), "--out", str(killed), "--resume")
    assert f"resuming {killed} from step {stopped_at}" in err and "neighbours read from" in err
    assert Run(killed).latest().step == 18


def test_resuming_a_finished_run_on_other_features_names_both_not_already_complete(trained, tmp_path, capsys):
    """A new user's probe (2026-12-07): --resume of a finished run given features of the same files with other
    values said "already complete"; the features' check came only with the neighbour search, after that."""
    source, train = trained
    run = tmp_path / "run"
    shutil.copytree(source / "run", run)
    config = (run / "config.yaml").read_text()
    x, y = _clusters(n_classes=12, per_class=8, seed=1)
    other = _folder(tmp_path / "other-model", x, y, input_root=source / "images")  # the same files, another model
    code, _, err = cli("refine", "train", str(other), "--out", str(run), "--resume", capsys=capsys)
    assert code == 2 and "already complete" not in err, err
    assert f"{other} are not the features run {run} was trained on ({train.resolve()})" in err, err
    assert len(err.strip().splitlines()) == 1 and (run / "config.yaml").read_text() == config  # left as it was
    _, err = cli_ok(capsys, "refine", "train", str(train), "--out", str(run), "--resume")  # its own: complete
    assert "already complete" in err


def test_resume_on_a_run_of_another_method_names_the_run_not_a_recipe(trained, tmp_path, capsys):
    """A review (2026-12-06): --resume on a DINO run's folder said "--recipe refine is a dino recipe"."""
    import shutil

    from conftest import cli

    _, train = trained
    other = tmp_path / "dino-run"
    other.mkdir()
    shutil.copy(Path(__file__).parents[1] / "recipes" / "dino_fmnist_quick.yaml", other / "config.yaml")
    code, _, err = cli("refine", "train", str(train), "--out", str(other), "--resume", capsys=capsys)
    assert code == 2 and f"--out {other} holds a run of method dino" in err and "--recipe" not in err, err
    # a probe (2026-12-07): another method's recipe with --labels said "unknown key method.labels_file"
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n")
    code, _, err = cli("refine", "train", str(train), "--recipe", "dino_fmnist_quick", "--labels", str(labels),
                       "--out", str(tmp_path / "r"), capsys=capsys)
    assert code == 2 and "--recipe dino_fmnist_quick is a dino recipe; refine train runs a refine recipe" in err, err


@pytest.mark.slow
def test_refine_resumes_exactly_after_sigkill(tmp_path):
    from safetensors.torch import load_file

    from mlsctl.runs import Run

    x, y = _clusters(n_classes=40, per_class=25, dim=32, seed=3)
    feats = _folder(tmp_path / "feats", x, y)
    args = ["refine", "train", str(feats), "--blocks", "2", "--k", "4", "--epochs", "8", "optim.batch_size=20",
            "train.checkpoint_every=25", "train.log_every=1", "method.zero_init=false"]  # 50 x 8 = 400 steps
    in_process(*args, "--out", str(tmp_path / "full"), check=True)
    killed = tmp_path / "killed"
    metrics = killed / "metrics.jsonl"
    process = kill_when([*args, "--out", str(killed)],
                        lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = Run(killed).latest().step
    assert 0 < stopped_at < 400
    result = in_process(*args, "--out", str(killed), "--resume", check=True)
    assert f"resuming {killed} from step {stopped_at}" in result.stderr and "neighbours read from" in result.stderr

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(killed)) == 400 and losses(killed) == losses(tmp_path / "full")
    a = load_file(str(Run(killed).latest().model_path))
    b = load_file(str(Run(tmp_path / "full").latest().model_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_report_of_a_refine_run_shows_what_it_has(trained, capsys):
    """A probe (2026-12-05): `report` refused a refine run ('has no backbone') although `plot` draws its curves."""
    tmp, _ = trained
    (tmp / "no-results").mkdir(exist_ok=True)  # empty (one that is not there is refused)
    _, err = cli_ok(capsys, "report", str(tmp / "run"), "--out", str(tmp / "refine-report.html"), "--results",
                    str(tmp / "no-results"))
    page = (tmp / "refine-report.html").read_text()
    assert "training curves" in page and "trains on features and has no backbone, so no patch map" in page
    # and its summary names no ViT it does not have, nor its embeddings images (a probe, 2026-12-07)
    assert "no backbone: the method trains on features" in page and "cross-attention blocks over k =" in page
    assert "vit_small_patch16_224, 224 px" not in page and "embeddings / s" in page and " images)" not in page


def test_two_processes_train_what_one_does(tmp_path):
    """Process 0 searches the neighbours and lists the feature folder, and sends both to the others
    (the folder travels as its path): 2 processes of batch 8 take the step of 1 process of batch 16."""
    import yaml
    from safetensors.torch import load_file

    from conftest import REPO, pretrain_on_two_processes_and_one
    from mlsctl.runs import Run

    x, y = _clusters(n_classes=12, per_class=5)  # 3 steps of 16: step 1's checkpoint is among the 4 kept
    raw = yaml.safe_load((REPO / "recipes" / "refine.yaml").read_text())
    raw["data"]["root"] = str(_folder(tmp_path / "feats", x, y))
    raw["method"].update(blocks=2, neighbours=4, zero_init=False)
    raw["optim"]["epochs"] = 1
    raw["train"]["log_every"] = 1
    runs = pretrain_on_two_processes_and_one(tmp_path, raw, 8)
    first = {n: json.loads((runs[n] / "metrics.jsonl").read_text().splitlines()[0]) for n in runs}
    assert first[2]["loss"] == pytest.approx(first[1]["loss"], rel=1e-5) and first[1]["loss"] > 0
    one, two = (load_file(str(next(c for c in Run(runs[n]).checkpoints() if c.step == 1).model_path)) for n in (1, 2))
    assert all(torch.allclose(one[k], two[k], atol=1e-6, rtol=0) for k in one)


def test_commands_that_embed_skip_refine_runs_when_taking_the_newest_run(trained, finished_run, tmp_path):
    """A new-user probe (2026-12-06): after a refine train, embed and eval without --run took the refine
    run and failed ("a refine run has no backbone"), while eval retrieval skipped to a MILE run."""
    import os
    import shutil

    from mlsctl.restore import choose_model, newest_run

    runs = tmp_path / "runs"
    shutil.copytree(finished_run[0], runs / "dino")
    shutil.copytree(trained[0] / "run", runs / "refine")
    later = max(p.stat().st_mtime for p in (runs / "dino").rglob("*")) + 100
    for path in (runs / "refine").rglob("*"):
        os.utime(path, (later, later))
    assert newest_run(runs).root.name == "refine"
    assert newest_run(runs, with_backbone=True).root.name == "dino"
    assert choose_model(runs_root=runs).description.startswith(f"teacher of run {runs / 'dino'}")


def test_a_neighbour_search_that_cannot_be_kept_is_a_warning(tmp_path, monkeypatch, caplog):
    """A review (2026-12-06): the kept search is an optimisation; a full disk writing it stopped the run."""
    import errno

    from mlsctl import atomic
    from mlsctl.methods.refine import method as refine_method

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "n.safetensors"))

    monkeypatch.setattr(atomic, "write_with", full)
    x, y = _clusters()
    caplog.set_level("WARNING", logger="mlsctl")
    rows = ContextDataset(x, y, 4, [str(i) for i in range(12)], "t", search=False).find_neighbours(tmp_path / "n.safetensors")
    assert rows.shape == (len(x), 4) and "not kept for --resume" in caplog.text
    assert refine_method.NEIGHBOURS_FILE == "neighbours.safetensors"


def test_a_refine_run_inside_its_feature_folder_is_refused_in_words_that_fit(trained, tmp_path, capsys):
    """A probe (2026-12-06): the refusal spoke of "a picture drawn into the run would become a training image"."""
    _, train = trained
    code, _, err = cli(*_train_args(train, train / "run"), capsys=capsys)
    assert code == 2 and "inside data.root" in err and "among the features it trains on" in err, err
    assert "picture" not in err and not (train / "run").exists()


def test_two_pictures_never_share_one_file(trained, tmp_path, capsys):
    """A probe (2026-12-06): refine plot --out X --grid-out X wrote both to X, the drift picture lost."""
    tmp, train = trained
    sweep = tmp_path / "grid.json"
    sweep.write_text("{}")
    code, _, err = cli("refine", "plot", str(tmp / "run"), str(train), "--out", str(tmp_path / "same.png"),
                       "--sweep", str(sweep), "--grid-out", str(tmp_path / "same.png"), capsys=capsys)
    assert code == 2 and "--out and --grid-out are both" in err and not (tmp_path / "same.png").exists()
    # a probe (2026-12-07): --grid-out without --sweep was taken without a word, and no grid drawn
    code, _, err = cli("refine", "plot", str(tmp / "run"), str(train), "--out", str(tmp_path / "drift.png"),
                       "--grid-out", str(tmp_path / "grid.png"), capsys=capsys)
    assert code == 2 and "give the sweep with --sweep FILE" in err and not (tmp_path / "drift.png").exists()
    # the default --grid-out is checked before drawing, as a given one is (a review, 2026-12-07)
    (tmp_path / "refine-grid.png").write_bytes(b"a picture of mine")
    code, _, err = cli("refine", "plot", str(tmp / "run"), str(train), "--out", str(tmp_path / "drift.png"),
                       "--sweep", str(sweep), cwd=tmp_path, capsys=capsys)
    assert code == 2 and "--grid-out refine-grid.png exists and is not a picture mlsctl drew" in err, err
    assert not (tmp_path / "drift.png").exists() and (tmp_path / "refine-grid.png").read_bytes() == b"a picture of mine"


def test_the_refine_run_s_report_lists_the_evaluations_of_its_refined_features(trained, tmp_path, capsys):
    """A new user's run-through (2026-12-06): `report` of a refine run showed "0 evaluations of the run's weights"
    for an `eval recall` of features it refined."""
    tmp, train = trained
    cli_ok(capsys, "refine", "apply", str(tmp / "run"), str(train), "--out", str(tmp_path / "refined"))
    cli_ok(capsys, "eval", "recall", str(tmp_path / "refined"), "--out", str(tmp_path / "results" / "after.json"))
    stale = json.loads((tmp_path / "results" / "after.json").read_text())  # as if the run was trained again since
    stale["model"]["refiner"]["fingerprint"] = "0" * 64
    (tmp_path / "results" / "stale.json").write_text(json.dumps(stale))
    out, _ = cli_ok(capsys, "report", str(tmp / "run"), "--out", str(tmp_path / "r.html"), "--results",
                    str(tmp_path / "results"), "--json")
    assert [Path(p).name for p in json.loads(out)["results"]["own"]] == ["after.json"]
    assert [Path(p).name for p in json.loads(out)["results"]["unmatched"]] == ["stale.json"]
    assert "this run&#x27;s refiner at step 18, on the features of" in (tmp_path / "r.html").read_text()


def test_the_refine_recipe_without_data_root_asks_for_a_feature_folder(capsys):
    """A new user's probe (2026-12-06): `pretrain refine` asked for data.root=/path/to/images."""
    code, _, err = cli("pretrain", "refine", capsys=capsys)
    assert code == 2 and "data.root=FEATURES, a feature folder of mlsctl embed" in err and "images" not in err, err


def test_a_refinement_that_raises_its_own_training_loss_says_so(trained, capsys):
    """A new user's probe (2026-12-06): at the defaults on weak features the refined loss stayed above the
    unrefined one (ms_before) for the whole run, and nothing said so."""
    tmp, train = trained
    _, err = cli_ok(capsys, *_train_args(train, tmp / "wild", "optim.lr=5"))
    assert "stayed above the unrefined ones'" in err and "try a lower optim.lr" in err, err
    from types import SimpleNamespace

    from mlsctl.methods.refine.method import Refine

    below = [(0.70, 0.72)] * 6 + [(0.73, 0.72)] * 4  # above at 4 of 10 logged steps: helping, said nothing
    assert Refine._worse_notes(SimpleNamespace(logged_losses=below)) == []
    assert Refine._worse_notes(SimpleNamespace(logged_losses=[(0.8, 0.7)] * 4)) == []  # too few steps to tell
    assert len(Refine._worse_notes(SimpleNamespace(logged_losses=[(0.73, 0.72)] * 6))) == 1


def test_a_stopped_refine_run_says_the_refine_command_that_continues_it(trained, tmp_path, monkeypatch, capsys):
    """A review (2026-12-06): a refine train stopped mid-way said "continue with: mlsctl pretrain RUN/config.yaml
    --out RUN --resume", another command than the one the user typed. It now names refine train's own --resume,
    and that command, pasted as printed, continues the run to its end."""
    import shlex

    from conftest import full_disk_at_the_second_checkpoint
    from mlsctl.train import checkpoint

    _, train = trained
    run = tmp_path / "stopped run"  # a space: the command is quoted
    real_save = checkpoint.save_checkpoint
    full_disk_at_the_second_checkpoint(monkeypatch, run)
    code, _, err = cli(*_train_args(train, run), capsys=capsys)
    last = err.strip().splitlines()[-1]
    command = shlex.join(["refine", "train", str(train), "--out", str(run), "--resume"])
    assert code == 1 and last.endswith(f"step 4 ({run / 'checkpoints' / 'step-00000004'}); continue with: mlsctl "
                                       f"{command}"), err
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    _, err = cli_ok(capsys, *shlex.split(command))  # without --blocks, --k, --epochs: the run's config.yaml has them
    assert f"resuming {run} from step 4" in err and "done:" in err


def test_classes_of_one_embedding_and_steps_that_mined_no_pair_are_said(tmp_path, capsys):
    """A new user's probe (2026-12-07, of MS; refinement samples its batches alike): a class of fewer embeddings
    than method.positives_per_class is drawn again, two equal refined embeddings, and a step whose miner finds no
    pair teaches nothing. Both are said: the first before training, the second at its end, as metrics.jsonl
    counts them."""
    x = torch.nn.functional.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    train = _folder(tmp_path / "train", x, torch.arange(32))  # 32 classes of one embedding each
    _, err = cli_ok(capsys, *_train_args(train, tmp_path / "run"))
    text = " ".join(err.split())
    assert (f"data.root {train}: 32 of the 32 classes have fewer images than method.positives_per_class=2 (fewest: 1, "
            f"32 of a single image (no positive pair at all))") in text and "give classes of two images" in text, text
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    empty = sum(r["mined_positive_pairs"] <= 1 and r["mined_negative_pairs"] <= 1 for r in records)
    assert empty and (f"miner found too few pairs for a loss (none, or at most one positive and one negative pair) "
                      f"in {empty} of the {len(records)} steps") in text, text
